"""Teacher checkpoints: a bad file is refused by name, and loading never runs its code."""

from __future__ import annotations

import pickle

import pytest
import torch
from byo_models import UNPICKLED, Opaque

from boss_core.models import ModelConfig, build_model
from boss_core.teacher import TeacherConfig, train_teacher
from tasks.teacher import load_checkpoint

SHAPE = (1, 8, 8)


def _good(tmp_path, config=None):
    model = build_model(config or ModelConfig(arch="mlp", hidden=16, depth=1), SHAPE, seed=0)
    states = []
    train_teacher(model, torch.randn(32, *SHAPE), TeacherConfig(
        iterations=4, batch_size=8, log_every=2, device="cpu", progress=False),
        callback=lambda p: states.append(p.snapshot()))
    path = tmp_path / "teacher.pt"
    torch.save(states[-1], path)
    return path


def test_a_good_checkpoint_loads(tmp_path):
    path = _good(tmp_path)
    model = build_model(ModelConfig(arch="mlp", hidden=16, depth=1), SHAPE, seed=1)
    assert load_checkpoint(path, model)["step"] == 4


def test_truncated_corrupt_and_foreign_files_are_named(tmp_path):
    model = build_model(ModelConfig(arch="mlp", hidden=16, depth=1), SHAPE, seed=1)
    good = _good(tmp_path).read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good[: len(good) // 2])
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint at all")
    other = tmp_path / "dict.pt"
    torch.save({"weights": torch.zeros(3)}, other)
    for path, match in ((truncated, "corrupt"), (text, "corrupt"), (other, "not a teacher")):
        with pytest.raises(ValueError, match=match) as err:
            load_checkpoint(path, model)
        assert str(path) in str(err.value)


def test_another_architecture_is_refused(tmp_path):
    path = _good(tmp_path, ModelConfig(arch="mlp", hidden=32, depth=1))
    model = build_model(ModelConfig(arch="mlp", hidden=16, depth=1), SHAPE, seed=1)
    with pytest.raises(ValueError, match="another architecture") as err:
        load_checkpoint(path, model)
    assert str(path) in str(err.value)


def test_a_pickled_object_is_never_unpickled(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as handle:
        pickle.dump({"step": 1, "model": Opaque("ran")}, handle)
    UNPICKLED.clear()
    model = build_model(ModelConfig(arch="mlp", hidden=16, depth=1), SHAPE, seed=1)
    with pytest.raises(ValueError, match="corrupt or not a checkpoint"):
        load_checkpoint(path, model)
    assert UNPICKLED == []
