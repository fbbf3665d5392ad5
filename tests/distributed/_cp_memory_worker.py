"""Worker for test_context_parallel: per-rank activation memory of one training forward of a
wan-tiny clip, without and with context parallelism (K = world size), through scaletrain's own
``enable_context_parallel``. Activation memory = bytes of the tensors autograd saves for backward
(``saved_tensors_hooks``), parameters excluded: what a rank holds between forward and backward,
measured exactly on any device (no allocator noise). Prints one JSON line per rank."""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

from scaletrain.models.context_parallel import enable_context_parallel
from scaletrain.models.registry import Denoiser, build_denoiser_net, get_preset


def saved_bytes(den: Denoiser, x: torch.Tensor, emb: torch.Tensor) -> tuple[int, torch.Tensor]:
    params = {p.untyped_storage().data_ptr() for p in den.parameters()}
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        if t.untyped_storage().data_ptr() not in params:
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = den(x, torch.tensor([500.0]), emb, None)
        loss = out.float().pow(2).mean()
    loss.backward()
    return total, out.detach()


def main() -> None:
    frames, side = int(sys.argv[1]), int(sys.argv[2])
    dist.init_process_group("gloo")
    preset = get_preset("wan-tiny")
    torch.manual_seed(0)
    ref = Denoiser(build_denoiser_net(preset), preset.family, use_text_mask=False)
    cp = Denoiser(build_denoiser_net(preset), preset.family, use_text_mask=False)
    cp.load_state_dict(ref.state_dict())
    g = torch.Generator().manual_seed(1)
    x, emb = torch.randn(1, 3, frames, side, side, generator=g), torch.randn(1, 32, 32, generator=g)
    full, want = saved_bytes(ref, x, emb)
    enable_context_parallel(cp, dist.get_world_size(), torch.device("cpu"))
    split, got = saved_bytes(cp, x, emb)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    print(json.dumps({"rank": dist.get_rank(), "tokens": frames * (side // 2) ** 2, "k1_bytes": full,
                      "k2_bytes": split, "ratio": split / full}), flush=True)
    del cp
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
