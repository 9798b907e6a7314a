"""One protocol: the in-memory sweep (``boss_core.sweep.run_sweep``) and the DVC stages run the
same steps, so from the stages' teacher and feature net the sweep gives the stages' metrics."""

from __future__ import annotations

import json

import pytest
import torch

from boss_core.fidelity import build_extractor, fid_kid_features
from boss_core.sweep import run_sweep
from tasks.runtime.artifacts import load_prepared, load_teacher
from tasks.runtime.params import load_params
from tasks.runtime.workspace import Workspace

pytestmark = pytest.mark.e2e


@pytest.fixture
def one_thread():
    """One torch thread and one BLAS thread (KID's numpy products), as the stages ran with
    OMP_NUM_THREADS=1 (tests/pipeline_helpers.env)."""
    from threadpoolctl import threadpool_limits

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(threads)


def test_in_memory_sweep_equals_the_stages_bit_for_bit(tiny_repro, one_thread):
    params = load_params(tiny_repro / "params.yaml")
    ws = Workspace.at(tiny_repro)
    data = load_prepared(ws)
    teacher = load_teacher(ws, "cpu")
    f = params.fidelity
    extractor = build_extractor(f, ws.step("features") / "feature_net.safetensors")
    reference = extractor.reference(data.x)

    def score(features):
        out = fid_kid_features(features, reference, f)
        return {"fid": out["fid"], "kid": out["kid"]}

    metrics, costs, _ = run_sweep(teacher, data.data_shape, score, params.sweep,
                                  params.straighten, options=params.methods, device="cpu",
                                  progress=False, featurize=extractor.features)
    stages = json.loads((tiny_repro / "results/metrics.json").read_text())
    assert list(metrics) == list(stages) == list(params.sweep.methods)
    assert metrics == stages  # every value, to the last bit
    staged_costs = json.loads((tiny_repro / "results/costs.json").read_text())
    for method, rows in staged_costs.items():
        for key, row in rows.items():
            for name in ("iterations", "trainable_params", "search_nfe", "search_evaluations"):
                assert costs[method][key][name] == row[name], (method, key, name)


def test_the_gits_row_added_through_the_registry_shows_everywhere(tiny_repro):
    """bellman_gits is one registry entry (not default); a run that selects it (the tiny
    profile does) has its row in metrics.json, the report's table and plots, and MLflow."""
    import mlflow

    metrics = json.loads((tiny_repro / "results/metrics.json").read_text())
    assert set(metrics["bellman_gits"]) == {"nfe_1", "nfe_2", "nfe_4"}
    assert "bellman_gits" in (tiny_repro / "results/metrics.md").read_text()
    lines = (tiny_repro / "results/plots/methods/bellman_gits.csv").read_text().splitlines()
    assert len(lines) == 1 + 3
    assert len((tiny_repro / "results/plots/steps/bellman_gits.csv").read_text().splitlines()) \
        == 1 + 1 + 2 + 4  # a row per step of K = 1, 2, 4
    schedules = json.loads((tiny_repro / "outputs/schedules/schedules.json").read_text())
    assert schedules["schedules"]["bellman_gits"]["nfe_2"]["name"].startswith(
        "bellman_discount1.15")
    client = mlflow.MlflowClient(f"sqlite:///{tiny_repro / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              "tags.mlflow.runName = 'evaluate'")
    assert runs and "bellman_gits.fid" in runs[0].data.metrics
