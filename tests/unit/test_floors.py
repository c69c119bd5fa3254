"""The package's floors: every import points down (or stays in its own room), read from the source with ast.

A module may import its own component and any component on a lower floor; peers on one floor never import
each other (engines and training meet only through a checkpoint path the driver hands over), except on the
ground floor and among the command-line entry points. The README's "Layout" section draws the same table.
"""

from __future__ import annotations

import ast
from pathlib import Path

import mmdc

FLOORS: list[set[str]] = [
    {"mmdc", "mmdc.config", "mmdc.roles", "mmdc.rundir", "mmdc.metrics"},  # ground: config, prompts, run directory
    {"mmdc.data"},  # pure rows
    {"mmdc.engines", "mmdc.train", "mmdc.sizing"},  # serving, training, sizing: peers
    {"mmdc.world"},  # the embedded default
    {"mmdc.eval"},  # benchmarks
    {"mmdc.report"},  # the run report
    {"mmdc.actors"},  # the driver and the GPU hand-over
    {"mmdc.run", "mmdc.ablate", "mmdc.endpoint", "mmdc.plan", "mmdc.finetune", "mmdc.__main__"},  # entry points
]
SHARED_FLOORS = (0, len(FLOORS) - 1)  # components on these floors may import each other

PACKAGE = Path(mmdc.__file__).parent


def component(module: str) -> tuple[str, int] | None:
    """The floor-table entry ``module`` belongs to (the longest matching name) and its floor."""
    best: tuple[str, int] | None = None
    for floor, names in enumerate(FLOORS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and (best is None or len(name) > len(best[0])):
                best = (name, floor)
    return best


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def imported(tree: ast.AST, here: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, module) of every mmdc import, relative ones resolved, function-level ones included.

    ``from mmdc import roles`` counts as an import of the module ``mmdc.roles``, not of the package.
    """
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = here.split(".")[: len(here.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([base] if base else []))
            submodules = [f"{base}.{alias.name}" for alias in node.names if is_module(f"{base}.{alias.name}")]
            found += [(node.lineno, name) for name in submodules or [base]]
    return [(line, name) for line, name in found if name == "mmdc" or name.startswith("mmdc.")]


def upward_imports() -> tuple[list[str], list[str]]:
    arrows, unplaced = [], []
    for path in sorted(PACKAGE.rglob("*.py")):
        here = module_name(path)
        mine = component(here)
        if mine is None:
            unplaced.append(here)
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for line, target in imported(tree, here, path.name == "__init__.py"):
            theirs = component(target)
            if theirs is None:
                unplaced.append(target)
            elif theirs[0] == "mmdc" and target == "mmdc":
                continue  # the package itself (its version)
            elif theirs[0] != mine[0] and (
                theirs[1] > mine[1] or (theirs[1] == mine[1] and mine[1] not in SHARED_FLOORS)
            ):
                arrows.append(
                    f"{path.relative_to(PACKAGE.parent)}:{line} {here} (floor {mine[1]}) imports "
                    f"{target} (floor {theirs[1]})"
                )
    return arrows, sorted(set(unplaced))


def test_every_import_points_down_or_stays_in_its_room():
    arrows, _ = upward_imports()
    assert arrows == [], "imports that run up or across a floor:\n" + "\n".join(arrows)


def test_every_module_has_a_floor():
    _, unplaced = upward_imports()
    assert unplaced == [], f"modules missing from the floor table in {__file__}: {unplaced}"


def test_the_check_sees_an_upward_import():
    tree = ast.parse("from mmdc.actors.driver import Driver\nfrom mmdc import roles\n")
    targets = [name for _, name in imported(tree, "mmdc.data.pools", False)]
    assert "mmdc.actors.driver" in targets and "mmdc.roles" in targets
    assert component("mmdc.actors.driver")[1] > component("mmdc.data.pools")[1]
