"""NaN or Inf in the teacher's paths stops the cost step with an error, and nothing is
written; non-finite values never reach metrics.json."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from boss_core.models import ModelConfig, build_model
from tasks import cost
from tasks.runtime.io import save_model, save_tensors, write_json
from tasks.runtime.params import load_params
from tasks.runtime.step import execute
from tasks.runtime.workspace import Workspace

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def workspace(tmp_path, monkeypatch, mlflow_store):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_store)
    monkeypatch.delenv("BOSS_PARENT_RUN_ID", raising=False)
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    ws = Workspace.at(tmp_path)
    save_tensors(ws.step("prepare") / "dataset.safetensors", {"x": torch.zeros(4, 2)},
                 {"name": "t", "n": 4, "data_shape": [2], "classes": []})
    return ws


def _teacher(ws, poison: float):
    config = ModelConfig(arch="mlp", hidden=8, depth=1)
    model = build_model(config, (2,), seed=0)
    with torch.no_grad():
        next(model.parameters()).fill_(poison)
    save_model(ws.step("teacher") / "model.safetensors", model, config.to_dict(), (2,))


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_non_finite_teacher_stops_the_cost_step(workspace, poison):
    _teacher(workspace, poison)
    params = load_params(workspace.repo / "params.yaml", {
        "run.device": "cpu", "run.progress": False, "sweep.search_samples": 8,
        "sweep.n_steps": 10, "sweep.nfes": [2]})
    with pytest.raises((ValueError, FloatingPointError)) as err:
        execute("cost", cost.run, cost.SECTIONS, params, workspace)
    assert "nan" in str(err.value).lower() or "inf" in str(err.value).lower()
    assert not (workspace.step("cost") / "cost.safetensors").exists()


def test_metrics_files_refuse_nan(tmp_path):
    path = tmp_path / "metrics.json"
    write_json(path, {"boss": {"nfe_2": {"fid": 1.0}}})
    with pytest.raises(ValueError):
        write_json(path, {"boss": {"nfe_2": {"fid": float("nan")}}})
    assert json.loads(path.read_text()) == {"boss": {"nfe_2": {"fid": 1.0}}}  # intact
