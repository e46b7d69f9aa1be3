"""The library's import graph (issue 15): no cycle, nothing imported from a higher layer, no
private name used outside its module. Every import counts, at the top of a file or inside a
function: a late import does not make an upward or circular one acceptable.

The layer order is written once, in :data:`LAYERS`, and mirrored in docs/architecture.md (the
last test keeps the two equal). A module imports only from its own layer or lower ones. A
package (``selfsup/data/``, ``selfsup/methods/``, ...) is one unit of the layers; cycles are
looked for between files too, so its own modules cannot import each other in a circle either.
"""
from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "selfsup"
DOC = ROOT / "docs" / "architecture.md"

#: Lowest first. A unit is a module of selfsup/ (``train`` is selfsup/train.py) or a package
#: (``data`` is selfsup/data.py or everything under selfsup/data/); ``selfsup`` is the package's
#: own __init__.py.
LAYERS: list[list[str]] = [
    # 0. ground floor: building blocks with no knowledge of runs or settings
    ["errors", "files", "conv", "norm", "binary", "vit", "backbones", "distributed", "losses", "augment", "heads",
     "momentum", "optim", "checkpoint", "monitor", "loader"],
    # 1. settings and data
    ["presets", "config", "data", "labels", "stream"],
    # 2. the run folder, the device, the run's guard, the run's images and loader
    ["runs", "device", "runguard", "feed"],
    # 3. methods and evaluation
    ["methods", "evaluate"],
    # 4. the trainer: the loop's pieces, the epoch-end monitors, the run's folder on start, the trainer
    ["loop", "epoch_end", "resume", "train"],
    # 5. what is built on the trainer and on run folders
    ["semisup", "perf", "export", "embeddings", "report", "views"],
    # 6. entry points
    ["api", "cli", "__main__", "selfsup"],
]


@dataclass(frozen=True)
class Import:
    source: str           # the importing module, dotted: "selfsup.train"
    target: str           # the imported module, dotted: "selfsup.methods.base"
    line: int
    names: tuple[str, ...] = ()  # names taken from ``target`` that are not modules themselves


def modules() -> dict[str, Path]:
    """Every module of the library by dotted name (``selfsup.methods.moco``)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = modules()


def unit(module: str) -> str:
    """The layer unit of a dotted module: selfsup.train -> train, selfsup.data.cache -> data."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _package_of(module: str, path: Path) -> str:
    return module if path.name == "__init__.py" else module.rpartition(".")[0]


def imports(module: str, path: Path) -> Iterator[Import]:
    """Every selfsup import of one file (module level and inside functions)."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in MODULES:
                    yield Import(module, alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = _package_of(module, path).split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target not in MODULES:
                continue
            names = []
            for alias in node.names:
                if f"{target}.{alias.name}" in MODULES:  # ``from . import checkpoint``: the module itself
                    yield Import(module, f"{target}.{alias.name}", node.lineno)
                else:
                    names.append(alias.name)
            if names:
                yield Import(module, target, node.lineno, tuple(names))


def all_imports() -> list[Import]:
    return [imp for module, path in MODULES.items() for imp in imports(module, path)]


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _cycles(edges: set[tuple[str, str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan)."""
    graph: dict[str, set[str]] = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)
        graph.setdefault(b, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _where(imp: Import) -> str:
    return f"{MODULES[imp.source].relative_to(ROOT)}:{imp.line}"


def test_every_module_is_placed_in_exactly_one_layer():
    placed = [name for layer in LAYERS for name in layer]
    assert len(placed) == len(set(placed)), f"placed twice: {sorted({n for n in placed if placed.count(n) > 1})}"
    units = {unit(m) for m in MODULES}
    assert not units - set(placed), f"modules in no layer of LAYERS (place them): {sorted(units - set(placed))}"
    assert not set(placed) - units, f"LAYERS names modules that do not exist: {sorted(set(placed) - units)}"


def test_no_import_cycle_between_modules_or_packages():
    edges = {(imp.source, imp.target) for imp in all_imports() if imp.source != imp.target}
    unit_edges = {(unit(a), unit(b)) for a, b in edges if unit(a) != unit(b)}
    cycles = _cycles(edges) + _cycles(unit_edges)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_no_import_goes_up_a_layer():
    level = {name: i for i, layer in enumerate(LAYERS) for name in layer}
    upward = sorted(f"{_where(imp)}: {unit(imp.source)} (layer {level[unit(imp.source)]}) imports "
                    f"{imp.target} (layer {level[unit(imp.target)]})"
                    for imp in all_imports()
                    if unit(imp.source) in level and unit(imp.target) in level
                    and level[unit(imp.target)] > level[unit(imp.source)])
    assert not upward, "upward imports:\n" + "\n".join(upward)


def _private_uses(path: Path, module: str | None) -> Iterator[str]:
    """``from x import _name`` and ``x._name`` where x is another selfsup module."""
    tree = ast.parse(path.read_text(), str(path))
    where = path.relative_to(ROOT)
    bound: dict[str, str] = {}  # local name -> the selfsup module it is bound to
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                assert module is not None
                base = _package_of(module, path).split(".")
                target = ".".join(base[:len(base) - node.level + 1] + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                if f"{target}.{alias.name}" in MODULES:
                    bound[alias.asname or alias.name] = f"{target}.{alias.name}"
                elif target in MODULES and target != module and _private(alias.name):
                    yield f"{where}:{node.lineno}: from {target} import {alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in MODULES:
                    bound[alias.asname or alias.name.split(".")[0]] = alias.asname and alias.name or "selfsup"
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            chain, value = [], node.value
            while isinstance(value, ast.Attribute):
                chain.insert(0, value.attr)
                value = value.value
            if isinstance(value, ast.Name) and value.id in bound:
                owner = ".".join([bound[value.id], *chain])
                if owner in MODULES and owner != module:
                    yield f"{where}:{node.lineno}: {owner}.{node.attr}"


def test_no_private_name_is_used_outside_its_module():
    benchmarks = sorted((ROOT / "benchmarks").rglob("*.py"))
    uses = [use for module, path in MODULES.items() for use in _private_uses(path, module)]
    uses += [use for path in benchmarks for use in _private_uses(path, None)]
    assert not uses, "private names used outside their module:\n" + "\n".join(uses)


def test_docs_architecture_lists_the_layers_in_this_order():
    """docs/architecture.md has one ``### `` heading per layer, lowest first, each followed by a
    ``- `module` — ...`` line per unit of the layer, as in LAYERS."""
    text = DOC.read_text()
    layers: list[list[str]] = []
    for line in text.split("## Layers", 1)[1].split("\n## ", 1)[0].splitlines():
        if line.startswith("### "):
            layers.append([])
        elif layers and (m := re.match(r"- `([\w.]+)`", line)):
            layers[-1].append(m.group(1))
    assert layers == LAYERS, "docs/architecture.md's layers differ from tests/test_imports.py LAYERS"
