"""The eval package's imports: no cycle between its modules, and each module imports on its own.

A cycle (commands.py importing recall.py importing commands.py) works or fails depending on which module a
program happens to import first; these tests keep the graph a tree of one-way dependencies.
"""

import ast
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EVAL = REPO / "sparse_prefill" / "eval"
PACKAGE = "sparse_prefill.eval"


def eval_modules() -> list[str]:
    return sorted(p.stem for p in EVAL.glob("*.py") if p.stem != "__init__")


def imported_eval_modules(module: str) -> set[str]:
    """The eval modules `module` imports anywhere in its source (inside functions too: a lazy import
    still closes a cycle when the function runs)."""
    tree = ast.parse((EVAL / f"{module}.py").read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:  # from .x import y / from . import x
                base = node.module.split(".")[0] if node.module else None
                names = [base] if base else [alias.name for alias in node.names]
            elif node.level == 0 and (node.module or "").startswith(PACKAGE + "."):
                names = [node.module.split(".")[2]]
            else:
                continue
        elif isinstance(node, ast.Import):
            names = [a.name.split(".")[2] for a in node.names if a.name.startswith(PACKAGE + ".")]
        else:
            continue
        found.update(n for n in names if (EVAL / f"{n}.py").is_file() and n != module)
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as [a, b, ..., a], or None (depth-first search, three colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle_and_accepts_a_tree():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_eval_import_graph_has_no_cycle():
    graph = {m: imported_eval_modules(m) for m in eval_modules()}
    assert graph["recall"] and graph["commands"] and graph["demo"]  # the parser sees the imports
    assert "recall" in graph["demo"] and "options" in graph["recall"]
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


# Each child imports one eval module into an interpreter that holds none of sparse_prefill. The parent imports
# the heavy third-party libraries once before forking, so the test takes seconds, not a minute of torch imports.
_ALONE = """
import importlib, os, sys, traceback
for heavy in ("torch", "transformers", "matplotlib.pyplot", "tqdm.auto", "lm_eval.models.huggingface"):
    try:
        importlib.import_module(heavy)
    except ImportError:
        pass
assert not any(name.startswith("sparse_prefill") for name in sys.modules)
failed = []
for module in sys.argv[1:]:
    pid = os.fork()
    if pid == 0:
        try:
            importlib.import_module("sparse_prefill.eval." + module)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        os._exit(0)
    if os.waitpid(pid, 0)[1] != 0:
        failed.append(module)
print("failed:", *failed)
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the check forks one child per module")
def test_each_eval_module_imports_alone():
    modules = eval_modules()
    run = subprocess.run([sys.executable, "-c", _ALONE, *modules], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    failed = run.stdout.split()[1:]
    if importlib.util.find_spec("lm_eval") is None:  # lm_harness needs the eval extra's lm-eval
        failed = [m for m in failed if m != "lm_harness"]
    assert failed == [], run.stderr
