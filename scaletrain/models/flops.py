"""Analytic training FLOPs per model family, and the device peak that MFU divides by.

The count is per image of the trainable denoiser only (frozen text encoder and VAE are
excluded, as MFU conventions do), forward + backward = 3 x forward:

- Conv2d: ``2 * k_h * k_w * (C_in / groups) * C_out * H_out * W_out``
- Linear: ``2 * in * out * tokens`` (tokens: every position the layer is applied to)
- Attention core (QK^T and AV): ``4 * N * M * d`` (N query tokens, M key tokens, d = heads x head dim;
  joint MMDiT attention: N = M = image + text tokens)

Normalisation, activations and other element-wise work are not counted (they are memory-
bound, and leaving them out is the usual MFU convention). ``layer_flops`` applies these
formulas to every layer of a preset: shapes are read by hooks during one forward on the
meta device (no memory, no compute), so the same walker covers every UNet and DiT config.
For the DiT family ``dit_forward_flops`` is the closed form (per-token matmuls plus
attention); tests check the two against each other and against torch's FlopCounterMode.
"""

from __future__ import annotations

import functools
import math
import time

import torch
from torch import nn

# Dense (no sparsity) peak TFLOP/s per GPU, from the vendors' data sheets. Matched by
# substring of torch.cuda.get_device_name(), most specific first. fp32 is plain FP32 (torch
# does not use TF32 for matmuls unless asked).
GPU_PEAK_TFLOPS: list[tuple[str, str, dict[str, float]]] = [
    ("H100 PCIe", "NVIDIA H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "fp32": 51.2}),
    ("H100 NVL", "NVIDIA H100 NVL", {"bf16": 835.0, "fp16": 835.0, "fp32": 60.0}),
    ("H100", "NVIDIA H100 SXM", {"bf16": 989.4, "fp16": 989.4, "fp32": 66.9}),
    ("H200", "NVIDIA H200", {"bf16": 989.4, "fp16": 989.4, "fp32": 66.9}),
    ("H800", "NVIDIA H800 SXM", {"bf16": 989.4, "fp16": 989.4, "fp32": 66.9}),
    ("B200", "NVIDIA B200", {"bf16": 2250.0, "fp16": 2250.0, "fp32": 75.0}),
    ("A100", "NVIDIA A100", {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5}),
    ("L40S", "NVIDIA L40S", {"bf16": 362.1, "fp16": 362.1, "fp32": 91.6}),
    ("L4", "NVIDIA L4", {"bf16": 121.0, "fp16": 121.0, "fp32": 30.3}),
    ("A10", "NVIDIA A10", {"bf16": 125.0, "fp16": 125.0, "fp32": 31.2}),
    # fp16-only tensor cores (no bf16): what engine.precision=fp16 is for
    ("V100", "NVIDIA V100 SXM2", {"fp16": 125.0, "fp32": 15.7}),
    ("T4", "NVIDIA T4", {"fp16": 65.0, "fp32": 8.1}),
]


# engine.precision=fp8 is measured against the bf16 peak, torchtitan's convention: fp8 MFU over
# bf16 MFU is then the speed-up, and a Linear-only fp8 run is never held to a peak its other
# layers cannot reach.
PEAK_AS = {"fp8": "bf16"}


def gpu_peak_tflops(device_name: str, precision: str) -> tuple[float, str] | None:
    """(peak, label) for a known GPU name, else None."""
    precision = PEAK_AS.get(precision, precision)
    for key, label, peaks in GPU_PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            if precision not in peaks:
                return None  # e.g. bf16 on a V100: no data-sheet figure, measure instead
            return peaks[precision], f"table: {label} {precision} dense"
    return None


@functools.lru_cache(maxsize=None)
def measured_matmul_tflops(precision: str, size: int = 1024, reps: int = 5) -> float:
    """This process's matmul ceiling (median of ``reps``), at its current thread count.

    Used on CPU (and unknown GPUs): there is no data-sheet number for "2 cores of whatever
    the cloud gave us", and under torchrun each rank gets OMP_NUM_THREADS=1, so the
    per-rank peak is what that rank can actually reach.
    """
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(PEAK_AS.get(precision, precision), torch.float32)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    a = torch.randn(size, size, dtype=dtype, device=dev)
    b = torch.randn(size, size, dtype=dtype, device=dev)
    times = []
    for _ in range(reps + 1):  # first one warms up the kernels/threads
        if dev == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if dev == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    times = sorted(times[1:])
    return 2 * size**3 / times[len(times) // 2] / 1e12


def device_peak_tflops(device: torch.device, precision: str, override: float | None = None) -> tuple[float, str]:
    """The peak MFU divides by, and where it came from (given / table / measured)."""
    if override:
        return override, "given"
    precision = PEAK_AS.get(precision, precision)
    if device.type == "cuda":
        known = gpu_peak_tflops(torch.cuda.get_device_name(device), precision)
        if known is not None:
            return known
    return measured_matmul_tflops(precision), f"measured: {precision} matmul 1024^3, {torch.get_num_threads()} threads"


# ----------------------------------------------------------------------------- counting


def _text_dims(preset) -> tuple[int, int]:
    """(tokens, width) of the text embedding the denoiser is conditioned on."""
    from scaletrain.models.family import get_family

    return preset.max_text_len, get_family(preset.family).text_width(preset.denoiser_config)


def denoiser_input_size(preset, resolution: int) -> int:
    """Side of the tensor the denoiser sees: pixels, or latents (the VAE's factor: 8 for SD's)."""
    return resolution // preset.vae_factor


# An image size: the side of a square, or (height, width) for aspect-ratio buckets.
ImageSize = int | tuple[int, int]


def _height_width(size: ImageSize) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


@functools.lru_cache(maxsize=None)
def layer_flops(preset_name: str, resolution: ImageSize, frames: int = 0) -> dict[str, int]:
    """Forward FLOPs per image of ``resolution`` (a square's side, or (height, width)) by layer
    kind ({"conv", "linear", "attention"}), by the formulas above. ``frames`` > 0 (video
    presets): per clip of that many frames (the denoiser sees the VAE's latent frames)."""
    from diffusers.models.attention import AttentionModuleMixin
    from diffusers.models.attention_processor import Attention

    from scaletrain.models.registry import Denoiser, build_denoiser_net, get_preset

    preset = get_preset(preset_name)
    with torch.device("meta"):
        net = build_denoiser_net(preset)
    den = Denoiser(net, preset.family, use_text_mask=False, pixel_factor=preset.vae_factor)
    counts = {"conv": 0, "linear": 0, "attention": 0}

    def conv_hook(m: nn.Conv2d | nn.Conv3d, args, out) -> None:  # per output position: kernel x in x out MACs
        counts["conv"] += (2 * math.prod(m.kernel_size) * (m.in_channels // m.groups) * m.out_channels
                           * math.prod(out.shape[2:]))

    def linear_hook(m: nn.Linear, args, out) -> None:
        counts["linear"] += 2 * m.in_features * m.out_features * (args[0].numel() // m.in_features)

    def attn_hook(m: Attention, args, kwargs, out) -> None:
        h = kwargs.get("hidden_states", args[0] if args else None)
        ctx = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        n = h.shape[-2] * h.shape[-1] if h.ndim == 4 else h.shape[1]  # (B,C,H,W) or (B,N,C)
        if ctx is None:  # self-attention
            q_tok = k_tok = n
        elif getattr(m, "added_kv_proj_dim", None) is not None:  # joint (MMDiT): both streams, both ways
            q_tok = k_tok = n + ctx.shape[1]
        else:  # cross-attention to the text
            q_tok, k_tok = n, ctx.shape[1]
        counts["attention"] += 4 * q_tok * k_tok * m.inner_dim

    hooks = []
    for mod in den.modules():
        if isinstance(mod, (nn.Conv2d, nn.Conv3d)):
            hooks.append(mod.register_forward_hook(conv_hook))
        elif isinstance(mod, nn.Linear):
            hooks.append(mod.register_forward_hook(linear_hook))
        elif isinstance(mod, (Attention, AttentionModuleMixin)):  # the classic and the newer (Flux) attention
            hooks.append(mod.register_forward_hook(attn_hook, with_kwargs=True))
    height, width_px = (denoiser_input_size(preset, side) for side in _height_width(resolution))
    clip = (preset.latent_frames(frames),) if frames else ()
    x = torch.zeros(1, preset.in_channels, *clip, height, width_px, device="meta")
    t = torch.zeros(1, dtype=torch.long, device="meta")
    with torch.no_grad():
        den(x, t, preset.conditioner.example(1, device="meta"))
    for hk in hooks:
        hk.remove()
    return counts


def forward_flops_per_image(preset_name: str, resolution: ImageSize, frames: int = 0) -> int:
    return sum(layer_flops(preset_name, resolution, frames).values())


def train_flops_per_image(preset_name: str, resolution: ImageSize, frames: int = 0) -> int:
    """Forward + backward of the denoiser for one image (``frames`` > 0: one clip): backward is
    2x forward (grads wrt inputs and wrt weights), so 3x forward."""
    return 3 * forward_flops_per_image(preset_name, resolution, frames)


def dit_forward_flops(*, layers: int, hidden: int, patch: int, in_channels: int, out_channels: int,
                      size: int, text_tokens: int, text_width: int, mlp_ratio: int = 4) -> int:
    """Closed form for a PixArt-style DiT block stack, per image.

    Per layer, N image tokens, L text tokens, d hidden: projections 2N(4d^2 self-attn q/k/v/o +
    2d^2 cross-attn q/o + 2*mlp_ratio*d^2 MLP) + 2L*2d^2 (cross-attn k/v of the text) +
    attention 4N^2 d (self) + 4NLd (cross). Plus patch embedding, caption projection (2 linears),
    timestep MLP + adaLN-single (per image, not per token) and the output projection.
    """
    d, n, L = hidden, (size // patch) ** 2, text_tokens
    per_layer = 2 * n * (4 + 2 + 2 * mlp_ratio) * d * d + 2 * L * 2 * d * d + 4 * n * n * d + 4 * n * L * d
    embed = 2 * patch * patch * in_channels * d * n
    caption = 2 * L * (text_width * d + d * d)
    time_embed = 2 * (256 * d + d * d) + 2 * d * 6 * d
    out = 2 * n * d * patch * patch * out_channels
    return layers * per_layer + embed + caption + time_embed + out
