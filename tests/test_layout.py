"""The package's shape, checked: the import graph (lazy imports inside functions included) has no cycle and
points only down the layers written once below, which `docs/architecture.md` draws from the same list;
files, functions and parameter lists stay small enough to read.

`python tests/test_layout.py` prints the layer block that docs/architecture.md must contain."""

from __future__ import annotations

import ast
import fnmatch
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "stardomain"

# Top to bottom: a module may import from its own layer and the layers below it, never from above.
LAYERS: list[tuple[str, list[str], str]] = [
    ("front doors", ["stardomain", "stardomain.__main__", "stardomain.cli"],
     "parse, call the library, print; the one error boundary (exit 2 / 1)"),
    ("api", ["stardomain.api", "stardomain.integrations", "stardomain.integrations.*"],
     "the verbs over live objects (sd.train, sd.barrier, ...); Starlight in Lightning and the HF Trainer"),
    ("study", ["stardomain.study", "stardomain.study.*"],
     "plan -> tasks -> artifacts -> results; executors, lock, runner"),
    ("file front ends", ["stardomain.files"],
     "read model files, run a computation, write its outputs (what commands and tasks run)"),
    ("presentation", ["stardomain.report", "stardomain.report.*"],
     "tables, prose and figures from results (never computes)"),
    ("methods", ["stardomain.starlight", "stardomain.objective", "stardomain.barriers", "stardomain.averaging",
                 "stardomain.merge"],
     "Starlight (its run and its objective), barriers, BMA and the other predictors, merges"),
    ("training", ["stardomain.training", "stardomain.population", "stardomain.runtime", "stardomain.tblog",
                  "stardomain.interpolate", "stardomain.repair"],
     "the one training loop and its stacked populations, state-dict arithmetic, REPAIR"),
    ("alignment", ["stardomain.permute", "stardomain.permute.*"],
     "permutation specs from the graph, matching, checked alignment"),
    ("engine and files", ["stardomain.engine", "stardomain.checkpoint"],
     "stacked-weight evaluation; model files"),
    ("models and data", ["stardomain.models", "stardomain.models.*", "stardomain.data", "stardomain.metrics",
                         "stardomain.stats", "stardomain.verdict"],
     "registries of models and data, metrics, statistics, the verdict's words"),
    ("foundation", ["stardomain.utils", "stardomain.safety", "stardomain.config", "stardomain.pairkinds",
                    "stardomain.errors", "stardomain._version"],
     "config, errors, the factory gate, pair kinds, small helpers"),
]



MAX_FILE_LINES, MAX_FUNCTION_LINES, MAX_PARAMETERS = 800, 60, 10


def modules() -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is_package) for every module of the package."""
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere in its text (function bodies included). An import
    of a package's submodule counts as that submodule; the implicit import of a parent package does not."""
    mods = modules()
    graph: dict[str, set[str]] = {}
    for name, (path, is_pkg) in mods.items():
        package = name if is_pkg else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    deps.add(sub if sub in mods else target)
            elif isinstance(node, ast.Import):
                deps.update(alias.name for alias in node.names)
        graph[name] = {d for d in deps if d in mods and d != name}
    return graph


def layer_of(module: str) -> int:
    for i, (_, patterns, _) in enumerate(LAYERS):
        if any(fnmatch.fnmatchcase(module, p) for p in patterns):
            return i
    raise AssertionError(f"{module} is in no layer: add it to LAYERS in tests/test_layout.py (and run "
                         "`python tests/test_layout.py` to redraw docs/architecture.md)")


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each a cycle or a knot of them."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def layer_block() -> str:
    """The layer diagram docs/architecture.md carries, drawn from LAYERS."""
    width = max(len(name) for name, _, _ in LAYERS)
    lines = ["    (top: may import everything below; bottom: imports nothing of ours)"]
    for name, patterns, what in LAYERS:
        shown = ", ".join(p.removeprefix("stardomain.") if p != "stardomain" else "stardomain/__init__"
                          for p in patterns)
        lines.append(f"    {name:<{width}}  {shown}")
        lines.append(f"    {'':<{width}}    {what}")
    return "\n".join(lines)


# ---------------------------------------------------------------- tests

def test_the_graph_reader_sees_lazy_and_relative_imports(tmp_path):
    """The checker itself: a cycle closed only by an import inside a function is still a cycle."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert "stardomain.study.runner" in import_graph()["stardomain.study"]
    assert "stardomain.study.executors" in import_graph()["stardomain.study.runner"]  # a relative import


def test_no_import_cycle():
    assert cycles(import_graph()) == []


def test_imports_only_point_down_the_layers():
    upward = [f"{m} ({LAYERS[layer_of(m)][0]}) imports {d} ({LAYERS[layer_of(d)][0]})"
              for m, deps in sorted(import_graph().items()) for d in sorted(deps) if layer_of(d) < layer_of(m)]
    assert upward == []


def test_architecture_doc_draws_the_same_layers():
    doc = (ROOT / "docs" / "architecture.md").read_text()
    assert layer_block() in doc, "docs/architecture.md's layer block is stale: run `python tests/test_layout.py`"


def _is_command(node: ast.FunctionDef) -> bool:
    return any(isinstance(d, ast.Call) and isinstance(d.func, ast.Attribute) and d.func.attr == "command"
               for d in node.decorator_list)


def test_files_functions_and_parameter_lists_stay_small():
    """No file over 800 lines, no function over 60, no function with more than 10 parameters (typer command
    functions, which take one parameter per option, aside)."""
    too_big = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        where = path.relative_to(PACKAGE)
        if text.count("\n") > MAX_FILE_LINES:
            too_big.append(f"{where}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            a = node.args
            names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs] + [x.arg for x in (a.vararg, a.kwarg) if x]
            n_params = len([x for x in names if x not in ("self", "cls")])
            length = node.end_lineno - node.lineno + 1
            if length > MAX_FUNCTION_LINES:
                too_big.append(f"{where}:{node.lineno} {node.name}: {length} lines")
            if n_params > MAX_PARAMETERS and not _is_command(node):
                too_big.append(f"{where}:{node.lineno} {node.name}: {n_params} parameters")
    assert too_big == []


if __name__ == "__main__":
    sys.stdout.write(layer_block() + "\n")
