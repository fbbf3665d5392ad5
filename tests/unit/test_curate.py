"""Curation (scaletrain/curate): exact filter counts against the synth metadata read by hand, caption
rewrite keeping the original, the safety gate's flagged rate (shards and validation), and an
aesthetic head that beats the mean predictor on held-out rated images."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from scaletrain.cli import main as cli_main
from tests.conftest import shard_pattern


def _read_tars(paths: list[Path]) -> list[dict]:
    """Samples {"__key__", ext: bytes} straight from the tars (no scaletrain reader)."""
    samples: dict[str, dict] = {}
    for path in paths:
        with tarfile.open(path) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, {"__key__": key})[ext] = tar.extractfile(m).read()
    return list(samples.values())


def _out_samples(out: Path) -> list[dict]:
    manifest = json.loads((out / "manifest.json").read_text())
    return _read_tars([out / name for name in manifest["shards"]])


# --------------------------------------------------------------------------- filter


def _expected_rule(meta: dict, caption: str) -> str | None:
    """The test's own reading of the thresholds used below (first failing, in report order)."""
    if meta["aesthetic"] < 5.0:
        return "aesthetic"
    if meta["punsafe"] > 0.15:
        return "punsafe"
    if meta["pwatermark"] > 0.3:
        return "pwatermark"
    if len(caption) > 32:
        return "caption_max_chars"
    return None


def test_filter_exact_counts_per_rule(synth_shards, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    # pwatermark comes from the recipe's data.filters, the rest from flags (flags override the recipe).
    recipe.write_text("data:\n  filters:\n    max_pwatermark: 0.3\n    min_aesthetic: 9.0\n")
    out = tmp_path / "filtered"
    args = ["curate", "filter", "--shards", shard_pattern(synth_shards), "--config", str(recipe),
            "--min-aesthetic", "5", "--max-punsafe", "0.15", "--max-caption-chars", "32"]
    assert cli_main([*args, "--out", str(out)]) == 0

    inputs = _read_tars(sorted(synth_shards.glob("shard-*.tar")))
    expected = {"aesthetic": 0, "punsafe": 0, "pwatermark": 0, "caption_max_chars": 0}
    kept_keys = []
    for s in inputs:
        rule = _expected_rule(json.loads(s["json"]), s["txt"].decode())
        if rule is None:
            kept_keys.append(s["__key__"])
        else:
            expected[rule] += 1
    assert all(v > 0 for v in expected.values()) and 0 < len(kept_keys) < len(inputs)  # every rule bites

    report = json.loads((out / "report.json").read_text())
    assert report["input"] == {"shards": 8, "samples": 256}
    assert report["dropped"] == expected
    assert report["kept"] == len(kept_keys) and report["corrupt"] == 0
    assert report["kept"] + report["dropped_total"] == 256
    out_samples = _out_samples(out)
    assert [s["__key__"] for s in out_samples] == kept_keys  # input order, each once
    by_key = {s["__key__"]: s for s in inputs}
    assert all(s["jpg"] == by_key[s["__key__"]]["jpg"] for s in out_samples)  # images untouched
    assert "| dropped: pwatermark |" in (out / "report.md").read_text()
    assert not (tmp_path / "filtered.partial").exists()

    # Same inputs -> byte-identical shards; --per-shard repacks the same samples.
    assert cli_main([*args, "--out", str(tmp_path / "again")]) == 0
    for name in json.loads((out / "manifest.json").read_text())["shards"]:
        assert (out / name).read_bytes() == (tmp_path / "again" / name).read_bytes()
    assert cli_main([*args, "--out", str(tmp_path / "packed"), "--per-shard", "10"]) == 0
    packed = json.loads((tmp_path / "packed" / "manifest.json").read_text())
    assert packed["samples_per_shard"][:-1] == [10] * (len(packed["shards"]) - 1)
    assert [s["__key__"] for s in _out_samples(tmp_path / "packed")] == kept_keys

    capsys.readouterr()
    assert cli_main([*args, "--out", str(out)]) == 2  # refuses to overwrite
    assert "already exists" in capsys.readouterr().err


# -------------------------------------------------------------------------- caption


def test_offline_caption_rewrite_keeps_original(synth_shards, tmp_path):
    from scaletrain.curate.caption import CaptionStage, OfflineCaptioner
    from scaletrain.curate.shards import rewrite_shards

    shard = synth_shards / "shard-000000.tar"
    report = rewrite_shards(str(shard), tmp_path / "cap", [CaptionStage(OfflineCaptioner(), "offline")],
                            command="caption")
    assert report["kept"] == 32 and report["stages"]["caption"]["captioned"] == 32
    originals = {s["__key__"]: s for s in _read_tars([shard])}
    for s in _out_samples(tmp_path / "cap"):
        meta, before = json.loads(s["json"]), originals[s["__key__"]]
        assert meta["original_caption"] == before["txt"].decode()
        assert s["txt"].decode() == meta["caption"] != meta["original_caption"]
        # The synth image has one or two shapes; the first shape's colour word should be what it sees most.
        assert meta["caption"].startswith("a 64x64 bright image with mostly ")
        assert s["jpg"] == before["jpg"]
    colours = {json.loads(s["json"])["caption"].rsplit(" ", 1)[1] for s in _out_samples(tmp_path / "cap")}
    assert len(colours) >= 4  # it looks at the pixels, not a constant


def _tiny_blip(path: Path) -> None:
    """A BLIP captioner built from configs with a 12-word vocabulary, saved like a downloaded one."""
    from transformers import (BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor,
                              BlipProcessor)

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "a", "red", "circle", "square", "on", "left"]
    path.mkdir()
    (path / "vocab.txt").write_text("\n".join(words) + "\n")
    tok = BertTokenizer(str(path / "vocab.txt"), bos_token="[DEC]")
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    cfg = BlipConfig(vision_config={**small, "image_size": 32, "patch_size": 8}, projection_dim=32,
                     text_config={**small, "vocab_size": len(words), "encoder_hidden_size": 32, "bos_token_id": 5,
                                  "pad_token_id": 0, "sep_token_id": 3, "eos_token_id": 3})
    torch.manual_seed(0)
    BlipForConditionalGeneration(cfg).save_pretrained(path)
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tok)
    processor.save_pretrained(path)


def test_hf_captioner_from_local_folder(synth_shards, tmp_path):
    from scaletrain.curate.caption import HFCaptioner

    with pytest.raises(ValueError, match="--captioner='/nonexistent' is not a local model folder"):
        HFCaptioner("/nonexistent")
    _tiny_blip(tmp_path / "blip")
    out = tmp_path / "cap"
    assert cli_main(["curate", "caption", "--captioner", str(tmp_path / "blip"), "--max-new-tokens", "6",
                     "--shards", str(synth_shards / "shard-000000.tar"), "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    vocab = {"a", "red", "circle", "square", "on", "left"}
    kept = _out_samples(out)
    assert report["kept"] == len(kept) and report["kept"] + report["dropped"]["empty_caption"] == 32
    for s in kept:  # random weights: the words mean nothing, but they come from the model's vocabulary
        meta = json.loads(s["json"])
        assert set(meta["caption"].split()) <= vocab and meta["caption_model"] == str(tmp_path / "blip")
        assert meta["original_caption"] != meta["caption"]


# --------------------------------------------------------------------------- safety


def test_safety_filter_flagged_rate(synth_shards, tmp_path):
    from scaletrain.curate.models import build_tiny_classifier
    from scaletrain.curate.safety import build_safety_classifier

    folder = tmp_path / "nsfw-vit"
    build_tiny_classifier().save_pretrained(folder)  # exercise the local-folder path, as a user runs it
    shards = [synth_shards / "shard-000000.tar", synth_shards / "shard-000001.tar"]
    inputs = _read_tars(shards)
    clf = build_safety_classifier(str(folder))
    scores = clf.score([Image.open(io.BytesIO(s["jpg"])).convert("RGB") for s in inputs])
    tiny = build_safety_classifier("tiny").score([Image.open(io.BytesIO(s["jpg"])).convert("RGB") for s in inputs[:4]])
    assert tiny == pytest.approx(scores[:4], abs=1e-6)  # 'tiny' is the same seeded model
    threshold = sorted(scores)[40]  # deterministic weights: a threshold that flags a known share
    flagged = {s["__key__"] for s, p in zip(inputs, scores) if round(p, 6) > round(threshold, 6)}
    assert 10 < len(flagged) < 40

    out = tmp_path / "safe"
    assert cli_main(["curate", "safety", "--model", str(folder), "--threshold", str(round(threshold, 6)),
                     "--shards", str(synth_shards / "shard-{000000..000001}.tar"), "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["dropped"]["safety_nsfw"] == len(flagged)
    assert report["stages"]["safety"]["flagged_rate"] == pytest.approx(len(flagged) / 64)
    kept = _out_samples(out)
    assert {s["__key__"] for s in kept} == {s["__key__"] for s in inputs} - flagged
    for s in kept:
        assert json.loads(s["json"])["safety_nsfw"] <= round(threshold, 6)

    with pytest.raises(ValueError, match="name no NSFW class"):
        from scaletrain.curate.safety import HFSafetyClassifier

        model = build_tiny_classifier()
        model.config.id2label = {0: "cat", 1: "dog"}
        HFSafetyClassifier(model)


def test_validation_logs_nsfw_flagged_rate(synth_shards):
    from scaletrain.config import ValidateSection
    from scaletrain.curate.models import tensor_to_pil
    from scaletrain.diffusion import build_objective
    from scaletrain.eval.validate import SamplingSpec, Validator, validation_record

    sampling = SamplingSpec(encode_text=lambda c: {"text_emb": torch.zeros(len(c), 2, 8)}, decode=lambda x: x,
                            in_channels=3, latent_factor=1, objective=build_objective("ddpm", {}))

    def denoise(x, t, cond):
        return 0.5 * x  # any fixed function: the images only have to be the same in both places

    vcfg = ValidateSection(every_steps=1, num_images=6, batch_size=6, steps=2, safety_model="tiny")
    v = Validator(vcfg, grid_prompts=["x"], grid_seed=0, default_shards=shard_pattern(synth_shards),
                  sampling=sampling, rank=0, world_size=1, device=torch.device("cpu"))
    images = v._generate(denoise, v._reference(32)[1][:6], v.cfg.seed, 32)
    scores = sorted(v.safety.score(tensor_to_pil(images)))
    assert len(set(scores)) == 6
    for threshold, flagged in ((scores[1], 4), (scores[4], 1), (1.0, 0)):
        v.cfg.safety_threshold = threshold
        v.run(denoise, 32, None)
        record = validation_record(3, v.label, 1.0, 0.1, 6, 32, False, v.metrics)
        assert record["validation/nsfw_flagged_rate"] == pytest.approx(flagged / 6)


# ------------------------------------------------------------------------ aesthetic


def test_aesthetic_head_reduces_heldout_loss(tmp_path):
    from scaletrain.curate.aesthetic import (ImageEmbedder, embed_rated, load_head, read_rated, save_head,
                                             train_head, write_synthetic_rated_set)

    pairs = read_rated(write_synthetic_rated_set(tmp_path / "rated", num_images=256, resolution=32))
    embedder = ImageEmbedder("tiny")
    emb, ratings = embed_rated(embedder, pairs)
    head, r = train_head(emb, ratings, heldout_fraction=0.2, epochs=150, seed=0)
    print({k: round(v, 4) for k, v in r.items() if "loss" in k})
    assert r["heldout_images"] == 51 and r["train_images"] == 205
    assert r["train_loss_after"] < 0.6 * r["train_loss_before"]
    # Held-out: better than before training and than predicting the training mean rating.
    assert r["heldout_loss_after"] < 0.6 * r["heldout_loss_before"]
    assert r["heldout_loss_after"] < 0.6 * r["heldout_loss_mean_predictor"]

    save_head(head, tmp_path / "head", "tiny", r)
    head2, embedder2 = load_head(tmp_path / "head")
    with torch.no_grad():
        assert torch.allclose(head2(embedder2.embed([Image.open(pairs[0][0])])), head(emb[:1]), atol=1e-4)


def test_aesthetic_commands_from_a_local_clip_folder(synth_shards, tmp_path, capsys):
    """The commands in the order docs/post-training.md gives them: `curate rated-synth`, then
    `aesthetic-train --encoder FOLDER` on a CLIP vision model saved like a downloaded one (random
    weights), then `aesthetic-score` in one process with the head it wrote, whose --min-aesthetic
    cuts on the score that stage just wrote. (Under torchrun: tests/distributed/test_curate_score.py.)"""
    from scaletrain.curate.aesthetic import load_head, read_rated
    from scaletrain.curate.models import build_tiny_clip_vision

    clip, rated, head_dir, scored = tmp_path / "clip-vit", tmp_path / "rated", tmp_path / "head", tmp_path / "scored"
    build_tiny_clip_vision().save_pretrained(clip)
    assert cli_main(["curate", "rated-synth", "--out", str(rated), "--num-images", "64"]) == 0
    assert len(read_rated(rated)) == 64 and len(list((rated / "images").glob("*.png"))) == 64
    assert cli_main(["curate", "aesthetic-train", "--rated", str(rated), "--encoder", str(clip),
                     "--out", str(head_dir)]) == 0
    assert "held-out MSE" in capsys.readouterr().out
    meta = json.loads((head_dir / "head.json").read_text())
    r = meta["training"]
    assert meta["encoder"] == str(clip) and r["train_images"] + r["heldout_images"] == 64
    assert r["train_loss_after"] < r["train_loss_before"]

    head, embedder = load_head(head_dir)  # the stored encoder is the folder, loaded again
    shard = synth_shards / "shard-000000.tar"
    inputs = _read_tars([shard])
    with torch.no_grad():
        scores = [round(s, 4) for s in head(embedder.embed(
            [Image.open(io.BytesIO(s["jpg"])).convert("RGB") for s in inputs])).tolist()]
    ranked = sorted(scores)
    assert ranked[16] - ranked[15] > 0  # a cut between two distinct scores
    cut = (ranked[15] + ranked[16]) / 2
    assert cli_main(["curate", "aesthetic-score", "--head", str(head_dir), "--shards", str(shard), "--out", str(scored),
                     "--min-aesthetic", str(cut)]) == 0
    report = json.loads((scored / "report.json").read_text())
    assert report["kept"] == 16 and report["dropped"]["aesthetic"] == 16
    assert report["stages"]["aesthetic"]["scored"] == 32
    expected = {s["__key__"]: score for s, score in zip(inputs, scores) if score >= cut}
    kept = _out_samples(scored)
    assert {s["__key__"]: json.loads(s["json"])["aesthetic"] for s in kept} == pytest.approx(expected, abs=2e-4)


def test_validate_safety_model_must_be_a_local_folder(synth_shards):
    from scaletrain.config import ConfigError
    from scaletrain.checks import validate_config

    data = {"data": {"shards": shard_pattern(synth_shards)}, "model": {"preset": "unet-tiny"},
            "train": {"stages": [{"name": "s", "resolution": 32, "steps": 1, "micro_batch": 1}]},
            "validate": {"every_steps": 1, "num_images": 2, "safety_model": "/nope"}}
    with pytest.raises(ConfigError, match="validate.safety_model='/nope' is not a local model folder"):
        validate_config(data)
    data["validate"]["safety_model"] = "tiny"
    assert validate_config(data).validate.safety_model == "tiny"
