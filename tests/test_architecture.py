"""The import-layer contract: no cycles, no upward imports, no unexplained lazy imports.

The layers, top to bottom (docs/architecture.md draws them). A module may import
from its own layer's package and from any layer below; siblings on one layer
(``features`` and ``quant``; ``demo`` and ``bench``) do not import each other.
The package root only re-exports, so nothing inside the package imports it.

Imports are read from the source with ``ast`` (imports inside functions count
too), so the test needs no import of the package and runs in milliseconds.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "peftadapt"

LAYERS = [
    ["peftadapt"],  # the public re-exports (the root __init__ only)
    ["peftadapt.cli"],
    ["peftadapt.demo", "peftadapt.bench"],
    ["peftadapt.integrations"],  # add_alignment: the DA step inside other trainers, on our data order
    ["peftadapt.train"],
    ["peftadapt.wrap"],
    ["peftadapt.backends"],
    ["peftadapt.methods"],
    ["peftadapt.validators"],  # scores of a model's outputs without target labels (tensors in, float out)
    ["peftadapt.align"],
    ["peftadapt.features", "peftadapt.quant"],
    ["peftadapt.core"],
]
# A first-party import inside a function must say why on its line or the line above.
LAZY_MARK = "lazy:"


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _resolve(module: str, node: ast.ImportFrom | ast.Import, is_package: bool) -> list[str]:
    """The first-party modules an import statement loads (a package means its __init__)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "peftadapt"]
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if target.split(".")[0] != "peftadapt":
        return []
    out = []
    for alias in node.names:
        sub = f"{target}.{alias.name}"
        out.append(sub if sub in MODULES else target)
    return out


def _imports() -> list[tuple[str, str, int, bool, str]]:
    """(importer, imported, line, inside a function, the source lines around it) for every import."""
    rows = []
    for module, path in MODULES.items():
        lines = path.read_text(encoding="utf-8").splitlines()
        tree = ast.parse("\n".join(lines))
        is_package = path.name == "__init__.py"

        def visit(
            node: ast.AST,
            in_function: bool,
            module: str = module,
            lines: list[str] = lines,
            is_package: bool = is_package,
        ) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.Import, ast.ImportFrom)):
                    context = "\n".join(lines[max(0, child.lineno - 2) : child.lineno])
                    for target in _resolve(module, child, is_package):
                        if target != module:
                            rows.append((module, target, child.lineno, in_function, context))
                visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))

        visit(tree, False)
    return rows


IMPORTS = _imports()


def _layer(module: str) -> tuple[int, str]:
    """(layer index, the layer entry that owns ``module``): the longest matching entry."""
    best = None
    for i, entries in enumerate(LAYERS):
        for entry in entries:
            owns = module == entry or (entry != "peftadapt" and module.startswith(entry + "."))
            if owns and (best is None or len(entry) > len(best[1])):
                best = (i, entry)
    assert best is not None, f"module {module} is in no layer: add it to LAYERS (and docs/architecture.md)"
    return best


def test_every_module_has_a_layer():
    for module in MODULES:
        _layer(module)


def test_no_upward_or_sideways_imports():
    bad = []
    for importer, imported, line, _, _ in IMPORTS:
        (li, own), (lj, other) = _layer(importer), _layer(imported)
        if lj < li or (lj == li and own != other):
            bad.append(f"{importer}:{line} imports {imported} ({other} is not below {own})")
    assert not bad, "imports against the layers:\n" + "\n".join(bad)


def test_no_import_cycles():
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for importer, imported, *_ in IMPORTS:
        graph[importer].add(imported)
    # Tarjan's strongly connected components
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles = []

    def strongconnect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    assert not cycles, f"import cycles: {cycles}"


def test_first_party_imports_inside_functions_say_why():
    bad = [
        f"{importer}:{line} imports {imported} inside a function without a '# {LAZY_MARK} <reason>' comment"
        for importer, imported, line, inside, context in IMPORTS
        if inside and LAZY_MARK not in context
    ]
    assert not bad, "\n".join(bad)


def test_the_contract_sees_the_imports_it_checks():
    # guards against a resolver that silently finds nothing: these edges exist today
    edges = {(a, b) for a, b, *_ in IMPORTS}
    assert ("peftadapt.align.terms", "peftadapt.align.registry") in edges
    assert ("peftadapt.wrap", "peftadapt.backends") in edges
    assert ("peftadapt.align.scope", "peftadapt.core.comm") in edges


@pytest.mark.parametrize(
    "importer,imported,bad",
    [
        ("peftadapt.core.hf", "peftadapt.align", True),  # upward
        ("peftadapt.features", "peftadapt.quant", True),  # sideways between siblings
        ("peftadapt.align.terms", "peftadapt.align.scope", False),
        ("peftadapt.train.loop", "peftadapt.core.comm", False),
    ],
)
def test_layer_rule_on_examples(importer, imported, bad):
    (li, own), (lj, other) = _layer(importer), _layer(imported)
    assert (lj < li or (lj == li and own != other)) is bad
