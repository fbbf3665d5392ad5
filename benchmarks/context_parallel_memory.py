"""Context parallelism: per-rank activation memory of one training forward at K = world size vs
K = 1, for clips of several lengths and sizes, in one run.

Run under a launcher, one process per rank (K = the number of ranks)::

    torchrun --standalone --nproc_per_node 2 benchmarks/context_parallel_memory.py \\
        --preset wan-tiny --clips 1x32 5x32 9x32 17x32 9x64 \\
        --out benchmarks/results/cpu_context_parallel_memory.json

For each clip (FRAMESxSIDE pixels) every rank builds the preset's denoiser twice from one seed:
the baseline is the plain network (every rank computes the whole clip, K = 1), the measured one
goes through scaletrain's ``enable_context_parallel`` (diffusers' plan, Ulysses attention over
all ranks). Activation memory = the bytes of the tensors autograd saves for backward during the
forward and loss (``saved_tensors_hooks``), parameters excluded: what a rank holds between
forward and backward, exact on any device (no allocator rounding, no other process's noise),
so a CPU run gives the ratio a GPU run has for the same shapes; what it leaves out (temporaries
freed inside an op, the all-to-all buffers while they fly) is the same at every K. Both
forwards' outputs are checked to agree (1e-5). A Markdown summary is written next to the JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from scaletrain.models.context_parallel import enable_context_parallel  # noqa: E402
from scaletrain.models.registry import Denoiser, build_denoiser_net, get_preset  # noqa: E402


def saved_bytes(den: Denoiser, x: torch.Tensor, cond: dict[str, torch.Tensor]) -> tuple[int, torch.Tensor]:
    """Bytes autograd saves for backward in one forward + loss (parameters excluded), and the output."""
    params = {p.untyped_storage().data_ptr() for p in den.parameters()}
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        if t.untyped_storage().data_ptr() not in params:
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = den(x, torch.tensor([500.0] * x.shape[0]), cond)
        loss = out.float().pow(2).mean()
    loss.backward()
    return total, out.detach()


def measure(preset_name: str, frames: int, side: int, k: int) -> dict:
    preset = get_preset(preset_name)
    torch.manual_seed(0)
    ref = Denoiser(build_denoiser_net(preset), preset.family, use_text_mask=False)
    cp = Denoiser(build_denoiser_net(preset), preset.family, use_text_mask=False)
    cp.load_state_dict(ref.state_dict())
    g = torch.Generator().manual_seed(1)
    s = side // preset.vae_factor
    x = torch.randn(1, preset.in_channels, preset.latent_frames(frames), s, s, generator=g)
    cond = preset.conditioner.example(1, generator=g)
    full, want = saved_bytes(ref, x, cond)
    enable_context_parallel(cp, k, torch.device("cpu"))
    split, got = saved_bytes(cp, x, cond)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    del cp
    return {"frames": frames, "side": side, "tokens": preset.tokens(side, side, frames), "k1_bytes": full,
            "k_bytes": split, "ratio": split / full}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="wan-tiny")
    ap.add_argument("--clips", nargs="+", default=["9x32"], metavar="FRAMESxSIDE")
    ap.add_argument("--out", default=None, help="JSON (+ .md beside it); rank 0 writes it")
    args = ap.parse_args()
    dist.init_process_group("gloo")
    k, rank = dist.get_world_size(), dist.get_rank()
    rows = []
    for clip in args.clips:
        frames, side = (int(v) for v in clip.split("x"))
        rows.append({"rank": rank, **measure(args.preset, frames, side, k)})
        print(json.dumps(rows[-1]), flush=True)
    dist.barrier()
    dist.destroy_process_group()
    if rank == 0 and args.out:
        command = "torchrun --standalone --nproc_per_node {} benchmarks/context_parallel_memory.py {}".format(
            k, " ".join(sys.argv[1:]))
        result = {"command": command, "preset": args.preset, "context_parallel": k, "host": platform.node(),
                  "torch": torch.__version__, "rows": rows}
        out = Path(args.out)
        out.write_text(json.dumps(result, indent=1) + "\n")
        lines = [f"# Context parallelism: activation memory per rank, K={k} vs K=1 ({args.preset})", "",
                 f"Written by `{command}`.", "",
                 "Bytes autograd saves for backward in one forward + loss, parameters excluded (exact, not "
                 "allocator-measured); rank 0 (every rank holds the same share).", "",
                 "| frames | side px | tokens | K=1 MiB | K={} MiB | ratio |".format(k), "|---|---|---|---|---|---|"]
        lines += [f"| {r['frames']} | {r['side']} | {r['tokens']:,} | {r['k1_bytes'] / 2**20:.1f} | "
                  f"{r['k_bytes'] / 2**20:.1f} | {r['ratio']:.3f} |" for r in rows]
        out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
