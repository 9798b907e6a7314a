"""Rollout straightening (boss_core/rollout.py) and its row boss_rollout, against oracles."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from boss_core import protocol
from boss_core.distances import swd
from boss_core.methods import MethodOptions
from boss_core.pairs import ReflowPairs, reflow_pairs
from boss_core.rollout import (
    evaluations_per_sample,
    rollout_loss,
    straighten_rollout,
    teacher_chord_end,
)
from boss_core.schedule import Schedule
from boss_core.straighten import StraightenConfig, trainable_copy
from boss_core.sweep import SweepConfig, run_sweep
from boss_core.velocity import NFECounter
from tasks.runtime.params import ParamsError, load_params

VARIANTS = [(t, b) for t in ("endpoint", "chord") for b in ("step", "full")]


class AffineFlow(nn.Module):
    """The straight flow of x1 = a z + b: x_t = z + t ((a - 1) z + b), so

        v(x, t) = (a - 1) z + b,   z = (x - t b) / (1 + t (a - 1)),

    every path a line and Euler exact on any grid (float64 weights)."""

    def __init__(self, a: float, b):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a, dtype=torch.float64))
        self.b = nn.Parameter(torch.tensor(b, dtype=torch.float64))

    def forward(self, x, t):
        tt = t.view(-1, 1)
        z = (x - tt * self.b) / (1 + tt * (self.a - 1))
        return (self.a - 1) * z + self.b


def config(**kw):
    return StraightenConfig(**{"iterations": 5, "batch_size": 32, "warmup": 0, "eval_every": 5,
                               "device": "cpu", "progress": False, **kw})


def _grads(net, loss):
    net.zero_grad()
    loss.backward()
    return torch.cat([p.grad.reshape(-1) for p in net.parameters()])


@pytest.mark.parametrize("target,backprop", VARIANTS)
def test_on_a_straight_teacher_the_rollout_student_stays_the_teacher(target, backprop):
    """The teacher's own K-step rollouts are exact, so the loss and its gradient vanish at the
    teacher's weights (Adam, which scales any gradient to about lr, is not run here)."""
    teacher = AffineFlow(0.6, [1.0, -2.0]).requires_grad_(False)
    n = 8
    ends = reflow_pairs(teacher, n, (2,), seed=0, start=0, count=64, dtype=torch.float64)
    np.testing.assert_allclose(ends.x1, 0.6 * ends.z + torch.tensor([1.0, -2.0]), atol=1e-12)
    schedule = Schedule.from_indices([0, 3, 8], n)
    student = trainable_copy(teacher)
    loss = rollout_loss(student, ends.z, ends.x1, schedule, target=target, backprop=backprop,
                        teacher=teacher, n_steps=n)
    assert float(loss.detach()) < 1e-28
    assert float(_grads(student, loss).abs().max()) < 1e-13
    # a student that is not the straight teacher has a loss and a gradient (this can fail)
    with torch.no_grad():
        student.b += 0.3
    bent = rollout_loss(student, ends.z, ends.x1, schedule, target=target, backprop=backprop,
                        teacher=teacher, n_steps=n)
    assert float(bent.detach()) > 1e-3
    assert float(_grads(student, bent).abs().max()) > 1e-2


def test_step_and_full_backprop_agree_at_one_step_and_not_at_two(mixture_teacher):
    student = trainable_copy(mixture_teacher)
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(32, 2, generator=gen)
    n = 12
    x1 = teacher_chord_end(mixture_teacher, z, 0, n, n)  # the teacher's N-step end points
    one, two = Schedule.from_indices([0, n], n), Schedule.from_indices([0, 4, n], n)
    for target in ("endpoint", "chord"):
        losses = {b: rollout_loss(student, z, x1, one, target=target, backprop=b,
                                  teacher=mixture_teacher, n_steps=n) for b in ("step", "full")}
        torch.testing.assert_close(losses["step"], losses["full"], rtol=1e-5, atol=0)
        torch.testing.assert_close(_grads(student, losses["step"]),
                                   _grads(student, losses["full"]), rtol=1e-4, atol=1e-7)
        at_two = [_grads(student, rollout_loss(student, z, x1, two, target=target, backprop=b,
                                               teacher=mixture_teacher, n_steps=n))
                  for b in ("step", "full")]
        assert (at_two[0] - at_two[1]).abs().max() > 1e-4 * at_two[0].abs().max()
    # at K = 1 the chord from z is the teacher's N-step end point: the targets coincide
    assert float(rollout_loss(student, z, x1, one, target="chord", backprop="step",
                              teacher=mixture_teacher, n_steps=n)) == float(
        rollout_loss(student, z, x1, one, target="endpoint", backprop="step"))


def test_teacher_calls_of_the_chord_target_are_counted(mixture_teacher):
    n, steps, batch = 10, 3, 16
    counted = NFECounter(mixture_teacher)
    ends = reflow_pairs(mixture_teacher, n, (2,), seed=0, start=0, count=40)
    schedule = Schedule.from_indices([0, 2, 7, n], n)
    straighten_rollout(trainable_copy(mixture_teacher), ends, schedule,
                       config(iterations=steps, batch_size=batch), target="chord",
                       teacher=counted)
    assert counted.n_evaluations == steps * batch * n  # N teacher steps per rollout
    assert evaluations_per_sample(schedule, "chord") == 3 * 3 + n
    assert evaluations_per_sample(schedule, "chord", teacher_calls=2) == 3 * 3 + 2 * n
    assert evaluations_per_sample(schedule, "endpoint") == 3 * 3


def test_rollout_resumes_bit_identically(mixture_teacher, tmp_path):
    ends = reflow_pairs(mixture_teacher, 8, (2,), seed=0, start=0, count=40)
    schedule = Schedule.from_indices([0, 3, 8], 8)
    whole = straighten_rollout(trainable_copy(mixture_teacher), ends, schedule,
                               config(iterations=4), backprop="full")
    straighten_rollout(trainable_copy(mixture_teacher), ends, schedule,
                       config(iterations=2, checkpoint_every=2), backprop="full",
                       checkpoint_dir=tmp_path)
    resumed = straighten_rollout(trainable_copy(mixture_teacher), ends, schedule,
                                 config(iterations=4), backprop="full", checkpoint_dir=tmp_path)
    assert resumed.resumed_from == 2
    np.testing.assert_array_equal(resumed.losses, whole.losses)
    with pytest.raises(ValueError, match="other settings"):  # another target: not resumed
        straighten_rollout(trainable_copy(mixture_teacher), ends, schedule, config(iterations=4),
                           target="chord", teacher=mixture_teacher, checkpoint_dir=tmp_path)


def test_rollout_row_in_the_sweep_beats_its_schedule_and_counts_its_calls(mixture_teacher):
    sweep = SweepConfig(methods=("teacher", "bellman", "boss_rollout"), nfes=(2,), n_steps=24,
                        search_samples=64, pair_samples=128, eval_samples=128, n_seeds=2,
                        batch_size=128)
    train = config(iterations=40, batch_size=64, warmup=5, eval_every=20)
    ref = torch.randn(500, 2, generator=torch.Generator().manual_seed(3))
    options = MethodOptions({"boss_rollout": {"target": "chord"}})
    metrics, costs, _ = run_sweep(mixture_teacher, (2,), lambda s: {"swd": swd(s, ref, seed=0)},
                                  sweep, train, options=options, progress=False)
    assert (metrics["boss_rollout"]["nfe_2"]["endpoint_rmse"]
            < 0.5 * metrics["bellman"]["nfe_2"]["endpoint_rmse"])
    assert costs["boss_rollout"]["nfe_2"]["train_evaluations"] == 40 * 64 * (3 * 2 + 24)
    assert "train_evaluations" not in costs["bellman"]["nfe_2"]


def test_bad_rollout_options_fail_before_compute_naming_the_key(mixture_teacher):
    with pytest.raises(ValueError, match=r"boss_rollout\.target"):
        MethodOptions({"boss_rollout": {"target": "middle"}})
    with pytest.raises(ParamsError, match=r"methods\.boss_rollout\.backprop"):
        load_params(overrides={"methods.boss_rollout.backprop": "some"})
    sweep = SweepConfig(methods=("boss_rollout",), nfes=(2,), n_steps=8)
    schedule = {2: Schedule.from_indices([0, 4, 8], 8)}

    def no_pairs(k):
        raise AssertionError("read pairs before checking the options")

    with pytest.raises(ValueError, match=r"boss_rollout\.target"):
        protocol.fit_method("boss_rollout", copy.deepcopy(mixture_teacher), no_pairs, sweep,
                            config(), schedules=schedule, options={"target": "x",
                                                                   "backprop": "step"})
    with pytest.raises(ValueError, match="schedules"):
        protocol.fit_method("boss_rollout", mixture_teacher, no_pairs, sweep, config())
    assert isinstance(reflow_pairs(mixture_teacher, 4, (2,), seed=0, start=0, count=2),
                      ReflowPairs)


class CubicRate(nn.Module):
    """v(x, t) = 3 t^2 x (no weights): the exact flow is x(1) = e z. Two Euler steps from 0
    through t_1 give x_2 = z (1 + 3 t_1^2 (1 - t_1)), closest to e z at t_1 = 2/3."""

    def forward(self, x, t):
        return 3 * t.view(-1, 1) ** 2 * x


def _timed_pairs(m: int = 256) -> ReflowPairs:
    z = torch.randn(m, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    return ReflowPairs(z, np.e * z, torch.arange(m))


def test_learned_times_gradient_matches_finite_differences():
    """d L / d phi of the rollout's end-point loss through the step sizes and the network's t
    input, against central differences of the same loss."""
    from boss_core.rollout import TimedStudent

    pairs = _timed_pairs(64)
    student = TimedStudent(CubicRate(), Schedule(np.array([0.0, 0.3, 0.55, 1.0])), scale=2.0)

    def loss():
        return rollout_loss(student, pairs.z, pairs.x1, Schedule.from_indices([0, 1, 2, 3], 3),
                            target="endpoint", backprop="full")

    student.zero_grad()
    loss().backward()
    grad = student.phi.grad.clone()
    assert grad.abs().max() > 1e-3
    eps = 1e-6
    for i in range(3):
        with torch.no_grad():
            student.phi[i] += eps
            up = float(loss())
            student.phi[i] -= 2 * eps
            down = float(loss())
            student.phi[i] += eps
        assert abs((up - down) / (2 * eps) - float(grad[i])) < 1e-6 * max(1.0, abs(grad[i]))


def test_learned_times_of_a_frozen_field_reach_the_brute_force_optimum():
    """With the weights frozen only the times train: from t_1 = 0.5 they reach the brute-force
    optimum of the 2-step end-point error (t_1 = 2/3 on a 10^4-point grid) within 0.01, and the
    returned model samples on them."""
    grid = np.linspace(1e-4, 1 - 1e-4, 10_000)
    best = grid[np.argmin((np.e - 1 - 3 * grid ** 2 * (1 - grid)) ** 2)]
    assert abs(best - 2 / 3) < 1e-3
    out = straighten_rollout(CubicRate(), _timed_pairs(), Schedule.from_indices([0, 1, 2], 2),
                             config(iterations=300, ema_decay=0.0, lr=1e-3, eval_every=300),
                             backprop="full", times_lr=0.03)
    learned = out.ema_model.schedule("learned_times_ft")
    assert abs(learned.times[1] - best) < 0.01, learned.times
    assert learned.indices is None and learned.times[0] == 0.0 and learned.times[-1] == 1.0


def test_learned_times_ft_row_samples_on_its_own_times(mixture_teacher, monkeypatch):
    """The row through the sweep: its students sample on their learned times (off the fine
    grid the Bellman start lay on), its end-point error beats that schedule's teacher, and its
    calls are the rollout's 3K per sample and step."""
    sweep = SweepConfig(methods=("teacher", "bellman", "learned_times_ft"), nfes=(2,),
                        n_steps=24, search_samples=64, pair_samples=128, eval_samples=128,
                        n_seeds=2, batch_size=128)
    train = config(iterations=40, batch_size=64, warmup=5, eval_every=20)
    ref = torch.randn(500, 2, generator=torch.Generator().manual_seed(3))
    seen, original = {}, protocol.sampling_plan

    def spy(*args, **kwargs):  # the times each row samples on
        plan = original(*args, **kwargs)
        seen.update({m: np.asarray(times) for m in plan for _, times in plan[m].values()})
        return plan

    monkeypatch.setattr(protocol, "sampling_plan", spy)
    metrics, costs, _ = run_sweep(mixture_teacher, (2,), lambda s: {"swd": swd(s, ref, seed=0)},
                                  sweep, train, progress=False)
    assert (metrics["learned_times_ft"]["nfe_2"]["endpoint_rmse"]
            < 0.5 * metrics["bellman"]["nfe_2"]["endpoint_rmse"])
    assert costs["learned_times_ft"]["nfe_2"]["train_evaluations"] == 40 * 64 * 3 * 2
    ours, start = seen["learned_times_ft"], seen["bellman"]
    assert ours[0] == 0.0 and ours[-1] == 1.0 and 0 < ours[1] < 1
    assert start[1] * 24 == round(start[1] * 24)  # the start: a fine-grid point
    assert abs(ours[1] * 24 - round(ours[1] * 24)) > 1e-6 and ours[1] != start[1], (ours, start)


def test_learned_times_need_the_endpoint_target():
    with pytest.raises(ValueError, match=r"learned_times_ft\.target"):
        MethodOptions({"learned_times_ft": {"target": "chord"}})
    with pytest.raises(ValueError, match=r"learned_times_ft\.times_lr"):
        MethodOptions({"learned_times_ft": {"times_lr": 0}})
