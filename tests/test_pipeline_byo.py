"""Bring your own model through the pipeline's stages: params name a class by import path
(defined in tests/byo_models.py), a state_dict file and a diffusers-style adapter; the teacher
stage loads it without training and the later stages search and straighten it."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from pipeline_helpers import copy_repo, run_steps_in_process

from boss_core.models import ModelConfig, build_model
from tasks.runtime.artifacts import load_teacher, model_builder
from tasks.runtime.workspace import Workspace

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_pretrained_diffusers_style_model_runs_through_the_stages(tmp_path, monkeypatch):
    """The stages run in this process (as ``python -m tasks.<step>`` does)."""
    repo = copy_repo(tmp_path / "repo")
    config = ModelConfig(arch="import", import_path="byo_models:TinyDiffusersNet",
                         init_kwargs={"dim": 64, "hidden": 32}, adapter="diffusers")
    net = build_model(config.__class__.from_dict({**config.to_dict(), "adapter": "plain"}),
                      (1, 8, 8), seed=7)
    from safetensors.torch import save_file

    save_file(net.state_dict(), str(repo / "data" / "my_model.safetensors"))
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["model"].update(arch="import", import_path="byo_models:TinyDiffusersNet",
                           init_kwargs={"dim": 64, "hidden": 32}, adapter="diffusers",
                           weights="data/my_model.safetensors")
    params["sweep"].update(methods=["teacher", "uniform", "bellman", "boss"], nfes=[2])
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run_steps_in_process(repo, ("prepare", "teacher", "cost", "schedules", "pairs",
                                "straighten --method boss"), monkeypatch)

    summary = json.loads((repo / "outputs/teacher/summary.json").read_text())
    assert summary["pretrained"].endswith("data/my_model.safetensors")  # nothing trained
    teacher = load_teacher(Workspace.at(repo), "cpu", "byo_models:TinyDiffusersNet")
    x, t = torch.randn(4, 1, 8, 8), torch.rand(4)
    expected = -net(x, (1 - t) * 1000.0).sample  # the diffusers convention, by hand
    assert torch.allclose(teacher(x, t), expected, atol=1e-6)
    with pytest.raises(ValueError, match="names code to import"):
        load_teacher(Workspace.at(repo), "cpu", None)  # not trusted without params' path
    student = repo / "outputs/students/boss/nfe_2/model.safetensors"
    from tasks.runtime.io import load_model

    model, meta = load_model(student, model_builder("byo_models:TinyDiffusersNet"))
    assert meta["model_config"]["import_path"] == "byo_models:TinyDiffusersNet"
    assert not torch.allclose(model(x, t), expected)  # straightening changed the weights
