"""The package's layers only look down, and no module imports itself back through others (deferred imports
included): commands -> trainer / callback / report -> reward -> judges -> the base modules."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "trl_longreward"

# Lower numbers are lower layers. A module may import its own layer or a lower one.
LAYERS: dict[str, int] = {
    "trl_longreward.models": 0,
    "trl_longreward.documents": 0,
    "trl_longreward.pairs": 0,
    "trl_longreward.records": 0,
    "trl_longreward.summaries": 0,
    "trl_longreward.shards": 0,
    "trl_longreward.data": 0,
    "trl_longreward.vllm_support": 0,
    "trl_longreward.generation": 1,
    "trl_longreward.judges": 2,
    "trl_longreward.reward": 3,
    "trl_longreward.testing": 3,
    "trl_longreward.trainer": 4,
    "trl_longreward.callback": 5,
    "trl_longreward.report": 5,
    "trl_longreward.commands": 6,
    "trl_longreward": 7,  # the package's public face imports everything
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _layer(module: str) -> int:
    best = max((name for name in LAYERS if module == name or module.startswith(name + ".")), key=len)
    return LAYERS[best]


def _imports(path: Path) -> set[str]:
    """Package modules a file imports, at module level or inside functions."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("trl_longreward"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("trl_longreward"):
                continue
            # `from pkg import name` may import the submodule pkg.name
            for alias in node.names:
                candidate = f"{target}.{alias.name}"
                found.add(candidate if _exists(candidate) else target)
    found.discard(module)
    return {name for name in found if _exists(name)}


def _exists(module: str) -> bool:
    path = PACKAGE.parent.joinpath(*module.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


GRAPH = {_module_name(p): _imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def _is_parent_package(importer: str, imported: str) -> bool:
    # importing a submodule runs its package's __init__; importing one's own package (for its names) is not a cycle
    return importer.startswith(imported + ".")


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_module_imports_only_its_own_layer_or_lower(module: str):
    upward = sorted(name for name in GRAPH[module] if _layer(name) > _layer(module))
    assert not upward, f"{module} (layer {_layer(module)}) imports a higher layer: {upward}"


def test_commands_share_helpers_through_common_modules_never_through_each_other():
    commands = [m for m in GRAPH if m.startswith("trl_longreward.commands.") and not m.endswith("__main__")]
    for module in commands:
        others = sorted(name for name in GRAPH[module] if name in commands)
        assert not others, f"{module} imports the commands {others}"


def test_no_import_cycles():
    edges = {m: {n for n in deps if not _is_parent_package(m, n)} for m, deps in GRAPH.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt) :] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)


def test_the_walk_sees_the_package():
    """Guards the test itself: the graph holds the modules and the edges it is meant to check."""
    assert "trl_longreward.trainer.trainer" in GRAPH and "trl_longreward.reward.function" in GRAPH
    assert "trl_longreward.documents" in GRAPH["trl_longreward.trainer.trainer"]
    assert "trl_longreward.reward.runner" in GRAPH["trl_longreward.reward.function"]
