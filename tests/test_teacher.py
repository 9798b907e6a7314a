"""Teacher training: the loss it minimises, reproducibility, resume, validation, devices."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from boss_core.device import resolve_device
from boss_core.grids import uniform_grid
from boss_core.models import ModelConfig, build_model
from boss_core.sampling import euler_sample
from boss_core.seeds import sample_noise, step_generator
from boss_core.teacher import CHECKPOINT_NAME, TeacherConfig, train_teacher

TINY = ModelConfig(arch="mlp", hidden=32, depth=1, time_embed_dim=16)


def quick(**overrides) -> TeacherConfig:
    values = {"iterations": 30, "batch_size": 16, "lr": 1e-3, "warmup": 5, "device": "cpu",
              "progress": False, "log_every": 10}
    return TeacherConfig(**{**values, **overrides})


def flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.state_dict().values()])


def toy_data(n: int = 40) -> torch.Tensor:
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(3))


class ZeroVelocity(nn.Module):
    """v = 0 with one unused parameter (so Adam has something to hold)."""

    def __init__(self):
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(1))

    def forward(self, x, t):
        return torch.zeros_like(x) + 0 * self.unused


def test_first_loss_is_the_flow_matching_mse_of_the_step_batch():
    """With v = 0 the loss is mean((x1 - z)^2) over the batch drawn from step_generator."""
    data, config = toy_data(), quick(iterations=1, batch_size=8, seed=4)
    result = train_teacher(ZeroVelocity(), data, config)
    gen = step_generator(4, 0)
    index = torch.randint(len(data), (8,), generator=gen)
    z = torch.randn((8, 2), generator=gen)
    expected = float(((data[index] - z) ** 2).mean())
    assert result.losses.shape == (1, 2)
    assert result.losses[0, 0] == 0
    assert math.isclose(result.losses[0, 1], expected, rel_tol=1e-6)


def test_same_seed_is_bit_identical_and_another_seed_differs():
    data = toy_data()
    runs = [train_teacher(build_model(TINY, (2,), seed=0), data, quick(seed=s)) for s in (1, 1, 2)]
    a, b, c = (flat_params(r.model) for r in runs)
    assert torch.equal(a, b)
    assert torch.equal(flat_params(runs[0].ema_model), flat_params(runs[1].ema_model))
    assert not torch.equal(a, c)


class Interrupt(Exception):
    pass


def stop_at(step: int):
    def hook(done: int) -> None:
        if done == step:
            raise Interrupt
    return hook


def test_resume_from_a_checkpoint_is_bit_identical_to_an_uninterrupted_run(tmp_path):
    data = toy_data()
    seen = []
    full = train_teacher(build_model(TINY, (2,), seed=0), data, quick(),
                         callback=lambda p: seen.append(p.step))
    assert seen == [10, 20, 30]
    # Killed right after the step-10 checkpoint, resumed into a differently initialised model.
    with pytest.raises(Interrupt):
        train_teacher(build_model(TINY, (2,), seed=0), data, quick(), checkpoint_dir=tmp_path,
                      on_checkpoint=stop_at(10))
    assert torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)["step"] == 10
    resumed = train_teacher(build_model(TINY, (2,), seed=9), data, quick(),
                            checkpoint_dir=tmp_path, on_checkpoint=seen.append)
    assert resumed.resumed_from == 10 and seen[3:] == [20, 30]
    # ... and a finished 20-step run continued to 30 (iterations may change on resume).
    train_teacher(build_model(TINY, (2,), seed=0), data, quick(iterations=20),
                  checkpoint_dir=tmp_path / "b")
    resumed20 = train_teacher(build_model(TINY, (2,), seed=9), data, quick(),
                              checkpoint_dir=tmp_path / "b")
    for other in (resumed, resumed20):
        assert torch.equal(flat_params(other.model), flat_params(full.model))
        assert torch.equal(flat_params(other.ema_model), flat_params(full.ema_model))
        assert (other.losses == full.losses).all()
    assert full.losses[:, 0].tolist() == list(range(30))
    assert full.resumed_from == 0 and resumed20.resumed_from == 20


def test_teacher_learns_a_two_mode_distribution():
    """Data at (+-2, 0): after training, 100-step Euler samples land on the two modes, evenly."""
    gen = torch.Generator().manual_seed(0)
    signs = torch.randint(2, (512,), generator=gen) * 2.0 - 1.0
    data = torch.stack([2 * signs, torch.zeros(512)], 1) + 0.05 * torch.randn(512, 2,
                                                                              generator=gen)
    model = build_model(ModelConfig(arch="mlp", hidden=64, depth=2, time_embed_dim=32), (2,),
                        seed=0)
    result = train_teacher(model, data, quick(iterations=800, batch_size=128, lr=3e-3, warmup=50))
    samples = euler_sample(result.ema_model, sample_noise((2,), 0, 0, 400), uniform_grid(100))
    near = (samples - torch.tensor([[2.0, 0.0]])).norm(dim=1).lt(0.5) | (
        samples - torch.tensor([[-2.0, 0.0]])).norm(dim=1).lt(0.5)
    assert float(near.float().mean()) > 0.9
    right = float((samples[:, 0] > 0).float().mean())
    assert 0.35 < right < 0.65


def test_nan_data_and_nan_loss_are_reported():
    data = toy_data()
    bad = data.clone()
    bad[7, 1] = float("nan")
    with pytest.raises(ValueError, match="row: 7"):
        train_teacher(build_model(TINY, (2,), seed=0), bad, quick())

    class NaNAtThirdCall(ZeroVelocity):
        calls = 0

        def forward(self, x, t):
            self.calls += 1
            out = super().forward(x, t)
            return out * float("nan") if self.calls == 3 else out

    with pytest.raises(FloatingPointError, match="step 2"):
        train_teacher(NaNAtThirdCall(), data, quick())


def test_labels_are_checked_against_the_model():
    data = toy_data()
    model = build_model(ModelConfig(arch="mlp", hidden=16, depth=1, time_embed_dim=8,
                                    num_classes=3), (2,), seed=0)
    with pytest.raises(ValueError, match="pass labels"):
        train_teacher(model, data, quick())
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        train_teacher(model, data, quick(), labels=torch.full((40,), 3))
    result = train_teacher(model, data, quick(iterations=3, label_dropout=0.5),
                           labels=torch.arange(40) % 3)
    assert result.losses.shape == (3, 2)


def test_config_rejects_unknown_keys_and_bad_values():
    assert TeacherConfig.from_dict({"iterations": 5}).iterations == 5
    with pytest.raises(ValueError, match="learning_rate"):
        TeacherConfig.from_dict({"learning_rate": 1e-3})
    for bad in ({"batch_size": 0}, {"iterations": 0}, {"lr": -1.0}, {"lr": float("nan")},
                {"ema_decay": 1.0}, {"device": "tpu"}, {"grad_clip": 0.0}, {"batch_size": 2.5}):
        name = next(iter(bad))
        with pytest.raises(ValueError, match=name):
            TeacherConfig(**bad)


def test_a_checkpoint_past_iterations_or_with_other_settings_is_refused(tmp_path):
    data = toy_data()
    train_teacher(build_model(TINY, (2,), seed=0), data, quick(), checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="step 30, past iterations = 20"):
        train_teacher(build_model(TINY, (2,), seed=0), data, quick(iterations=20),
                      checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match=r"other settings: \['lr', 'seed'\]"):
        train_teacher(build_model(TINY, (2,), seed=0), data, quick(lr=3e-3, seed=1),
                      checkpoint_dir=tmp_path)


def test_resolve_device(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    with pytest.raises(ValueError, match="known: cpu, cuda"):
        resolve_device("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    for name in ("cuda", "cuda:1"):
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device(name)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match="only 2 CUDA"):
        resolve_device("cuda:2")
