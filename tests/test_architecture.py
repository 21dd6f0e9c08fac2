"""Imports run one way: read from the code's own import statements, with ``ast``.

A *part* of the package is a folder of ``imagen/`` (``api``, ``jobs``, ...) or one of its top-level modules
(``config``, ``errors``, ...); ``imagen`` itself is the package's ``__init__.py`` (its ``__version__``).
``ALLOWED`` says which parts each part may import. From the ground up:

========================  =====================================================================
part                      may import
========================  =====================================================================
imagen, config, errors,   nothing of the package: the vocabulary every part speaks (settings, the
logs, private_files,      root exception, log records, the data folder's modes, how a followed file
watched_files,            is looked at, the A1111 sampler names); ``client`` is the command line's
sampler_names, client,    HTTP client, ``web`` the page's static files
web
access, inputs            keys and rate limits; request images and sizes
outputs                   writing and serving PNGs (their A1111 ``Sampler`` field: ``sampler_names``)
registry                  which models and LoRAs are served, the demo among them
generation                the engines: a task in, an image out (reads the registry, writes outputs)
jobs                      the job backends, which run the engines in workers
webhooks                  job events sent out, read from the job store
api                       the HTTP layer: everything the server offers
testing                   tiny test models for ``imagen fixtures`` (builds on generation and registry;
                          only the command line imports it)
cli                       the command line: serves the API, runs workers, calls the client
__main__                  ``python -m imagen``
========================  =====================================================================

No part imports one above it, so the table itself has no circle (checked below), and no two modules import
each other, directly or around a loop: every import counts, at module level or inside a function (an import
put in a function to save start-up time is still a dependency; a loop of them is one module split in two).
The API process never loads torch, diffusers or celery by importing a route: those load in workers, or
(celery) when the distributed backend is built.

A new folder or top-level module gets its row here, with the parts it needs, below it in the table.
The demo model's training (``training/``), the tests and the benchmarks live outside the package: they may
import it, never the other way round, and the wheel holds none of them.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import REPO

PACKAGE = REPO / "imagen"

BOTTOM = frozenset(
    {"imagen", "config", "errors", "logs", "private_files", "watched_files", "sampler_names", "client", "web"}
)
ALLOWED: dict[str, frozenset[str]] = {
    **{part: frozenset() for part in BOTTOM},
    "access": frozenset({"config", "watched_files"}),
    "inputs": frozenset(),
    "outputs": frozenset({"config", "inputs", "sampler_names"}),
    "registry": frozenset({"errors", "sampler_names", "watched_files"}),
    "generation": frozenset({"config", "errors", "inputs", "outputs", "registry", "sampler_names"}),
    "jobs": frozenset(
        {"config", "errors", "logs", "private_files", "watched_files", "outputs", "registry", "generation"}
    ),
    "webhooks": frozenset({"imagen", "config", "errors", "jobs"}),
    "api": frozenset({
        "imagen", "config", "errors", "logs", "access", "inputs", "outputs", "registry", "sampler_names",
        "generation", "jobs", "webhooks",
    }),
    "testing": frozenset({"registry", "generation"}),
    "cli": frozenset({"config", "errors", "logs", "client", "access", "jobs", "api", "testing"}),
    "__main__": frozenset({"cli"}),
}

# what the API process must not load by importing its modules (routes never import them; workers do)
HEAVY = ("torch", "diffusers", "celery")


@dataclass(frozen=True)
class Import:
    source: str  # the importing module, e.g. imagen.api.routes
    target: str  # the module it names: imagen.jobs.types, or a third-party one (torch)
    line: int
    deferred: bool  # inside a function, or under ``if TYPE_CHECKING:``: not run when the module is imported


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES: dict[str, Path] = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def part_of(module: str) -> str:
    """``imagen.jobs.embedded.child`` -> ``jobs``; ``imagen.config`` -> ``config``; ``imagen`` -> ``imagen``."""
    return module.split(".")[1] if "." in module else module


def _resolve(source: str, node: ast.ImportFrom) -> str:
    """The absolute module a ``from ... import`` statement reads from."""
    if not node.level:
        return node.module or ""
    package = source.split(".") if MODULES[source].name == "__init__.py" else source.split(".")[:-1]
    base = package[: len(package) - node.level + 1]
    return ".".join([*base, *([node.module] if node.module else [])])


def _known(name: str) -> str:
    """The longest prefix of ``name`` that is one of our modules (``imagen.registry.Registry`` -> the package)."""
    while name not in MODULES and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(source: str) -> Iterator[Import]:
    def visit(node: ast.AST, deferred: bool) -> Iterator[Import]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                for alias in child.names:
                    target = _known(alias.name) if alias.name.startswith("imagen") else alias.name
                    yield Import(source, target, child.lineno, deferred)
            elif isinstance(child, ast.ImportFrom):
                module = _resolve(source, child)
                for alias in child.names:
                    # ``from imagen.registry import safe_files`` names a module; ``import Registry``, a name in one
                    full = f"{module}.{alias.name}"
                    target = _known(full) if module.startswith("imagen") else module
                    yield Import(source, target, child.lineno, deferred)
            elif isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                yield from visit(child, True)
            elif isinstance(child, ast.If) and _is_type_checking(child):
                for statement in child.body:
                    yield from visit(ast.Module(body=[statement], type_ignores=[]), True)
                for statement in child.orelse:
                    yield from visit(ast.Module(body=[statement], type_ignores=[]), deferred)
            else:
                yield from visit(child, deferred)

    yield from visit(ast.parse(MODULES[source].read_text(encoding="utf-8")), False)


IMPORTS: list[Import] = [imp for module in MODULES for imp in imports_of(module)]
OURS: list[Import] = [imp for imp in IMPORTS if imp.target.startswith("imagen") and imp.target != imp.source]


def where(imp: Import) -> str:
    late = " (in a function)" if imp.deferred else ""
    return f"{MODULES[imp.source].relative_to(REPO)}:{imp.line} imports {imp.target}{late}"


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
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


def test_the_reader_sees_every_import() -> None:
    """The reader itself: it finds the imports this file knows are there, deferred ones included."""
    found = {(imp.source, imp.target, imp.deferred) for imp in OURS}
    assert ("imagen.api.app", "imagen.jobs.factory", False) in found
    assert ("imagen.api.app", "imagen.registry.safe_files", True) in found  # a module named by ``from ... import``
    assert ("imagen.cli", "imagen.api.app", True) in found
    assert ("imagen.jobs.distributed.task", "imagen.generation.base", True) in found  # under TYPE_CHECKING
    parts = {part_of(module) for module in MODULES}
    assert set(ALLOWED) == parts, "ALLOWED: a row for each new part of the package, none for a part that is gone"


def test_no_module_imports_one_that_imports_it_back() -> None:
    graph: dict[str, set[str]] = {}
    for imp in OURS:
        graph.setdefault(imp.source, set()).add(imp.target)
    loops = circles(graph)
    details = sorted({where(imp) for loop in loops for imp in OURS if imp.source in loop and imp.target in loop})
    assert loops == [], "\n".join(details)


def test_the_allowed_table_is_layered() -> None:
    """Each part's allowed parts are all below it: the table can be read floor by floor, ground first."""
    graph = {part: set(allowed) for part, allowed in ALLOWED.items()}
    assert circles(graph) == []
    assert all(not ALLOWED[part] for part in BOTTOM)


def test_each_part_imports_only_the_parts_below_it() -> None:
    wrong = sorted({
        f"{part_of(imp.source)} -> {part_of(imp.target)}: {where(imp)}"
        for imp in OURS
        if part_of(imp.source) != part_of(imp.target) and part_of(imp.target) not in ALLOWED[part_of(imp.source)]
    })
    assert wrong == []


def test_importing_the_api_loads_no_torch_diffusers_or_celery_as_read() -> None:
    """Follow the imports that run when a module of ``imagen/api`` is imported (module level only): none of
    our modules on the way imports torch, diffusers or celery at module level. The failure names the path."""
    eager: dict[str, list[Import]] = {}
    for imp in IMPORTS:
        if not imp.deferred:
            eager.setdefault(imp.source, []).append(imp)
    wrong: set[str] = set()
    for start in (module for module in MODULES if module.startswith("imagen.api")):
        path_to: dict[str, list[str]] = {start: [start]}
        todo = [start]
        while todo:
            module = todo.pop()
            for imp in eager.get(module, []):
                if imp.target.split(".")[0] in HEAVY:
                    wrong.add(" -> ".join([*path_to[module], imp.target]) + f" ({where(imp)})")
                elif imp.target in MODULES and imp.target not in path_to:
                    path_to[imp.target] = [*path_to[module], imp.target]
                    todo.append(imp.target)
    assert sorted(wrong) == []


def test_the_api_process_loads_no_torch_diffusers_or_celery(tmp_path: Path) -> None:
    """As run: every module of ``imagen/api`` imported, and the embedded app built for the diffusers engine,
    in a fresh interpreter. Third-party imports count here too."""
    api_modules = sorted(module for module in MODULES if module.startswith("imagen.api"))
    code = (
        "import importlib, sys\n"
        f"for name in {api_modules!r}:\n"
        "    importlib.import_module(name)\n"
        "from imagen.api.app import create_app\n"
        "from imagen.config import Settings\n"
        f"create_app(Settings(data_dir={str(tmp_path)!r}, engine='diffusers', broker_url=None))\n"
        f"print(sorted(name for name in {HEAVY!r} if name in sys.modules))\n"
    )
    env = {key: value for key, value in os.environ.items() if not key.startswith("IMAGEN_")}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120,
        env={**env, "PYTHONPATH": str(REPO)},
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_the_engines_know_no_model_by_name() -> None:
    """What sets a model apart (its files, its latent-to-RGB map, its guidance) is data on its registry entry,
    which an engine reads as it reads any model's: no module under ``generation`` asks whether a model is the
    demo (``spec.demo``)."""
    reads = [
        f"{path.relative_to(REPO)}:{node.lineno}"
        for path in sorted((PACKAGE / "generation").rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.Attribute) and node.attr == "demo"
    ]
    assert not reads, reads


OUTSIDE = ("training", "tests", "bench")  # top-level folders of the repository that are not shipped


def test_the_package_imports_nothing_from_the_folders_it_does_not_ship() -> None:
    """An installed ``imagen`` has no ``training/``, ``tests/`` or ``bench/``: importing one would fail there."""
    wrong = sorted(where(imp) for imp in IMPORTS if imp.target.split(".")[0] in OUTSIDE)
    assert wrong == []


def test_the_wheel_ships_only_the_package() -> None:
    """The packages setuptools finds with pyproject.toml's own settings: ``imagen`` and its folders, and
    neither the demo's training nor the tests nor the benchmarks."""
    import tomllib

    from setuptools import find_namespace_packages

    find = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    shipped = find_namespace_packages(str(REPO), include=find.get("include", ["*"]), exclude=find.get("exclude", []))
    assert "imagen.testing" in shipped and "imagen.generation.diffusers" in shipped
    assert [name for name in shipped if name != "imagen" and not name.startswith("imagen.")] == []
    assert (REPO / "training" / "train_demo.py").is_file() and not (PACKAGE / "devtools").exists()
