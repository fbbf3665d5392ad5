"""On-the-fly metadata filters, weighted source mixing with provenance, class balancing, and
their per-stage config: exact kept counts, realised ratios within sampling error, exact resume."""

from __future__ import annotations

import itertools
import json
import math
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch

from scaletrain.config import ConfigError

from scaletrain.checks import validate_config
from scaletrain.data import LoaderSpec, build_loader, write_synthetic_shards
from scaletrain.data.filters import FilterSpec
from scaletrain.data.mixing import Balance, Source

RES = 32


def _meta(shards: list[str]) -> list[dict]:
    """Every sample's metadata in stream order, read straight from the tars."""
    out = []
    for path in shards:
        with tarfile.open(path) as tar:
            out += [json.loads(tar.extractfile(m).read()) for m in tar.getmembers() if m.name.endswith(".json")]
    return out


def _take(spec: LoaderSpec, n: int) -> list[dict]:
    return list(itertools.islice(iter(build_loader(spec)), n))


def _within(count: int, n: int, p: float, sigmas: float = 4.0) -> bool:
    """|count - n p| <= sigmas * sqrt(n p (1 - p)): binomial sampling error."""
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> list[str]:
    return write_synthetic_shards(tmp_path_factory.mktemp("plain"), num_samples=48, samples_per_shard=12,
                                  resolution=RES, seed=0)


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> list[str]:
    """180 cat / 20 dog, exactly (synthetic_labels)."""
    return write_synthetic_shards(tmp_path_factory.mktemp("labelled"), num_samples=200, samples_per_shard=50,
                                  resolution=RES, seed=1, labels={"cat": 0.9, "dog": 0.1})


@pytest.fixture(scope="module")
def other(tmp_path_factory) -> list[str]:
    return write_synthetic_shards(tmp_path_factory.mktemp("other"), num_samples=40, samples_per_shard=10,
                                  resolution=RES, seed=2, labels={"cat": 0.5, "dog": 0.5})


# ------------------------------------------------------------------------- filters

FILTERS = FilterSpec(min_aesthetic=5.0, max_punsafe=0.15, max_pwatermark=0.4)


def _expected_rule(meta: dict) -> str | None:
    # Written out again on purpose (not filters.first_failing_rule): an independent count.
    if meta["aesthetic"] < 5.0:
        return "aesthetic"
    if meta["punsafe"] > 0.15:
        return "punsafe"
    if meta["pwatermark"] > 0.4:
        return "pwatermark"
    return None


def test_filters_give_exact_kept_and_dropped_counts(plain):
    metas = _meta(plain)
    rules = [_expected_rule(m) for m in metas]
    kept = [m["key"] for m, r in zip(metas, rules) if r is None]
    assert 0 < len(kept) < len(metas)  # the thresholds cut something and keep something
    last = max(i for i, r in enumerate(rules) if r is None)
    before_last = Counter(r for r in rules[:last] if r)  # drops counted up to the last kept sample
    # One batch = exactly the epoch's kept samples, in order; the next batch is the next epoch.
    first, second = _take(LoaderSpec(shards=plain, resolution=RES, micro_batch=len(kept), num_workers=0,
                                     filters=FILTERS), 2)
    assert first["keys"] == kept and second["keys"] == kept
    assert first["filtered"] == dict(before_last) and first["skipped"] == 0
    total = Counter(first["filtered"]) + Counter(second["filtered"])
    assert total == Counter(r for r in rules if r) + before_last  # epoch 0 in full + epoch 1 up to its last kept
    # Two ranks (split by sample: rank r reads samples j with j % 2 == r) filter their own share.
    for r in (0, 1):
        mine = [m["key"] for j, (m, rule) in enumerate(zip(metas, rules)) if j % 2 == r and rule is None]
        (batch,) = _take(LoaderSpec(shards=plain, resolution=RES, micro_batch=len(mine), num_workers=0,
                                    filters=FILTERS, split="sample", rank=r, world_size=2), 1)
        assert batch["keys"] == mine


def test_filter_dropping_everything_is_one_clear_error(plain):
    spec = LoaderSpec(shards=plain, resolution=RES, micro_batch=2, num_workers=0, filters=FilterSpec(min_aesthetic=9.5))
    with pytest.raises(RuntimeError, match=r"data.filters dropped all 48 it read \(aesthetic: 48\); loosen"):
        next(iter(build_loader(spec)))


# ----------------------------------------------------------------- balance and mixing


def test_balanced_sampling_turns_90_10_into_50_50(labelled):
    metas = {m["key"]: m["label"] for m in _meta(labelled)}
    assert Counter(metas.values()) == {"cat": 180, "dog": 20}
    spec = LoaderSpec(shards=labelled, resolution=RES, micro_batch=8, num_workers=0, balance=Balance("label"))
    batches = _take(spec, 25)  # 200 samples: one epoch-equivalent of the labelled set
    labels = [lab for b in batches for lab in b["labels"]]
    assert all(metas[k] == lab for b in batches for k, lab in zip(b["keys"], b["labels"]))  # true provenance
    # Binomial(200, 0.5): sd 7.1, so 4 sd = +-28; unbalanced sampling would give ~20 dogs (11 sd off).
    assert _within(labels.count("dog"), 200, 0.5), Counter(labels)
    # The 20 dogs repeat (a second pass of the minority class) while the cats are still in their first.
    dog_keys = [k for b in batches for k, lab in zip(b["keys"], b["labels"]) if lab == "dog"]
    assert len(set(dog_keys)) == 20 < len(dog_keys)
    # Explicit class weights: 3 cat : 1 dog.
    spec = LoaderSpec(shards=labelled, resolution=RES, micro_batch=8, num_workers=0,
                      balance=Balance("label", {"cat": 3.0, "dog": 1.0}))
    labels = [lab for b in _take(spec, 25) for lab in b["labels"]]
    assert _within(labels.count("dog"), 200, 0.25), Counter(labels)


def test_mixing_hits_weights_with_provenance(plain, other):
    caption = {name: {m["key"]: m["caption"] for m in _meta(sh)} for name, sh in (("real", plain), ("synthetic", other))}
    spec = LoaderSpec(shards=[], resolution=RES, micro_batch=10, num_workers=0, caption_dropout=0.0,
                      sources=(Source("real", plain, 9.0), Source("synthetic", other, 1.0)))
    batches = _take(spec, 40)
    names = [s for b in batches for s in b["sources"]]
    # Binomial(400, 0.1): sd 6, 4 sd = +-24 around 40.
    assert _within(names.count("synthetic"), 400, 0.1), Counter(names)
    # Each sample's caption is its source's caption for that key: the tag is the true origin.
    assert all(caption[s][k] == c for b in batches for s, k, c in zip(b["sources"], b["keys"], b["captions"]))


def _mixed_spec(plain, labelled, **kw) -> LoaderSpec:
    return LoaderSpec(shards=[], resolution=RES, micro_batch=4, num_workers=0, seed=5, shuffle_buffer=16,
                      sources=(Source("real", labelled, 3.0, FilterSpec(min_aesthetic=5.0)),
                               Source("web", plain, 1.0)),
                      filters=FilterSpec(max_pwatermark=0.3), balance=Balance("label"), **kw)


def test_mixed_filtered_balanced_stream_resumes_exactly(labelled, other):
    straight = _take(_mixed_spec(other, labelled), 12)
    resumed = _take(_mixed_spec(other, labelled, skip_batches=5), 7)
    for a, b in zip(straight[5:], resumed):
        assert (a["keys"], a["sources"], a["labels"], a["filtered"]) == (b["keys"], b["sources"], b["labels"], b["filtered"])
        assert torch.equal(a["pixels"], b["pixels"])
    assert {s for b in straight for s in b["sources"]} == {"real", "web"}
    # Source filters replace data.filters: "real" drops on aesthetic only, "web" on pwatermark only.
    filtered = sum((Counter(b["filtered"]) for b in straight), Counter())
    assert set(filtered) == {"aesthetic", "pwatermark"}


def test_leaf_picks_do_not_depend_on_the_rank_layout(labelled, other):
    one = _take(_mixed_spec(other, labelled, split="sample"), 6)
    two = [_take(LoaderSpec(**{**_mixed_spec(other, labelled).__dict__, "micro_batch": 2, "split": "sample",
                               "rank": r, "world_size": 2}), 6) for r in (0, 1)]
    for k in range(6):  # world-1 batch k: global positions 4k..4k+3 = rank r's batch k (positions 4k+r, 4k+2+r)
        got = [(s, lab) for r in (0, 1) for s, lab in zip(two[r][k]["sources"], two[r][k]["labels"])]
        want = list(zip(one[k]["sources"], one[k]["labels"]))
        assert Counter(got) == Counter(want)


def test_missing_balance_field_is_a_clear_error(plain):
    spec = LoaderSpec(shards=plain, resolution=RES, micro_batch=2, num_workers=0, balance=Balance("species"))
    with pytest.raises(ValueError, match=r"data.balance.field='species' is missing from the metadata of sample"):
        build_loader(spec)


# ---------------------------------------------------------------------------- config


def _cfg(data: dict, stage_data: dict | None = None) -> dict:
    stages = [{"name": "a", "resolution": 32, "steps": 2, "micro_batch": 2},
              {"name": "b", "resolution": 32, "steps": 2, "micro_batch": 2}]
    if stage_data is not None:
        stages[1]["data"] = stage_data
    return {"data": data, "train": {"stages": stages}}


def test_config_sources_and_stage_overrides(plain, other):
    data = {"sources": [{"name": "real", "shards": plain, "weight": 9, "filters": {"min_aesthetic": 5}},
                        {"name": "synthetic", "shards": other, "weight": 1}],
            "filters": {"max_punsafe": 0.1}, "balance": {"field": "label"}}
    cfg = validate_config(_cfg(data, {"sources": [{"name": "real", "weight": 1}], "balance": None}), world_size=1)
    first, second = cfg.stage_data(0), cfg.stage_data(1)
    assert [s.name for s in first.sources] == ["real", "synthetic"] and first.balance.field == "label"
    # The stage reuses real's shards and filters by name, drops balancing, keeps data.filters.
    (real,) = second.sources
    assert real.shards == plain and real.weight == 1 and real.filters.min_aesthetic == 5
    assert second.balance is None and second.filters.max_punsafe == 0.1
    cfg = validate_config(_cfg({"shards": plain}, {"shards": other, "filters": {"min_aesthetic": 6}}), world_size=1)
    assert cfg.stage_data(0).shards == plain and cfg.stage_data(1).shards == other
    assert cfg.stage_data(0).filters is None and cfg.stage_data(1).filters.min_aesthetic == 6


@pytest.mark.parametrize("data, stage_data, message", [
    ({"sources": [{"name": "a", "shards": "S", "weight": 0}]}, None, r"data.sources.0.weight=0: Input should be greater than 0"),
    ({"sources": [{"name": "a", "shards": "S"}], "shards": "T"}, None, "data.shards and data.sources are both set"),
    ({"sources": [{"name": "a", "shards": "S"}, {"name": "a", "shards": "T"}]}, None, "has the name 'a' twice"),
    ({"sources": [{"name": "a"}]}, None, "data.sources 'a' has no shards"),
    ({"sources": [{"name": "a", "shards": "S"}]}, {"sources": [{"name": "b", "weight": 2}]},
     r"train.stages.1.data.sources.0.name='b' is not in data.sources and has no shards; add shards: PATH or use one of \['a'\]"),
    ({"shards": "S"}, {"shards": "S", "sources": [{"name": "a", "shards": "S"}]}, "are both set; keep one"),
    ({"balance": {"mode": "weights"}}, None, "data.balance.mode=weights needs data.balance.weights"),
    ({"balance": {"mode": "weights", "weights": {"cat": 1, "dog": 0}}}, None, r"data.balance.weights=\{'dog': 0.0\} must be > 0"),
    ({"sources": [{"name": "a b", "shards": "S"}]}, None, "data.sources.0.name='a b'"),
])
def test_config_errors_are_one_line(data, stage_data, message):
    with pytest.raises(ConfigError, match=message) as err:
        validate_config(_cfg(data, stage_data), world_size=1, check_paths=False)
    assert "\n" not in str(err.value)


def test_config_checks_every_source_path(plain, tmp_path):
    data = {"sources": [{"name": "real", "shards": plain}, {"name": "gone", "shards": str(tmp_path / "x.tar")}]}
    with pytest.raises(ConfigError, match=r"data.sources 'gone': '.*x.tar' does not exist"):
        validate_config(_cfg(data), world_size=1)


def test_synth_labels_are_exact_and_leave_default_output_alone(tmp_path):
    a = write_synthetic_shards(tmp_path / "a", num_samples=10, samples_per_shard=5, resolution=RES)
    b = write_synthetic_shards(tmp_path / "b", num_samples=10, samples_per_shard=5, resolution=RES,
                               labels={"x": 0.7, "y": 0.3})
    assert all("label" not in m for m in _meta(a)) and Counter(m["label"] for m in _meta(b)) == {"x": 7, "y": 3}
    assert json.loads((tmp_path / "b" / "manifest.json").read_text())["labels"] == {"x": 7, "y": 3}
    # Same images and captions: the label is added to the metadata and nothing else changes.
    strip = [{k: v for k, v in m.items() if k != "label"} for m in _meta(b)]
    assert strip == _meta(a)
    assert Path(a[0]).read_bytes() != Path(b[0]).read_bytes()
