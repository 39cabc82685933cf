"""Dependencies point one way (STYLE.md section 10), read from the source with `ast`: every
import of every project module, at module level and inside functions, against the allowed
arrows between layers; and no import cycle between project modules."""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

from conftest import ROOT

LAYERS = ("core", "methods", "engine", "eval", "runs", "suites", "reports", "bench", "scripts")
ANYTHING = frozenset(LAYERS)
# layer -> the layers it may import (its own always); a name with a dot is one module of a layer,
# allowed where the rest of that layer is not
ALLOWED = {
    "core": frozenset(),
    "methods": frozenset({"core"}),
    "engine": frozenset({"methods", "core"}),
    # the ViT, the Batch/products and the registry: never a method file such as methods.mae
    "eval": frozenset({"engine", "methods", "methods.vit", "methods.base", "methods.registry", "core"}),
    "runs": frozenset({"eval", "engine", "methods", "core"}),
    # the command line prints and saves the suite's table (reports.tables) once its runs are done
    "suites": frozenset({"runs", "eval", "engine", "methods", "core", "reports"}),
    # the record schema (and the run index beside it) and the ground floor: no model code
    "reports": frozenset({"runs.records", "runs.index", "core"}),
    "bench": ANYTHING,
    "scripts": ANYTHING,
}
# arrows judged module by module, where only some modules of a layer may be imported: there the
# layer's name stands for its package alone (`from methods import registry` is methods.registry)
BY_MODULE = {("eval", "methods"), ("reports", "runs")}
# the run-layer modules the report may load: runs/__init__.py imports nothing
REPORT_READS = {"runs", "runs.records", "runs.index"}


@dataclass(frozen=True)
class Import:
    line: int
    module: str     # the project module it loads: `from eval import knn` -> eval.knn
    when: str       # "import": as the importer is imported; "call": in a function; "typing": TYPE_CHECKING only


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_sources(root: Path = ROOT) -> dict[str, tuple[Path, str]]:
    """module name -> (file, source) of every module of the layers."""
    return {module_name(path, root): (path, path.read_text())
            for layer in LAYERS for path in sorted((root / layer).rglob("*.py"))}


def layer_of(module: str) -> str:
    return module.split(".")[0]


def resolve(node: ast.ImportFrom, importer: str, is_package: bool) -> str:
    """The absolute module a `from ... import` names, relative imports included."""
    if not node.level:
        return node.module
    base = importer.split(".")[: len(importer.split(".")) - node.level + (1 if is_package else 0)]
    return ".".join(base + ([node.module] if node.module else []))


def is_type_checking(node: ast.If) -> bool:
    test = node.test
    return getattr(test, "id", None) == "TYPE_CHECKING" or getattr(test, "attr", None) == "TYPE_CHECKING"


def imports_of(source: str, importer: str, is_package: bool, modules: set[str]) -> list[Import]:
    """Every import of project code in `source`, each named by the module it loads."""
    found: dict[Import, None] = {}      # one per module and line: `from a import b, c` loads `a` once

    def visit(node: ast.AST, when: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                found.update((Import(child.lineno, alias.name, when), None) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = resolve(child, importer, is_package)
                found.update((Import(child.lineno, f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules
                                     else base, when), None) for alias in child.names)
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(child, "typing" if when == "typing" else "call")
            else:
                visit(child, "typing" if isinstance(child, ast.If) and is_type_checking(child) else when)

    visit(ast.parse(source), "import")
    return [i for i in found if layer_of(i.module) in LAYERS]


def imports_by_module(sources: dict[str, tuple[Path, str]]) -> dict[str, list[Import]]:
    return {importer: imports_of(source, importer, path.name == "__init__.py", set(sources))
            for importer, (path, source) in sources.items()}


def arrow_target(importer: str, module: str) -> str | None:
    """What an import reaches that its layer may not (a layer, or one module of a layer judged
    module by module); None when the arrow is allowed."""
    source, target = layer_of(importer), layer_of(module)
    if (source, target) in BY_MODULE:
        target = module
    return None if source == layer_of(target) or target in ALLOWED[source] else target


def violations(sources: dict[str, tuple[Path, str]], root: Path = ROOT) -> list[str]:
    """`file:line imports X (layer A -> layer B not allowed)` for each import against the arrows."""
    lines = []
    for importer, found in imports_by_module(sources).items():
        for target in found:
            if (reached := arrow_target(importer, target.module)) is not None:
                lines.append(f"{sources[importer][0].relative_to(root)}:{target.line} imports {target.module} "
                             f"(layer {layer_of(importer)} -> layer {reached} not allowed)")
    return lines


def import_graph(sources: dict[str, tuple[Path, str]]) -> dict[str, set[str]]:
    """module -> the project modules it imports when it is imported (functions' imports aside)."""
    return {importer: {i.module for i in found if i.when == "import" and i.module in sources and i.module != importer}
            for importer, found in imports_by_module(sources).items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per back edge a depth-first search meets, each as its modules in import order."""
    cycles, state, stack = [], {}, []

    def visit(module: str) -> None:
        state[module] = "open"
        stack.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                cycles.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module)
    return cycles


def reachable(graph: dict[str, set[str]], start: set[str]) -> set[str]:
    seen, todo = set(), list(start)
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo += graph.get(module, ())
    return seen


def with_packages(modules: set[str]) -> set[str]:
    """The modules and every package above them (`runs.records` -> also `runs`)."""
    return {".".join(m.split(".")[:n]) for m in modules for n in range(1, m.count(".") + 2)}


def beyond_the_record_schema(sources: dict[str, tuple[Path, str]]) -> list[str]:
    """The project modules outside reports/, core/ and the record schema that reports/ loads, at
    import time or on use, with the packages Python runs on the way (`import runs.records` runs
    runs/__init__.py); TYPE_CHECKING imports never run."""
    graph = {importer: with_packages({i.module for i in found if i.when != "typing"})
             for importer, found in imports_by_module(sources).items()}
    reached = reachable(graph, {m for m in sources if layer_of(m) == "reports"}) & set(sources)
    return sorted(m for m in reached if layer_of(m) not in ("reports", "core") and m not in REPORT_READS)


def synthetic(files: dict[str, str], root: Path = Path("/project")) -> dict[str, tuple[Path, str]]:
    return {module_name(root / name, root): (root / name, text) for name, text in files.items()}


def test_the_checker_flags_an_upward_import_at_module_level_and_inside_a_function():
    sources = synthetic({
        "methods/__init__.py": "",
        "methods/mae.py": "from core.files import write_json\nimport engine.trainer\n",
        "eval/knn.py": "from methods.vit import ViT\n\ndef run():\n    from methods import mae\n",
        "reports/build.py": "from runs.records import RecordError\nfrom runs import execute\n",
        "core/files.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from runs.records import Run\n",
        "engine/trainer.py": "", "methods/vit.py": "", "runs/records.py": "", "runs/execute.py": "",
    })
    assert violations(sources, Path("/project")) == [
        "methods/mae.py:2 imports engine.trainer (layer methods -> layer engine not allowed)",
        "eval/knn.py:4 imports methods.mae (layer eval -> layer methods.mae not allowed)",
        "reports/build.py:2 imports runs.execute (layer reports -> layer runs.execute not allowed)",
        "core/files.py:3 imports runs.records (layer core -> layer runs not allowed)",
    ]


def test_the_checker_finds_a_cycle_and_ignores_imports_inside_functions():
    sources = synthetic({
        "methods/registry.py": "from methods.base import MIMMethod\n",
        "methods/base.py": "import methods.registry\n",
        "engine/data.py": "def load():\n    import engine.trainer\n",
        "engine/trainer.py": "from engine import data\n",
    })
    assert find_cycles(import_graph(sources)) == [["methods.base", "methods.registry", "methods.base"]]


def test_the_checker_follows_the_report_through_the_record_schema_and_the_packages_on_the_way():
    sources = synthetic({
        "reports/build.py": ("from typing import TYPE_CHECKING\nfrom runs.records import read_result\n"
                             "if TYPE_CHECKING:\n    from runs.plan import Plan\n"),
        "runs/__init__.py": "from runs import execute\n",
        "runs/records.py": "def read_result():\n    from runs.identity import Run\n",
        "runs/execute.py": "", "runs/identity.py": "", "runs/plan.py": "",
    })
    assert beyond_the_record_schema(sources) == ["runs.execute", "runs.identity"]


def test_every_import_follows_the_layers():
    found = violations(project_sources())
    for line in found:
        print(line)
    assert not found, "imports against STYLE.md section 10:\n" + "\n".join(found)


def test_no_project_module_imports_itself_back_at_import_time():
    cycles = find_cycles(import_graph(project_sources()))
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(cycle) for cycle in cycles)


def test_the_report_reaches_only_the_record_schema_and_the_ground_floor():
    """(That no library the report imports loads torch is test_report's, at run time.)"""
    outside = beyond_the_record_schema(project_sources())
    assert not outside, f"the report reaches {outside}"
