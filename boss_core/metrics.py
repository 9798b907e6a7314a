"""Sample-quality metrics that need no feature network."""

from __future__ import annotations

import math

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
