"""The BOSS cost matrix: the error of one Euler jump from grid point i to j.

On the uniform fine grid t_i = i / N, with teacher Euler states x_i and velocities v_i:

    c(i, j) = (1/M) sum_m || x^m_j - x^m_i - (t_j - t_i) v^m_i ||^2,   i < j,

the squared norm summed over every non-batch dimension. Everything comes from the stored
trajectory: no network call beyond the N teacher steps. c(i, i+1) = 0 up to rounding.

The sum over samples is kept in float64 and merges exactly across shards.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from .batching import Batch, iter_batches
from .grids import check_n_steps, uniform_grid
from .sampling import TEACHER_SOLVERS, Trajectory, euler_trajectory
from .velocity import VelocityFn


@dataclass(frozen=True, eq=False)
class CostMatrix:
    """Sum of per-sample jump errors over ``n_samples`` samples.

    sum: (N + 1, N + 1) float64; sum[i, j] = sum_m ||x_j - x_i - (t_j - t_i) v_i||^2 for
        i < j, 0 elsewhere.
    n_samples: M, the number of trajectories summed.
    """

    sum: np.ndarray
    n_samples: int

    def __post_init__(self):
        s = np.asarray(self.sum, dtype=np.float64)
        if s.ndim != 2 or s.shape[0] != s.shape[1] or s.shape[0] < 2:
            raise ValueError(f"CostMatrix.sum must be (N+1, N+1) with N >= 1, got {s.shape}")
        if self.n_samples < 1:
            raise ValueError(f"CostMatrix.n_samples must be >= 1, got {self.n_samples}")
        object.__setattr__(self, "sum", s)

    @property
    def n_steps(self) -> int:
        return self.sum.shape[0] - 1

    @property
    def times(self) -> np.ndarray:
        return uniform_grid(self.n_steps)

    @property
    def values(self) -> np.ndarray:
        """(N + 1, N + 1) float64 mean cost; +inf where j <= i; rounding below 0 clipped to 0."""
        mean = np.maximum(self.sum / self.n_samples, 0.0)
        mean[np.tril_indices_from(mean)] = np.inf
        return mean

    def merge(self, other: CostMatrix) -> CostMatrix:
        """Exact merge of two shards: (sum_a + sum_b) / (n_a + n_b)."""
        if not isinstance(other, CostMatrix):
            return NotImplemented
        if other.sum.shape != self.sum.shape:
            raise ValueError(
                "cannot merge cost matrices of different grids: "
                f"{self.sum.shape} vs {other.sum.shape}"
            )
        return CostMatrix(self.sum + other.sum, self.n_samples + other.n_samples)

    __add__ = merge


def trajectory_cost_sum(traj: Trajectory, *, method: str = "gram") -> np.ndarray:
    """Sum over the batch of the jump errors of one trajectory batch.

    Args:
        traj: states (N + 1, B, ...) and velocities (N, B, ...).
        method: "gram" expands the square into two (N+1)x(N+1) float64 GEMMs,

            ||x_j - x_i - h v_i||^2 = G_jj - 2 G_ij + G_ii - 2 h (P_ij - P_ii) + h^2 Q_i,
            G = X X^T, P = V X^T, Q_i = ||v_i||^2, h = t_j - t_i,

            on states detrended by their chord; rounding is ~1e-16 of the squared bend per
            entry (c(i, i+1) is a few 1e-13 or less, not 0). "direct" forms each residual in
            the model's dtype (c(i, i+1) exactly 0, per-sample exact, so batch-size
            independent entry by entry), used as the reference. It makes this sum about 6x
            slower, but the teacher's network calls dominate: a whole ``cost_matrix`` call
            on the digits U-Net is about 10% slower (bench/cost_methods.py).
    Returns:
        (N + 1, N + 1) float64 sums, zero on and below the diagonal.
    """
    n = traj.n_steps
    t = torch.tensor(traj.times, dtype=torch.float64, device=traj.states.device)
    states = traj.states.reshape(n + 1, -1)  # (N+1, B*D)
    vels = traj.velocities.reshape(n, -1)  # (N, B*D)
    out = torch.zeros((n + 1, n + 1), dtype=torch.float64)
    if method == "gram":
        # r_ij is unchanged by x_j -> x_j - x_0 - t_j (x_N - x_0), v_i -> v_i - (x_N - x_0):
        # the Gram terms then scale with the path's bend, not its size, so less cancels.
        chord = (states[n] - states[0]).to(torch.float64)  # (B*D,)
        x64 = states.to(torch.float64) - states[0].to(torch.float64) - t[:, None] * chord
        v64 = vels.to(torch.float64) - chord
        gram = x64 @ x64.T  # (N+1, N+1): G_ij = <x_i, x_j>
        cross = v64 @ x64.T  # (N, N+1): P_ij = <v_i, x_j>
        vnorm = (v64 * v64).sum(dim=1)  # (N,)
        gdiag = torch.diagonal(gram)  # (N+1,)
        h = t[None, :] - t[:n, None]  # (N, N+1): t_j - t_i
        full = (
            gdiag[None, :]
            - 2.0 * gram[:n]
            + gdiag[:n, None]
            - 2.0 * h * (cross - torch.diagonal(cross)[:, None])
            + h * h * vnorm[:, None]
        ).cpu()
        out[:n] = torch.triu(full, diagonal=1)
    elif method == "direct":
        for i in range(n):
            h = (t[i + 1 :] - t[i]).to(states.dtype)  # (N - i,)
            pred = states[i][None, :] + h[:, None] * vels[i][None, :]  # (N - i, B*D)
            resid = (states[i + 1 :] - pred).to(torch.float64)
            out[i, i + 1 :] = (resid * resid).sum(dim=1).cpu()
    else:
        raise ValueError(f"unknown cost method {method!r}; use 'gram' or 'direct'")
    return out.numpy()


def cost_matrix(
    velocity: VelocityFn,
    noise: Tensor | Iterable[Tensor | Batch],
    n_steps: int,
    batch_size: int = 256,
    *,
    extras: Mapping[str, Any] | None = None,
    method: str = "gram",
    solver: str = "euler",
    progress: bool = False,
) -> CostMatrix:
    """The BOSS cost from N-step uniform Euler teacher paths, batch by batch.

    Args:
        velocity: the teacher v(x, t, **extras).
        noise: (M, ...) tensor, or an iterable of (B, ...) batches or (batch, extras) pairs.
            Peak memory is set by ``batch_size`` (states (N+1, B, ...)), never by M.
        n_steps: N, the fine-grid steps.
        method: "gram" or "direct" (see ``trajectory_cost_sum``).
        solver: the teacher's integrator, "euler" (BOSS; c(i, i+1) = 0) or "heun" (2N calls,
            a more accurate teacher path; c(i, i+1) > 0).
    Returns:
        CostMatrix with the float64 sum over all M samples.
    """
    n = check_n_steps(n_steps)
    if method not in ("gram", "direct"):
        raise ValueError(f"unknown cost method {method!r}; use 'gram' or 'direct'")
    if solver not in TEACHER_SOLVERS:
        raise ValueError(f"unknown teacher solver {solver!r}; use one of {TEACHER_SOLVERS}")
    grid = uniform_grid(n)
    total = np.zeros((n + 1, n + 1), dtype=np.float64)
    count = 0
    for x, ex in tqdm(iter_batches(noise, batch_size, extras), desc="cost matrix",
                      unit="batch", disable=not progress):
        traj = euler_trajectory(velocity, x, grid, extras=ex, solver=solver)
        total += trajectory_cost_sum(traj, method=method)
        count += x.shape[0]
    if count == 0:
        raise ValueError("noise is empty: the cost matrix needs at least one sample")
    return CostMatrix(total, count)
