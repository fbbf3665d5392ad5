"""Diffusion-DPO pieces on one process: the loss against hand-computed values and its gradient
direction, the shared noise/timestep of a pair, and preference-pair shards and their loader."""

from __future__ import annotations

import io
import json
import math
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from scaletrain.data.pairs import build_pair_loader
from scaletrain.data.pipeline import LoaderSpec
from scaletrain.data.synth import COLORS, POSITIONS, write_tar_shard
from scaletrain.data.synth_pairs import make_preference_pair, write_preference_shards
from scaletrain.diffusion.dpo import diffusion_dpo_loss, prepare_pair_batch
from scaletrain.diffusion import build_objective


def test_loss_matches_hand_computed_values():
    # beta=10: z = -5 * ((0.5 - 0.7) - (0.6 - 0.6)) = 1.0; loss = log(1 + e^-1)
    t = lambda v: torch.tensor([v])  # noqa: E731
    out = diffusion_dpo_loss(t(0.5), t(0.7), t(0.6), t(0.6), beta=10.0)
    assert out.loss.item() == pytest.approx(math.log1p(math.exp(-1.0)), rel=1e-6)
    assert out.margin.item() == pytest.approx(1.0)
    assert out.reward_chosen.item() == pytest.approx(0.5) and out.reward_rejected.item() == pytest.approx(-0.5)
    pairs, correct, margin, chosen, rejected = out.sums()
    assert (pairs, correct) == (1.0, 1.0) and margin == pytest.approx(1.0)
    # A pair the policy gets wrong: z = -5 * ((0.7 - 0.5) - 0) = -1 -> loss log(1 + e), not counted correct.
    wrong = diffusion_dpo_loss(t(0.7), t(0.5), t(0.6), t(0.6), beta=10.0)
    assert wrong.loss.item() == pytest.approx(math.log1p(math.e), rel=1e-6) and wrong.sums()[1] == 0.0


def test_policy_equal_to_reference_is_log2_and_half_accuracy():
    e = torch.tensor([0.3, 0.9, 0.1])
    out = diffusion_dpo_loss(e, e.flip(0), e, e.flip(0), beta=5000.0)
    assert out.loss.item() == pytest.approx(math.log(2.0))
    assert out.sums()[:3] == [3.0, 1.5, 0.0]  # ties count one half, as in diffusers' implicit_acc


def test_gradient_lowers_chosen_error_and_raises_rejected_error():
    model_w = torch.tensor([0.4, 0.8], requires_grad=True)
    model_l = torch.tensor([0.5, 0.2], requires_grad=True)
    ref = torch.tensor([0.45, 0.45])
    diffusion_dpo_loss(model_w, model_l, ref, ref, beta=20.0).loss.backward()
    # Gradient descent moves against the gradient: chosen errors down, rejected errors up.
    assert (model_w.grad > 0).all() and (model_l.grad < 0).all()
    # The reference gets no gradient even when it requires one.
    ref_w = torch.tensor([0.45], requires_grad=True)
    diffusion_dpo_loss(torch.tensor([0.4], requires_grad=True), torch.tensor([0.5]), ref_w, ref_w, 1.0).loss.backward()
    assert ref_w.grad is None


def test_loss_rejects_bad_inputs():
    e = torch.zeros(2)
    with pytest.raises(ValueError, match="dpo.beta"):
        diffusion_dpo_loss(e, e, e, e, beta=0.0)
    with pytest.raises(ValueError, match="share one shape"):
        diffusion_dpo_loss(e, torch.zeros(3), e, e, beta=1.0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_pair_shares_noise_and_timestep_and_is_layout_invariant(prediction_type):
    objective = build_objective("ddpm", {"prediction_type": prediction_type, "noise_offset": 0.1})
    sched = objective.noise_scheduler
    g = torch.Generator().manual_seed(0)
    chosen, rejected = torch.rand(3, 3, 8, 8, generator=g), torch.rand(3, 3, 8, 8, generator=g)
    keys = ["a", "b", "c"]
    tb = prepare_pair_batch(chosen, rejected, keys, step=7, seed=1, objective=objective)
    noisy, t, target = tb.noisy, tb.t, tb.target
    assert torch.equal(t[:3], t[3:]) and len(set(t[:3].tolist())) > 1  # per pair shared, across pairs not
    # noisy = sqrt(ab) x0 + sqrt(1 - ab) eps with one eps per pair: the difference is the images' alone.
    ab = sched.alphas_cumprod[t[:3]].view(-1, 1, 1, 1)
    assert torch.allclose(noisy[:3] - noisy[3:], ab.sqrt() * (chosen - rejected), atol=1e-5)
    if prediction_type == "epsilon":
        assert torch.equal(target[:3], target[3:])
    # Pair "b" alone on another "rank" draws exactly what it drew inside the batch.
    one = prepare_pair_batch(chosen[1:2], rejected[1:2], ["b"], step=7, seed=1, objective=objective)
    n1, t1, y1 = one.noisy, one.t, one.target
    assert torch.equal(t1, t[[1, 4]]) and torch.equal(n1, noisy[[1, 4]]) and torch.equal(y1, target[[1, 4]])
    other_step = prepare_pair_batch(chosen, rejected, keys, step=8, seed=1, objective=objective)
    assert not torch.equal(other_step.noisy, noisy)


def _color_at(image_bytes: bytes, position: str, resolution: int) -> tuple[int, int, int]:
    fx, fy, _ = POSITIONS[position]
    with Image.open(io.BytesIO(image_bytes)) as im:
        return im.convert("RGB").getpixel((int(fx * resolution), int(fy * resolution)))


def test_synthetic_pairs_follow_the_rule():
    for i in range(12):
        pair = make_preference_pair(i, seed=3, resolution=32, image_format="png")
        meta = json.loads(pair["json"])
        chosen, rejected = meta["chosen"], meta["rejected"]
        assert pair["txt"] == meta["caption"] and chosen["color"] in pair["txt"] and chosen["shape"] in pair["txt"]
        assert chosen["shape"] == rejected["shape"]
        if meta["rule"] == "wrong_color":
            assert rejected["color"] != chosen["color"] and rejected["position"] == chosen["position"]
        else:
            assert rejected["position"] != chosen["position"] and rejected["color"] == chosen["color"]
        # The chosen image has the caption's colour where the caption puts the shape (png: exact).
        assert _color_at(pair["chosen.png"], chosen["position"], 32) == COLORS[chosen["color"]]
        assert _color_at(pair["rejected.png"], chosen["position"], 32) != COLORS[chosen["color"]]


def test_pair_shards_are_deterministic_and_load_across_ranks(tmp_path):
    a = write_preference_shards(tmp_path / "a", num_pairs=24, pairs_per_shard=6, resolution=16)
    b = write_preference_shards(tmp_path / "b", num_pairs=24, pairs_per_shard=6, resolution=16)
    assert [open(x, "rb").read() for x in a] == [open(x, "rb").read() for x in b]
    assert tarfile.open(a[0]).getnames()[:4] == ["000000000.chosen.jpg", "000000000.rejected.jpg",
                                                 "000000000.txt", "000000000.json"]
    seen = []
    for rank in range(2):
        spec = LoaderSpec(shards=a, resolution=16, micro_batch=3, num_workers=0, rank=rank, world_size=2)
        it = iter(build_pair_loader(spec))
        batches = [next(it) for _ in range(4)]  # 12 pairs per rank = one epoch
        for batch in batches:
            assert batch["pixels_chosen"].shape == batch["pixels_rejected"].shape == (3, 3, 16, 16)
            assert not torch.equal(batch["pixels_chosen"], batch["pixels_rejected"])
            seen += batch["keys"]
        # Resume: skipping two batches continues exactly where the stream was.
        resumed = next(iter(build_pair_loader(LoaderSpec(**{**spec.__dict__, "skip_batches": 2}))))
        assert resumed["keys"] == batches[2]["keys"]
        assert torch.equal(resumed["pixels_rejected"], batches[2]["pixels_rejected"])
    assert sorted(seen) == [f"{i:09d}" for i in range(24)]  # every pair once per epoch


def test_pair_missing_a_side_or_corrupt_is_skipped_and_counted(tmp_path):
    good = [make_preference_pair(i, seed=0, resolution=16) for i in range(3)]
    no_rejected = {k: v for k, v in make_preference_pair(3, 0, 16).items() if not k.startswith("rejected")}
    bad_bytes = {**make_preference_pair(4, 0, 16), "chosen.jpg": b"not a jpeg"}
    png = make_preference_pair(5, seed=0, resolution=16, image_format="png")  # other extensions decode too
    write_tar_shard(tmp_path / "pairs.tar", [good[0], no_rejected, good[1], bad_bytes, good[2], png])
    spec = LoaderSpec(shards=[str(tmp_path / "pairs.tar")], resolution=16, micro_batch=4, num_workers=0)
    batch = next(iter(build_pair_loader(spec)))
    assert batch["keys"] == ["000000000", "000000001", "000000002", "000000005"]
    assert batch["skipped"] == 2
    assert np.isfinite(batch["pixels_chosen"].numpy()).all()


def test_pair_loader_applies_metadata_filters(tmp_path):
    from scaletrain.data.filters import FilterSpec

    shards = write_preference_shards(tmp_path, num_pairs=16, pairs_per_shard=16, resolution=16)
    captions = [make_preference_pair(i, 0, 16)["txt"] for i in range(16)]
    keep = [f"{i:09d}" for i, c in enumerate(captions) if len(c) >= 28]
    assert 0 < len(keep) < 16  # the threshold splits this set
    spec = LoaderSpec(shards=shards, resolution=16, micro_batch=len(keep), num_workers=0,
                      filters=FilterSpec(min_caption_chars=28))
    batch = next(iter(build_pair_loader(spec)))
    assert batch["keys"] == keep
    # Drops are counted in the batch they precede (those after its last pair go to the next one).
    last = int(keep[-1])
    assert batch["filtered"] == {"caption_min_chars": sum(len(c) < 28 for c in captions[:last])}
