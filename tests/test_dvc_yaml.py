"""dvc.yaml is generated from the steps and the method registry, its code deps are each step's
import closure, and the committed baseline (dvc.lock, results/metrics.json) is the default run."""

from __future__ import annotations

import hashlib
from pathlib import Path

import yaml

from boss_core.methods import REGISTRY, trained_names
from tasks.cli import dvcyaml
from tasks.runtime.imports import stage_deps

ROOT = Path(__file__).resolve().parents[1]
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())


def stages():
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def test_committed_dvc_yaml_is_what_the_generator_writes():
    assert (ROOT / "dvc.yaml").read_text() == dvcyaml.render(PARAMS), \
        "dvc.yaml is stale: run python -m tasks.cli.dvcyaml"


def test_every_stage_depends_on_the_code_it_imports():
    for name, stage in stages().items():
        stage = stage.get("do", stage)
        module = stage["cmd"].split("python -m ")[1].split()[0]
        if module == "tasks.runtime.launch":
            module = "tasks.straighten"
        closure = set(stage_deps(module, ROOT)) - set(dvcyaml.NOT_DEPS)
        assert closure <= set(stage["deps"]), (name, sorted(closure - set(stage["deps"])))
    deps = {name: set(s.get("do", s)["deps"]) for name, s in stages().items()}
    # the gaps the hand-written lists had: pairs.py builds the distill grid, the cost matrix
    # runs grids, velocity and batching
    assert "boss_core/pairs.py" in deps["schedules"]
    assert {"boss_core/grids.py", "boss_core/velocity.py", "boss_core/batching.py"} <= deps["cost"]
    assert "boss_core/methods.py" in deps["straighten"]


def test_methods_come_from_the_registry():
    s = stages()
    assert s["straighten"]["foreach"] == list(trained_names())
    for method in trained_names():
        assert f"outputs/students/{method}" in s["evaluate"]["deps"]
        assert f"outputs/students/{method}" in s["report"]["deps"]
    plots = yaml.safe_load((ROOT / "dvc.yaml").read_text())["plots"]
    lines = next(p["fid_vs_nfe"] for p in plots if isinstance(p, dict) and "fid_vs_nfe" in p)
    assert set(lines["y"]) == {f"results/plots/methods/{m}.csv" for m, entry in REGISTRY.items()
                               if not entry.reference}
    options = [f"methods.{m}.{o}" for m, e in REGISTRY.items() if e.search for o in e.options]
    assert set(options) <= set(s["schedules"]["params"])


def test_a_users_model_module_is_a_dep_of_every_stage_that_builds_the_network():
    params = {**PARAMS, "model": {**PARAMS["model"], "arch": "import",
                                  "import_path": "tests.byo_models:TinyVelocity"}}
    built = dvcyaml.build(params)["stages"]
    for name in ("prepare", "teacher", "cost", "schedules", "pairs", "evaluate"):
        assert "tests/byo_models.py" in built[name]["deps"], name
    assert "tests/byo_models.py" in built["straighten"]["do"]["deps"]
    assert "tests/byo_models.py" not in built["features"]["deps"]
    assert dvcyaml.user_model_file({"model": {"import_path": "torch.nn:Linear"}}) is None


def test_data_stage_writes_the_embedded_digits_and_data_dvc_is_gone():
    data = stages()["data"]
    assert data["outs"] == ["data/digits"]
    assert "tasks/cli/embed.py" in data["deps"]
    assert not (ROOT / "data.dvc").exists()
    assert "data" in stages()["prepare"]["deps"]


def test_committed_baseline_is_the_default_run_of_these_params():
    """dvc.lock and results/metrics.json are committed together: the lock's params are
    params.yaml's values and its metrics hash is the committed file's (rerun `dvc repro` and
    commit both when the default numbers change)."""
    lock = yaml.safe_load((ROOT / "dvc.lock").read_text())["stages"]
    assert set(lock) >= {"data", "prepare", "teacher", "evaluate", "report"}
    for name, entry in lock.items():
        for values in (entry.get("params") or {}).values():
            for key, value in values.items():
                node = PARAMS
                for part in key.split("."):
                    node = node[part]
                assert node == value, (name, key, value, node)
    metrics = next(o for o in lock["evaluate"]["outs"] if o["path"] == "results/metrics.json")
    digest = hashlib.md5((ROOT / "results/metrics.json").read_bytes()).hexdigest()
    assert metrics["md5"] == digest
