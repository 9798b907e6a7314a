"""Sample-quality metrics that need no feature network, and the multi-seed aggregate."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor


def endpoint_rmse(samples: Tensor, reference: Tensor) -> float:
    """sqrt( mean_m || x^m - x_ref^m ||^2 ), the norm summed over every non-batch dim.

    Args:
        samples: (M, ...) K-step samples.
        reference: (M, ...) N-step teacher samples from the same noises.
    """
    if samples.shape != reference.shape:
        raise ValueError(f"samples {tuple(samples.shape)} and reference "
                         f"{tuple(reference.shape)} must have the same shape")
    if samples.shape[0] == 0:
        raise ValueError("endpoint_rmse needs at least one sample")
    diff = (samples.to(torch.float64) - reference.to(torch.float64)).reshape(samples.shape[0], -1)
    return math.sqrt(float((diff * diff).sum(dim=1).mean()))


def aggregate(values: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Mean and population std over seeds: for each key k, ``k`` = mean_s v_s[k] and
    ``k_std`` = sqrt( mean_s (v_s[k] - mean)^2 ) (``np.std(ddof=0)``), plus ``n_seeds``.

    Args:
        values: one dict of metrics per seed, all with the same keys.
    Raises:
        ValueError: fewer than 2 seeds (no spread to report), mismatching keys, or a key that
            would clash with an output name (``k`` and ``k_std`` both given, or ``n_seeds``).
    """
    if len(values) < 2:
        raise ValueError(f"n_seeds must be >= 2 to report a std, got {len(values)} result(s)")
    keys = list(values[0])
    for index, row in enumerate(values):
        if set(row) != set(keys):
            raise ValueError(f"seed {index} has keys {sorted(row)}, seed 0 has {sorted(keys)}")
    clashes = sorted(k for k in keys if k.endswith("_std") and k[:-4] in keys)
    if clashes or "n_seeds" in keys:
        raise ValueError(f"keys {clashes or ['n_seeds']} would clash with the aggregate's own "
                         "'<key>_std' / 'n_seeds' names; rename them first")
    out: dict[str, float] = {}
    for key in keys:
        column = np.array([float(row[key]) for row in values], dtype=np.float64)  # (n_seeds,)
        out[key] = float(column.mean())
        out[f"{key}_std"] = float(column.std(ddof=0))
    out["n_seeds"] = len(values)
    return out


def class_accuracy(predicted: Tensor, labels: Tensor) -> float:
    """The fraction of samples whose predicted class equals the label they were drawn at:
    (1/M) sum_m [pred_m = y_m]. predicted, labels: (M,) integer tensors."""
    if predicted.shape != labels.shape or predicted.dim() != 1 or predicted.shape[0] == 0:
        raise ValueError(f"predicted {tuple(predicted.shape)} and labels "
                         f"{tuple(labels.shape)} must be the same non-empty (M,) shape")
    return float((predicted.cpu().long() == labels.cpu().long()).double().mean())
