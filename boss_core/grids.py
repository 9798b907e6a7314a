"""Time grids: validation and the uniform fine grid.

A grid is a float64 array ``times`` of shape (K + 1,) with times[0] == 0 exactly,
times[-1] == 1 exactly and times strictly increasing. K is the number of Euler steps (NFE).
"""

from __future__ import annotations

import numpy as np
import torch


def as_grid(times, *, name: str = "times") -> np.ndarray:
    """Return ``times`` as a validated, read-only float64 array of shape (K + 1,).

    Raises ValueError unless the grid is 1-D, has at least two points, is finite, starts at
    exactly 0, ends at exactly 1 and is strictly increasing.
    """
    if isinstance(times, torch.Tensor):
        times = times.detach().cpu().numpy()
    grid = np.array(times, dtype=np.float64)
    if grid.ndim != 1 or grid.shape[0] < 2:
        raise ValueError(
            f"{name} must be a 1-D grid with at least 2 points, got shape {grid.shape}")
    # Strictly increasing from exactly 0 to exactly 1 implies finite; NaN fails "> 0".
    steps = grid[1:] - grid[:-1]
    if grid[0] == 0.0 and grid[-1] == 1.0 and (steps > 0).all():
        grid.setflags(write=False)
        return grid
    if not np.isfinite(grid).all():
        raise ValueError(f"{name} contains NaN or Inf: {grid.tolist()}")
    if grid[0] != 0.0 or grid[-1] != 1.0:
        raise ValueError(
            f"{name} must start at exactly 0 and end at exactly 1, got {grid[0]!r} .. {grid[-1]!r}"
        )
    bad = int(np.argmin(steps))
    raise ValueError(
        f"{name} must be strictly increasing; {name}[{bad}]={grid[bad]!r} >= "
        f"{name}[{bad + 1}]={grid[bad + 1]!r}"
    )


def check_n_steps(n_steps: int) -> int:
    """Validate the fine-grid size N (an int >= 1)."""
    if isinstance(n_steps, bool) or not isinstance(n_steps, (int, np.integer)) or n_steps < 1:
        raise ValueError(f"n_steps (N) must be an integer >= 1, got {n_steps!r}")
    return int(n_steps)


def check_nfe(nfe: int, n_steps: int, *, name: str = "nfe") -> int:
    """Validate a step count K with 1 <= K <= N."""
    if isinstance(nfe, bool) or not isinstance(nfe, (int, np.integer)) or nfe < 1:
        raise ValueError(f"{name} (K) must be an integer >= 1, got {nfe!r}")
    if nfe > n_steps:
        raise ValueError(f"{name} (K={nfe}) cannot exceed the fine-grid steps N={n_steps}")
    return int(nfe)


def uniform_grid(n_steps: int) -> np.ndarray:
    """The uniform grid t_i = i / N, i = 0..N, float64 of shape (N + 1,), endpoints exact."""
    n = check_n_steps(n_steps)
    grid = np.arange(n + 1, dtype=np.float64) / n
    grid.setflags(write=False)
    return grid
