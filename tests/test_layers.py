"""Dependencies point one way: schemas -> domain -> engine -> entrypoints, with no import cycle.

Read from the source with ``ast`` (imports inside functions and ``TYPE_CHECKING`` blocks count too),
so a lazy import that hides a cycle from the interpreter fails here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "transferlab"

# Each module's layer; a module may import its own layer or a lower one, never a higher one.
LAYERS: dict[str, int] = {
    # 0 schemas and the error type: import nothing of transferlab's beyond these.
    "transferlab.schemas": 0,
    "transferlab.config": 0,
    "transferlab.versions": 0,
    # 1 domain: backbones, data sources, data, modes, parameter groups.
    "transferlab.backbones": 1,
    "transferlab.validate": 1,
    "transferlab.sources": 1,
    "transferlab.data": 1,
    "transferlab.modes": 1,
    "transferlab.optim": 1,
    "transferlab.schedule": 1,
    "transferlab.augment": 1,
    "transferlab.classifier": 1,
    # 2 engine: caches, the loop, checkpoints, tracking, sweeps, pre-flight of overrides.
    "transferlab.cache": 2,
    "transferlab.inputs": 2,
    "transferlab.engine": 2,
    "transferlab.evaluation": 2,
    "transferlab.distributed": 2,
    "transferlab.loop_state": 2,
    "transferlab.checkpoint": 2,
    "transferlab.resilient": 2,
    "transferlab.tracking": 2,
    "transferlab.provenance": 2,
    "transferlab.sweep": 2,
    "transferlab.study": 2,
    "transferlab.study_store": 2,
    "transferlab.preflight": 2,
    "transferlab.pyfunc": 2,
    "transferlab.model_code": 2,
    "transferlab.model_store": 2,
    # 3 entrypoints.
    "transferlab.train": 3,
    "transferlab.report": 3,
    "transferlab.report_axes": 3,
    "transferlab.report_stats": 3,
    "transferlab.report_ci": 3,
    "transferlab.report_select": 3,
    "transferlab.report_render": 3,
    "transferlab.reproduce": 3,
    "transferlab.bench": 3,
    "transferlab.demo": 3,
    "transferlab.predict": 3,
    "transferlab.replicate": 3,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> int:
    """The layer of a module or of the package holding it (``transferlab.sources.elpv`` -> sources)."""
    for prefix in sorted(LAYERS, key=len, reverse=True):
        if module == prefix or module.startswith(prefix + "."):
            return LAYERS[prefix]
    raise AssertionError(f"{module} has no layer: add it to LAYERS in {__file__}")


def imports_of(module: str) -> set[str]:
    """The transferlab modules ``module`` imports, anywhere in its body."""
    is_package = MODULES[module].name == "__init__.py"
    return imports_in(MODULES[module].read_text(), module, is_package)


def imports_in(source: str, module: str, is_package: bool = False) -> set[str]:
    tree = ast.parse(source)
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from .x import y
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            # `from transferlab import sweep` imports the module transferlab.sweep
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in MODULES:  # `import transferlab.x.y` -> the deepest module known
                name = name.rpartition(".")[0]
            if name.startswith("transferlab") and name != module:
                found.add(name)
    return found


GRAPH = {module: imports_of(module) for module in MODULES}


def test_every_module_has_a_layer_and_imports_downwards() -> None:
    upward = [
        f"{module} (layer {layer_of(module)}) imports {target} (layer {layer_of(target)})"
        for module, targets in GRAPH.items()
        for target in sorted(targets)
        if layer_of(target) > layer_of(module)
    ]
    assert not upward, "\n".join(upward)


def test_schemas_import_nothing_of_transferlab_but_schemas() -> None:
    for module, targets in GRAPH.items():
        if layer_of(module) == 0:
            assert all(layer_of(t) == 0 for t in targets), (module, targets)
        if module.startswith("transferlab.schemas"):
            assert all(t.startswith("transferlab.schemas") for t in targets), (module, targets)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (as a path that ends where it starts), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle() -> None:
    cycle = find_cycle(GRAPH)
    assert cycle is None, " -> ".join(cycle or [])


def test_the_cycle_finder_finds_a_lazy_cycle() -> None:
    """The check can fail: a cycle closed by an import inside a function is found."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    lazy = "def f():\n    if True:\n        from transferlab.train import train\n"
    assert imports_in(lazy, "transferlab.modes") == {"transferlab.train"}
    assert imports_in("from . import data, engine\n", "transferlab.cache") == {
        "transferlab.data",
        "transferlab.engine",
    }
    upward = {"transferlab.modes": {"transferlab.train"}}
    assert any(layer_of(t) > layer_of(m) for m, ts in upward.items() for t in ts)


@pytest.mark.parametrize("module", sorted(m for m in MODULES if not m.endswith("__init__")))
def test_no_module_over_450_lines(module: str) -> None:
    lines = len(MODULES[module].read_text().splitlines())
    assert lines <= 450, f"{MODULES[module]} has {lines} lines: split it"
