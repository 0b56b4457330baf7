"""The shape of the code that issue 15 asks to keep: no import cycle inside bnfold, no module reaching
for another module's private (underscore) names, no module over ~600 lines, torch only under
bnfold/fx. Read from the source (ast), so a regression fails here, not in review."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "bnfold"
MAX_LINES = 600


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def is_type_checking_block(node: ast.stmt) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def top_level_imports(path: Path) -> list[ast.Import | ast.ImportFrom]:
    """Imports that run when the module is imported: at module level, outside TYPE_CHECKING blocks
    (a function's own imports run later and cannot make an import cycle)."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(statements: list[ast.stmt]) -> None:
        for statement in statements:
            if isinstance(statement, ast.Import | ast.ImportFrom):
                found.append(statement)
            elif isinstance(statement, ast.If) and not is_type_checking_block(statement):
                visit(statement.body)
                visit(statement.orelse)
            elif isinstance(statement, ast.Try):
                visit(statement.body)
                for handler in statement.handlers:
                    visit(handler.body)
                visit(statement.orelse)
                visit(statement.finalbody)

    visit(ast.parse(path.read_text()).body)
    return found


def absolute(module: str, statement: ast.ImportFrom) -> str:
    if not statement.level:
        return statement.module or ""
    base = module.split(".")
    if not MODULES[module].name == "__init__.py":
        base = base[:-1]
    base = base[: len(base) - (statement.level - 1)]
    return ".".join([*base, statement.module] if statement.module else base)


def bnfold_imports(module: str) -> set[str]:
    """The bnfold modules that importing ``module`` imports first (a ``from package import name``
    that names a submodule counts as that submodule)."""
    targets: set[str] = set()
    for statement in top_level_imports(MODULES[module]):
        if isinstance(statement, ast.Import):
            targets.update(alias.name for alias in statement.names if alias.name.startswith("bnfold"))
            continue
        source = absolute(module, statement)
        if not source.startswith("bnfold"):
            continue
        for alias in statement.names:
            submodule = f"{source}.{alias.name}"
            targets.add(submodule if submodule in MODULES else source)
    return {target for target in targets if target in MODULES and target != module}


def test_no_import_cycle_inside_bnfold():
    graph = {module: bnfold_imports(module) for module in MODULES}
    # A package imports its parents first; an edge into a parent package's __init__ is only a cycle
    # when that __init__ imports back, which the search sees as any other edge.
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(module: str) -> None:
        state[module] = 1
        stack.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                cycles.append([*stack[stack.index(target) :], target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(cycle) for cycle in cycles)


def test_no_module_imports_another_modules_private_names():
    offenders = []
    for module, path in MODULES.items():
        for statement in ast.walk(ast.parse(path.read_text())):
            if not isinstance(statement, ast.ImportFrom):
                continue
            source = absolute(module, statement)
            if not source.startswith("bnfold"):
                continue
            offenders += [
                f"{module}: from {source} import {alias.name}"
                for alias in statement.names
                if alias.name.startswith("_") and alias.name != "__version__"
            ]
    assert not offenders, offenders


def test_no_module_is_over_the_line_budget():
    long = {
        module: n for module, path in MODULES.items() if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_torch_is_imported_at_module_level_only_under_bnfold_fx():
    offenders = []
    for module, path in MODULES.items():
        if module == "bnfold.fx" or module.startswith("bnfold.fx."):
            continue
        for statement in top_level_imports(path):
            names = (
                [alias.name for alias in statement.names]
                if isinstance(statement, ast.Import)
                else [absolute(module, statement)]
            )
            offenders += [f"{module}: {name}" for name in names if name.split(".")[0] == "torch"]
    assert not offenders, offenders


def test_the_checks_see_what_they_check():
    # The walk found the package, and the import graph has the edges everyone knows are there.
    assert "bnfold.onnx.fold" in MODULES and "bnfold.core.driver" in MODULES
    assert "bnfold.core.driver" in bnfold_imports("bnfold.onnx.fold")
    assert "bnfold.onnx.io.store" in bnfold_imports("bnfold.onnx.io")
