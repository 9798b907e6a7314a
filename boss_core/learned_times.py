"""Learned step times (as in LD3, arXiv 2405.15506): a K-step Euler schedule whose times are
trained by gradient through the solver to the teacher's N-step end point.

Parametrisation (theta in R^K, float64): the step sizes are a softmax, so every theta is a
valid schedule, sorted, inside (0, 1), with both ends exact:

    dt = softmax(theta)                                    (K,)   dt_k > 0, sum_k dt_k = 1
    t_0 = 0,   t_k = dt_0 + ... + dt_{k-1} (0 < k < K),   t_K = 1

A schedule's own theta is log dt (up to a constant, ``logits_of``).

Objective, on M noises z_m with the teacher's N-step uniform Euler end points X_m (computed
once, no gradient):

    Phi_theta(z): x_0 = z,  x_{k+1} = x_k + (t_{k+1} - t_k) v(x_k, t_k),  Phi_theta(z) = x_K
    L(theta) = (1 / B) sum_{m in batch} || Phi_theta(z_m) - X_m ||^2

The network is frozen: theta is the only leaf, and its gradient reaches the times through the
step sizes and the network's t input. Adam on theta, ``iterations`` steps, each on a
mini-batch of ``batch_size`` of the M samples drawn without replacement from (seed, step)
alone (``seeds.step_generator``). The schedule returned is the final one, or the start if the
final one has the larger loss over all M samples (a too-large ``lr`` cannot make it worse than
its start); its ``.cost`` is that full loss, like ``global_search``'s.

Network calls (``velocity.NFECounter``: a forward pass 1, a backward pass 2; batched calls and
per-sample evaluations), b = the call batch:

    teacher end points          ceil(M / b) N calls,     M N evaluations (once for every K)
    each iteration              K forward + K backward = 3K calls,  3 K B evaluations
    full loss at start and end  2 ceil(M / b) K calls,   2 M K evaluations
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from .batching import check_batch_size, slice_extras
from .config import ConfigMixin, check_int, check_number
from .grids import as_grid, check_n_steps, uniform_grid
from .sampling import euler_sample
from .schedule import Schedule
from .seeds import step_generator
from .velocity import NFECounter, VelocityFn

INITS = ("uniform", "bellman", "bellman_global")
NAME = "learned_times"


@dataclass(frozen=True)
class LearnTimesConfig(ConfigMixin):
    """The options of the learned-times search (params.yaml ``methods.learned_times.*``).

    iterations: Adam steps on theta (per K). lr: Adam's learning rate on theta.
    batch_size: samples per step. samples: how many of the search noises train (the first
    min(samples, M)). init: the start, "uniform" (t_k = k / K), "bellman" (BOSS's DP on the
    cost matrix) or "bellman_global" (the greedy end-point search, the default: see below).
    seed: the mini-batches'.

    Why the greedy start: on the 2-D mixture teacher the loss is rugged in t (the network's
    Fourier time features reach frequency 1000): along t_1 at K = 2 it has a local minimum
    every 0.015-0.035, so gradient steps refine the basin they start in rather than find the
    best one. Started from the uniform grid or Bellman's, the learned times end behind the
    greedy search's; started from it, they end at or below it on their training noises and
    within 1 % of it on fresh ones (BENCHMARKS.md, "Learned times"). A larger ``lr`` hops
    basins but can diverge (the start is then kept).
    """

    iterations: int = 200
    lr: float = 0.02
    batch_size: int = 64
    samples: int = 256
    init: str = "bellman_global"
    seed: int = 0

    def __post_init__(self):
        check_int("iterations", self.iterations, 0)
        check_number("lr", self.lr, lambda v: v > 0, "> 0")
        check_int("batch_size", self.batch_size, 1)
        check_int("samples", self.samples, 1)
        check_int("seed", self.seed, 0)
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")


@dataclass(frozen=True, eq=False)
class LearnedTimes:
    """One K's result: the ``schedule`` (off the fine grid: no indices), the mini-batch
    ``losses`` (iterations,), the full losses over the M samples at the start and at the end,
    and the network calls it spent (``nfe`` batched, ``evaluations`` per sample; forward 1,
    backward 2), the teacher end points' excluded (``LearnedSchedules`` has them)."""

    schedule: Schedule
    losses: np.ndarray
    start_loss: float
    end_loss: float
    nfe: int
    evaluations: int


@dataclass(frozen=True, eq=False)
class LearnedSchedules:
    """{K: LearnedTimes} of ``learned_schedules`` and all the network calls it spent, the
    teacher end points' included."""

    by_k: dict[int, LearnedTimes]
    nfe: int
    evaluations: int


def times_of(theta: Tensor) -> Tensor:
    """(K + 1,) times of logits theta (K,): t_0 = 0, t_k = cumsum(softmax(theta))_{k-1},
    t_K = 1 exactly (the last cumulative sum is 1 only up to rounding, so it is replaced)."""
    if theta.dim() != 1 or theta.shape[0] < 1:
        raise ValueError(f"theta must have shape (K,) with K >= 1, got {tuple(theta.shape)}")
    inner = torch.cumsum(torch.softmax(theta, dim=0), dim=0)[:-1]  # (K - 1,) t_1 .. t_{K-1}
    return torch.cat([theta.new_zeros(1), inner, theta.new_ones(1)])  # (K + 1,)


def logits_of(times) -> Tensor:
    """(K,) float64 theta with ``times_of(theta)`` = times: log dt, centred (mean 0)."""
    grid = torch.tensor(np.array(as_grid(times)), dtype=torch.float64)  # (K + 1,)
    log_dt = torch.log(torch.diff(grid))  # (K,)
    return log_dt - log_dt.mean()


def euler_endpoint(velocity: VelocityFn, noise: Tensor, times: Tensor,
                   extras: Mapping[str, Any] | None = None) -> Tensor:
    """K Euler steps on a differentiable time grid; gradients reach ``times``.

    Args:
        noise: (B, ...) x_0. times: (K + 1,) float64 tensor from 0 to 1 (may require grad).
    Returns:
        (B, ...) x_K in noise's dtype: x_{k+1} = x_k + (t_{k+1} - t_k) v(x_k, t_k), with t_k
        handed to the network as a (B,) tensor in x's dtype.
    """
    x_cur = noise
    for k in range(times.shape[0] - 1):
        t_cur = times[k].to(noise.dtype).expand(noise.shape[0])  # (B,)
        v_cur = velocity(x_cur, t_cur, **(extras or {}))  # (B, ...)
        if v_cur.shape != x_cur.shape:
            raise ValueError(f"velocity at step {k} returned shape {tuple(v_cur.shape)}, "
                             f"expected {tuple(x_cur.shape)}")
        x_cur = x_cur + (times[k + 1] - times[k]).to(noise.dtype) * v_cur
    return x_cur


def endpoint_loss(end: Tensor, target: Tensor) -> Tensor:
    """Mean over the batch of the squared L2 end-point error: (B, ...) x2 -> scalar float64."""
    diff = (end - target).to(torch.float64).reshape(end.shape[0], -1)  # (B, D)
    return (diff * diff).sum(1).mean()


def _index_extras(extras: Mapping[str, Any], index: Tensor) -> dict[str, Any]:
    return {k: (v[index.to(v.device)] if isinstance(v, Tensor) and v.dim() > 0 else v)
            for k, v in extras.items()}


@torch.no_grad()
def _full_loss(velocity, noise, targets, times, extras, batch_size) -> float:
    """L over all M samples (chunks of ``batch_size`` per call)."""
    total = 0.0
    for lo in range(0, noise.shape[0], batch_size):
        hi = min(lo + batch_size, noise.shape[0])
        end = euler_endpoint(velocity, noise[lo:hi], times, slice_extras(extras, lo, hi))
        total += float(endpoint_loss(end, targets[lo:hi])) * (hi - lo)
    return total / noise.shape[0]


def learn_times(velocity: VelocityFn, noise: Tensor, targets: Tensor, start, config:
                LearnTimesConfig, *, extras: Mapping[str, Any] | None = None,
                batch_size: int = 500, progress: bool = False) -> LearnedTimes:
    """Train one K's times (see the module docstring).

    Args:
        velocity: the frozen teacher v(x, t, **extras); its weights get no gradient.
        noise: (M, ...) z_m; targets: (M, ...) X_m, the teacher's end points of those noises.
        start: (K + 1,) float64 starting times (e.g. ``uniform_grid(K)`` or Bellman's).
        extras: the teacher's conditioning of the M noises ({"y": (M,)} or {}).
        batch_size: samples per network call for the full losses.
    Returns:
        ``LearnedTimes`` named "learned_times".
    """
    if noise.shape != targets.shape:
        raise ValueError(f"noise {tuple(noise.shape)} and targets {tuple(targets.shape)} differ")
    check_batch_size(batch_size)
    extras = dict(extras or {})
    counter = NFECounter(velocity)
    theta0 = logits_of(start).to(noise.device)  # (K,)
    k_steps, m = theta0.shape[0], noise.shape[0]
    start_times = times_of(theta0).detach()
    start_loss = _full_loss(counter, noise, targets, start_times, extras, batch_size)
    losses = np.zeros(config.iterations)
    theta = theta0.clone().requires_grad_(k_steps > 1)
    if k_steps > 1:  # one step has no interior time to learn
        optimizer = torch.optim.Adam([theta], lr=config.lr)
        batch = min(config.batch_size, m)
        with torch.enable_grad():  # the pipeline's schedules step runs under no_grad
            for step in tqdm(range(config.iterations), desc=f"learn times K={k_steps}",
                             disable=not progress):
                pick = torch.randperm(m, generator=step_generator(config.seed, step))[:batch]
                pick = pick.to(noise.device)  # (B,)
                end = euler_endpoint(counter, noise[pick], times_of(theta),
                                     _index_extras(extras, pick))
                loss = endpoint_loss(end, targets[pick])
                (theta.grad,) = torch.autograd.grad(loss, theta)  # never the network's weights
                optimizer.step()
                losses[step] = float(loss.detach())
    end_times = times_of(theta.detach())
    end_loss = _full_loss(counter, noise, targets, end_times, extras, batch_size)
    if not math.isfinite(end_loss):
        raise FloatingPointError(f"learned times at K={k_steps} gave a non-finite loss: lower "
                                 f"methods.learned_times.lr (now {config.lr})")
    best, cost = (end_times, end_loss) if end_loss <= start_loss else (start_times,
                                                                      start_loss)
    schedule = Schedule(times=best.cpu().numpy(), cost=cost, name=NAME)
    return LearnedTimes(schedule, losses, start_loss, end_loss, counter.nfe,
                        counter.n_evaluations)


@torch.no_grad()
def teacher_endpoints(velocity: VelocityFn, noise: Tensor, n_steps: int, batch_size: int,
                      extras: Mapping[str, Any] | None = None) -> Tensor:
    """(M, ...) N-step uniform Euler end points of the (M, ...) noises, ``batch_size`` per call."""
    grid = uniform_grid(check_n_steps(n_steps))
    return torch.cat([euler_sample(velocity, noise[lo:lo + batch_size], grid,
                                   extras=slice_extras(extras, lo, lo + batch_size))
                      for lo in range(0, noise.shape[0], batch_size)])


def learned_schedules(velocity: VelocityFn, noise: Tensor, n_steps: int, nfes, config:
                      LearnTimesConfig, *, starts: Mapping[int, Schedule] | None = None,
                      extras: Mapping[str, Any] | None = None, batch_size: int = 500,
                      progress: bool = False) -> LearnedSchedules:
    """Learned times for every K in ``nfes`` from the first min(config.samples, M) noises.

    Args:
        noise: (M, ...) the search noises; n_steps: N of the teacher's end points.
        starts: {K: Schedule} to start from (None: the uniform grid, whatever config.init
            says; the caller builds the Bellman or greedy start).
        extras: the teacher's conditioning of the M noises.
    Returns:
        ``LearnedSchedules``; the teacher's end points are computed once and shared.
    """
    counter = NFECounter(velocity)
    m = min(config.samples, noise.shape[0])
    noise, extras = noise[:m], slice_extras(extras, 0, m)
    targets = teacher_endpoints(counter, noise, n_steps, batch_size, extras)  # (m, ...)
    by_k = {}
    for k in nfes:
        start = uniform_grid(k) if starts is None else starts[k].times
        by_k[k] = learn_times(counter, noise, targets, start, config, extras=extras,
                              batch_size=batch_size, progress=progress)
    return LearnedSchedules(by_k, counter.nfe, counter.n_evaluations)
