"""End to end: `dvc repro` on the tiny profile in a copy of the repository, then the MLflow
store, a no-op second repro, `dvc push` and sampling from a registered model
(experiments, `dvc metrics diff` and `dvc plots show`: test_pipeline_queue.py).

The tests that only read the run use the session's ``tiny_repro`` (tests/conftest.py); the ones
that push or commit work on one copy of it (``repo``)."""

from __future__ import annotations

import json
import math
import sys

import pytest
from pipeline_helpers import clone_repo, run

from boss_core.methods import trained_names

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
# every step's MLflow run: one straighten step per trained method of the registry
STEPS = ["prepare", "teacher", "features", "cost", "schedules", "pairs",
         *(f"straighten_{m}" for m in trained_names()), "evaluate", "report"]


@pytest.fixture(scope="module")
def repo(tiny_repro, tmp_path_factory):
    """A copy of the shared run for the tests that change it."""
    return clone_repo(tiny_repro, tmp_path_factory.mktemp("changed") / "repo")


def _dvc():
    from pipeline_helpers import BIN

    return BIN / "dvc"


def _metrics(repo):
    return json.loads((repo / "results" / "metrics.json").read_text())


def test_metrics_cover_every_method_and_nfe(tiny_repro):
    repo = tiny_repro
    import yaml

    params = yaml.safe_load((repo / "params.yaml").read_text())
    metrics = _metrics(repo)
    sweep = params["sweep"]
    assert set(metrics) == set(sweep["methods"])
    for method, table in metrics.items():
        keys = [f"nfe_{sweep['n_steps']}"] if method == "teacher" else [
            f"nfe_{k}" for k in sweep["nfes"]]
        assert sorted(table) == sorted(keys), method
        for row in table.values():
            for name in ("fid", "fid_std", "kid", "kid_std", "endpoint_rmse"):
                assert math.isfinite(row[name]), (method, name)
            assert row["n_samples"] == sweep["eval_samples"]
            assert row["n_seeds"] == sweep["n_seeds"]
    assert metrics["teacher"][f"nfe_{sweep['n_steps']}"]["endpoint_rmse"] == 0.0
    uniform = [metrics["uniform"][f"nfe_{k}"]["fid"] for k in sweep["nfes"]]
    assert all(a > b for a, b in zip(uniform, uniform[1:], strict=False)), uniform
    assert metrics["boss"]["nfe_2"]["fid"] < metrics["uniform"]["nfe_2"]["fid"]
    costs = json.loads((repo / "results" / "costs.json").read_text())
    assert costs["boss"]["nfe_2"]["iterations"] == params["straighten"]["iterations"]
    assert costs["bellman"]["nfe_2"]["search_nfe"] > 0


def test_mlflow_holds_parent_and_nested_runs(tiny_repro):
    repo = tiny_repro
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("boss-tiny")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    children = {r.info.run_name: r for r in runs
                if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert sorted(children) == sorted(STEPS)
    assert {r.info.status for r in children.values()} == {"FINISHED"}
    metrics = _metrics(repo)
    history = client.get_metric_history(children["evaluate"].info.run_id, "boss.fid")
    assert {h.step: h.value for h in history} == pytest.approx(
        {int(k.split("_")[1]): row["fid"] for k, row in metrics["boss"].items()})
    on_parent = client.get_metric_history(parent.info.run_id, "uniform.endpoint_rmse")
    assert len(on_parent) == len(metrics["uniform"])
    costs = json.loads((repo / "results" / "costs.json").read_text())
    budget = client.get_metric_history(parent.info.run_id, "boss.budget_evaluations")
    assert {h.step: h.value for h in budget} == {
        int(k.split("_")[1]): row["budget_evaluations"] for k, row in costs["boss"].items()}
    assert parent.data.params["straighten.iterations"] == "60"
    assert parent.data.tags.get("mlflow.source.git.commit")
    names = {m.name for m in client.search_registered_models()}
    assert "boss-tiny-boss-nfe2" in names
    version = max(client.search_model_versions("name = 'boss-tiny-boss-nfe2'"),
                  key=lambda v: int(v.version))
    schedule = json.loads(version.tags["schedule"])
    saved = json.loads((repo / "outputs/students/boss/nfe_2/schedule.json").read_text())
    assert schedule["times"] == saved["times"]


def test_second_repro_reruns_nothing(tiny_repro):
    repo = tiny_repro
    out = run([str(_dvc()), "repro"], repo)
    assert "Running stage" not in out.stdout + out.stderr
    status = run([str(_dvc()), "status"], repo)
    assert "up to date" in status.stdout


def test_dvc_push_works_out_of_the_box(repo):
    run([str(_dvc()), "push"], repo)
    stored = [p for p in (repo / ".dvcstore").rglob("*") if p.is_file()]
    assert len(stored) >= 3  # the data folder's two files and its .dir listing, at least
    status = run([str(_dvc()), "status", "--cloud"], repo)
    assert "in sync" in status.stdout.lower(), status.stdout


def test_sample_from_the_registered_model(tiny_repro, tmp_path):
    repo = tiny_repro
    out = tmp_path / "samples"
    run([sys.executable, "-m", "tasks.cli.sample", "--registry", "boss-tiny-boss-nfe2", "--n", "16",
         "--seed", "3", "--out", str(out)], repo)
    local = tmp_path / "local"
    run([sys.executable, "-m", "tasks.cli.sample", "--method", "boss", "--nfe", "2", "--n", "16",
         "--seed", "3", "--out", str(local)], repo)
    import numpy as np

    a, b = sorted(out.glob("*.npy")), sorted(local.glob("*.npy"))
    assert len(a) == len(b) == 1
    assert np.array_equal(np.load(a[0]), np.load(b[0]))
