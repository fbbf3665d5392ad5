"""Precomputed latents (scaletrain/data/latents.py): `data encode` keeps every sample's key,
caption and metadata, stores the posterior and the text outputs, resumes after an interruption;
the loader gives the same latents and embeddings as the online path; bad input is one line."""

from __future__ import annotations

import itertools
import shutil
import tarfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as st_load

from scaletrain.config import ConfigError
from scaletrain.checks import load_run_config as load_config
from scaletrain.data import LoaderSpec, build_loader, write_synthetic_shards
from scaletrain.data.latents import (
    EMPTY_CAPTION_FILE,
    ENCODING_FILE,
    MANIFEST_FILE,
    MEMBER,
    check_precomputed,
    encode_dataset,
    read_encoding,
)
from scaletrain.diffusion.seeding import posterior_generators
from scaletrain.models import build_model

RECIPE = """
run: {{dir: {run}, seed: 0}}
model: {{preset: unet-tiny-latent}}
data: {{shards: {shards}, num_workers: 0, caption_dropout: 0.0}}
train:
  stages:
    - {{name: a, resolution: 32, steps: 2, micro_batch: 4}}
    - {{name: b, resolution: 64, steps: 2, micro_batch: 2}}
log: {{wandb: disabled}}
sample: {{at_end: false}}
"""


def _recipe(tmp: Path, shards: str, *sets: str, check_paths: bool = True):
    path = tmp / "recipe.yaml"
    path.write_text(RECIPE.format(run=tmp / "run", shards=shards))
    return load_config(path, list(sets), check_paths=check_paths)


def _members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("latents")
    shards = write_synthetic_shards(tmp / "img", num_samples=24, samples_per_shard=12, resolution=64, seed=0)
    cfg = _recipe(tmp, str(tmp / "img"), check_paths=False)
    summary = encode_dataset(cfg, str(tmp / "img"), tmp / "enc", [32, 64], batch_size=5, progress=False)
    return tmp, shards, cfg, summary


def test_encode_layout_keeps_keys_captions_metadata(encoded) -> None:
    tmp, shards, cfg, summary = encoded
    assert {r: (e["samples_written"], e["corrupt"]) for r, e in summary["resolutions"].items()} == {
        32: (24, 0), 64: (24, 0)}
    for res, side in ((32, 8), (64, 16)):
        folder = tmp / "enc" / f"{res}px"
        assert {p.name for p in folder.iterdir()} == {ENCODING_FILE, EMPTY_CAPTION_FILE, MANIFEST_FILE,
                                                      "shard-000000.tar", "shard-000001.tar"}
        enc = read_encoding(folder)
        assert enc.resolution == res and enc.scaling == (0.5, 0.0) and enc.info["vae_factor"] == 4
        for src in shards:
            before, after = _members(Path(src)), _members(folder / Path(src).name)
            keys = sorted({n.split(".")[0] for n in before})
            # every non-image member byte for byte, the image replaced by the latents member
            assert {n: b for n, b in before.items() if not n.endswith(".jpg")} == {
                n: b for n, b in after.items() if not n.endswith(MEMBER)}
            assert sorted(n.split(".")[0] for n in after if n.endswith(MEMBER)) == keys
            t = st_load(after[f"{keys[0]}.{MEMBER}"])
            assert t["mean"].shape == t["logvar"].shape == (4, side, side)
            assert t["cond.text_emb"].shape == (32, 32) and t["cond.text_emb"].dtype == torch.float32
            assert t["cond.text_mask"].shape == (32,)
            assert enc.info["conditioning"] == {"text_emb": [32, 32], "text_mask": [32]}


def _same_as_online(preset: str, shards: list[str], folder: Path) -> int:
    """Same keys and captions in the same order; the keyed posterior sample and every
    conditioning field match the online encoders (fp32, rtol 1e-5); a dropped caption takes the
    stored "". Returns how many captions were dropped."""
    enc = read_encoding(folder)
    common = dict(resolution=32, micro_batch=4, seed=0, num_workers=0, caption_dropout=0.3)
    online = list(itertools.islice(iter(build_loader(LoaderSpec(shards=shards, **common))), 6))
    pre_urls = [str(folder / Path(s).name) for s in shards]
    pre = list(itertools.islice(iter(build_loader(LoaderSpec(shards=pre_urls, precomputed=True,
                                                             empty_cond=enc.empty_caption(), **common))), 6))
    torch.manual_seed(0)
    model = build_model(preset, encoder_seed=0)
    dropped = 0
    for step, (a, b) in enumerate(zip(online, pre)):
        assert a["keys"] == b["keys"] and a["captions"] == b["captions"] and "pixels" not in b
        dropped += a["captions"].count("")
        x_online = model.encode_images(a["pixels"], posterior_generators(0, step, a["keys"]))
        mean, logvar = b["latents"].chunk(2, dim=1)
        x_pre = model.latents_from_posterior(mean, logvar, posterior_generators(0, step, b["keys"]),
                                             scaling=enc.scaling)
        torch.testing.assert_close(x_pre, x_online, rtol=1e-5, atol=1e-6)
        assert torch.equal(a["geometry"], b["geometry"])  # each image's original size and crop (SDXL's time_ids)
        cond = model.encode_text(a["captions"], "cpu")
        assert b["cond"].keys() == cond.keys() == model.preset.conditioner.fields().keys()
        for k, v in cond.items():
            torch.testing.assert_close(b["cond"][k], v, rtol=1e-5, atol=1e-6, msg=k)
    return dropped


def test_precomputed_batches_give_the_online_latents_and_embeddings(encoded) -> None:
    tmp, shards, cfg, _ = encoded
    assert _same_as_online("unet-tiny-latent", shards, tmp / "enc" / "32px") > 0  # the dropout path ran


def test_precomputed_conditioning_of_a_family_with_several_encoders(encoded) -> None:
    """SDXL's two CLIPs: both encoders' states, the pooled vector, and a dropped caption's zeros
    (SDXL's unconditional conditioning) come back from the shards as the online path makes them."""
    tmp, shards, _, _ = encoded
    cfg = _recipe(tmp, str(tmp / "img"), "model.preset=sdxl-tiny", check_paths=False)
    encode_dataset(cfg, str(tmp / "img"), tmp / "enc-sdxl", [32], batch_size=8, progress=False)
    folder = tmp / "enc-sdxl" / "32px"
    assert read_encoding(folder).info["conditioning"] == {"text_emb": [32, 32], "text_mask": [32], "pooled": [16]}
    empty = read_encoding(folder).empty_caption()
    assert not empty["text_emb"].any() and not empty["pooled"].any()
    assert _same_as_online("sdxl-tiny", shards, folder) > 0


def test_encode_resumes_from_the_shards_it_finished(encoded, tmp_path) -> None:
    tmp, shards, cfg, _ = encoded
    out = tmp_path / "enc"
    shutil.copytree(tmp / "enc", out)
    folder = out / "32px"
    first = (folder / "shard-000001.tar").read_bytes()
    # an interrupted run: shard 1 was being written, the manifest not yet
    (folder / "shard-000001.tar").unlink()
    (folder / "shard-000001.tar.partial").write_bytes(b"half a tar")
    (folder / MANIFEST_FILE).unlink()
    with pytest.raises(ConfigError, match="not completely encoded .* rerun the same"):
        _recipe(tmp_path, str(out))
    summary = encode_dataset(cfg, str(tmp / "img"), out, [32, 64], batch_size=7, progress=False)
    assert summary["resolutions"][32]["shards_written"] == 1 and summary["resolutions"][32]["shards_resumed"] == 1
    assert summary["resolutions"][64]["shards_written"] == 0
    assert (folder / "shard-000001.tar").read_bytes() == first  # deterministic, batch size independent
    assert not (folder / "shard-000001.tar.partial").exists()
    assert check_precomputed(_recipe(tmp_path, str(out))) is not None


def test_bad_precomputed_input_is_one_line(encoded, tmp_path) -> None:
    tmp, shards, cfg, _ = encoded
    enc = str(tmp / "enc")
    cases = [
        ([f"data.shards=[{tmp}/enc/32px/shard-000000.tar, {shards[1]}]", "train.stages=[{name: a, resolution: 32, "
          "steps: 2, micro_batch: 4}]"], r"data.shards mixes precomputed latents .*32px.* and image shards"),
        ([f"data.shards={tmp}/enc/32px"], r"data.shards: .*32px was encoded at resolution 32 but this stage trains "
         r"at 64; encode at this resolution with `scaletrain data encode --resolution 64`"),
        ([f"data.shards={enc}", "run.seed=1"], r"encoded with text_encoder='random-init:.*:seed=0' but this recipe "
         r"has 'random-init:.*:seed=1'"),
        ([f"data.shards={enc}", "model.preset=unet-tiny"], r"encoded with preset='unet-tiny-latent'"),
        ([f"data.shards={enc}", "data.precomputed=false"], r"data.precomputed is false but data.shards holds "
         "precomputed latents"),
        ([f"data.shards={tmp}/img", "data.precomputed=true"], r"data.precomputed is true but data.shards holds image "
         "shards; encode them with `scaletrain data encode"),
        ([f"data.shards={enc}", f"train.stages.1.data={{shards: {tmp}/img}}"], r"data.shards holds precomputed "
         r"latents but train.stages.1.data.shards holds images"),
        ([f"data.shards={enc}", "validate.at_end=true"], r"validate.shards must name image shards"),
        ([f"data.shards={enc}", "data.buckets.enabled=true"], r"was encoded at resolution 32 but this stage trains "
         r"at 32 with data.buckets"),
    ]
    for sets, needle in cases:
        with pytest.raises(ConfigError, match=needle) as err:
            _recipe(tmp_path, enc, *sets)
        assert "\n" not in str(err.value)
    # encoding into a folder written by another recipe, or encoding latents again
    other = _recipe(tmp_path, enc, "run.seed=1", check_paths=False)
    with pytest.raises(ValueError, match=r"--out: .*32px holds latents encoded differently \(text_encoder"):
        encode_dataset(other, str(tmp / "img"), tmp / "enc", [32], progress=False)
    with pytest.raises(ValueError, match=r"--shards: .* is already encoded"):
        encode_dataset(cfg, f"{tmp}/enc/32px", tmp_path / "again", [32], progress=False)
    pixel = _recipe(tmp_path, enc, "model.preset=unet-tiny", check_paths=False)
    with pytest.raises(ValueError, match=r"model.preset='unet-tiny' trains in pixel space; data encode is for"):
        encode_dataset(pixel, str(tmp / "img"), tmp_path / "pix", [32], progress=False)


def test_training_on_latents_builds_no_encoders_until_sampling(encoded) -> None:
    """build_model(encoders=False) defers them; the lazily built ones equal the eager ones (their
    own seed), so a sample grid after precomputed training uses the encoders that encoded it."""
    torch.manual_seed(0)
    eager = build_model("unet-tiny-latent", encoder_seed=3)
    torch.manual_seed(0)
    lazy = build_model("unet-tiny-latent", encoders=False, encoder_seed=3)
    assert not lazy.encoders_built
    for a, b in zip(eager.denoiser.parameters(), lazy.denoiser.parameters()):
        assert torch.equal(a, b)  # the denoiser does not depend on whether encoders were built
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(lazy.encode_posterior(x), eager.encode_posterior(x), rtol=0, atol=0)
    assert lazy.encoders_built
