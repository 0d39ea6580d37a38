"""The layout is the data flow: each subpackage imports only from the layers below it, and no module imports
itself back through others (issue "One step of redesign"). Checked on the source text, lazy imports included."""

from __future__ import annotations

import ast
from pathlib import Path

import edgekit

ROOT = Path(edgekit.__file__).parent
# Layer of each part of edgekit: a module may import from lower layers, and from its own subpackage.
# The base modules (layer 0.x) are ordered among themselves too.
LAYERS = {
    "version": 0.0, "errors": 0.0, "interrupts": 0.0, "safe_io": 0.1, "progress": 0.2,
    "targets": 0.3, "variants": 0.4, "tokenizer_record": 0.5,
    "package": 1, "sources": 1,
    "runtimes": 2, "exporters": 2.5,
    "accuracy": 3,
    "quant": 4,
    "recipe_step": 4.2, "build_context": 4.4, "build_steps": 4.5,
    "pipeline": 5, "demo": 5, "summary": 5.5, "serve": 5.8, "terminal_chat": 5.9, "cli": 6, "__init__": 7,
}  # fmt: skip
SUBPACKAGES = {"package", "sources", "runtimes", "exporters", "accuracy", "quant", "serve"}


def part_of(module: str) -> str:
    """``edgekit.sources.registry`` -> ``sources``; ``edgekit.cli`` -> ``cli``; ``edgekit`` -> ``__init__``."""
    return module.split(".")[1] if module.count(".") >= 1 else "__init__"


def edgekit_imports(path: Path, module: str) -> set[str]:
    """Every edgekit module ``path`` imports, at any depth of the file (lazy imports included)."""
    imported: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.startswith("edgekit"):
            targets = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            imported.update(t for t in targets if module_path(t) is not None)
        elif isinstance(node, ast.Import):
            imported.update(a.name for a in node.names if a.name.startswith("edgekit.") and module_path(a.name))
    return imported - {module}


def module_path(module: str) -> Path | None:
    if module == "edgekit":
        return ROOT / "__init__.py"
    relative = Path(*module.split(".")[1:])
    for candidate in (ROOT / relative.with_suffix(".py"), ROOT / relative / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def all_modules() -> dict[str, Path]:
    modules = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        parts = parts[:-1] if parts[-1] == "__init__" else parts
        modules[".".join(("edgekit", *parts))] = path
    return modules


def test_every_part_of_edgekit_has_a_layer() -> None:
    missing = sorted({part_of(m) for m in all_modules()} - set(LAYERS))
    assert not missing, f"give these a layer in LAYERS: {missing}"


def test_imports_only_go_down() -> None:
    upward = []
    for module, path in all_modules().items():
        mine = part_of(module)
        for target in edgekit_imports(path, module):
            theirs = part_of(target)
            if theirs == mine and mine in SUBPACKAGES:
                continue  # within one subpackage; cycles are the next test's business
            if target == "edgekit":
                continue  # the root holds only __version__ and the lazy public names
            if LAYERS[theirs] >= LAYERS[mine]:
                upward.append(f"{module} (layer {LAYERS[mine]}) -> {target} (layer {LAYERS[theirs]})")
    assert not upward, "imports that go up or sideways:\n" + "\n".join(sorted(upward))


def test_no_import_cycles() -> None:
    modules = all_modules()
    graph = {m: {t for t in edgekit_imports(p, m) if t in modules} for m, p in modules.items()}
    state: dict[str, int] = {}
    cycles: list[str] = []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                cycles.append(" -> ".join([*trail[trail.index(target) :], target]))
            elif target not in state:
                visit(target, [*trail, target])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_checker_sees_lazy_imports(tmp_path: Path) -> None:
    """A test that cannot fail is a defect: the parser must find imports inside functions."""
    path = tmp_path / "x.py"
    path.write_text("def f():\n    from edgekit.pipeline import build\n    import edgekit.cli\n")
    assert edgekit_imports(path, "edgekit.sources.x") == {"edgekit.pipeline", "edgekit.cli"}
