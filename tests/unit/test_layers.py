"""The package's import graph (issue 30, layers): no import cycle beyond those listed in KNOWN
(none now), and none may appear or grow.

Every import statement of every module under scaletrain/ counts -- module level or inside a
function, since a function-local import is still a dependency -- except those under
``if TYPE_CHECKING:``, which exist for annotations only. ``from pkg import name`` counts as an
import of the submodule ``pkg.name`` where there is one, else of ``pkg``. Cycles are the
strongly connected components of that graph (Tarjan). Hand-written because import-linter's
contracts are stated per layer or per pair of packages; none says "the whole graph is acyclic"
without listing the layers first, which is what issue 30 is still deciding.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

PKG = Path(__file__).resolve().parents[2] / "scaletrain"

# The cycles left (issue 30, item 1), which may only shrink: none. (config.py left the big one
# when it became a schema; the family registry stopped naming the pipeline-folder reader and LoRA
# when get_preset moved up to models/registry.py and ADAPTER down to models/family.py; the shard
# readers stopped sharing private helpers when common/ took the tar reading and writing and the
# rank helpers, and data/samples.py the image and caption decoding.)
KNOWN: set[frozenset[str]] = set()


def _type_checking_only(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            ids |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return ids


def import_graph() -> dict[str, set[str]]:
    mods = {}
    for p in PKG.rglob("*.py"):
        parts = p.relative_to(PKG.parent).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    graph: dict[str, set[str]] = {m: set() for m in mods}

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    for m, p in mods.items():
        tree = ast.parse(p.read_text())
        skip = _type_checking_only(tree)
        pkg = m if p.name == "__init__.py" else m.rpartition(".")[0]
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                targets = [resolve(a.name) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else resolve(base) for a in node.names]
            else:
                continue
            graph[m] |= {t for t in targets if t and t != m}
    return graph


def cycles(graph: dict[str, set[str]]) -> set[frozenset[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: set[frozenset[str]] = set()

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.add(frozenset(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_beyond_the_known_one_and_it_does_not_grow() -> None:
    found = cycles(import_graph())
    new = [sorted(c) for c in found if not any(c <= k for k in KNOWN)]
    assert not new, f"import cycle(s) not allowed: {new}; break them (issue 30: no module imports its caller)"


# The layers, bottom to top: a module may import its own layer and those below, never above.
# Within a layer the cycle test above keeps imports one way.
LAYERS = [
    ("common", ["scaletrain.common", "scaletrain.distributed", "scaletrain.data.buckets", "scaletrain.data.filters"]),
    ("schema", ["scaletrain.config"]),
    ("components", ["scaletrain.models", "scaletrain.diffusion", "scaletrain.data", "scaletrain.curate"]),
    ("engines", ["scaletrain.engines", "scaletrain.checkpoint"]),
    ("eval", ["scaletrain.eval"]),
    ("train", ["scaletrain.train"]),
    ("checks", ["scaletrain.checks"]),
    ("tools", ["scaletrain.bench", "scaletrain.comm"]),
    ("entry", ["scaletrain.cli", "scaletrain.slurm", "scaletrain.config_reference", "scaletrain"]),
]


def layer_of(module: str) -> int | None:
    """The layer of ``module``: its longest matching prefix (data.buckets is below data)."""
    best = None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and (best is None or len(p) > best[1]):
                best = (i, len(p))
    return best[0] if best else None


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    out = []
    for a in sorted(graph):
        for b in sorted(graph[a]):
            la, lb = layer_of(a), layer_of(b)
            if la is None or lb is None:
                out.append(f"{a} -> {b}: not in a layer")
            elif lb > la:
                out.append(f"{a} ({LAYERS[la][0]}) -> {b} ({LAYERS[lb][0]})")
    return out


def test_no_upward_import() -> None:
    bad = upward_imports(import_graph())
    assert not bad, "imports that run upward (issue 30, layers):\n" + "\n".join(bad)


def test_the_layer_check_sees_an_upward_import() -> None:
    assert upward_imports({"scaletrain.config": {"scaletrain.models.registry"}, "scaletrain.models.registry": set()})
    assert not upward_imports({"scaletrain.models.registry": {"scaletrain.config", "scaletrain.common.tars"},
                               "scaletrain.config": {"scaletrain.data.buckets"}, "scaletrain.common.tars": set(),
                               "scaletrain.data.buckets": set()})


def test_the_checker_sees_a_cycle_and_ignores_type_checking_imports() -> None:
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(g) == {frozenset("abc")}
    graph = import_graph()
    # sizing <-> scaling was a cycle until bench/facts.py took what both need
    assert "scaletrain.bench.facts" in graph["scaletrain.bench.scaling"]
    assert "scaletrain.bench.sizing" not in graph["scaletrain.bench.scaling"]
    # config.py is a schema: it imports no component (their checks import it)
    assert not {m for m in graph["scaletrain.config"] if not m.startswith("scaletrain.data.")}
    assert "scaletrain.config" in graph["scaletrain.models.checks"]
    # watchers names the Trainer for annotations only
    assert "scaletrain.train.trainer" not in graph["scaletrain.train.watchers"]
    assert "scaletrain.train.watchers" in graph["scaletrain.train.trainer"]
    # common/ is the bottom layer: it imports nothing from scaletrain, and the shard readers use it
    common = [m for m in graph if m == "scaletrain.common" or m.startswith("scaletrain.common.")]
    assert {"scaletrain.common.tars", "scaletrain.common.ranks"} <= set(common)
    assert not {t for m in common for t in graph[m]}
    for reader in ("scaletrain.data.pipeline", "scaletrain.data.latents", "scaletrain.curate.shards"):
        assert "scaletrain.common.tars" in graph[reader]
    # data encode and curate share no helpers but common/'s and data/samples.py's
    assert "scaletrain.curate.shards" not in graph["scaletrain.data.latents"]
    assert "scaletrain.data.pipeline" not in graph["scaletrain.curate.shards"]
    # the loader reads precomputed shards (latents.py) and clips (video.py); neither imports it
    assert "scaletrain.data.latents" in graph["scaletrain.data.pipeline"]
    assert "scaletrain.data.video" in graph["scaletrain.data.pipeline"]
    for below in ("scaletrain.data.latents", "scaletrain.data.video", "scaletrain.data.samples"):
        assert "scaletrain.data.pipeline" not in graph[below]
    assert "scaletrain.data.samples" in graph["scaletrain.data.video"]
    # the family registry is below LoRA and the pipeline-folder reader; get_preset sits above both
    assert not {"scaletrain.models.lora", "scaletrain.models.pipeline_folder"} & graph["scaletrain.models.family"]
    assert "scaletrain.models.family" in graph["scaletrain.models.lora"]
    assert "scaletrain.models.family" in graph["scaletrain.models.pipeline_folder"]
    assert "scaletrain.models.pipeline_folder" in graph["scaletrain.models.registry"]


def test_scripts_import_only_what_exists() -> None:
    """Benchmarks, examples, launchers, tools and tests import scaletrain names that exist: a
    module moved or an API retired must take its scripts along (a benchmark nobody ran for a
    while would otherwise fail only when someone needs its figure)."""
    import importlib
    import importlib.util

    root = PKG.parent
    missing = []
    for folder in ("benchmarks", "examples", "launchers", "tools", "tests"):
        for p in sorted((root / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(p.read_text())):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("scaletrain") and not node.level:
                    try:
                        mod = importlib.import_module(node.module)
                    except ImportError as e:
                        missing.append(f"{p.relative_to(root)}:{node.lineno}: {node.module} ({e})")
                        continue
                    for a in node.names:
                        if not hasattr(mod, a.name) and importlib.util.find_spec(f"{node.module}.{a.name}") is None:
                            missing.append(f"{p.relative_to(root)}:{node.lineno}: {node.module}.{a.name}")
                elif isinstance(node, ast.Import):
                    for a in node.names:
                        if a.name.startswith("scaletrain") and importlib.util.find_spec(a.name) is None:
                            missing.append(f"{p.relative_to(root)}:{node.lineno}: {a.name}")
    assert not missing, "imports of names that do not exist:\n" + "\n".join(missing)
