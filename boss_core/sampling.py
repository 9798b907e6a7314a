"""Samplers on an explicit float64 time grid, and the trajectory recorder.

Euler (K network calls on K + 1 times):

    x_{k+1} = x_k + (t_{k+1} - t_k) v(x_k, t_k)

Heun (2K calls; trapezoid in time, second order):

    x' = x_k + h v(x_k, t_k),   x_{k+1} = x_k + h/2 [v(x_k, t_k) + v(x', t_{k+1})],
    h = t_{k+1} - t_k

All states keep the noise's dtype; times stay float64 until they are handed to the model.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .grids import as_grid
from .velocity import VelocityFn, evaluate_velocity


@dataclass(frozen=True, eq=False)
class Trajectory:
    """An Euler path with every state and velocity.

    times: (N + 1,) float64 grid.
    states: (N + 1, B, ...) states x_0 (noise) .. x_N.
    velocities: (N, B, ...) v_i = v(x_i, t_i) for i < N (the last state needs none).
    """

    times: np.ndarray
    states: Tensor
    velocities: Tensor

    @property
    def n_steps(self) -> int:
        return self.times.shape[0] - 1

    @property
    def final(self) -> Tensor:
        return self.states[-1]


def euler_step(x_cur: Tensor, v_cur: Tensor, t_cur: float, t_next: float) -> Tensor:
    """One Euler step in x's dtype: x_next = x_cur + (t_next - t_cur) v_cur."""
    return x_cur + (t_next - t_cur) * v_cur


@torch.no_grad()
def euler_sample(
    velocity: VelocityFn,
    noise: Tensor,
    times,
    *,
    extras: Mapping[str, Any] | None = None,
) -> Tensor:
    """Integrate from t_0 = 0 to t_K = 1 with K Euler steps.

    Args:
        velocity: v(x, t, **extras).
        noise: (B, ...) initial state x_0.
        times: float64 tensor or array of shape (K + 1,), from exactly 0 to exactly 1.
    Returns:
        (B, ...) final state x_K, in noise's dtype.
    """
    grid = as_grid(times)
    x_cur = noise
    for k in range(grid.shape[0] - 1):
        t_cur, t_next = float(grid[k]), float(grid[k + 1])
        v_cur = evaluate_velocity(velocity, x_cur, t_cur, step=k, extras=extras)
        x_cur = euler_step(x_cur, v_cur, t_cur, t_next)
    return x_cur


def heun_step(velocity: VelocityFn, x_cur: Tensor, v_cur: Tensor, t_cur: float, t_next: float,
              *, step: int, extras: Mapping[str, Any] | None = None) -> Tensor:
    """One Heun step given v_cur = v(x_cur, t_cur); one more network call (the corrector)."""
    h = t_next - t_cur
    x_pred = x_cur + h * v_cur
    v_next = evaluate_velocity(velocity, x_pred, t_next, step=f"{step} (corrector)", extras=extras)
    return x_cur + (0.5 * h) * (v_cur + v_next)


@torch.no_grad()
def heun_sample(
    velocity: VelocityFn,
    noise: Tensor,
    times,
    *,
    extras: Mapping[str, Any] | None = None,
) -> Tensor:
    """Integrate with Heun's method (2 calls per step). Shapes as in ``euler_sample``."""
    grid = as_grid(times)
    x_cur = noise
    for k in range(grid.shape[0] - 1):
        t_cur, t_next = float(grid[k]), float(grid[k + 1])
        v_cur = evaluate_velocity(velocity, x_cur, t_cur, step=k, extras=extras)
        x_cur = heun_step(velocity, x_cur, v_cur, t_cur, t_next, step=k, extras=extras)
    return x_cur


SAMPLERS = {"euler": euler_sample, "heun": heun_sample}
TEACHER_SOLVERS = tuple(SAMPLERS)


@torch.no_grad()
def euler_trajectory(
    velocity: VelocityFn,
    noise: Tensor,
    times,
    *,
    extras: Mapping[str, Any] | None = None,
    solver: str = "euler",
) -> Trajectory:
    """Run the teacher on ``times`` and keep every state and velocity (see ``Trajectory``).

    solver="euler" (N calls): the last state equals ``euler_sample`` bit for bit.
    solver="heun" (2N calls): states follow ``heun_sample``; velocities[k] is still
    v(x_k, t_k), the slope a student's Euler step from x_k would take (GITS-style teacher).
    """
    if solver not in TEACHER_SOLVERS:
        raise ValueError(f"unknown teacher solver {solver!r}; use one of {TEACHER_SOLVERS}")
    grid = as_grid(times)
    n = grid.shape[0] - 1
    states = noise.new_empty((n + 1, *noise.shape))
    velocities = noise.new_empty((n, *noise.shape))
    states[0] = noise
    for k in range(n):
        t_cur, t_next = float(grid[k]), float(grid[k + 1])
        velocities[k] = evaluate_velocity(velocity, states[k], t_cur, step=k, extras=extras)
        if solver == "euler":
            states[k + 1] = euler_step(states[k], velocities[k], t_cur, t_next)
        else:
            states[k + 1] = heun_step(velocity, states[k], velocities[k], t_cur, t_next,
                                      step=k, extras=extras)
    return Trajectory(times=grid, states=states, velocities=velocities)
