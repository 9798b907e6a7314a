"""Student-aware schedules: re-run the Bellman DP on the straightened student's jump errors.

BOSS picks the K steps where the teacher's own one-jump error is least; the steps best for a
student being trained need not be those. After straightening on schedule S_0 (BOSS's), the
student v_s prices every jump on the teacher's fine-grid Euler paths x_0 .. x_N (t_i = i / N):

    c_S(i, j) = (1/M) sum_m || x^m_j - x^m_i - (t_j - t_i) v_s(x^m_i, t_i) ||^2,   i < j,

``cost.trajectory_cost_sum`` on the teacher's states with the student's velocities: one
student call at t_i prices every jump i -> j, N student calls (and N teacher calls for the
path) per path. A student equal to the teacher gives the teacher's cost c_T exactly.

Bias. The student was trained only at its schedule's times, so c_S is low on the jumps it
learnt and says little about the others. ``schedule_bias`` measures it: the geometric mean
of c_S / c_T over S's jumps ("on") and over the jumps i -> j of the same lengths j - i that
are not S's ("off"); on / off < 1 is the pull toward the current schedule. On the 2-D
8-mode mixture (the tests' teacher, N = 50, 200 steps of batch 128 on S_0 = Bellman's) it is
strong: on = 0.0010 / off = 0.16 at K = 2, on = 0.0024 / off = 0.17 at K = 4, so the student
is about 100x better, relative to the teacher, on the jumps it learnt than on their
neighbours. A DP on c_S alone would mostly re-pick S. We mix:

    c(i, j) = w c_T(i, j) + (1 - w) c_S(i, j),     w = ``teacher_weight`` in [0, 1],

an arithmetic mix, because it keeps c an expected squared error (the DP's total stays the
mean of a sum of jump errors) and the teacher's term, which does not depend on S, bounds how
far the student's self-confirming low cost on S can carry the DP. w = 1 is BOSS again (S_0);
w = 0 the student's cost alone. The DP runs per K on that K's student; if it returns S_r
again, the round stops (retraining would give the same student). Each round straightens a
fresh student from the teacher's weights on the new schedule's teacher chords (the same
noises as the pairs step's), so the final student had the same optimiser steps as boss; the
earlier rounds, the costs and the chords are counted as extra network calls.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .batching import iter_batches
from .bellman import bellman_schedules
from .config import check_int, check_number
from .cost import CostMatrix, trajectory_cost_sum
from .grids import check_n_steps, uniform_grid
from .pairs import ChordPairs, teacher_states_at
from .sampling import Trajectory, euler_trajectory
from .schedule import Schedule
from .velocity import VelocityFn, evaluate_velocity


def check_student_options(opts: Mapping[str, Any]) -> None:
    """ValueError naming the option (``rounds``, ``teacher_weight``, ``cost_samples``)."""
    check_int("rounds", opts.get("rounds"), 1)
    check_number("teacher_weight", opts.get("teacher_weight"), lambda v: 0 <= v <= 1,
                 "in [0, 1]")
    check_int("cost_samples", opts.get("cost_samples"), 1)


@torch.no_grad()
def student_cost(student: VelocityFn, teacher: VelocityFn, noise, n_steps: int,
                 batch_size: int = 256, *, extras: Mapping[str, Any] | None = None
                 ) -> tuple[CostMatrix, CostMatrix]:
    """(c_S, c_T): the student's and the teacher's jump errors on the teacher's N-step Euler
    paths from ``noise`` ((M, ...) or batches, as ``cost.cost_matrix`` takes; ``extras`` the
    labels of both). N teacher calls and N student calls per path."""
    n = check_n_steps(n_steps)
    grid = uniform_grid(n)
    mine = np.zeros((n + 1, n + 1))
    theirs = np.zeros((n + 1, n + 1))
    count = 0
    for x, ex in iter_batches(noise, batch_size, extras):
        traj = euler_trajectory(teacher, x, grid, extras=ex)  # states (N + 1, B, ...)
        own = torch.stack([evaluate_velocity(student, traj.states[i], float(grid[i]),
                                             step=i, extras=ex)
                           for i in range(n)])  # (N, B, ...): v_s(x_i, t_i)
        theirs += trajectory_cost_sum(traj)
        mine += trajectory_cost_sum(Trajectory(grid, traj.states, own))
        count += x.shape[0]
    if count == 0:
        raise ValueError("noise is empty: the student cost needs at least one path")
    return CostMatrix(mine, count), CostMatrix(theirs, count)


def mixed_cost(student: CostMatrix, teacher: CostMatrix, teacher_weight: float) -> np.ndarray:
    """(N + 1, N + 1) w c_T + (1 - w) c_S of the mean costs (+inf on and below the diagonal;
    mixed above it only, so w = 0 or 1 never meets 0 x inf)."""
    mixed = np.full(teacher.values.shape, np.inf)
    upper = np.triu_indices(mixed.shape[0], 1)
    mixed[upper] = (teacher_weight * teacher.values[upper]
                    + (1.0 - teacher_weight) * student.values[upper])
    return mixed


def schedule_bias(student: CostMatrix, teacher: CostMatrix, schedule: Schedule,
                  floor: float = 1e-12) -> dict[str, float]:
    """{"on", "off"}: geometric means of c_S(i, j) / c_T(i, j) over the schedule's jumps and
    over the other jumps of the same lengths j - i (entries with c_T <= ``floor`` left out:
    a one-step jump costs the teacher 0). on / off < 1: the student favours its schedule."""
    c_s, c_t = student.values, teacher.values
    jumps = list(zip(schedule.indices[:-1], schedule.indices[1:], strict=True))
    lengths = {j - i for i, j in jumps}
    n = c_t.shape[0] - 1

    def gmean(pairs) -> float:
        logs = [np.log(max(c_s[i, j], floor) / c_t[i, j]) for i, j in pairs
                if c_t[i, j] > floor]
        return float(np.exp(np.mean(logs))) if logs else float("nan")

    others = [(i, i + length) for length in sorted(lengths) for i in range(n - length + 1)
              if (i, i + length) not in jumps]
    return {"on": gmean(jumps), "off": gmean(others)}


def chords_along(teacher: VelocityFn, noise: Tensor, sample: Tensor, y: Tensor | None,
                 schedule: Schedule, batch_size: int) -> ChordPairs:
    """The teacher's chords along ``schedule`` from the noises (M, ...) (sample indices (M,),
    labels (M,) or None), as ``pairs.teacher_pairs`` lays them out: per batch, step by step.
    max(indices) teacher calls per noise."""
    n, path = schedule.n_steps, list(schedule.indices)
    parts = []
    for lo in range(0, noise.shape[0], batch_size):
        hi = min(lo + batch_size, noise.shape[0])
        labels = None if y is None else y[lo:hi]
        states = teacher_states_at(teacher, noise[lo:hi], n, path,
                                   extras={} if labels is None else {"y": labels})
        xs, ts, targets = [], [], []
        for k, (a, b) in enumerate(zip(path[:-1], path[1:], strict=True)):
            xs.append(states[k])
            ts.append(torch.full((hi - lo,), a / n, dtype=torch.float64))
            targets.append((states[k + 1] - states[k]) / ((b - a) / n))
        parts.append(ChordPairs(torch.cat(xs), torch.cat(ts), torch.cat(targets),
                                sample[lo:hi].repeat(len(path) - 1),
                                None if labels is None else labels.repeat(len(path) - 1)))
    return ChordPairs.concat(parts)


def noises_of(chords: ChordPairs) -> tuple[Tensor, Tensor, Tensor | None]:
    """(z (M, ...), sample (M,), y (M,) or None): the noises of chord pairs, their rows at
    t = 0 (every schedule starts there), in sample order."""
    first = chords.t == 0
    order = torch.argsort(chords.sample[first])
    y = None if chords.y is None else chords.y[first][order]
    return chords.x[first][order], chords.sample[first][order], y


@dataclass
class Round:
    """One round: the schedule its student learnt, and that student's measured bias."""

    schedule: Schedule
    bias: dict[str, float] = field(default_factory=dict)


@dataclass
class RoundsResult:
    """fitted: the last student (whatever ``fit`` returned); schedule: the one it learnt;
    rounds: every round's schedule and bias; trainings: the students trained."""

    fitted: Any
    schedule: Schedule
    rounds: list[Round]
    trainings: int


def student_rounds(fit: Callable[[ChordPairs, int], Any],
                   student_of: Callable[[Any], VelocityFn], teacher: VelocityFn,
                   chords: ChordPairs, schedule: Schedule, *, rounds: int,
                   teacher_weight: float, cost_samples: int, batch_size: int) -> RoundsResult:
    """The module doc's rounds for one K.

    Args:
        fit: ``fit(pairs, r)`` straightens a fresh student from the teacher on chord pairs
            (the caller splits off its held-out pairs) and returns it.
        student_of: the velocity of what ``fit`` returned (called with the labels).
        teacher: the (guided) teacher v(x, t, **extras).
        chords: the teacher's chords along ``schedule`` (round 0's pairs), whose noises
            (t = 0 rows) give the later rounds' chords and the first ``cost_samples`` the
            student cost's paths.
        schedule: S_0 on the fine grid.
    """
    z, sample, y = noises_of(chords)
    m = min(cost_samples, z.shape[0])
    extras = {} if y is None else {"y": y[:m]}
    fitted, current = fit(chords, 0), schedule
    log = [Round(schedule)]
    trainings = 1
    for r in range(1, rounds + 1):
        c_s, c_t = student_cost(student_of(fitted), teacher, z[:m], schedule.n_steps,
                                batch_size, extras=extras)
        log[-1].bias = schedule_bias(c_s, c_t, current)
        k = current.nfe
        found = bellman_schedules(mixed_cost(c_s, c_t, teacher_weight), k)[k]
        found = Schedule.from_indices(found.indices, found.n_steps, cost=found.cost,
                                      name="boss_student")
        if tuple(found.indices) == tuple(current.indices):
            break
        current = found
        fitted = fit(chords_along(teacher, z, sample, y, current, batch_size), r)
        log.append(Round(current))
        trainings += 1
    return RoundsResult(fitted, current, log, trainings)
