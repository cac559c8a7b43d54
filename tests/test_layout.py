"""The library's shape, checked from its source with ``ast`` (nothing is imported).

Every import is read: at module level, inside functions and under ``if TYPE_CHECKING:``
(an import a type checker needs is a dependency all the same). Relative imports are resolved;
``from compressor.x import y`` where ``y`` is a submodule counts as importing ``compressor.x.y``.
An import names the module it names, not the packages above it (``import compressor.a.b``
is an edge to ``compressor.a.b`` only). Files map to modules as pyproject's ``package-dir``
says: ``passes/`` is ``compressor.passes``, ``exporters/`` is ``compressor.exporters``,
``kernels/`` is ``compressor.kernels``; everything else lives under ``compressor/``.

Rules:

1. No import cycle between files.
2. The packages, and what each may import from the others:

   - ``kernels`` (``kernels/``): nothing from core, passes, exporters or app -- the kernels stand
     alone;
   - ``core`` (``compressor/*.py``, ``compressor/adapters/``, ``compressor/distill/``): the
     kernels; nothing from passes, exporters or app, with ONE exception: ``compressor.recipe``
     reads the two registries, importing the packages ``compressor.passes`` and
     ``compressor.exporters`` (their ``__init__``, which registers every pass/exporter) inside
     the function that parses a recipe. A recipe names passes and formats, so parsing one
     needs the registry; importing it late keeps ``import compressor.recipe`` free of every
     pass. That edge is a plug-in lookup, not a layer dependency: it is left out of the
     package graph, but it stays in the file graph (rule 1), so no pass or exporter may import
     ``compressor.recipe``, directly or through other modules. Any other core module, any other
     target (a pass's own module), or a module-level import breaks the rule;
   - ``passes`` (``passes/``) and ``exporters`` (``exporters/``): core and kernels; nothing
     from app (passes and exporters do not import each other either: the package graph
     must stay acyclic, and each is a leaf the recipe names);
   - ``app`` (``compressor/app/``, ``compressor/api.py``): anything.

   And the package graph has no cycle.
3. No library module over 400 lines, no function over 80 lines.
4. A module that registers a pass (``@register_pass``) or an exporter (``@register_exporter``)
   is named after what it registers: its file stem is the registered name (``-`` read as
   ``_``), or it registers several and its stem is made of exactly those names
   (``a_b.py`` registering ``a`` and ``b``).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# folder (relative to ROOT) -> the dotted package it is installed as (pyproject's package-dir)
PACKAGE_DIRS = {
    "compressor": "compressor",
    "passes": "compressor.passes",
    "exporters": "compressor.exporters",
    "kernels": "compressor.kernels",
}
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80
# the one core -> passes/exporters edge allowed (see rule 2): importer -> the registries it reads
REGISTRY_READER = "compressor.recipe"
REGISTRIES = frozenset({"compressor.passes", "compressor.exporters"})
# package -> the packages it may import from
ALLOWED = {
    "kernels": {"kernels"},
    "core": {"core", "kernels"},
    "passes": {"passes", "core", "kernels"},
    "exporters": {"exporters", "core", "kernels"},
    "app": {"app", "core", "kernels", "passes", "exporters"},
}


@dataclass(frozen=True)
class Import:
    importer: str
    imported: str
    line: int
    in_function: bool

    def where(self) -> str:
        return f"{MODULES[self.importer].relative_to(ROOT)}:{self.line}"


def _modules() -> dict[str, Path]:
    """Dotted module name -> its file, for every library file."""
    out: dict[str, Path] = {}
    for folder, package in PACKAGE_DIRS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            name = ".".join((package, *parts))
            # compressor/ holds no passes/, exporters/ or kernels/ folder; guard the remap anyway
            assert name not in out, f"{path} and {out[name]} are both {name}"
            out[name] = path
    return out


MODULES = _modules()


def _package_of(module: str) -> str:
    """The dotted package a module's relative imports resolve against."""
    return module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]


def _resolve(module: str, level: int, name: str | None) -> str:
    if level == 0:
        return name or ""
    base = _package_of(module).split(".")
    base = base[: len(base) - (level - 1)]
    return ".".join([*base, name] if name else base)


def _known(name: str) -> str | None:
    """The library module ``name`` is, or the nearest library package above it."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def _walk(node: ast.AST, in_function: bool = False) -> Iterator[tuple[ast.AST, bool]]:
    """Every node with whether it sits inside a function body."""
    for child in ast.iter_child_nodes(node):
        inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        yield child, inside
        yield from _walk(child, inside)


def _imports_of(module: str, tree: ast.Module) -> Iterator[Import]:
    for node, in_function in _walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            source = _resolve(module, node.level, node.module)
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                targets.append(sub if sub in MODULES else source)
        for target in targets:
            known = _known(target)
            if known is not None and known != module:
                yield Import(module, known, node.lineno, in_function)


TREES = {name: ast.parse(path.read_text(encoding="utf-8"), str(path)) for name, path in MODULES.items()}
# deduplicated: ``from m import a, b`` is one edge
IMPORTS = list(dict.fromkeys(imp for name, tree in TREES.items() for imp in _imports_of(name, tree)))


def package(module: str) -> str:
    for prefix in ("kernels", "passes", "exporters", "app"):
        if module == f"compressor.{prefix}" or module.startswith(f"compressor.{prefix}."):
            return prefix
    return "app" if module == "compressor.api" else "core"


def _is_registry_read(imp: Import) -> bool:
    return imp.importer == REGISTRY_READER and imp.imported in REGISTRIES and imp.in_function


def _cycles(edges: dict[str, dict[str, str]]) -> list[list[str]]:
    """One shortest cycle through each strongly connected component (Tarjan), as a node chain."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:  # recursion depth <= number of modules (~100)
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, {}):
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
            if len(component) > 1 or v in edges.get(v, {}):
                components.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return [_shortest_cycle(edges, component) for component in sorted(components)]


def _shortest_cycle(edges: dict[str, dict[str, str]], component: list[str]) -> list[str]:
    """Breadth-first from the component's first node back to itself, inside the component."""
    start, members = component[0], set(component)
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(edges.get(v, {})):
                if w == start:
                    chain = [v]
                    while chain[-1] != start:
                        chain.append(parent[chain[-1]])
                    return [*reversed(chain), start]
                if w in members and w not in parent:
                    parent[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle through {start}")  # a component always has one


def _show_cycle(chain: list[str], edges: dict[str, dict[str, str]]) -> str:
    steps = [f"{a} -> {b} ({edges[a][b]})" for a, b in zip(chain, chain[1:], strict=False)]
    return "\n    ".join(steps)


def test_no_import_cycle_between_files() -> None:
    edges: dict[str, dict[str, str]] = {}
    for imp in IMPORTS:  # the registry read included: nothing it loads may import the recipe
        edges.setdefault(imp.importer, {}).setdefault(imp.imported, imp.where())
    cycles = _cycles(edges)
    if cycles:
        pytest.fail(
            f"{len(cycles)} import cycle(s) between files:\n  "
            + "\n  ".join("cycle:\n    " + _show_cycle(chain, edges) for chain in cycles),
            pytrace=False,
        )


def test_packages_import_only_what_their_layer_allows() -> None:
    bad = [
        f"{imp.where()}: {package(imp.importer)} module {imp.importer} imports "
        f"{package(imp.imported)} module {imp.imported}"
        for imp in IMPORTS
        if package(imp.imported) not in ALLOWED[package(imp.importer)] and not _is_registry_read(imp)
    ]
    if bad:
        pytest.fail("imports across layers the rules forbid:\n  " + "\n  ".join(bad), pytrace=False)


def test_no_cycle_between_packages() -> None:
    edges: dict[str, dict[str, str]] = {}
    for imp in IMPORTS:
        a, b = package(imp.importer), package(imp.imported)
        if a != b and not _is_registry_read(imp):
            edges.setdefault(a, {}).setdefault(b, f"{imp.where()}: {imp.importer} -> {imp.imported}")
    cycles = _cycles(edges)
    if cycles:
        pytest.fail(
            "package cycle(s):\n  " + "\n  ".join(_show_cycle(c, edges) for c in cycles), pytrace=False
        )


def test_the_registry_read_is_late() -> None:
    """``compressor.recipe`` reads the registries only inside a function (rule 2)."""
    early = [
        imp.where()
        for imp in IMPORTS
        if imp.importer == REGISTRY_READER and package(imp.imported) != "core" and not imp.in_function
    ]
    if early:
        pytest.fail(
            "compressor.recipe imports non-core modules at module level: " + ", ".join(early), pytrace=False
        )


def test_modules_and_functions_are_short() -> None:
    long_modules = [
        f"{path.relative_to(ROOT)}: {n} lines"
        for path in MODULES.values()
        if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES
    ]
    long_functions = [
        f"{MODULES[name].relative_to(ROOT)}:{node.lineno} {node.name}: {n} lines"
        for name, tree in TREES.items()
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and (n := (node.end_lineno or node.lineno) - node.lineno + 1) > MAX_FUNCTION_LINES
    ]
    if long_modules or long_functions:
        pytest.fail(
            f"modules over {MAX_MODULE_LINES} lines:\n  "
            + ("\n  ".join(long_modules) or "none")
            + f"\nfunctions over {MAX_FUNCTION_LINES} lines:\n  "
            + ("\n  ".join(long_functions) or "none"),
            pytrace=False,
        )


def _registered(tree: ast.Module, decorator: str) -> list[str | None]:
    """The ``name`` of every class in ``tree`` decorated with ``decorator`` (None: not literal)."""
    out: list[str | None] = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.ClassDef):
            continue
        names = {d.id if isinstance(d, ast.Name) else getattr(d, "attr", None) for d in node.decorator_list}
        if decorator not in names:
            continue
        literal = None
        for stmt in node.body:
            if isinstance(stmt, (ast.Assign, ast.AnnAssign)) and isinstance(stmt.value, ast.Constant):
                targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
                if any(isinstance(t, ast.Name) and t.id == "name" for t in targets):
                    literal = stmt.value.value if isinstance(stmt.value.value, str) else None
        out.append(literal)
    return out


def _named_after(stem: str, names: list[str]) -> bool:
    rest = stem
    for name in sorted((n.replace("-", "_") for n in names), key=len, reverse=True):
        if name not in rest:
            return False
        rest = rest.replace(name, "", 1)
    return rest.strip("_") == ""


def test_registering_modules_are_named_after_what_they_register() -> None:
    bad = []
    for module, tree in TREES.items():
        family = package(module)
        if family not in ("passes", "exporters"):
            continue
        names = _registered(tree, "register_pass" if family == "passes" else "register_exporter")
        if not names:
            continue
        path = MODULES[module].relative_to(ROOT)
        if None in names:
            bad.append(f"{path}: a registered class has no literal `name = '...'` in its body")
        elif not _named_after(MODULES[module].stem, [n for n in names if n]):
            bad.append(f"{path} registers {', '.join(sorted(n for n in names if n))}")
    if bad:
        pytest.fail("modules not named after what they register:\n  " + "\n  ".join(bad), pytrace=False)
