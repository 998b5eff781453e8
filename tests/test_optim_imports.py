"""llava_sgg.optim stands alone and its modules import one another one way only.

docs/style.md: the optimizers import nothing from the rest of the package. And no two of its modules
import each other in a circle, counting imports inside functions, which Python resolves late and so
hides: such a circle means neither module can be read, tested or changed without the other.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

OPTIM = Path(__file__).parent.parent / "llava_sgg" / "optim"
PACKAGE = "llava_sgg.optim"


def optim_imports(path: Path) -> set[str]:
    """The modules of llava_sgg.optim that ``path`` imports anywhere in it (in functions too)."""
    modules = {p.stem for p in OPTIM.glob("*.py")} - {"__init__"}
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:  # from .x import y / from . import x
                names = [node.module] if node.module else [alias.name for alias in node.names]
            elif node.level == 0 and node.module and node.module.startswith(PACKAGE + "."):
                names = [node.module.removeprefix(PACKAGE + ".")]
            elif node.level == 0 and node.module == PACKAGE:
                names = [alias.name for alias in node.names]
            else:
                continue
        elif isinstance(node, ast.Import):
            names = [alias.name.removeprefix(PACKAGE + ".") for alias in node.names
                     if alias.name.startswith(PACKAGE + ".")]
        else:
            continue
        found |= {name.split(".")[0] for name in names} & modules
    return found - {path.stem}


def import_graph() -> dict[str, set[str]]:
    return {p.stem: optim_imports(p) for p in sorted(OPTIM.glob("*.py")) if p.stem != "__init__"}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(v):
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
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return groups


def test_no_two_optim_modules_import_each_other_in_a_circle():
    graph = import_graph()
    assert {"sgg", "functional", "fused", "steps"} <= set(graph)  # the checker sees the package
    assert cycles(graph) == []


def test_the_checker_sees_imports_inside_functions():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]


@pytest.mark.slow  # a python process of its own (importing torch: seconds)
def test_importing_the_optimizers_imports_nothing_else_of_llava_sgg():
    code = ("import sys, llava_sgg.optim\n"
            "print(sorted(m for m in sys.modules if m.startswith('llava_sgg') and m != 'llava_sgg'"
            " and not m.startswith('llava_sgg.optim')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=OPTIM.parent.parent)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


if __name__ == "__main__":  # python tests/test_optim_imports.py: the graph and any circle in it
    for module, imports in import_graph().items():
        print(f"{module:12} -> {', '.join(sorted(imports)) or '(nothing of llava_sgg.optim)'}")
    print("cycles:", cycles(import_graph()))
