"""The code's layout: imports go one way (config, networks, library, entry points), no cycles, short functions.

Every import is read from the source (``ast``), including those inside functions, so an import
deferred for speed still counts. Notebooks are read too (their code cells).
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from tests.conftest import REPO

# Each module's layer; a module may import modules of its own layer or below only.
CONFIG, NETWORKS, LIBRARY, EXPERIMENTS, ENTRY_POINTS, TESTS = range(6)
# The VAE-GAN network sits beside models/; the toy experiment and the comparison use the library, above it.
LAYER_OF_MODULE = {"vae_gan.model": NETWORKS, "vae_gan.toy": EXPERIMENTS, "vae_gan.compare": EXPERIMENTS}
LAYER_OF_PACKAGE = {"models": NETWORKS, "worldmodels": LIBRARY}
LIBRARY_FOLDERS = ("worldmodels", "models", "vae_gan")
MAX_FUNCTION_LINES = 80
# Functions allowed to be longer, each with the reason (none today: add one only with a reason).
LONG_FUNCTIONS: set[tuple[str, str]] = set()


def module_name(path: Path) -> str:
    """``worldmodels/figures.py`` -> ``worldmodels.figures``; ``02_train_vae.py`` -> ``02_train_vae``."""
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> int:
    if module == "config":
        return CONFIG
    if module in LAYER_OF_MODULE:
        return LAYER_OF_MODULE[module]
    top = module.split(".")[0]
    if top in LAYER_OF_PACKAGE:
        return LAYER_OF_PACKAGE[top]
    return TESTS if top == "tests" else ENTRY_POINTS


def python_sources() -> dict[str, str]:
    """``{module name: source}`` of every Python file and notebook of the repository."""
    sources = {}
    for path in sorted(REPO.rglob("*.py")):
        if not any(part.startswith(".") for part in path.relative_to(REPO).parts):
            sources[module_name(path)] = path.read_text(encoding="utf-8")
    for path in sorted((REPO / "notebooks").glob("*.ipynb")):
        cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
        code = ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
        # IPython magics are not Python; they import nothing of ours.
        sources[f"notebooks.{path.stem}"] = "\n".join(line for cell in code for line in cell.splitlines()
                                                      if not line.lstrip().startswith(("%", "!")))
    return sources


def project_imports(module: str, source: str, known: set[str]) -> set[str]:
    """The project modules that ``module`` imports anywhere in ``source`` (``from pkg import mod`` -> ``pkg.mod``)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        else:
            continue
        for name in names:
            # The longest known prefix: "worldmodels.storage.read_json" -> "worldmodels.storage".
            parts = name.split(".")
            for end in range(len(parts), 0, -1):
                candidate = ".".join(parts[:end])
                if candidate in known and candidate != module:
                    found.add(candidate)
                    break
    # A package's __init__ is imported with any of its modules; it is empty here, so it adds nothing.
    return {name for name in found if name not in LIBRARY_FOLDERS}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    sources = python_sources()
    known = set(sources)
    return {module: project_imports(module, source, known) for module, source in sources.items()}


def test_the_walk_sees_the_whole_project(graph):
    assert {"config", "worldmodels.training", "models.vae", "vae_gan.compare", "02_train_vae",
            "benchmarks.bench_dream", "notebooks.results"} <= set(graph)
    assert "worldmodels.vision_training" in graph["02_train_vae"]
    # The layer check itself can fail: a library module importing a script or an experiment is upward.
    assert layer("worldmodels.figures") < layer("vae_gan.compare") < layer("study_temperature")
    assert layer("config") < layer("models.vae") == layer("vae_gan.model") < layer("worldmodels.storage")


def test_config_imports_nothing_of_the_project(graph):
    assert graph["config"] == set()


def test_imports_go_one_way(graph):
    """No library module imports a script, an experiment or a module of a higher layer."""
    upward = sorted(f"{module} -> {target}" for module, targets in graph.items() for target in targets
                    if layer(target) > layer(module))
    assert upward == []


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as ``[a, b, ..., a]``, or None (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycles(graph):
    assert find_cycle(graph) is None


def test_find_cycle_finds_one():
    """The cycle check itself can fail."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_library_functions_are_short():
    long = []
    for folder in LIBRARY_FOLDERS:
        for path in sorted((REPO / folder).glob("*.py")):
            relative = path.relative_to(REPO).as_posix()
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) \
                        and (relative, node.name) not in LONG_FUNCTIONS:
                    lines = node.end_lineno - node.lineno + 1
                    if lines > MAX_FUNCTION_LINES:
                        long.append(f"{relative}:{node.lineno} {node.name} ({lines} lines)")
    assert long == []


def test_scripts_are_thin():
    """The numbered stages keep argument parsing, progress and one call; their logic is in the library."""
    for path in sorted(REPO.glob("0[1-5]_*.py")):
        assert len(path.read_text(encoding="utf-8").splitlines()) <= 100, path.name


def test_no_sys_path_manipulation():
    """The package is installed (``pip install -e .``) or run from the repository root: no path hacks."""
    offenders = [module for module, source in python_sources().items()
                 if not module.startswith("tests.") and "sys.path" in source]
    assert offenders == []
