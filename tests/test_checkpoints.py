"""Training checkpoints (boss_core.training): a bad file is refused by name, loading never runs
its code, and the file is replaced atomically."""

from __future__ import annotations

import pickle

import pytest
import torch
from byo_models import UNPICKLED, Opaque

from boss_core.models import ModelConfig, build_model
from boss_core.teacher import CHECKPOINT_NAME, TeacherConfig, train_teacher

SHAPE = (1, 8, 8)
DATA = torch.randn(32, *SHAPE, generator=torch.Generator().manual_seed(0))
SMALL = ModelConfig(arch="mlp", hidden=16, depth=1)


def teach(folder, model_config=SMALL, iterations=4, seed=1):
    """A 4-step teacher checkpointed in ``folder`` (every 2 steps)."""
    model = build_model(model_config, SHAPE, seed=seed)
    return train_teacher(model, DATA, TeacherConfig(
        iterations=iterations, batch_size=8, log_every=2, device="cpu", progress=False),
        checkpoint_dir=folder)


def test_a_good_checkpoint_is_resumed_and_replaced_without_leftovers(tmp_path):
    teach(tmp_path)
    state = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    assert state["step"] == 4 and len(state["losses"]) == 4 and state["wall_seconds"] > 0
    assert set(state) == {"step", "model", "ema", "optimizer", "losses", "val_losses",
                          "config", "wall_seconds"}
    resumed = teach(tmp_path, iterations=6)
    assert resumed.resumed_from == 4 and resumed.losses.shape == (6, 2)
    assert torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)["step"] == 6
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT_NAME]  # no temporary left


def test_truncated_corrupt_and_foreign_files_are_named(tmp_path):
    teach(tmp_path / "good")
    good = (tmp_path / "good" / CHECKPOINT_NAME).read_bytes()
    files = {"truncated": good[: len(good) // 2], "text": b"not a checkpoint at all"}
    for name, data in files.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / CHECKPOINT_NAME).write_bytes(data)
    (tmp_path / "dict").mkdir()
    torch.save({"weights": torch.zeros(3)}, tmp_path / "dict" / CHECKPOINT_NAME)
    for name in ("truncated", "text", "dict"):
        path = tmp_path / name / CHECKPOINT_NAME
        with pytest.raises(ValueError, match="does not match this model or is corrupt") as err:
            teach(path.parent)
        assert str(path) in str(err.value) and "delete it" in str(err.value)


def test_another_architecture_is_refused(tmp_path):
    teach(tmp_path, ModelConfig(arch="mlp", hidden=32, depth=1))
    with pytest.raises(ValueError, match="does not match this model") as err:
        teach(tmp_path)
    assert str(tmp_path / CHECKPOINT_NAME) in str(err.value)


def test_a_pickled_object_is_never_unpickled(tmp_path):
    with open(tmp_path / CHECKPOINT_NAME, "wb") as handle:
        pickle.dump({"step": 1, "model": Opaque("ran")}, handle)
    UNPICKLED.clear()
    with pytest.raises(ValueError, match="corrupt"):
        teach(tmp_path)
    assert UNPICKLED == []
