"""The project's import graph, read from the source (``ast``), not by importing anything.

Every ``import`` / ``from ... import`` statement counts, wherever it stands: module level,
inside a function or method, under ``if TYPE_CHECKING:`` or ``try:``. Relative imports are
resolved against the importing module's package. A statement names a project module when the
longest dotted prefix of what it names is one (``from boss_core.fidelity import
FidelityConfig`` names ``boss_core.fidelity``; ``from .runtime import tracking`` inside
``tasks`` names ``tasks.runtime.tracking``). Imports by string (``importlib.import_module``,
``python -m``) are not seen: ``tasks/runtime/launch.py`` runs a step that way on purpose.

``stage_deps("tasks.prepare")`` is what DVC must hash for a stage: the ``.py`` files under
``boss_core/`` and ``tasks/`` the step module imports, transitively, with the ``__init__.py``
of every package on the way (Python runs those first).
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

PACKAGES = ("boss_core", "tasks", "flows")
STAGE_PACKAGES = ("boss_core", "tasks")
ROOT = Path(__file__).resolve().parents[2]


def module_name(path: Path, root: Path) -> str:
    """``root/tasks/runtime/io.py`` -> ``tasks.runtime.io``; a package's ``__init__.py`` ->
    the package."""
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(source: str, module: str, is_package: bool) -> set[str]:
    """The absolute dotted names the import statements of ``module`` name, anywhere in it.

    ``import a.b`` -> ``a.b``; ``from a import b`` -> ``a.b`` (a module or a name in ``a``);
    ``from a import *`` -> ``a``. Relative forms are made absolute first.
    """
    package = module if is_package else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".") if package else []
                if node.level - 1 > len(parts):
                    raise ValueError(f"{module}: relative import beyond the top-level package")
                anchor = ".".join(parts[:len(parts) - (node.level - 1)])
                base = f"{anchor}.{base}" if base and anchor else (base or anchor)
            names |= {base if alias.name == "*" else f"{base}.{alias.name}"
                      for alias in node.names}
    return names


class ImportGraph:
    """Modules (files) under ``root/<package>`` for ``packages`` and whom each imports."""

    def __init__(self, root: str | Path = ROOT, packages: tuple[str, ...] = PACKAGES):
        self.root = Path(root).resolve()
        self.packages = tuple(packages)
        self.files: dict[str, Path] = {}
        for package in self.packages:
            for path in sorted((self.root / package).rglob("*.py")):
                self.files[module_name(path, self.root)] = path
        self.names: dict[str, set[str]] = {}
        for module, path in self.files.items():
            try:
                self.names[module] = imported_names(path.read_text(), module,
                                                    path.name == "__init__.py")
            except SyntaxError as err:
                raise SyntaxError(f"{path}: {err}") from err

    def resolve(self, name: str) -> str | None:
        """The project module ``name`` refers to (its longest known prefix), or None."""
        parts = name.split(".")
        for end in range(len(parts), 0, -1):
            candidate = ".".join(parts[:end])
            if candidate in self.files:
                return candidate
        return None

    def imports(self, module: str) -> set[str]:
        """The project modules ``module`` imports directly (never itself)."""
        found = {self.resolve(name) for name in self.names[module]}
        return {m for m in found if m is not None and m != module}

    def external(self, module: str) -> set[str]:
        """The top-level names of what ``module`` imports from outside ``packages``."""
        roots = {name.split(".")[0] for name in self.names[module]}
        return {r for r in roots if r not in self.packages}

    def closure(self, module: str) -> set[str]:
        """``module`` and every project module it imports, transitively, with the packages
        (``__init__``) each of them sits in."""
        seen, todo = set(), [module]
        while todo:
            current = todo.pop()
            if current in seen or current not in self.files:
                continue
            seen.add(current)
            todo.extend(self.imports(current))
            parts = current.split(".")
            todo.extend(".".join(parts[:end]) for end in range(1, len(parts)))
        return seen

    def cycles(self) -> list[list[str]]:
        """Import cycles: the strongly connected components of more than one module (Tarjan),
        each sorted, in sorted order."""
        index: dict[str, int] = {}
        low: dict[str, int] = {}
        stack: list[str] = []
        on_stack: set[str] = set()
        found = []

        def visit(node: str) -> None:  # recursion depth is bounded by the module count
            index[node] = low[node] = len(index)
            stack.append(node)
            on_stack.add(node)
            for succ in sorted(self.imports(node)):
                if succ not in index:
                    visit(succ)
                    low[node] = min(low[node], low[succ])
                elif succ in on_stack:
                    low[node] = min(low[node], index[succ])
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

        for module in sorted(self.files):
            if module not in index:
                visit(module)
        return sorted(found)

    def path_of(self, module: str) -> str:
        """The module's file, relative to ``root``, with forward slashes."""
        return self.files[module].relative_to(self.root).as_posix()


@cache
def _graph(root: Path) -> ImportGraph:
    return ImportGraph(root)


def closure(module: str, root: str | Path | None = None) -> set[Path]:
    """The project ``.py`` files ``module`` imports, transitively (``ImportGraph.closure``)."""
    graph = ImportGraph(root) if root is not None else _graph(ROOT)
    return {graph.files[m] for m in graph.closure(module)}


def stage_deps(module: str, root: str | Path | None = None) -> list[str]:
    """The files a DVC stage running ``python -m <module>`` depends on: the closure of
    ``module`` within ``boss_core/`` and ``tasks/``, as sorted paths relative to ``root``."""
    graph = ImportGraph(root, STAGE_PACKAGES) if root is not None else _graph(ROOT)
    return sorted(graph.path_of(m) for m in graph.closure(module)
                  if m.split(".")[0] in STAGE_PACKAGES)
