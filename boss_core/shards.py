"""Seed-range shards of the sample-parallel work, and their exact merges.

Three pieces of BOSS are sums or concatenations over independent samples m = 0 .. M-1, each
drawn from its own seed (``boss_core.seeds``):

- the cost matrix, a float64 sum over teacher paths: C = sum_shards C_s, M = sum_shards M_s;
- the training pairs, rows keyed by sample: concatenated in seed order;
- evaluation samples (or their features), rows keyed by sample: concatenated in seed order,
  and the end-point error's float64 sum of squares.

A shard is the half-open seed range [start, start + count). It regenerates its own noise from
the seeds, so nothing but the model travels to a worker and only the results come back. When
shard boundaries fall on batch boundaries every network call sees the same batch as in one
process, so pairs and samples are bit-identical and the cost sum differs only by the order of
float64 additions (relative 1e-15 per entry). Unaligned shards change batch compositions, which
moves float32 network outputs by a few ulp (see tests/test_dask.py for the tolerance).

Everything here is a plain function of tensors and modules;
``tasks/runtime/shards.py`` maps the shard
functions over a Prefect task runner (in-process, or Dask).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from functools import reduce

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .cost import CostMatrix, cost_matrix
from .device import resolve_device
from .grids import uniform_grid
from .guidance import Conditioning
from .pairs import ChordPairs, ReflowPairs, teacher_pairs
from .sampling import euler_sample
from .schedule import Schedule
from .seeds import sample_noise
from .velocity import VelocityFn

Shard = tuple[int, int]  # (start, count): samples start .. start + count - 1


def shard_ranges(total: int, shard_samples: int, batch_size: int,
                 n_workers: int = 1) -> list[Shard]:
    """Split samples 0 .. total-1 into consecutive seed ranges.

    Args:
        total: M, the number of samples.
        shard_samples: samples per shard; 0 picks ceil(M / n_workers) rounded up to a
            multiple of ``batch_size`` (one shard per worker, whole batches).
        batch_size: the batch the shard computes in (used only for the 0 default).
    Returns:
        [(start, count)], covering 0 .. M-1 in order; the last shard may be shorter.
    """
    for name, value, low in (("total", total, 1), ("shard_samples", shard_samples, 0),
                             ("batch_size", batch_size, 1), ("n_workers", n_workers, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    size = shard_samples
    if size == 0:
        size = math.ceil(math.ceil(total / n_workers) / batch_size) * batch_size
    return [(lo, min(size, total - lo)) for lo in range(0, total, size)]


def aligned(shards: Sequence[Shard], batch_size: int) -> bool:
    """Whether every shard boundary is a batch boundary of the single-process run."""
    return all(start % batch_size == 0 for start, _ in shards)


def _place(device, *models):
    """Resolve ``device`` ("auto", "cpu", "cuda:1", ...) on this machine and move the modules
    there (a shard may run on a worker whose device differs from the caller's)."""
    if device is None:  # where the first module already is
        first = next((p for m in models if isinstance(m, torch.nn.Module)
                      for p in m.parameters()), None)
        return first.device if first is not None else torch.device("cpu")
    dev = resolve_device(device)
    for m in models:
        if isinstance(m, torch.nn.Module):
            m.to(dev)
    return dev


def _noise_batches(data_shape, seed: int, start: int, count: int, batch_size: int, device):
    for lo in range(start, start + count, batch_size):
        n = min(batch_size, start + count - lo)
        yield sample_noise(tuple(data_shape), seed, lo, n, device=device)


def _labelled_batches(data_shape, seed: int, start: int, count: int, batch_size: int, device,
                      num_classes: int | None):
    """(noise, extras) batches: extras {"y": y_i = i mod C} of a class-conditional teacher,
    {} when ``num_classes`` is None."""
    cond = Conditioning(num_classes)
    for lo in range(start, start + count, batch_size):
        n = min(batch_size, start + count - lo)
        yield (sample_noise(tuple(data_shape), seed, lo, n, device=device),
               cond.extras(lo, n, device))


def cost_shard(velocity: VelocityFn, data_shape, seed: int, start: int, count: int,
               n_steps: int, batch_size: int, device=None, method: str = "gram",
               num_classes: int | None = None) -> CostMatrix:
    """The cost sum over teacher paths from noises [start, start + count) of ``seed``.

    num_classes: C of a class-conditional ``velocity`` (e.g. guided): path i runs at label
        y_i = i mod C (``boss_core.guidance``); None: unconditional.
    Returns:
        CostMatrix with sum (N+1, N+1) float64 over ``count`` paths; shards merge with
        ``merge_costs``.
    """
    device = _place(device, velocity)
    noise = (_noise_batches(data_shape, seed, start, count, batch_size, device)
             if num_classes is None else
             _labelled_batches(data_shape, seed, start, count, batch_size, device, num_classes))
    with torch.no_grad():
        return cost_matrix(velocity, noise, n_steps, batch_size, method=method)


def merge_costs(parts: Sequence[CostMatrix]) -> CostMatrix:
    """Sum of the shards' float64 sums and sample counts, in shard order."""
    if not parts:
        raise ValueError("no cost shards to merge")
    return reduce(CostMatrix.merge, parts)


def pairs_shard(velocity: VelocityFn, schedules: Mapping[Hashable, Schedule], n_steps: int,
                data_shape, seed: int, start: int, count: int, batch_size: int, device=None,
                reflow: bool = False, num_classes: int | None = None
                ) -> tuple[dict[Hashable, ChordPairs], ReflowPairs | None]:
    """``teacher_pairs`` over samples [start, start + count), returned on the CPU."""
    device = _place(device, velocity)
    with torch.no_grad():
        chords, ends = teacher_pairs(velocity, schedules, n_steps, data_shape, seed=seed,
                                     start=start, count=count, batch_size=batch_size,
                                     device=device, reflow=reflow, num_classes=num_classes)
    chords = {key: p.to("cpu") for key, p in chords.items()}
    return chords, (ends.to("cpu") if ends is not None else None)


def merge_pairs(parts: Sequence[tuple[dict, ReflowPairs | None]]):
    """Concatenate shards' pairs key by key, in shard (= seed) order."""
    if not parts:
        raise ValueError("no pair shards to merge")
    keys = list(parts[0][0])
    chords = {key: ChordPairs.concat([p[0][key] for p in parts]) for key in keys}
    ends = [p[1] for p in parts]
    return chords, (ReflowPairs.concat(ends) if ends[0] is not None else None)


RowKey = tuple[str, int]  # (method, K); the teacher reference row is ("reference", N)


@dataclass(frozen=True, eq=False)
class Drawn:
    """What an evaluation shard brings back, per row and seed.

    values: {(method, K, s): (count, ...)} the samples, or their features (count, D) when the
        shard was given ``featurize``; ("reference", N, s) is the N-step teacher.
    sq_err: {(method, K): float64 sum over the shard's samples of every seed of
        ||x - x_ref||^2}, the end-point error's numerator (the reference row's is 0).
    count: samples per seed.
    """

    values: dict[tuple[str, int, int], Tensor]
    sq_err: dict[RowKey, float]
    count: int

    def endpoint_rmse(self, key: RowKey, n_seeds: int) -> float:
        """sqrt(sq_err / (count * n_seeds)): ``metrics.endpoint_rmse`` pooled over seeds."""
        return math.sqrt(self.sq_err[key] / (self.count * n_seeds))


def sample_shard(rows: Mapping[RowKey, tuple[VelocityFn, Sequence[float]]], teacher: VelocityFn,
                 data_shape, seeds: Sequence[int], n_steps: int, start: int, count: int,
                 batch_size: int, device=None, featurize: Callable[[Tensor], Tensor] | None = None,
                 progress: bool = False, num_classes: int | None = None) -> Drawn:
    """Euler samples of every row from noises [start, start + count) of every seed.

    Args:
        rows: {(method, K): (velocity, times)} with times (K + 1,) from 0 to 1.
        seeds: the evaluation's noise seeds.
        num_classes: C of class-conditional velocities: sample i of every seed is drawn at
            label y_i = i mod C (class-balanced, ``boss_core.guidance``); None: unconditional.
        featurize: (count, ...) samples -> (count, D) features (e.g. the FID extractor's):
            only features come back, so a 50k-sample evaluation of large images moves
            (count, D) per row, never the images.
    Returns:
        ``Drawn`` with CPU tensors.
    """
    device = _place(device, teacher, *(v for v, _ in rows.values()))
    reference_key = ("reference", n_steps)
    plan = {reference_key: (teacher, uniform_grid(n_steps)), **rows}
    values: dict[tuple[str, int, int], Tensor] = {}
    sq_err = {key: 0.0 for key in plan}
    with torch.no_grad():
        for s, seed in enumerate(tqdm(seeds, desc="sample", disable=not progress)):
            noise = list(_labelled_batches(data_shape, seed, start, count, batch_size, device,
                                           num_classes))
            reference = None
            for key, (velocity, times) in plan.items():
                x = torch.cat([euler_sample(velocity, z, times, extras=ex).cpu()
                               for z, ex in noise])
                if reference is None:
                    reference = x
                else:
                    diff = (x.double() - reference.double()).reshape(x.shape[0], -1)
                    sq_err[key] += float((diff * diff).sum())
                values[(*key, s)] = featurize(x) if featurize is not None else x
    return Drawn(values, sq_err, count)


def merge_samples(parts: Sequence[Drawn]) -> Drawn:
    """Concatenate each row's values across shards in shard (= seed) order; add the errors."""
    if not parts:
        raise ValueError("no sample shards to merge")
    values = {key: torch.cat([p.values[key] for p in parts]) for key in parts[0].values}
    sq_err = {key: math.fsum(p.sq_err[key] for p in parts) for key in parts[0].sq_err}
    return Drawn(values, sq_err, sum(p.count for p in parts))
