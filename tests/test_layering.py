"""The package's layering: only ``dmlkd/cli/`` knows click, no import cycle between files, imports go downwards."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOT_LIBRARY = {"tests", "bench", "build", "docs", "cli"}


def _library_files() -> list[Path]:
    files = []
    for path in sorted(ROOT.rglob("*.py")):
        top = path.relative_to(ROOT).parts[0]
        if top not in NOT_LIBRARY and not top.startswith(".") and path.name != "__main__.py":
            files.append(path)
    return files


def _imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def test_library_modules_never_import_click_or_the_cli() -> None:
    offenders = {}
    for path in _library_files():
        bad = {
            name for name in _imported_modules(path) if name.split(".")[0] == "click" or name.startswith("dmlkd.cli")
        }
        if bad:
            offenders[str(path.relative_to(ROOT))] = sorted(bad)
    assert not offenders, f"library modules importing the command line layer: {offenders}"


def test_every_click_command_lives_in_the_cli_package() -> None:
    commands = [path for path in (ROOT / "cli").glob("*.py") if "import click" in path.read_text(encoding="utf-8")]
    assert len(commands) >= 8  # app, options and the command modules
    assert len(_library_files()) > 50  # the walk really covers the library


# The architecture as a test: the package's import graph has no cycle between files and follows the layering
# documented in the README's Contributing section. The graph is read with ``ast`` from every file of the package
# (module-level *and* in-function imports), so an import hidden inside a function counts like any other; a
# module may import modules of its own layer (same prefix) and of any lower layer.

OUTSIDE_PACKAGE = {"tests", "bench", "build", "docs"}

# Lowest first. A module belongs to the first layer with a prefix matching it (``a.b`` matches ``a.b`` and
# ``a.b.*``; the longest matching prefix wins); within a layer, modules may only import modules of their own
# prefix (``dmlkd.cli`` and the root facade share a layer, not code).
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    (
        "core (torch-free: errors, data formats, registries, configs, paths)",
        (
            "dmlkd.errors",
            "dmlkd.jsondata",
            "dmlkd.version",
            "dmlkd.lazy",
            "dmlkd.paths",
            "dmlkd.registry",
            "dmlkd.hub_access",
            "dmlkd.models.spec",
            "dmlkd.config",
            "dmlkd.teacher.config",
            "dmlkd.transfer.config",
            "dmlkd.devices",
        ),
    ),
    ("numerics (torch helpers both stages share)", ("dmlkd.numerics",)),
    ("data", ("dmlkd.data",)),
    ("models", ("dmlkd.models",)),
    ("process group", ("dmlkd.engine.distributed",)),
    ("checkpoints", ("dmlkd.checkpoints",)),
    ("evaluation", ("dmlkd.evaluation",)),
    ("inference", ("dmlkd.inference",)),
    ("engine (run machinery)", ("dmlkd.engine",)),
    ("stage 1", ("dmlkd.teacher",)),
    ("stage 2", ("dmlkd.transfer",)),  # may use stage 1's numerics; the teacher never imports transfer code
    ("pipelines", ("dmlkd.pipelines",)),
    ("command line and root facade", ("dmlkd.cli", "dmlkd")),
]

# In-function imports of dmlkd modules in library code (outside cli/), each with its reason. Everything else
# imports at the top of the module.
LAZY_IMPORTS = {
    ("dmlkd", "dmlkd.checkpoints.io"): "root facade: `import dmlkd` stays torch-free",
    ("dmlkd.transfer", "dmlkd.transfer.base"): "package facade: `import dmlkd.transfer` stays torch-free",
    ("dmlkd.engine.rundir", "dmlkd.engine.state"): "torch-free run folders; --resume checks the saved state",
    (
        "dmlkd.engine.stage_run",
        "dmlkd.engine.distributed",
    ): "a busy or finished run folder is refused before torch loads",
    ("dmlkd.pipelines.state", "dmlkd.engine.distributed"): "torch-free pipeline state; saving asks the rank",
    ("dmlkd.pipelines.plots", "dmlkd.evaluation.knn"): "a finished pipeline's summary prints without torch",
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(["dmlkd", *parts])


def library_modules() -> dict[str, Path]:
    modules = {}
    for path in sorted(ROOT.rglob("*.py")):
        top = path.relative_to(ROOT).parts[0]
        if top in OUTSIDE_PACKAGE or top.startswith(".") or path.name == "__main__.py":
            continue
        modules[module_name(path)] = path
    return modules


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, bool, int]]:
    """``(imported module, inside a function, line)`` for every import of a dmlkd module in ``path``.

    ``from a.b import c`` is an import of ``a.b.c`` when that is a module, else of ``a.b``; relative imports are
    resolved against the importing module's package.
    """
    found: list[tuple[str, bool, int]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((a.name, inside, child.lineno) for a in child.names if a.name.split(".")[0] == "dmlkd")
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                    package = package[: len(package) - child.level + 1]
                    base = ".".join([*package, base] if base else package)
                if base.split(".")[0] == "dmlkd":
                    for alias in child.names:
                        target = f"{base}.{alias.name}"
                        found.append((target if target in modules else base, inside, child.lineno))
            visit(child, inside)

    visit(ast.parse(path.read_text(encoding="utf-8")), False)
    return found


def import_graph() -> tuple[dict[str, set[str]], dict[tuple[str, str], list[tuple[bool, int]]]]:
    modules = library_modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    where: dict[tuple[str, str], list[tuple[bool, int]]] = {}
    for name, path in modules.items():
        for target, inside, line in imports_of(name, path, modules):
            if target in modules and target != name:
                graph[name].add(target)
                where.setdefault((name, target), []).append((inside, line))
    return graph, where


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph[node]):
            if other not in index:
                connect(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return found


def layer_of(module: str) -> tuple[int, str]:
    """``(layer index, matching prefix)`` of a module; the longest matching prefix wins."""
    best: tuple[int, int, str] | None = None
    for number, (_title, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > best[0]:
                    best = (len(prefix), number, prefix)
    assert best is not None, f"{module} is in no layer: add it to LAYERS (and to the README's list)"
    return best[1], best[2]


def layering_violations(graph: dict[str, set[str]]) -> list[str]:
    problems = []
    for module, targets in sorted(graph.items()):
        layer, prefix = layer_of(module)
        for target in sorted(targets):
            target_layer, target_prefix = layer_of(target)
            if target_layer > layer:
                problems.append(f"{module} ({LAYERS[layer][0]}) imports {target} ({LAYERS[target_layer][0]})")
            elif target_layer == layer and target_prefix != prefix and layer != 0:
                problems.append(f"{module} imports {target}: {prefix} and {target_prefix} share a layer, not code")
    return problems


def test_no_import_cycle_between_files() -> None:
    graph, where = import_graph()
    found = cycles(graph)
    details = [
        f"{' <-> '.join(cycle)}: "
        + "; ".join(
            f"{a} -> {b} line {line}{' (in a function)' if inside else ''}"
            for a in cycle
            for b in sorted(graph[a] & set(cycle))
            for inside, line in where[(a, b)]
        )
        for cycle in found
    ]
    assert not found, "import cycles:\n" + "\n".join(details)


def test_imports_follow_the_documented_layering() -> None:
    graph, _ = import_graph()
    problems = layering_violations(graph)
    assert not problems, "imports against the layering (README, Contributing):\n" + "\n".join(problems)


def test_library_modules_import_at_the_top() -> None:
    _graph, where = import_graph()
    lazy = {
        (module, target)
        for (module, target), places in where.items()
        if not module.startswith("dmlkd.cli") and any(inside for inside, _line in places)
    }
    unexplained = sorted(lazy - set(LAZY_IMPORTS))
    assert not unexplained, f"in-function imports outside cli/ without a reason in LAZY_IMPORTS: {unexplained}"
    stale = sorted(set(LAZY_IMPORTS) - lazy)
    assert not stale, f"LAZY_IMPORTS lists imports that are no longer in-function: {stale}"


def test_the_checks_can_fail() -> None:
    """The cycle finder and the layering check catch what they are for (on a made-up graph)."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    assert layering_violations({"dmlkd.models.embedding": {"dmlkd.transfer.trainer"}, "dmlkd.transfer.trainer": set()})
    assert layering_violations({"dmlkd.data.transforms": {"dmlkd.models.outputs"}, "dmlkd.models.outputs": set()})
    assert layering_violations({"dmlkd.teacher.trainer": {"dmlkd.transfer.base"}, "dmlkd.transfer.base": set()})
    assert layering_violations({"dmlkd.checkpoints.io": {"dmlkd.inference.embed"}, "dmlkd.inference.embed": set()})
    assert not layering_violations({"dmlkd.transfer.trainer": {"dmlkd.models.embedding"}})
    graph, _ = import_graph()
    assert len(graph) > 80 and sum(map(len, graph.values())) > 300  # the walk really reads the package
