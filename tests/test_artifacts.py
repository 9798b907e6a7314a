"""Model files are rebuilt from their own config: code they name is not trusted."""

from __future__ import annotations

import pytest
import torch

from boss_core.models import ModelConfig, build_model
from tasks.runtime.artifacts import build_from_meta, model_builder
from tasks.runtime.io import load_model, save_model


def _saved(tmp_path, config: ModelConfig):
    model = build_model(config, (2,), seed=0)
    path = tmp_path / "model.safetensors"
    save_model(path, model, config.to_dict(), (2,))
    return model, path


def test_builtin_models_round_trip(tmp_path):
    model, path = _saved(tmp_path, ModelConfig(arch="mlp", hidden=16, depth=1))
    loaded, meta = load_model(path, build_from_meta)
    x, t = torch.randn(5, 2), torch.rand(5)
    assert torch.equal(loaded(x, t), model(x, t))
    assert meta["data_shape"] == [2]


def test_import_arch_needs_the_params_import_path(tmp_path):
    config = ModelConfig(arch="import", import_path="byo_models:TinyVelocity",
                         init_kwargs={"dim": 2})
    model, path = _saved(tmp_path, config)
    with pytest.raises(ValueError, match="names code to import"):
        load_model(path, build_from_meta)
    with pytest.raises(ValueError, match="names code to import"):
        load_model(path, model_builder("os:system"))
    loaded, _ = load_model(path, model_builder("byo_models:TinyVelocity"))
    x, t = torch.randn(3, 2), torch.rand(3)
    assert torch.equal(loaded(x, t), model(x, t))
