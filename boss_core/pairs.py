"""Training pairs for straightening, from N-step teacher Euler paths.

Chord pairs (BOSS and distill-K). For a schedule tau_0 < ... < tau_K on the fine grid
(tau_k = i_k / N) and teacher states x_{tau_k} of the N-step uniform Euler path from noise z:

    input (x_{tau_k}, tau_k),   target (x_{tau_{k+1}} - x_{tau_k}) / (tau_{k+1} - tau_k),

one pair per sample and step k: K pairs per noise.

Reflow pairs (uniform-reflow). The noise and the teacher's end point (z, x_1); a training
step draws t ~ U[0, 1] and regresses v(x_t, t) on x_1 - z with x_t = (1 - t) z + t x_1.

Noises come from per-sample seeds (``seeds.sample_noise``), so a shard [start, start + count)
gives the same pairs as the same rows of one big run. Whether sample i is held out for
validation depends only on (seed, i) as well.

Class-conditional teachers (``num_classes`` C): sample i's path is the teacher's (guided)
field at label y_i = i mod C (``boss_core.guidance``), and its pairs carry y_i, which the
student is called with (``extras``); unconditional pairs have y None.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .grids import check_n_steps, uniform_grid
from .guidance import balanced_labels
from .sampling import euler_step
from .schedule import Schedule
from .seeds import HOLDOUT_STREAM, sample_noise, sample_seed
from .velocity import VelocityFn, evaluate_velocity


def _take(y: Tensor | None, index) -> Tensor | None:
    return None if y is None else y[index]


def _extras(y: Tensor | None) -> dict[str, Tensor]:
    return {} if y is None else {"y": y}


@dataclass(frozen=True, eq=False)
class ChordPairs:
    """x: (P, ...) inputs; t: (P,) float64 times; target: (P, ...) chord velocities;
    sample: (P,) int64 index of the noise each pair came from; y: (P,) int64 class labels
    the teacher was called with (None: unconditional)."""

    x: Tensor
    t: Tensor
    target: Tensor
    sample: Tensor
    y: Tensor | None = None

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def batch(self, index: Tensor, generator: torch.Generator):
        """(x, t, target) rows ``index``; the generator is unused (pairs are fixed)."""
        index = index.to(self.x.device)
        return self.x[index], self.t[index], self.target[index]

    def extras(self, index: Tensor) -> dict[str, Tensor]:
        """The student's extras of rows ``index``: {} or {"y": (B,) labels}."""
        return _extras(_take(self.y, index.to(self.x.device)))

    def subset(self, keep: Tensor) -> ChordPairs:
        return ChordPairs(self.x[keep], self.t[keep], self.target[keep], self.sample[keep],
                          _take(self.y, keep))

    def to(self, device) -> ChordPairs:
        return ChordPairs(self.x.to(device), self.t.to(device), self.target.to(device),
                          self.sample, None if self.y is None else self.y.to(device))

    @staticmethod
    def concat(parts: list[ChordPairs]) -> ChordPairs:
        cat = [torch.cat([getattr(p, f) for p in parts]) for f in ("x", "t", "target", "sample")]
        return ChordPairs(*cat, _concat_labels(parts))


@dataclass(frozen=True, eq=False)
class ReflowPairs:
    """z: (M, ...) noises; x1: (M, ...) teacher end points; sample: (M,) int64 indices;
    y: (M,) int64 class labels (None: unconditional)."""

    z: Tensor
    x1: Tensor
    sample: Tensor
    y: Tensor | None = None

    def __len__(self) -> int:
        return int(self.z.shape[0])

    def batch(self, index: Tensor, generator: torch.Generator):
        """x_t = (1 - t) z + t x1 with t ~ U[0, 1] from ``generator``; target x1 - z."""
        t = torch.rand(index.shape[0], generator=generator, dtype=torch.float64)  # (B,)
        index, t = index.to(self.z.device), t.to(self.z.device)
        z, x1 = self.z[index], self.x1[index]
        t_b = t.to(z.dtype).view(-1, *([1] * (z.dim() - 1)))
        return (1 - t_b) * z + t_b * x1, t, x1 - z

    def extras(self, index: Tensor) -> dict[str, Tensor]:
        """The student's extras of rows ``index``: {} or {"y": (B,) labels}."""
        return _extras(_take(self.y, index.to(self.z.device)))

    def subset(self, keep: Tensor) -> ReflowPairs:
        return ReflowPairs(self.z[keep], self.x1[keep], self.sample[keep], _take(self.y, keep))

    def to(self, device) -> ReflowPairs:
        return ReflowPairs(self.z.to(device), self.x1.to(device), self.sample,
                           None if self.y is None else self.y.to(device))

    @staticmethod
    def concat(parts: list[ReflowPairs]) -> ReflowPairs:
        cat = [torch.cat([getattr(p, f) for p in parts]) for f in ("z", "x1", "sample")]
        return ReflowPairs(*cat, _concat_labels(parts))


def _concat_labels(parts) -> Tensor | None:
    labelled = {p.y is not None for p in parts}
    if len(labelled) > 1:
        raise ValueError("cannot concatenate labelled and unlabelled pairs")
    return torch.cat([p.y for p in parts]) if labelled == {True} else None


@torch.no_grad()
def teacher_states_at(velocity: VelocityFn, noise: Tensor, n_steps: int,
                      indices: list[int], extras: Mapping[str, Any] | None = None) -> Tensor:
    """States x_i of the N-step uniform Euler teacher at the given grid indices.

    Args:
        noise: (B, ...) x_0. indices: sorted grid indices in [0, N].
        extras: the teacher's conditioning of these samples (e.g. {"y": (B,) labels}).
    Returns:
        (len(indices), B, ...) in noise's dtype; memory O(len(indices) * B), not O(N * B).
    """
    grid = uniform_grid(n_steps)
    wanted = sorted(set(int(i) for i in indices))
    if wanted and (wanted[0] < 0 or wanted[-1] > n_steps):
        raise ValueError(f"indices must lie in [0, N={n_steps}], got {wanted[0]}..{wanted[-1]}")
    keep = {0: noise} if 0 in wanted else {}
    x = noise
    for i in range(wanted[-1] if wanted else 0):
        t_cur, t_next = float(grid[i]), float(grid[i + 1])
        x = euler_step(x, evaluate_velocity(velocity, x, t_cur, step=i, extras=extras),
                       t_cur, t_next)
        if i + 1 in wanted:
            keep[i + 1] = x
    return torch.stack([keep[i] for i in indices])


def holdout_mask(sample: Tensor, seed: int, fraction: float) -> Tensor:
    """(P,) bool: True where the pair's noise is held out; depends only on (seed, index)."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"holdout fraction must be in [0, 1), got {fraction}")
    draws = [sample_seed(seed, int(i), stream=HOLDOUT_STREAM) / 2.0**63 for i in sample.tolist()]
    return torch.tensor(draws, dtype=torch.float64) < fraction


def _check_schedule(schedule: Schedule, n_steps: int) -> tuple[int, ...]:
    if schedule.indices is None:
        raise ValueError(f"schedule {schedule.name!r} is off the fine grid (no indices); "
                         "straightening needs teacher states at its times")
    if schedule.n_steps is not None and schedule.n_steps != n_steps:
        raise ValueError(f"schedule {schedule.name!r} was built on N={schedule.n_steps}, "
                         f"but the teacher runs N={n_steps}")
    return schedule.indices


def _noise_batches(data_shape, seed: int, start: int, count: int, batch_size: int, device,
                   dtype, desc: str, progress: bool):
    if count < 1 or start < 0 or batch_size < 1:
        raise ValueError(f"need count >= 1, start >= 0 and batch_size >= 1, got count={count}, "
                         f"start={start}, batch_size={batch_size}")
    for lo in tqdm(range(start, start + count, batch_size), desc=desc, unit="batch",
                   disable=not progress):
        n = min(batch_size, start + count - lo)
        yield lo, sample_noise(tuple(data_shape), seed, lo, n, device=device, dtype=dtype)


def teacher_pairs(velocity: VelocityFn, schedules: Mapping[Hashable, Schedule], n_steps: int,
                  data_shape, *, seed: int, start: int, count: int, batch_size: int = 256,
                  device=None, dtype: torch.dtype = torch.float32, reflow: bool = False,
                  num_classes: int | None = None, progress: bool = False
                  ) -> tuple[dict[Hashable, ChordPairs], ReflowPairs | None]:
    """Chord pairs for every keyed schedule, and optionally reflow pairs, from ONE teacher pass
    over samples [start, start + count): states are kept at the union of the indices.

    num_classes: C of a class-conditional ``velocity`` (e.g. a ``guidance.GuidedVelocity``):
        sample i's path is the teacher's at label y_i = i mod C
        (``guidance.balanced_labels``), stored in the pairs' ``y``; None: unconditional.
    Returns:
        ({key: ChordPairs}, ReflowPairs or None).
    """
    n = check_n_steps(n_steps)
    paths = {key: _check_schedule(s, n) for key, s in schedules.items()}
    if not paths and not reflow:  # no student learns from the teacher: no teacher pass
        return {}, None
    union = sorted({i for p in paths.values() for i in p} | ({0, n} if reflow else set()))
    pos = {i: a for a, i in enumerate(union)}
    parts: dict[Hashable, list[ChordPairs]] = {key: [] for key in paths}
    ends: list[ReflowPairs] = []
    for lo, z in _noise_batches(data_shape, seed, start, count, batch_size, device,
                                dtype, "teacher pairs", progress):
        y = None if num_classes is None else balanced_labels(num_classes, lo, z.shape[0])
        states = teacher_states_at(velocity, z, n, union,  # (len(union), B, ...)
                                   extras=_extras(None if y is None else y.to(z.device)))
        index = torch.arange(lo, lo + z.shape[0])
        if reflow:
            ends.append(ReflowPairs(z, states[pos[n]], index, y))
        for key, path in paths.items():
            xs, ts, targets = [], [], []
            for a, b in zip(path[:-1], path[1:], strict=True):
                x_a, x_b = states[pos[a]], states[pos[b]]
                xs.append(x_a)
                ts.append(torch.full((z.shape[0],), a / n, dtype=torch.float64))
                targets.append((x_b - x_a) / ((b - a) / n))
            parts[key].append(ChordPairs(torch.cat(xs), torch.cat(ts), torch.cat(targets),
                                         index.repeat(len(path) - 1),
                                         None if y is None else y.repeat(len(path) - 1)))
    chords = {key: ChordPairs.concat(v) for key, v in parts.items()}
    return chords, (ReflowPairs.concat(ends) if reflow else None)


def chord_pairs(velocity: VelocityFn, schedules: list[Schedule], n_steps: int, data_shape,
                **kwargs) -> dict[int, ChordPairs]:
    """Chord pairs for each schedule, keyed by its K (one teacher pass; see ``teacher_pairs``)."""
    nfes = [s.nfe for s in schedules]
    if len(set(nfes)) != len(nfes):
        raise ValueError(f"chord_pairs keys by K, but K repeats in {nfes}; "
                         "use teacher_pairs with your own keys")
    return teacher_pairs(velocity, {s.nfe: s for s in schedules}, n_steps, data_shape,
                         **kwargs)[0]


def reflow_pairs(velocity: VelocityFn, n_steps: int, data_shape, **kwargs) -> ReflowPairs:
    """(noise, N-step teacher end point) pairs (see ``teacher_pairs``)."""
    return teacher_pairs(velocity, {}, n_steps, data_shape, reflow=True, **kwargs)[1]


def uniform_on_grid(nfe: int, n_steps: int) -> Schedule:
    """The uniform K-grid rounded to the fine grid: indices round(k N / K) (distill-K).

    Exactly uniform when K divides N; otherwise off by at most 1/(2N) per point.
    """
    idx = [round(k * n_steps / nfe) for k in range(nfe + 1)]
    return Schedule.from_indices(idx, n_steps, name="distill_uniform")
