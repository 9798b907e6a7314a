"""Splitting noise (and its conditioning) into batches.

Every sweep over M samples goes through ``iter_batches``, so M need not fit in memory:
``noise`` may be one (M, ...) tensor, cut into ``batch_size`` chunks, or an iterable of
batches, each a (B, ...) tensor or a ``(tensor, extras)`` pair.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

Batch = tuple[Tensor, dict[str, Any]]


def check_batch_size(batch_size: int) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    return batch_size


def slice_extras(extras: Mapping[str, Any] | None, start: int, stop: int) -> dict[str, Any]:
    """Slice every tensor in ``extras`` along its batch dim; other values pass through."""
    return {
        k: (v[start:stop] if isinstance(v, Tensor) and v.dim() > 0 else v)
        for k, v in (extras or {}).items()
    }


def iter_batches(
    noise: Tensor | Iterable[Tensor | Batch],
    batch_size: int,
    extras: Mapping[str, Any] | None = None,
) -> Iterator[Batch]:
    """Yield ``(x, extras)`` batches of at most ``batch_size`` samples, in order.

    Tensor input of shape (M, ...) is sliced (extras tensors with it); iterable input is
    re-cut so no batch exceeds ``batch_size``.
    """
    check_batch_size(batch_size)
    if isinstance(noise, Tensor):
        chunks: Iterable[Tensor | Batch] = [(noise, dict(extras or {}))]
    else:
        if extras:
            raise ValueError("pass extras inside the batches when noise is an iterable")
        chunks = noise
    for chunk in chunks:
        x, ex = chunk if isinstance(chunk, tuple) else (chunk, {})
        if not isinstance(x, Tensor) or x.dim() < 1:
            raise ValueError(f"each noise batch must be a tensor of shape (B, ...), got {x!r}")
        for start in range(0, x.shape[0], batch_size):
            stop = min(start + batch_size, x.shape[0])
            yield x[start:stop], slice_extras(ex, start, stop)


def concat(parts: list[Tensor]) -> Tensor:
    if not parts:
        raise ValueError("noise is empty: at least one sample is needed")
    return torch.cat(parts, dim=0)


def collect(
    noise: Tensor | Iterable[Tensor | Batch],
    extras: Mapping[str, Any] | None = None,
) -> Batch:
    """All samples as one (M, ...) tensor plus extras concatenated along the batch dim."""
    if isinstance(noise, Tensor):
        if noise.dim() < 1 or noise.shape[0] == 0:
            raise ValueError("noise is empty: at least one sample is needed")
        return noise, dict(extras or {})
    xs, exs = [], []
    for x, ex in iter_batches(noise, 1 << 62, extras):
        xs.append(x)
        exs.append(ex)
    merged = {
        k: (torch.cat([e[k] for e in exs]) if isinstance(exs[0][k], Tensor) else exs[0][k])
        for k in (exs[0] if exs else {})
    }
    return concat(xs), merged
