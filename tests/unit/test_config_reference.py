"""docs/reference.md is generated from the schema (scaletrain/config_reference.py) and a test
fails when the two drift (issue 30, item 4)."""

from __future__ import annotations

from pathlib import Path

import pytest

from scaletrain.config_reference import _comments, render

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]


def test_committed_reference_is_what_the_schema_generates() -> None:
    text = render()
    committed = (REPO / "docs" / "reference.md").read_text()
    assert committed == text, ("docs/reference.md is stale: run `scaletrain config reference --out "
                               "docs/reference.md` and commit it")


def test_reference_lists_every_key_with_its_source_comment() -> None:
    from scaletrain.config import CheckpointSection, RunConfig, StageSection

    text = render()
    # every field of every section, dotted as --set takes it, including list items and objectives
    for name in RunConfig.model_fields:
        assert f"| `{name}` |" in text
    for name in CheckpointSection.model_fields:
        assert f"| `checkpoint.{name}` |" in text
    for name in StageSection.model_fields:
        assert f"| `train.stages[].{name}` |" in text
    assert "| `diffusion.prediction_type` |" in text and "| `diffusion.timestep_sampling` |" in text
    # the comment above a field and the one beside it both reach the page
    row = next(ln for ln in text.splitlines() if ln.startswith("| `run.stop_at_step` |"))
    assert "scheduler's time slot" in row and "`None`" in row
    row = next(ln for ln in text.splitlines() if ln.startswith("| `checkpoint.every_steps` |"))
    assert "0 = no step interval" in row


def test_comment_reader_takes_the_lines_above_and_beside_a_field() -> None:
    class Demo:
        # first line
        # second line
        a: int = 1  # beside
        b: int = 2

        # after a gap
        c: int = 3

    got = _comments(Demo)
    assert got == {"a": "first line second line beside", "b": "", "c": "after a gap"}


def test_cli_prints_and_writes_the_reference(tmp_path: Path, capsys) -> None:
    from scaletrain.cli import main

    assert main(["config", "reference"]) == 0
    assert capsys.readouterr().out == render()
    assert main(["config", "reference", "--out", str(tmp_path / "ref.md")]) == 0
    assert (tmp_path / "ref.md").read_text() == render()
