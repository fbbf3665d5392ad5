"""Every shell block in README.md and docs/*.md either runs in a test or says what it needs
(issue 30, item 4).

A shell block is a fenced block tagged bash, sh, shell or console. The line right before its
fence is a marker:

- ``<!-- runs-in: tests/e2e/test_x.py::test_y, tests/unit/test_z.py::test_w -->``: every command
  of the block is run by one of the named tests. Checked here: the file and the test function
  exist, and every significant token of each command (the program, its subcommands, its flags,
  the ``--set`` keys, the repository files it names) is in one named test's code: the test
  function, plus the module's helpers and fixtures and the ``tests.*`` helpers it uses (string
  literals and names; docstrings and comments do not count). ``.ci/run`` may be named for
  install commands: CI runs it, and it runs ``make test``, whose install step is in the Makefile.
- ``<!-- needs: cluster -->`` (several nodes, Slurm, a multi-node network),
  ``<!-- needs: gpu -->`` (GPUs, or more ranks than a CPU test host runs),
  ``<!-- needs: weights -->`` (local copies of published models; no block uses it today: the
  curation commands run in tests/unit/test_curate.py on tiny random-init models saved to local
  folders, but it stays allowed for a block that means nothing without the published weights) or
  ``<!-- needs: long-run -->`` (runs on this CPU machine as typed, but for minutes to an hour: the
  `make` targets, and only them; the tests run the same launchers and recipes cut short). Checked
  here: every command of a long-run block is ``make ...`` (``VAR=value`` before it allowed); any
  other command is reported with its file:line, to be named in a runs-in marker (the test that
  runs it, cut short) or marked cluster, gpu or weights.

Every block, whatever its marker, may only name `make` targets the Makefile defines and
launcher, benchmark, tool and config files that exist.
"""

from __future__ import annotations

import ast
import re
import shlex
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHELL_LANGS = {"bash", "sh", "shell", "console"}
NEEDS = {"cluster", "gpu", "weights", "long-run"}
FENCE = re.compile(r"^\s*```+\s*([\w+-]*)")
MARKER = re.compile(r"^\s*<!--\s*(runs-in|needs)\s*:\s*(.*?)\s*-->\s*$")
# A program run under another name by the tests: `python` is sys.executable, `torchrun` may be
# `python -m torch.distributed.run` (tests.launch.torchrun).
# `scaletrain` may be `python -m scaletrain.cli` or the CLI's `main` imported from scaletrain.cli.
PROGRAM_ALIASES = {"python": ("python", "executable"), "python3": ("python3", "executable"),
                   "torchrun": ("torchrun", "torch.distributed.run"), "scaletrain": ("scaletrain", "scaletrain.cli")}
# Rendezvous plumbing the tests replace with a free loopback port (tests.launch.torchrun).
IGNORED = {"--standalone"}
# Paths a block may name that must exist (user placeholders such as configs/my.yaml are exempt).
CHECKED_DIRS = ("launchers/", "benchmarks/", "tools/", "ds_configs/", "configs/", ".ci/")
PLACEHOLDER = re.compile(r"(^|/)my[._]")


@dataclass
class Block:
    file: Path
    line: int  # 1-based line of the opening fence
    marker: tuple[str, str] | None
    text: str

    @property
    def where(self) -> str:
        return f"{self.file.relative_to(REPO)}:{self.line}"


def shell_blocks(path: Path) -> list[Block]:
    lines = path.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        end = i + 1
        while end < len(lines) and not FENCE.match(lines[end]):
            end += 1
        if m.group(1).lower() in SHELL_LANGS:
            prev = lines[i - 1] if i else ""
            mm = MARKER.match(prev)
            blocks.append(Block(path, i + 1, (mm.group(1), mm.group(2)) if mm else None,
                                "\n".join(lines[i + 1:end])))
        i = end + 1
    return blocks


def all_blocks() -> list[Block]:
    return [b for p in DOCS for b in shell_blocks(p)]


def commands(text: str) -> list[list[str]]:
    """The block's commands as token lists: continuation lines joined, comments, prompts and
    output lines dropped, split at `&&`, `||`, `;` and `|`."""
    joined = re.sub(r"\\\n", " ", text)
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line.startswith("$ "):
            line = line[2:]
        try:
            toks = shlex.split(line, comments=True)
        except ValueError:
            toks = line.split()
        cmd: list[str] = []
        for t in toks + [";"]:
            if t in {"&&", "||", ";", "|"}:
                if cmd:
                    out.append(cmd)
                cmd = []
            else:
                cmd.append(t)
    return out


def significant(cmd: list[str]) -> list[tuple[str, ...]]:
    """Each significant token of a command as the alternatives any of which must appear:
    the program, its positional words (subcommands, `make` targets), its flags, the key of each
    `--set KEY=VALUE`, the module after `-m`, and the repository files it names. Flag values
    (sizes, counts, output paths) and placeholders are not significant."""
    toks = list(cmd)
    while toks and re.match(r"^[A-Z_][A-Z0-9_]*=", toks[0]):  # VAR=value before the program
        toks = toks[1:]
    if not toks or toks[0] in {".", "source"}:  # activating a venv runs nothing
        return []
    prog = Path(toks[0]).name
    sig: list[tuple[str, ...]] = [PROGRAM_ALIASES.get(prog, (prog,))]
    prev_flag = None
    for t in toks[1:]:
        if t.startswith("-") and len(t) > 1 and not re.match(r"^-\d", t):
            flag = t.split("=", 1)[0]
            if flag not in IGNORED:
                sig.append((flag,))
            prev_flag = flag if "=" not in t else None
            continue
        if prev_flag in ("--set",):
            sig.append((t.split("=", 1)[0],))
        elif prev_flag is not None and (REPO / t).is_file() and not PLACEHOLDER.search(t):
            sig.append((t,))  # a repository file given as a flag's value: --config configs/demo.yaml
        elif prev_flag in ("-m", "--module"):
            sig.append((t,))
        elif prev_flag is None:
            if (REPO / t).is_file() and not PLACEHOLDER.search(t):
                sig.append((t,))
            elif re.fullmatch(r"[a-z][a-z0-9_-]*", t):
                sig.append((t,))
        prev_flag = None
    return sig


# --- a test's code: the function, and the helpers and fixtures it reaches --------------------

@lru_cache(maxsize=None)
def _module(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _top_defs(path: Path) -> dict[str, ast.AST]:
    defs: dict[str, ast.AST] = {}
    for node in _module(path).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defs[node.name] = node
        elif isinstance(node, ast.Assign):
            for t in node.targets:
                if isinstance(t, ast.Name):
                    defs[t.id] = node
    return defs


def _imports(path: Path) -> dict[str, Path]:
    """Names imported from the tests package, to the file that defines them."""
    out = {}
    for node in _module(path).body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "tests":
            src = REPO / Path(*node.module.split("."))
            src = src.with_suffix(".py") if src.with_suffix(".py").is_file() else src / "__init__.py"
            for a in node.names:
                out[a.asname or a.name] = src
    return out


def _docstrings(node: ast.AST) -> set[int]:
    ids = set()
    for n in ast.walk(node):
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Module)):
            body = getattr(n, "body", [])
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                ids.add(id(body[0].value))
    return ids


def _words(node: ast.AST) -> tuple[list[str], set[str]]:
    """The string literals (docstrings excluded), the modules imported inside, and the names a
    node uses."""
    skip = _docstrings(node)
    strings, names = [], set()
    for n in ast.walk(node):
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in skip:
            strings.append(n.value)
        elif isinstance(n, ast.ImportFrom) and n.module:
            strings.append(n.module)
        elif isinstance(n, ast.Name):
            names.add(n.id)
        elif isinstance(n, ast.Attribute):
            names.add(n.attr)
        elif isinstance(n, ast.arg):
            names.add(n.arg)
    return strings, names


def _module_imports(path: Path) -> dict[str, str]:
    """Every name imported at a module's top level, to the module it comes from."""
    out = {}
    for node in _module(path).body:
        if isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                out[a.asname or a.name] = node.module
    return out


def to_words(texts: list[str]) -> frozenset[str]:
    """Each text whole and split at whitespace (a literal "--set" or "data synth --out"), quotes
    stripped."""
    words = set()
    for t in texts:
        words.add(t)
        words.update(w.strip("'\"") for w in t.split())
    return frozenset(words)


def code_of_test(path: Path, func: str) -> frozenset[str]:
    """The words of the code a test runs: its function, then (transitively) the top-level
    helpers, constants and fixtures of its module and of conftest.py it uses, and the ``tests.*``
    helpers it imports; string literals (not docstrings or comments), names, and the modules the
    names it uses are imported from."""
    conftest = REPO / "tests" / "conftest.py"
    start = _top_defs(path).get(func)
    if start is None or not func.startswith("test_"):
        raise LookupError(f"{path.relative_to(REPO)} has no top-level test {func}")
    seen, todo, texts = set(), [(path, start)], []
    while todo:
        where, node = todo.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        strings, names = _words(node)
        texts.extend(strings)
        texts.extend(names)
        local, imported, shared = _top_defs(where), _imports(where), _top_defs(conftest)
        modules = _module_imports(where)
        for name in names:
            if name in modules:
                texts.append(modules[name])
            if name in local:
                todo.append((where, local[name]))
            elif name in imported and imported[name].is_file():
                target = _top_defs(imported[name]).get(name)
                if target is not None:
                    todo.append((imported[name], target))
            elif name in shared:  # a conftest fixture taken as an argument
                todo.append((conftest, shared[name]))
    return to_words(texts)


def _present(token: str, words: frozenset[str]) -> bool:
    """A token is in the code as a whole word, or as the key of a `KEY=VALUE` word."""
    return token in words or any(w.startswith(token + "=") for w in words)


def missing_tokens(cmd: list[str], words: frozenset[str]) -> list[str]:
    return ["|".join(alts) for alts in significant(cmd) if not any(_present(a, words) for a in alts)]


def _make_rules() -> tuple[dict[str, tuple[list[str], list[str]]], dict[str, str]]:
    """The Makefile's rules (target -> prerequisites, recipe lines) and its variables."""
    text = re.sub(r"\\\n", " ", (REPO / "Makefile").read_text())
    variables, rules, current = {}, {}, None
    for line in text.splitlines():
        if line.startswith("\t") and current:
            for t in current:
                rules[t][1].append(line.strip())
            continue
        current = None
        if m := re.match(r"^([A-Za-z_]+)\s*[:?]?=\s*(.*)$", line):
            variables[m.group(1)] = m.group(2).strip()
        elif m := re.match(r"^([^#\s:][^:=]*):(?!=)\s*([^#]*)", line):
            current = _expand(m.group(1), variables).split()
            for t in current:
                rules[t] = (m.group(2).replace("|", " ").split(), [])
    return rules, variables


def _expand(s: str, variables: dict[str, str], depth: int = 0) -> str:
    if depth > 5:
        return s
    return re.sub(r"\$\((\w+)\)", lambda m: _expand(variables.get(m.group(1), ""), variables, depth + 1), s)


def make_target_recipe(target: str) -> list[str]:
    """The recipe lines `make TARGET` runs: its own and its prerequisites', variables expanded."""
    rules, variables = _make_rules()
    lines, todo, seen = [], [target], set()
    while todo:
        t = _expand(todo.pop(), variables)
        if t in seen or t not in rules:
            continue
        seen.add(t)
        prereqs, recipe = rules[t]
        todo.extend(prereqs)
        lines.extend(_expand(r, variables) for r in recipe)
    return lines


def ci_code() -> frozenset[str]:
    """What `.ci/run` runs: its lines, and the recipes of the `make` targets it calls."""
    text = (REPO / ".ci" / "run").read_text()
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    for target in re.findall(r"^\s*make\s+([\w.-]+)", text, re.M):
        lines.extend(make_target_recipe(target))
    return to_words(lines)


def check_runs_in(block: Block) -> list[str]:
    """Problems with a runs-in marker: a target that does not exist, or a command no named
    target's code contains (naming the tokens each target lacks)."""
    problems, codes = [], {}
    for target in (t.strip() for t in block.marker[1].split(",") if t.strip()):
        if target == ".ci/run":
            codes[target] = ci_code()
            continue
        file, _, func = target.partition("::")
        path = REPO / file
        if not (file.startswith("tests/") and path.is_file() and func) or path == Path(__file__).resolve():
            problems.append(f"{block.where}: runs-in target {target!r} is not an existing tests/FILE.py::test_name")
            continue
        try:
            codes[target] = code_of_test(path, func)
        except LookupError as e:
            problems.append(f"{block.where}: runs-in target {target!r}: {e}")
    if problems:
        return problems
    for cmd in commands(block.text):
        if not significant(cmd):
            continue
        misses = {t: missing_tokens(cmd, c) for t, c in codes.items()}
        if all(misses.values()):
            detail = "; ".join(f"{t} lacks {m}" for t, m in misses.items())
            problems.append(f"{block.where}: `{' '.join(cmd)}` is in none of the named tests ({detail})")
    return problems


def check_long_run(block: Block) -> list[str]:
    """Problems with a long-run marker: a command other than `make` (a launcher, the CLI, a
    script): a test runs it cut short (runs-in), or it needs a cluster, a GPU or weights."""
    problems = []
    for cmd in commands(block.text):
        if not significant(cmd):  # a comment, activating a venv
            continue
        toks = list(cmd)
        while toks and re.match(r"^[A-Z_][A-Z0-9_]*=", toks[0]):
            toks = toks[1:]
        if Path(toks[0]).name != "make":
            problems.append(f"{block.where}: `{' '.join(cmd)}` under needs: long-run, which may hold only `make` "
                            f"commands: name the test that runs it (<!-- runs-in: tests/FILE.py::test_name -->) "
                            f"or mark the block needs: cluster|gpu|weights")
    return problems


def make_targets() -> set[str]:
    return set(re.findall(r"^([\w.-]+)\s*:(?!=)", (REPO / "Makefile").read_text(), re.M))


def check_references(block: Block) -> list[str]:
    problems, targets = [], make_targets()
    for cmd in commands(block.text):
        toks = [t for t in cmd if not re.match(r"^[A-Z_][A-Z0-9_]*=", t)] if cmd else []
        if toks and toks[0] == "make":
            for t in toks[1:]:
                if not t.startswith("-") and "=" not in t and t not in targets:
                    problems.append(f"{block.where}: `make {t}`: the Makefile has no target {t!r}")
        for t in cmd:
            value = t.split("=", 1)[1] if t.startswith("SCRIPT=") else t
            if value.startswith(CHECKED_DIRS) and not PLACEHOLDER.search(value) and "{" not in value \
                    and not (REPO / value).exists():
                problems.append(f"{block.where}: {value} does not exist in the repository")
    return problems


# --- the tests ----------------------------------------------------------------------------------

def test_docs_have_shell_blocks() -> None:
    blocks = all_blocks()
    assert len(blocks) >= 20, f"found only {len(blocks)} shell blocks: is the fence parser broken?"


def test_every_shell_block_has_a_marker() -> None:
    problems = []
    for b in all_blocks():
        if b.marker is None:
            problems.append(f"{b.where}: shell block without a marker on the line before its fence "
                            f"(<!-- runs-in: tests/...py::test_name --> or <!-- needs: {'|'.join(sorted(NEEDS))} -->)")
        elif b.marker[0] == "needs" and b.marker[1] not in NEEDS:
            problems.append(f"{b.where}: needs: {b.marker[1]!r} is not one of {sorted(NEEDS)}")
    assert not problems, "\n".join(problems)


def test_runs_in_blocks_are_run_by_the_named_tests() -> None:
    problems = [p for b in all_blocks() if b.marker and b.marker[0] == "runs-in" for p in check_runs_in(b)]
    assert not problems, "\n".join(problems)


def test_long_run_blocks_hold_only_make_commands() -> None:
    problems = [p for b in all_blocks() if b.marker == ("needs", "long-run") for p in check_long_run(b)]
    assert not problems, "\n".join(problems)


def test_shell_blocks_name_make_targets_and_files_that_exist() -> None:
    problems = [p for b in all_blocks() for p in check_references(b)]
    assert not problems, "\n".join(problems)


# --- the checker itself ---------------------------------------------------------------------

def test_checker_fails_on_a_wrong_or_missing_target() -> None:
    doc = REPO / "docs" / "x.md"
    good = Block(doc, 1, ("runs-in", "tests/e2e/test_launchers.py::test_torchrun_two_ranks"),
                 "torchrun --nproc_per_node 2 launchers/pretrain.py --config configs/demo.yaml")
    assert check_runs_in(good) == []
    # the test runs configs/demo.yaml under torchrun, not the DPO launcher, nor with --max-restarts
    wrong = Block(doc, 1, good.marker, "torchrun --max-restarts 3 launchers/dpo.py --config configs/dpo.yaml")
    (problem,) = check_runs_in(wrong)
    assert "--max-restarts" in problem and "launchers/dpo.py" in problem and "configs/dpo.yaml" in problem
    absent = Block(doc, 1, ("runs-in", "tests/e2e/test_launchers.py::test_no_such_test"), good.text)
    assert "has no top-level test test_no_such_test" in check_runs_in(absent)[0]
    nofile = Block(doc, 1, ("runs-in", "tests/e2e/test_nothing.py::test_x"), good.text)
    assert "is not an existing" in check_runs_in(nofile)[0]


def test_checker_fails_on_a_non_make_command_under_long_run() -> None:
    doc = REPO / "docs" / "x.md"
    ok = Block(doc, 7, ("needs", "long-run"), "NPROC=2 make demo   # runs/demo\n. .venv/bin/activate\nmake test-fast")
    assert check_long_run(ok) == []
    bad = Block(doc, 7, ("needs", "long-run"),
                "make demo\nscaletrain bench --out runs/bench && torchrun --nproc_per_node 2 launchers/dpo.py")
    problems = check_long_run(bad)
    assert len(problems) == 2 and all(p.startswith("docs/x.md:7: `") for p in problems)
    assert "`scaletrain bench --out runs/bench` under needs: long-run" in problems[0]
    assert "`torchrun --nproc_per_node 2 launchers/dpo.py`" in problems[1]
    assert "runs-in" in problems[0] and "cluster|gpu|weights" in problems[0]


def test_significant_tokens() -> None:
    (cmd,) = commands("FOO=1 scaletrain data synth --out data/x --num-samples 8 \\\n  --set a.b=3  # note")
    assert significant(cmd) == [("scaletrain", "scaletrain.cli"), ("data",), ("synth",), ("--out",), ("--num-samples",),
                                ("--set",), ("a.b",)]
    assert [c[0] for c in commands("python3 -m venv .venv && . .venv/bin/activate\npip install x")] == \
        ["python3", ".", "pip"]
    assert significant(["torchrun", "--standalone", "-m", "scaletrain.cli", "preflight"]) == \
        [("torchrun", "torch.distributed.run"), ("-m",), ("scaletrain.cli",), ("preflight",)]
