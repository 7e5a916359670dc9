"""The folders are the architecture: every import goes to the same or a lower layer, no module
imports the console script, and the project's import graph has no cycle.

Layers, lowest first (README "What is in the box"):
core -> diffusion, networks -> datamodules -> stages -> callbacks -> pipelines -> evaluation
-> benchmarks -> cli. Imports inside functions count too (they are real dependencies).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS: list[tuple[str, ...]] = [
    ("modules.core",),
    ("modules.diffusion", "modules.networks"),
    ("datamodules",),
    ("modules.stages",),
    ("callbacks",),
    ("modules.pipelines",),
    ("modules.evaluation",),
    ("benchmarks",),
    ("modules.cli",),
]
PACKAGES = ("modules", "datamodules", "callbacks", "benchmarks")


def layer_of(module: str) -> int | None:
    for rank, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return rank
    return None


def project_modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def imports_of(path: Path, known: set[str]) -> set[str]:
    """Project modules `path` imports (`from a.b import c` counts `a.b.c` when that is a module)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module for a in node.names]
        else:
            continue
        out |= {n for n in names if n.split(".")[0] in PACKAGES}
    return out


def graph() -> dict[str, set[str]]:
    modules = project_modules()
    known = set(modules)
    return {name: {m for m in imports_of(path, known) if m in known and m != name} for name, path in modules.items()}


def test_every_module_has_a_layer() -> None:
    assert [m for m in project_modules() if layer_of(m) is None and m not in PACKAGES and m != "modules.__init__"] == []


def test_imports_go_down_the_layers_and_nothing_imports_the_console_script() -> None:
    upward = [(a, b) for a, deps in graph().items() for b in deps
              if layer_of(a) is not None and layer_of(b) is not None and layer_of(b) > layer_of(a)]
    assert upward == []
    console = [a for a, deps in graph().items() for b in deps if b == "modules.cli.main" and a != "modules.cli.__main__"]
    assert console == []


def test_the_import_graph_has_no_cycle() -> None:
    g, state, cycles = graph(), {}, []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(g.get(node, ())):
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = 2

    for node in sorted(g):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_the_checker_sees_an_upward_import(tmp_path: Path) -> None:
    """The rule is not vacuous: a core module importing a stage would be reported."""
    fake = tmp_path / "bad.py"
    fake.write_text("from modules.stages.decoder import DecoderModule\n")
    deps = imports_of(fake, set(project_modules()))
    assert deps == {"modules.stages.decoder.DecoderModule"} or deps == {"modules.stages.decoder"}
    assert layer_of("modules.stages.decoder") > layer_of("modules.core.errors")
