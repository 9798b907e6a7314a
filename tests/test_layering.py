"""The layers stay apart (shared/STYLE.md), read from the source with ``tasks.runtime.imports``.

Every import statement counts, inside functions too. The rules: boss_core imports no pipeline
framework; tasks never import flows; no module of tasks imports a step module (a step runs
another only through ``importlib``, as tasks/runtime/launch.py does); no import cycles; and, in a
fresh interpreter, the params loader imports no torch-fidelity or Prefect and no step module
imports Prefect. Each rule also meets a synthetic module set that breaks it, so it can fail.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

from tasks.runtime.imports import ImportGraph, closure, imported_names, stage_deps

ROOT = Path(__file__).resolve().parents[1]
GRAPH = ImportGraph(ROOT)
FORBIDDEN_IN_CORE = {"prefect", "mlflow", "dvc", "yaml", "tasks", "flows"}


# --- the rules: each returns its violations, empty when the rule holds ---------------------

def step_modules(graph: ImportGraph) -> set[str]:
    """``tasks/<step>.py``: the modules directly in ``tasks/`` (not its packages)."""
    return {m for m, path in graph.files.items()
            if path.parent == graph.root / "tasks" and path.name != "__init__.py"}


def core_imports_frameworks(graph: ImportGraph) -> list[str]:
    return sorted(f"{m} imports {name}" for m in graph.files if m.split(".")[0] == "boss_core"
                  for name in graph.names[m] if name.split(".")[0] in FORBIDDEN_IN_CORE)


def tasks_import_flows(graph: ImportGraph) -> list[str]:
    return sorted(f"{m} imports {name}" for m in graph.files if m.split(".")[0] == "tasks"
                  for name in graph.names[m] if name.split(".")[0] == "flows")


def tasks_import_steps(graph: ImportGraph) -> list[str]:
    """A step importing another step, or tasks/runtime, tasks/cli (or tasks/__init__)
    importing any step."""
    steps = step_modules(graph)
    return sorted(f"{m} imports step {s}" for m in graph.files if m.split(".")[0] == "tasks"
                  for s in graph.imports(m) & steps if s != m)


def loaded_by_imports(modules: Iterable[str], watch: Iterable[str], cwd: Path) -> dict[str, str]:
    """Import ``modules`` one after the other in a fresh interpreter (``cwd`` first on the path);
    for each top-level name in ``watch`` that ended up in ``sys.modules``, the module whose
    import loaded it first."""
    code = (
        "import importlib, json, sys\n"
        f"watch, found = {sorted(watch)!r}, {{}}\n"
        f"for module in {list(modules)!r}:\n"
        "    importlib.import_module(module)\n"
        "    for name in watch:\n"
        "        found.setdefault(name, module) if name in sys.modules else None\n"
        "print(json.dumps(found))\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(cwd)}
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- the rules on this repository ---------------------------------------------------------

def test_the_graph_sees_every_package_and_step():
    assert {m.split(".")[0] for m in GRAPH.files} == {"boss_core", "tasks", "flows"}
    assert {"tasks.prepare", "tasks.teacher", "tasks.evaluate", "tasks.report"} <= (
        step_modules(GRAPH))
    assert "tasks.runtime.params" in GRAPH.files and "tasks.runtime" in GRAPH.files


def test_core_imports_no_pipeline_framework():
    assert core_imports_frameworks(GRAPH) == []


def test_tasks_never_import_flows():
    assert tasks_import_flows(GRAPH) == []


def test_no_step_module_is_imported_inside_tasks():
    assert tasks_import_steps(GRAPH) == []


def test_no_import_cycles_beyond_the_known_one():
    assert GRAPH.cycles() == []


def test_the_params_loader_imports_no_fidelity_or_prefect():
    assert loaded_by_imports(["tasks.runtime.params"],
                             ["torch_fidelity", "torchvision", "prefect", "mlflow"], ROOT) == {}


def test_importing_a_step_module_imports_no_prefect():
    assert loaded_by_imports(sorted(step_modules(GRAPH)), ["prefect"], ROOT) == {}


def test_stage_deps_of_every_step_stay_in_core_and_tasks():
    steps = step_modules(GRAPH)
    for step in steps:
        deps = stage_deps(step)
        own = GRAPH.path_of(step)
        assert own in deps and "tasks/__init__.py" in deps and "boss_core/__init__.py" in deps
        assert "tasks/runtime/step.py" in deps and "tasks/runtime/__init__.py" in deps
        assert deps == sorted(set(deps))
        assert all(d.split("/")[0] in ("boss_core", "tasks") for d in deps), deps
        assert {GRAPH.path_of(s) for s in steps} & set(deps) == {own}
        assert all((ROOT / d).is_file() for d in deps)


# --- each rule can fail: a synthetic module set that breaks it ----------------------------

def write_tree(root: Path, files: Mapping[str, str]) -> ImportGraph:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return ImportGraph(root)


PACKAGE_INITS = {f"{p}/__init__.py": "" for p in (
    "boss_core", "boss_core/models", "tasks", "tasks/runtime", "tasks/cli", "flows")}


def test_relative_imports_are_resolved():
    assert imported_names("from . import tracking\nfrom .io import save\n",
                          "tasks.runtime.step", False) == {"tasks.runtime.tracking",
                                                           "tasks.runtime.io.save"}
    assert imported_names("from ..config import X\nfrom . import mlp\n",
                          "boss_core.models", True) == {"boss_core.config.X",
                                                        "boss_core.models.mlp"}
    assert imported_names("def f():\n    from .. import data as d\n    import a.b\n",
                          "boss_core.models.mlp", False) == {"boss_core.data", "a.b"}
    with pytest.raises(ValueError, match="beyond the top-level package"):
        imported_names("from ... import x\n", "tasks.step", False)


def test_the_core_rule_can_fail(tmp_path):
    graph = write_tree(tmp_path, {**PACKAGE_INITS,
                                  "boss_core/clean.py": "import torch\n",
                                  "boss_core/a.py": "def f():\n    import mlflow.entities\n",
                                  "boss_core/models/b.py": "from tasks.runtime import io\n",
                                  "boss_core/c.py": "if True:\n    from prefect import flow\n"})
    assert core_imports_frameworks(graph) == ["boss_core.a imports mlflow.entities",
                                              "boss_core.c imports prefect.flow",
                                              "boss_core.models.b imports tasks.runtime.io"]


def test_the_flows_rule_can_fail(tmp_path):
    graph = write_tree(tmp_path, {**PACKAGE_INITS, "flows/pipeline.py": "import tasks.prepare\n",
                                  "tasks/runtime/x.py": "def f():\n    from flows import runs\n",
                                  "tasks/prepare.py": "import flows.pipeline as p\n"})
    assert tasks_import_flows(graph) == ["tasks.prepare imports flows.pipeline",
                                         "tasks.runtime.x imports flows.runs"]


def test_the_step_rule_can_fail(tmp_path):
    graph = write_tree(tmp_path, {
        **PACKAGE_INITS,
        "tasks/prepare.py": "from .runtime import step\n",
        "tasks/teacher.py": "def run():\n    from . import prepare\n",  # step -> step
        "tasks/runtime/step.py": "",
        "tasks/runtime/launch.py": "import importlib\n\n"
                                   "def go(name):\n"
                                   "    importlib.import_module(f'tasks.{name}')\n",  # allowed
        "tasks/runtime/shards.py": "def f():\n    from ..prepare import run\n",
        "tasks/cli/sample.py": "import tasks.teacher\n",
        "flows/pipeline.py": "from tasks import prepare, teacher\n"})  # flows may
    assert step_modules(graph) == {"tasks.prepare", "tasks.teacher"}
    assert tasks_import_steps(graph) == ["tasks.cli.sample imports step tasks.teacher",
                                         "tasks.runtime.shards imports step tasks.prepare",
                                         "tasks.teacher imports step tasks.prepare"]


def test_the_cycle_rule_can_fail(tmp_path):
    graph = write_tree(tmp_path, {
        **PACKAGE_INITS,
        "boss_core/b.py": "from .c import x\n",
        "boss_core/c.py": "def g():\n    from . import b\n",  # only inside a function
        "boss_core/d.py": "from . import b\n",  # imports into the cycle, not part of it
        "tasks/runtime/p.py": "from . import q\n",
        "tasks/runtime/q.py": "from .r import z\n",
        "tasks/runtime/r.py": "import tasks.runtime.p\n"})
    assert graph.cycles() == [["boss_core.b", "boss_core.c"],
                              ["tasks.runtime.p", "tasks.runtime.q", "tasks.runtime.r"]]


@pytest.fixture(scope="module")
def fake_modules(tmp_path_factory):
    """A package whose modules import a stand-in heavy module at import time or lazily."""
    root = tmp_path_factory.mktemp("fake")
    write_tree(root, {"fakeheavy/__init__.py": "",
                      "fakepkg/__init__.py": "",
                      "fakepkg/loader.py": "def load():\n    import fakeheavy\n",  # lazy: fine
                      "fakepkg/light_step.py": "from . import loader\n",
                      "fakepkg/eager_step.py": "import fakeheavy\n"})
    return root


def test_the_runtime_import_check_can_fail(fake_modules):
    assert loaded_by_imports(["fakepkg.loader", "fakepkg.light_step"], ["fakeheavy"],
                             fake_modules) == {}
    assert loaded_by_imports(["fakepkg.light_step", "fakepkg.eager_step"], ["fakeheavy"],
                             fake_modules) == {"fakeheavy": "fakepkg.eager_step"}


# --- stage deps on a synthetic package --------------------------------------------------------

SYNTHETIC = {
    **PACKAGE_INITS,
    "boss_core/config.py": "",
    "boss_core/models/__init__.py": "from ..config import X\n",
    "boss_core/models/mlp.py": "from . import helpers\n",
    "boss_core/models/helpers.py": "",
    "boss_core/unused.py": "",
    "boss_core/fidelity.py": "def f():\n    import torch_fidelity\n    from .metrics import m\n",
    "boss_core/metrics.py": "",
    "tasks/runtime/step.py": "from . import tracking\n",
    "tasks/runtime/tracking.py": "def connect():\n    from .agent import client\n",
    "tasks/runtime/agent.py": "",
    "tasks/runtime/launch.py": "import importlib\n",
    "tasks/prepare.py": "from boss_core.models.mlp import Net\nfrom .runtime.step import main\n",
    "tasks/evaluate.py": "from boss_core import fidelity\nfrom .runtime import step\n",
    "flows/pipeline.py": "from tasks import evaluate, prepare\n",
}
TASKS_CORE = ["tasks/__init__.py", "tasks/runtime/__init__.py", "tasks/runtime/agent.py",
              "tasks/runtime/step.py", "tasks/runtime/tracking.py"]
EXPECTED_DEPS = {
    "tasks.prepare": ["boss_core/__init__.py", "boss_core/config.py",
                      "boss_core/models/__init__.py", "boss_core/models/helpers.py",
                      "boss_core/models/mlp.py", *TASKS_CORE, "tasks/prepare.py"],
    "tasks.evaluate": ["boss_core/__init__.py", "boss_core/fidelity.py", "boss_core/metrics.py",
                       *TASKS_CORE, "tasks/evaluate.py"],
}


@pytest.mark.parametrize("step", sorted(EXPECTED_DEPS))
def test_stage_deps_is_the_import_closure(tmp_path, step):
    write_tree(tmp_path, SYNTHETIC)
    assert stage_deps(step, tmp_path) == sorted(EXPECTED_DEPS[step])
    assert closure(step, tmp_path) == {tmp_path / d for d in EXPECTED_DEPS[step]}
    assert step_modules(ImportGraph(tmp_path)) == {"tasks.prepare", "tasks.evaluate"}
