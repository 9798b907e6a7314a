"""The shared loop (boss_core.training) on a quadratic whose gradient is known in closed form.

L_s(theta) = sum_i (theta_i - c_i)^2, grad = 2 (theta - c). Adam's first step is
lr_0 * g / (|g| + eps), i.e. lr_0 * sign(g) up to eps = 1e-8 relative, so the warm-up learning
rate shows in the step size; the gradient left on theta after the last step is the clipped one;
the EMA after step 0 is d_0 theta_0 + (1 - d_0) theta_1 with d_0 = min(decay, 1 / 10).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from boss_core.training import Checkpoint, LoopSettings, train

C = torch.tensor([3.0, -4.0, 0.0])  # target; from theta = 0, grad = (-6, 8, 0), |grad| = 10


class Point(nn.Module):
    def __init__(self):
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(3))


def quadratic(net: nn.Module, step: int) -> torch.Tensor:
    return ((net.theta - C) ** 2).sum()


def settings(**kw) -> LoopSettings:
    base = dict(name="toy", iterations=1, lr=0.1, warmup=4, grad_clip=None, ema_decay=0.999,
                log_every=1, checkpoint_every=0, progress=False)
    return LoopSettings(**{**base, **kw})


def test_first_step_has_the_warm_up_rate_and_the_ema_its_warm_up_decay():
    point = Point()
    result = train(point, quadratic, settings())
    lr_0 = 0.1 * 1 / 4
    expected = torch.tensor([lr_0, -lr_0, 0.0])  # -lr_0 * sign(grad)
    torch.testing.assert_close(point.theta.detach(), expected, rtol=1e-6, atol=0)
    d_0 = 1 / 10
    torch.testing.assert_close(result.ema_model.theta, (1 - d_0) * expected, rtol=1e-6, atol=0)
    assert not result.ema_model.theta.requires_grad and result.trainable_params == 3
    assert settings(warmup=0).lr_at(0) == 0.1 and settings().lr_at(7) == 0.1


def test_the_gradient_is_clipped_to_the_global_norm():
    point = Point()
    train(point, quadratic, settings(grad_clip=2.5))
    # the last step's gradient, at theta = 0: 2 (0 - c) = (-6, 8, 0), norm 10, scaled to 2.5
    torch.testing.assert_close(point.theta.grad, torch.tensor([-1.5, 2.0, 0.0]), rtol=1e-6,
                               atol=0)


def test_losses_log_means_and_evaluations_follow_the_steps():
    seen = []
    result = train(Point(), lambda net, s: quadratic(net, s) * 0 + float(s), settings(
        iterations=5, log_every=2), evaluate=lambda ema: float(ema.theta.sum()),
        callback=lambda *row: seen.append(row))
    assert result.losses.tolist() == [[s, float(s)] for s in range(5)]
    assert [(step, mean) for step, mean, _ in seen] == [(2, 0.5), (4, 2.5), (5, 4.0)]
    assert result.val_losses[:, 0].tolist() == [2, 4, 5]
    assert [v for *_, v in seen] == result.val_losses[:, 1].tolist()


def test_a_non_finite_loss_names_its_step_and_nothing_trains_without_parameters():
    with pytest.raises(FloatingPointError, match="toy loss is inf at step 2"):
        train(Point(), lambda net, s: quadratic(net, s) * (float("inf") if s == 2 else 1.0),
              settings(iterations=4))
    frozen = Point().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        train(frozen, quadratic, settings())


def test_resume_checks_the_settings_that_must_not_change(tmp_path):
    def at(config):
        return Checkpoint.at(tmp_path, "toy.pt", config, {"iterations"})

    first = train(Point(), quadratic, settings(iterations=3), checkpoint=at(
        {"iterations": 3, "lr": 0.1}))
    again = train(Point(), quadratic, settings(iterations=5), checkpoint=at(
        {"iterations": 5, "lr": 0.1}))
    assert first.resumed_from == 0 and again.resumed_from == 3
    assert again.losses[:3].tolist() == first.losses.tolist()
    with pytest.raises(ValueError, match=r"toy.pt was written with other settings: \['lr'\]"):
        train(Point(), quadratic, settings(iterations=6),
              checkpoint=at({"iterations": 6, "lr": 0.2}))
    with pytest.raises(ValueError, match=r"other settings: \['seed'\]"):
        train(Point(), quadratic, settings(iterations=6),
              checkpoint=at({"iterations": 6, "lr": 0.1, "seed": 0}))
    assert Checkpoint.at(None, "toy.pt", {}, ()) is None
