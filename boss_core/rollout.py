"""Rollout straightening: the student learns on the states it visits itself.

BOSS's students regress on the teacher's states only, yet at K steps they sample from their
own (an exposure gap). Here each training batch runs the student's own K Euler steps on the
schedule tau_0 = 0 < ... < tau_K = 1 (tau_k = i_k / N on the fine grid) from the noises z of
the (noise, N-step teacher end point) pairs (z, x1) (``pairs.ReflowPairs``):

    x_0 = z,   x_{k+1} = x_k + h_k v_theta(x_k, tau_k),   h_k = tau_{k+1} - tau_k,

with a target velocity per step (option ``target``):

    "endpoint": u_k = (x1 - x_k) / (1 - tau_k), the straight line from the student's state to
                the teacher's end point of its noise (no teacher call while training);
    "chord":    u_k = (y_{k+1} - x_k) / h_k, y_{k+1} = Phi(x_k; i_k -> i_{k+1}) the teacher's
                Euler steps on the fine grid from the student's state ((i_{k+1} - i_k) teacher
                calls per sample, N per rollout).

and a gradient (option ``backprop``), D the dims of a sample, sg stop-gradient:

    "step": each state detached, one loss per step,
            L = (1/K) sum_k mean_b (1/D) ||v_theta(sg x_k, tau_k) - u_k||^2;
    "full": the states keep their graph (backpropagation through the rollout),
            endpoint: L = mean_b (1/D) ||x_K - x1||^2, the K-step sampler's end-point error;
            chord:    L = (1/K) sum_k mean_b (1/D) ||x_{k+1} - sg y_{k+1}||^2 / h_k^2.

At K = 1 every variant is mean_b (1/D) ||v_theta(z, 0) - (x1 - z)||^2 (y_1 is the teacher's
N-step end point of z, x1 itself), with the same gradient. Labels of class-conditional pairs
go to every student call and to the (guided) teacher.

Network calls per sample per training step (a forward 1, a backward 2):
3K for the student, plus N x (teacher calls per evaluation: 2 guided) for "chord".

Learned times (``times_lr``, the "endpoint" target only): the schedule's K - 1 interior times
train with the weights, on the same loss, as ``boss_core.learned_times`` parametrises them:

    tau = times_of(theta)   (t_0 = 0, t_k = cumsum(softmax(theta))_{k-1}, t_K = 1),
    theta = (times_lr / lr) phi,   phi a parameter of ``TimedStudent``, started at
                                   logits_of(schedule) lr / times_lr

Adam's step is invariant to the scale of a gradient, so phi moves about lr per step and theta
about times_lr: the loop's one learning rate serves both. The gradient reaches theta through
the step sizes h_k and the network's t input; the EMA averages phi with the weights and the
EMA's times are the student's schedule (off the fine grid).

The loop is ``boss_core.training.train`` (Adam, warm-up, clipping, EMA from the teacher's
weights, the checkpoint ``rollout.pt`` and its resume, the NaN stop); step s draws its batch
from ``step_generator(seed, s)``. The held-out loss is the EMA student's K-step end-point
error mean_b (1/D) ||x_K - x1||^2 on the validation pairs, for either target.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import check_number
from .distributed import Dist
from .grids import uniform_grid
from .learned_times import logits_of, times_of
from .sampling import euler_step
from .schedule import Schedule
from .seeds import step_generator
from .straighten import (
    _RESUMABLE,
    StraightenConfig,
    StraightenResult,
    place_training,
    result_of,
)
from .training import Checkpoint, LoopSettings
from .training import train as train_loop
from .velocity import VelocityFn, evaluate_velocity

CHECKPOINT_NAME = "rollout.pt"
TARGETS = ("endpoint", "chord")
BACKPROPS = ("step", "full")


def check_rollout_options(opts: Mapping[str, Any]) -> None:
    """ValueError naming the option (``target``, ``backprop``) that is not allowed."""
    if opts.get("target") not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {opts.get('target')!r}")
    if opts.get("backprop") not in BACKPROPS:
        raise ValueError(f"backprop must be one of {BACKPROPS}, got {opts.get('backprop')!r}")


def check_timed_options(opts: Mapping[str, Any]) -> None:
    """``check_rollout_options`` plus ``times_lr`` > 0; learned times need the "endpoint"
    target (the "chord" target is the teacher's steps between fine-grid points)."""
    check_rollout_options(opts)
    check_number("times_lr", opts.get("times_lr"), lambda v: v > 0, "> 0")
    if opts["target"] != "endpoint":
        raise ValueError(f"target must be 'endpoint' when the times are learned, got "
                         f"{opts['target']!r}")


class TimedStudent(nn.Module):
    """A student whose K-step schedule is a parameter (the module doc's learned times).

    Calls go to ``net``; ``times()`` is the (K + 1,) differentiable schedule
    times_of(scale phi), scale = times_lr / lr.
    """

    def __init__(self, net: nn.Module, schedule: Schedule, scale: float):
        super().__init__()
        self.net = net  # first: its weights' dtype is the training dtype (place_training)
        self.scale = float(scale)
        self.clock = nn.Module()  # a child after net, so that parameters() lists net's first
        self.clock.phi = nn.Parameter(logits_of(schedule.times) / self.scale)  # (K,) float64

    @property
    def phi(self) -> Tensor:
        return self.clock.phi

    def forward(self, x: Tensor, t: Tensor, **extras) -> Tensor:
        return self.net(x, t, **extras)

    def times(self) -> Tensor:
        """(K + 1,) float64 tau_0 = 0 < ... < tau_K = 1, with the graph to phi."""
        return times_of(self.scale * self.phi)

    def schedule(self, name: str) -> Schedule:
        """The current times as a ``Schedule`` (no fine-grid indices)."""
        return Schedule(self.times().detach().cpu().numpy(), name=name)


def _schedule_times(net, schedule: Schedule) -> list:
    """The K + 1 times a rollout steps on: the floats of ``schedule``, or a ``TimedStudent``'s
    own (0-dim tensors with their graph; ``net`` may be its DDP wrapper)."""
    module = getattr(net, "module", net)
    if isinstance(module, TimedStudent):
        return list(module.times().unbind())
    return [float(t) for t in schedule.times]


def evaluations_per_sample(schedule: Schedule, target: str, teacher_calls: int = 1) -> int:
    """Network calls of one sample in one training step: 3K student calls (K forwards, their
    backward counted 2), plus (i_K - i_0) = N teacher steps x ``teacher_calls`` for "chord"."""
    k = schedule.nfe
    if target == "chord":
        return 3 * k + (schedule.indices[-1] - schedule.indices[0]) * teacher_calls
    return 3 * k


@torch.no_grad()
def teacher_chord_end(teacher: VelocityFn, x: Tensor, i_from: int, i_to: int, n_steps: int,
                      extras: Mapping[str, Any] | None = None) -> Tensor:
    """y = Phi(x; i_from -> i_to): the teacher's Euler steps x <- x + (1/N) v(x, i / N) for
    i = i_from .. i_to - 1 on the fine grid (the same operations as ``pairs.teacher_states_at``,
    so from i_from = 0 it is the teacher's path). x: (B, ...) -> (B, ...)."""
    grid = uniform_grid(n_steps)
    for i in range(i_from, i_to):
        t_cur, t_next = float(grid[i]), float(grid[i + 1])
        x = euler_step(x, evaluate_velocity(teacher, x, t_cur, step=i, extras=extras),
                       t_cur, t_next)
    return x


def _times(x: Tensor, t: float | Tensor) -> Tensor:
    """(B,) t in x's dtype (a 0-dim tensor t keeps its graph)."""
    if isinstance(t, Tensor):
        return t.to(device=x.device, dtype=x.dtype).expand(x.shape[0])
    return torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device)


def _sq(err: Tensor) -> Tensor:
    """mean_b (1/D) ||err_b||^2 of a (B, ...) error."""
    return err.pow(2).reshape(err.shape[0], -1).mean(dim=1).mean()


def rollout_loss(net: Callable[..., Tensor], z: Tensor, x1: Tensor, schedule: Schedule, *,
                 target: str, backprop: str, teacher: VelocityFn | None = None,
                 n_steps: int | None = None, extras: Mapping[str, Any] | None = None) -> Tensor:
    """The module doc's L for noises z (B, ...) and teacher end points x1 (B, ...) on
    ``schedule`` (its times; its fine-grid indices and ``n_steps`` N for "chord", which
    calls ``teacher``); a ``TimedStudent`` steps on its own times. A scalar with the graph of
    ``net``'s calls."""
    times, extras = _schedule_times(net, schedule), dict(extras or {})
    k_steps = len(times) - 1
    x = z
    total = z.new_zeros(())
    for k in range(k_steps):
        t_cur, t_next = times[k], times[k + 1]
        h = t_next - t_cur
        x_in = x.detach() if backprop == "step" else x
        v = net(x_in, _times(x_in, t_cur), **extras)
        if target == "chord":
            y_next = teacher_chord_end(teacher, x_in.detach(), schedule.indices[k],
                                       schedule.indices[k + 1], n_steps, extras)
            if backprop == "step":
                total = total + F.mse_loss(v, (y_next - x_in) / h)
            else:
                total = total + _sq(euler_step(x_in, v, t_cur, t_next) - y_next) / (h * h)
        elif backprop == "step":
            total = total + F.mse_loss(v, (x1 - x_in) / (1.0 - t_cur))
        x = euler_step(x_in, v, t_cur, t_next)
    if target == "endpoint" and backprop == "full":
        return _sq(x - x1)
    return total / k_steps


@torch.no_grad()
def endpoint_error(model: Callable[..., Tensor], pairs, schedule: Schedule,
                   batch_size: int = 1024) -> float:
    """mean over pairs of (1/D) ||x_K - x1||^2: ``model``'s K Euler steps on ``schedule``
    (a ``TimedStudent``'s: its own times) from each noise z against the teacher's end point
    x1."""
    total, count = 0.0, 0
    for lo in range(0, len(pairs), batch_size):
        index = torch.arange(lo, min(lo + batch_size, len(pairs)))
        z, x1 = pairs.z[index.to(pairs.z.device)], pairs.x1[index.to(pairs.z.device)]
        extras = pairs.extras(index)
        x = z
        times = [float(t) for t in _schedule_times(model, schedule)]
        for t_cur, t_next in zip(times[:-1], times[1:], strict=True):
            x = euler_step(x, model(x, _times(x, t_cur), **extras), t_cur, t_next)
        err = (x - x1).pow(2).reshape(x.shape[0], -1).mean(dim=1)
        total += float(err.double().sum())
        count += index.shape[0]
    return total / count


def straighten_rollout(model: nn.Module, train, schedule: Schedule, config: StraightenConfig,
                       *, target: str = "endpoint", backprop: str = "step",
                       teacher: VelocityFn | None = None, val=None,
                       checkpoint_dir: str | os.PathLike | None = None,
                       on_checkpoint: Callable[[int], None] | None = None,
                       dist: Dist | None = None,
                       times_lr: float | None = None) -> StraightenResult:
    """Fine-tune ``model`` (in place, from the teacher's weights) on its own rollouts.

    Args:
        train, val: ``ReflowPairs`` (z, x1[, y]); val may be None.
        schedule: the K-step schedule it learns (on the fine grid for "chord").
        target, backprop: the module doc's options.
        teacher: the (guided) teacher v(x, t, **extras) for "chord" (its calls are not
            trained); None for "endpoint".
        checkpoint_dir: where ``rollout.pt`` is written and resumed from (None: never).
        times_lr: learn the times too (the module doc), from ``schedule``'s; the result's
            ``model`` and ``ema_model`` are then ``TimedStudent``s (``.net`` samples on
            ``.schedule(name)``). None: the times stay ``schedule``'s.
    """
    check_rollout_options({"target": target, "backprop": backprop})
    if times_lr is not None:
        check_timed_options({"target": target, "backprop": backprop, "times_lr": times_lr})
        model = TimedStudent(model, schedule, times_lr / config.lr)
    dist = Dist() if dist is None else dist
    n_steps = None
    if target == "chord":
        if teacher is None:
            raise ValueError("target 'chord' needs the teacher")
        if schedule.indices is None or schedule.n_steps is None:
            raise ValueError(f"target 'chord' needs a schedule on the fine grid, got "
                             f"{schedule.name!r} without indices")
        n_steps = schedule.n_steps
    rows, dtype, device, train, val = place_training(model, train, val, config, dist)
    if isinstance(teacher, nn.Module):
        teacher.to(device)

    def step_loss(net: nn.Module, step: int) -> Tensor:
        gen = step_generator(config.seed, step)
        index = torch.randint(len(train), (config.batch_size,), generator=gen)  # (B,)
        at = index.to(train.z.device)
        z, x1 = train.z[at].to(dtype)[rows], train.x1[at].to(dtype)[rows]  # (B / W, ...)
        extras = {k: v[rows] for k, v in train.extras(index).items()}
        return rollout_loss(net, z, x1, schedule, target=target, backprop=backprop,
                            teacher=teacher, n_steps=n_steps, extras=extras)

    settings = {**config.to_dict(), "target": target, "backprop": backprop,
                "times": [float(t) for t in schedule.times], "times_lr": times_lr}
    trained = train_loop(
        model, step_loss,
        LoopSettings.of(config, "rollout straightening", config.eval_every,
                        config.checkpoint_every),
        checkpoint=Checkpoint.at(checkpoint_dir, CHECKPOINT_NAME, settings, _RESUMABLE),
        evaluate=(lambda ema: endpoint_error(ema, val, schedule)) if val is not None else None,
        on_checkpoint=on_checkpoint, dist=dist)
    return result_of(model, trained)
