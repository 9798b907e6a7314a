"""Global (end-point) schedule search: a greedy DP that carries the student's own states.

Teacher states X_j (N-step uniform Euler, shape (M, ...)) fix the targets. Layer k holds the
student state S[k][j] after k Euler jumps ending at grid point j:

    S[0][0] = noise
    E(k, i, j) = (1/M) sum_m || S[k-1][i] + (t_j - t_i) v(S[k-1][i], t_i) - X_j ||^2
    i*(k, j)   = argmin_{i < j} E(k, i, j)   (earliest i on ties)
    S[k][j]    = S[k-1][i*] + (t_j - t_i*) v(S[k-1][i*], t_i*)

The K-step schedule backtracks i* from (K, N); its ``.cost`` is the mean squared end-point
error E at (K, N). This is a heuristic (as in OSS, arXiv 2503.21774), not an exact optimum:
keeping one state per (k, j) discards paths that are worse early but better later.

Cost: about K_max * N batched network calls (one per reachable (k - 1, i)), against N for
the local cost. Memory: the teacher states (N + 1, M, ...) and one layer of student states;
``batch_size`` bounds the batch of each network call.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from .batching import Batch, check_batch_size, collect, slice_extras
from .grids import check_n_steps, check_nfe, uniform_grid
from .sampling import TEACHER_SOLVERS, euler_step, euler_trajectory
from .schedule import Schedule
from .velocity import VelocityFn, evaluate_velocity


def _batched(fn, x: Tensor, extras: dict, batch_size: int) -> Tensor:
    """Apply ``fn(x_chunk, extras_chunk)`` over batch_size chunks of x and concatenate."""
    outs = [fn(x[s:s + batch_size], slice_extras(extras, s, s + batch_size))
            for s in range(0, x.shape[0], batch_size)]
    return torch.cat(outs, dim=0)


def _jump_errors(sources: list[int], states: dict[int, Tensor], vels: dict[int, Tensor],
                 teacher: Tensor, times: np.ndarray, batch_size: int) -> np.ndarray:
    """E[a, j] for source i = sources[a] and every grid point j (inf where j <= i).

    Expands ||s_i + h v_i - x_j||^2 = |s|^2 - 2 s.x_j + |x_j|^2 + 2h (s.v - v.x_j) + h^2 |v|^2
    into float64 GEMMs, accumulated over sample chunks so the float64 copies stay small.
    teacher: (N + 1, M, ...).
    """
    n_src, m = len(sources), teacher.shape[1]
    sx = torch.zeros((n_src, teacher.shape[0]), dtype=torch.float64)
    vx = torch.zeros_like(sx)
    ss = torch.zeros(n_src, dtype=torch.float64)
    sv, vv = torch.zeros_like(ss), torch.zeros_like(ss)
    xx = torch.zeros(teacher.shape[0], dtype=torch.float64)
    for lo in range(0, m, batch_size):
        hi = min(lo + batch_size, m)
        x = teacher[:, lo:hi].reshape(teacher.shape[0], -1).to(torch.float64)  # (N+1, b*D)
        s = torch.stack([states[i][lo:hi].reshape(-1) for i in sources]).to(torch.float64)
        v = torch.stack([vels[i][lo:hi].reshape(-1) for i in sources]).to(torch.float64)
        sx += (s @ x.T).cpu()
        vx += (v @ x.T).cpu()
        ss += (s * s).sum(1).cpu()
        sv += (s * v).sum(1).cpu()
        vv += (v * v).sum(1).cpu()
        xx += (x * x).sum(1).cpu()
    t = torch.tensor(times, dtype=torch.float64)
    h = t[None, :] - t[sources][:, None]  # (n_src, N+1)
    err = (ss[:, None] - 2 * sx + xx[None, :] + 2 * h * (sv[:, None] - vx)
           + h * h * vv[:, None]) / m
    err = err.clamp_min(0.0).numpy()
    err[h.numpy() <= 0] = np.inf
    return err


@torch.no_grad()
def global_schedules(
    velocity: VelocityFn,
    noise: Tensor | Iterable[Tensor | Batch],
    n_steps: int,
    max_nfe: int,
    batch_size: int = 256,
    *,
    extras: Mapping[str, Any] | None = None,
    solver: str = "euler",
    progress: bool = False,
) -> dict[int, Schedule]:
    """End-point-error schedules for every K = 1..max_nfe (see the module docstring).

    Args:
        velocity: the teacher v(x, t, **extras).
        noise: (M, ...) tensor or an iterable of batches; all M states are held per layer.
        n_steps: N; max_nfe: K_max with 1 <= K_max <= N.
        solver: the teacher's integrator for the targets X_j, "euler" or "heun".
    Returns:
        {K: Schedule} named "bellman_global"; ``.cost`` is the mean squared end-point error
        against the N-step teacher from the same noise.
    """
    n = check_n_steps(n_steps)
    k_max = check_nfe(max_nfe, n, name="max_nfe")
    check_batch_size(batch_size)
    if solver not in TEACHER_SOLVERS:
        raise ValueError(f"unknown teacher solver {solver!r}; use one of {TEACHER_SOLVERS}")
    x0, ex = collect(noise, extras)
    grid = uniform_grid(n)

    def teacher_states(xb, eb):
        traj = euler_trajectory(velocity, xb, grid, extras=eb, solver=solver)
        return traj.states.transpose(0, 1)

    teacher = _batched(teacher_states, x0, ex, batch_size).transpose(0, 1)  # (N+1, M, ...)
    target_end = teacher[n].to(torch.float64)
    states: dict[int, Tensor] = {0: x0}  # layer k-1: grid point -> (M, ...) student state
    parents: list[dict[int, int]] = [{}]
    out: dict[int, Schedule] = {}
    for k in tqdm(range(1, k_max + 1), desc="global search", unit="layer", disable=not progress):
        sources = sorted(i for i in states if i < n)
        vels = {}
        for i in sources:
            def step_velocity(xb, eb, i=i, k=k):
                return evaluate_velocity(velocity, xb, float(grid[i]), extras=eb,
                                         step=f"global layer {k} from t_{i}")
            vels[i] = _batched(step_velocity, states[i], ex, batch_size)
        err = _jump_errors(sources, states, vels, teacher, grid, batch_size)  # (n_src, N+1)
        last_needed = n - (k_max - k)  # later layers still need room for k_max - k jumps
        targets = [j for j in range(k, n + 1) if j <= last_needed or j == n]
        new_states, parent = {}, {}
        for j in targets:
            a = int(np.argmin(err[:, j]))
            i = sources[a]
            parent[j] = i
            new_states[j] = euler_step(states[i], vels[i], float(grid[i]), float(grid[j]))
        parents.append(parent)
        path = [n]
        for layer in range(k, 0, -1):
            path.append(parents[layer][path[-1]])
        end_err = ((new_states[n].to(torch.float64) - target_end) ** 2)
        cost = float(end_err.reshape(end_err.shape[0], -1).sum(1).mean())
        out[k] = Schedule.from_indices(path[::-1], n, cost=cost, name="bellman_global")
        states = new_states
    return out
