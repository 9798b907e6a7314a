"""Per-sample seeds: sample i's noise depends on (seed, i) only.

Like EDM's ``StackedRandomGenerator``: the noise of sample i is the same whatever the batch
size, the shard it falls in, or the device, so sharded runs reproduce single-process runs.

Weight initialisation is the one place that still draws from torch's process-wide default
generator (``nn.Linear``'s init, peft's LoRA init, ...). ``seeded`` serialises those draws under
one lock, so steps building models in threads of one process do not interleave them.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import Tensor

# Streams of ``sample_seed``: unrelated random draws under one seed never share a generator.
NOISE_STREAM = 0    # a sample's starting noise
STEP_STREAM = 1     # a training step's batch (indices, times, noise, label drop-out)
HOLDOUT_STREAM = 2  # whether a pair's sample is held out for validation

# Offsets of ``sweep.seed``: the sweep's noise sets, kept apart by their seed.
SEARCH_OFFSET = 1   # the search paths (cost matrix, global search)
PAIRS_OFFSET = 2    # the straightening pairs' noises and their hold-out split
EVAL_OFFSET = 100   # evaluation seed s is sweep.seed + 100 + s (also the report's sample grids)


def search_seed(seed: int) -> int:
    """The seed of the search paths' noises under ``sweep.seed``."""
    return seed + SEARCH_OFFSET


def pairs_seed(seed: int) -> int:
    """The seed of the straightening pairs' noises (and of their hold-out) under ``sweep.seed``."""
    return seed + PAIRS_OFFSET


def eval_seeds(seed: int, n_seeds: int) -> list[int]:
    """The evaluation's noise seeds under ``sweep.seed``: seed + 100 + s for s < n_seeds."""
    return [seed + EVAL_OFFSET + s for s in range(n_seeds)]


def sample_seed(seed: int, index: int, stream: int = 0) -> int:
    """A well-mixed 63-bit generator seed for sample ``index`` of ``stream`` under ``seed``.

    Streams keep unrelated uses apart (0: sampling noise, 1: training steps, ...).
    """
    if min(seed, index, stream) < 0:
        raise ValueError(f"seed, index and stream must be >= 0, got {seed}, {index}, {stream}")
    state = np.random.SeedSequence([int(seed), int(index), int(stream)]).generate_state(
        2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


def sample_noise(
    shape: tuple[int, ...],
    seed: int,
    start: int,
    count: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """Standard normal noise for samples ``start .. start + count - 1``.

    Args:
        shape: per-sample shape, e.g. (1, 8, 8).
    Returns:
        (count, *shape) tensor; row r is drawn from ``sample_seed(seed, start + r)`` on the CPU
        in float32 and then cast and moved, so it is identical on every device.
    """
    if count < 0 or start < 0:
        raise ValueError(f"start and count must be >= 0, got start={start}, count={count}")
    rows = []
    gen = torch.Generator(device="cpu")
    for index in range(start, start + count):
        gen.manual_seed(sample_seed(seed, index))
        rows.append(torch.randn(shape, generator=gen, dtype=torch.float32))
    out = torch.stack(rows) if rows else torch.empty((0, *shape))
    return out.to(dtype=dtype, device=device)


def step_generator(seed: int, step: int) -> torch.Generator:
    """A CPU generator for training step ``step``: resuming at any step replays it exactly."""
    return torch.Generator(device="cpu").manual_seed(sample_seed(seed, step, stream=STEP_STREAM))


# Held for every draw from torch's global (default CPU) generator made while building a model.
# Re-entrant: a seeded build may call another (``build_pretrained`` -> ``build_model``).
GLOBAL_RNG_LOCK = threading.RLock()


@contextmanager
def seeded(seed: int | None = None) -> Iterator[None]:
    """Hold ``GLOBAL_RNG_LOCK``; with a seed, also run the block from ``torch.manual_seed(seed)``.

    seed given: the block sees exactly the generator state ``torch.manual_seed(seed)`` makes,
    and the CPU generator is restored afterwards (``torch.random.fork_rng(devices=[])``), so
    the global state is left untouched. seed None: the block draws from the global generator
    as it stands (and advances it), as it would without the lock.

    Only draws made under the lock are kept apart: every construction with a random init in
    ``boss_core`` runs under it, and code elsewhere that draws from the global generator while
    other threads may build models (e.g. a third-party network's constructor) should too.
    """
    with GLOBAL_RNG_LOCK:
        if seed is None:
            yield
            return
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            yield
