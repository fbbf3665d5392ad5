"""The recipe reference, generated from the schema: every key of ``RunConfig`` (and of each
registered objective's ``Params``) with its type, its default and the comment written beside
it in the source, as Markdown (``scaletrain config reference --out docs/reference.md``).

The schema is the one source: a key added, removed or re-documented in ``config.py`` (or in an
objective's file) changes this page, and ``tests/unit/test_config_reference.py`` fails until the
committed page is regenerated. The comments are read with ``tokenize`` from the class bodies
(pydantic keeps no comments); a field's text is the run of ``#`` lines right above it plus its
inline comment.
"""

from __future__ import annotations

import inspect
import io
import tokenize
import typing
from pathlib import Path

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

HEADER = ("# Recipe reference\n\nGenerated from the schema (`scaletrain/config.py` and each objective's `Params`) by "
          "`scaletrain config reference --out docs/reference.md`; do not edit by hand (a test fails when this page "
          "and the schema disagree). Keys are dotted as `--set` takes them; `[]` marks a list item "
          "(`train.stages.0.steps`). A default of `required` must be given.\n")


def _comments(cls: type) -> dict[str, str]:
    """field name -> the comment above it and beside it in ``cls``'s source."""
    try:
        lines, _ = inspect.getsourcelines(cls)
    except (OSError, TypeError):
        return {}
    out: dict[str, str] = {}
    above: list[str] = []
    toks = list(tokenize.generate_tokens(io.StringIO("".join(lines)).readline))
    by_line: dict[int, list[tokenize.TokenInfo]] = {}
    for t in toks:
        by_line.setdefault(t.start[0], []).append(t)
    body_col = None  # the class body's indentation: that of its first line after the header
    for no in sorted(by_line):
        ts = [t for t in by_line[no] if t.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT,
                                                         tokenize.DEDENT, tokenize.ENDMARKER)]
        if not ts:
            continue
        if no > 1 and body_col is None:
            body_col = ts[0].start[1]
        if ts[0].type == tokenize.COMMENT:
            above.append(ts[0].string.lstrip("#").strip())
            continue
        # a field: NAME ':' at the class body's indentation
        if len(ts) > 1 and ts[0].type == tokenize.NAME and ts[1].string == ":" and ts[0].start[1] == body_col:
            inline = [t.string.lstrip("#").strip() for t in ts if t.type == tokenize.COMMENT]
            out[ts[0].string] = " ".join(above + inline).strip()
        above = []
    return out


def _type_name(tp) -> str:
    text = str(tp).replace("typing.", "").replace("NoneType", "None")
    if isinstance(tp, type) and not typing.get_args(tp):
        text = tp.__name__
    return text.replace("scaletrain.config.", "")


def _default(field) -> str:
    if field.default_factory is not None:
        return "(built)"
    if field.default is PydanticUndefined:
        return "required"
    if isinstance(field.default, BaseModel):
        return "(section)"
    return f"`{field.default!r}`"


def _sections(tp) -> list[type[BaseModel]]:
    """The pydantic models inside an annotation (X, X | None, list[X])."""
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return [tp]
    return [m for a in typing.get_args(tp) for m in _sections(a)]


def _rows(model: type[BaseModel], prefix: str, out: list[tuple[str, list[tuple[str, str, str, str]]]]) -> None:
    notes = _comments(model)
    rows, nested = [], []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        subs = _sections(field.annotation)
        if subs:
            is_list = typing.get_origin(field.annotation) is list
            nested.append((f"{key}[]." if is_list else f"{key}.", subs[0]))
            rows.append((f"`{key}`", "list of sections" if is_list else "section", _default(field),
                         notes.get(name, "")))
            continue
        rows.append((f"`{key}`", f"`{_type_name(field.annotation)}`", _default(field), notes.get(name, "")))
    out.append((prefix.rstrip(".") or "(top level)", rows))
    for p, sub in nested:
        _rows(sub, p, out)


def render() -> str:
    from scaletrain.config import RunConfig
    from scaletrain.diffusion import OBJECTIVES

    sections: list[tuple[str, list]] = []
    _rows(RunConfig, "", sections)
    # scaletrain's own objectives (a test or a plug-in may have registered more in this process)
    for name in sorted(n for n, c in OBJECTIVES.items() if c.__module__.startswith("scaletrain.")):
        params = OBJECTIVES[name].Params
        _rows(params, "diffusion.", tab := [])
        sections.append((f"diffusion (objective {name}: flat, or under diffusion.{name})", tab[0][1]))
    parts = [HEADER]
    for title, rows in sections:
        parts.append(f"\n## `{title}`\n\n| key | type | default | what |\n|---|---|---|---|")
        for key, typ, default, text in rows:
            parts.append(f"| {key} | {typ.replace('|', '&#124;')} | {default.replace('|', '&#124;')} | "
                         f"{text.replace('|', '&#124;')} |")
    return "\n".join(parts) + "\n"


def write(path: str | Path) -> None:
    Path(path).write_text(render())
