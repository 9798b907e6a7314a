"""Bellman DP for the BOSS schedule: the exact minimum-cost path 0 -> N with K jumps.

With c(i, j) the one-jump cost (``boss_core.cost``) and a future-cost discount gamma
(gamma = 1 is BOSS; GITS uses a coefficient on the future cost in the same place):

    V_0(N) = 0,  V_0(j) = inf for j < N
    V_k(j) = min_{l > j} [ c(j, l) + gamma V_{k-1}(l) ]
    optimum for K steps = V_K(0)

One vectorised pass over k = 1..K_max fills the (K_max + 1, N + 1) table, so every K up to
K_max is read off the same table: O(K_max N^2) time, O(N^2) extra memory. Among equal-cost
choices the earliest grid index wins (``argmin`` returns the first minimum), which makes the
path the lexicographically smallest optimal one.
"""

from __future__ import annotations

import functools

import numpy as np

from .cost import CostMatrix
from .global_search import global_schedules
from .grids import check_nfe
from .schedule import Schedule

__all__ = ["bellman_schedule", "bellman_schedules", "check_cost", "global_schedules"]


def check_cost(cost) -> np.ndarray:
    """Validate a cost and return its (N + 1, N + 1) float64 values, +inf on and below the diagonal.

    Raises ValueError for a non-square shape, N < 1, NaN anywhere, or a non-finite or
    negative entry above the diagonal.
    """
    values = cost.values if isinstance(cost, CostMatrix) else np.array(cost, dtype=np.float64)
    if values.ndim != 2 or values.shape[0] != values.shape[1]:
        raise ValueError(f"cost must be an (N+1) x (N+1) matrix, got shape {values.shape}")
    if values.shape[0] < 2:
        raise ValueError(f"cost must cover N >= 1 steps, got shape {values.shape}")
    if np.isnan(values).any():
        i, j = np.argwhere(np.isnan(values))[0]
        raise ValueError(f"cost contains NaN (first at [{i}, {j}])")
    upper = _upper_mask(values.shape[0])
    if not np.isfinite(values[upper]).all():
        raise ValueError("cost has a non-finite entry above the diagonal")
    if (values[upper] < 0).any():
        raise ValueError(
            f"cost has a negative entry above the diagonal (min {values[upper].min():.3g})")
    return np.where(upper, values, np.inf)


@functools.lru_cache(maxsize=8)
def _upper_mask(size: int) -> np.ndarray:
    """(size, size) bool, True strictly above the diagonal; cached, read-only."""
    mask = np.triu(np.ones((size, size), dtype=bool), k=1)
    mask.setflags(write=False)
    return mask


def _check_discount(discount: float) -> float:
    if not (np.isfinite(discount) and discount > 0):
        raise ValueError(f"discount must be a finite number > 0, got {discount!r}")
    return float(discount)


def bellman_table(values: np.ndarray, max_nfe: int, discount: float = 1.0):
    """Fill the DP table.

    Args:
        values: (N + 1, N + 1) validated cost (``check_cost``).
    Returns:
        value: (K_max + 1, N + 1) float64, value[k, j] = V_k(j).
        choice: (K_max + 1, N + 1) int64, the argmin l of V_k(j) (earliest on ties).
    """
    n = values.shape[0] - 1
    value = np.full((max_nfe + 1, n + 1), np.inf)
    choice = np.zeros((max_nfe + 1, n + 1), dtype=np.int64)
    value[0, n] = 0.0
    total = np.empty_like(values)  # total[j, l] = c(j, l) + gamma V_{k-1}(l)
    future = np.empty(n + 1)
    flat_row_start = np.arange(n + 1) * (n + 1)
    for k in range(1, max_nfe + 1):
        rows = n - k + 1  # V_k(j) is +inf for j > N - k: too few grid points left
        if discount == 1.0:
            future = value[k - 1]
        else:
            np.multiply(value[k - 1], discount, out=future)
        np.add(values[:rows], future, out=total[:rows])
        best = total[:rows].argmin(axis=1)
        choice[k, :rows] = best
        value[k, :rows] = total.ravel()[flat_row_start[:rows] + best]
    return value, choice


def bellman_schedules(cost, max_nfe: int, discount: float = 1.0) -> dict[int, Schedule]:
    """Optimal schedules for every K = 1..max_nfe from one DP pass.

    Args:
        cost: a ``CostMatrix`` or an (N + 1, N + 1) array of c(i, j) on the grid t_i = i / N.
        max_nfe: K_max, 1 <= K_max <= N.
        discount: gamma on the future cost; 1.0 (the default) is BOSS.
    Returns:
        {K: Schedule} with ``.indices`` the grid path and ``.cost`` = V_K(0).
    """
    values = check_cost(cost)
    n = values.shape[0] - 1
    k_max = check_nfe(max_nfe, n, name="max_nfe")
    gamma = _check_discount(discount)
    value, choice = bellman_table(values, k_max, gamma)
    name = "bellman" if gamma == 1.0 else f"bellman_discount{gamma:g}"
    step_to = choice.tolist()  # plain lists: the backtracking below is scalar work
    out = {}
    for k in range(1, k_max + 1):
        path = [0]
        for steps_left in range(k, 0, -1):
            path.append(step_to[steps_left][path[-1]])
        out[k] = Schedule.from_indices(path, n, cost=float(value[k, 0]), name=name)
    return out


def bellman_schedule(cost, nfe: int, discount: float = 1.0) -> Schedule:
    """The optimal K-step schedule (see ``bellman_schedules``)."""
    return bellman_schedules(cost, nfe, discount)[nfe]
