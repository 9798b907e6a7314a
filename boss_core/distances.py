"""Sample distances for low-dimensional (e.g. 2-D toy) data: sliced Wasserstein-2 and MMD^2.

Sliced Wasserstein-2 (``swd``), for x of n points and y of m points in R^d:

    SW_2(x, y) = sqrt( (1/L) sum_l W_2^2( theta_l . x, theta_l . y ) ),   theta_l uniform on S^{d-1}

with the exact 1-D W_2 between empirical measures, W_2^2 = int_0^1 (F_x^{-1}(u) - F_y^{-1}(u))^2 du,
evaluated on the merged breakpoints {i/n} U {j/m} of the two step quantile functions (so unequal
n and m are exact, not interpolated). Closed form to check against: for N(0, I_2) against
N(mu, I_2), W_2^2 along theta is (theta . mu)^2, so SW_2 = |mu| / sqrt(2) in two dimensions.

MMD^2 (``mmd``) with the mixture kernel k(a, b) = sum_s exp(-||a - b||^2 / (2 s^2)) over the
bandwidths s; the unbiased estimator (default) drops the i = j terms of the within-set sums,

    MMD_u^2 = sum_{i!=j} k(x_i, x_j) / (n(n-1)) + sum_{i!=j} k(y_i, y_j) / (m(m-1))
              - 2 sum_{i,j} k(x_i, y_j) / (n m),

and can be slightly negative; the biased (V-statistic) one keeps them, is >= 0, and is exactly 0
for identical sets. Everything is computed in float64.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .seeds import sample_seed

_STREAM_SWD = 4  # seed stream of boss_core.seeds for the projection directions


def _check_points(x: Tensor, y: Tensor, min_points: int = 1) -> tuple[Tensor, Tensor]:
    for name, value in (("x", x), ("y", y)):
        if not isinstance(value, Tensor) or value.dim() != 2:
            raise ValueError(f"{name} must be a tensor of shape (n, d)")
        if value.shape[0] < min_points:
            raise ValueError(f"{name} needs at least {min_points} points, got {value.shape[0]}")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x has dimension {x.shape[1]} but y has {y.shape[1]}")
    return x.detach().to("cpu", torch.float64), y.detach().to("cpu", torch.float64)


def random_directions(n_projections: int, dim: int, seed: int) -> Tensor:
    """(n_projections, dim) float64 unit vectors, uniform on the sphere (normalised Gaussians)."""
    if n_projections < 1 or dim < 1:
        raise ValueError(f"n_projections and dim must be >= 1, got {n_projections}, {dim}")
    gen = torch.Generator().manual_seed(sample_seed(seed, 0, _STREAM_SWD))
    theta = torch.randn((n_projections, dim), generator=gen, dtype=torch.float64)
    return theta / theta.norm(dim=1, keepdim=True)


def wasserstein2_1d(a: Tensor, b: Tensor) -> Tensor:
    """Exact W_2^2 between the empirical measures of each row pair (module doc).

    Args:
        a: (L, n) and b: (L, m) float64 samples, one 1-D problem per row.
    Returns:
        (L,) float64 squared distances.
    """
    n, m = a.shape[1], b.shape[1]
    a_sorted, b_sorted = a.sort(dim=1).values, b.sort(dim=1).values
    # breakpoints of both step quantile functions, u in (0, 1]; exact rationals via i*m, j*n
    ticks = torch.unique(torch.cat([torch.arange(1, n + 1) * m, torch.arange(1, m + 1) * n]))
    lower = torch.cat([torch.zeros(1, dtype=ticks.dtype), ticks[:-1]])
    widths = (ticks - lower).to(torch.float64) / (n * m)  # (P,) interval lengths, sum to 1
    # on (lower, tick] the quantile functions take values of index ceil(u n) - 1, ceil(u m) - 1
    i = torch.div(ticks - 1, m, rounding_mode="floor")  # (P,) into a_sorted
    j = torch.div(ticks - 1, n, rounding_mode="floor")  # (P,) into b_sorted
    diff = a_sorted[:, i] - b_sorted[:, j]  # (L, P)
    return (diff * diff * widths).sum(dim=1)


def swd(x: Tensor, y: Tensor, n_projections: int = 256, seed: int = 0) -> float:
    """Sliced Wasserstein-2 distance SW_2 (not squared) between point sets (module doc).

    Args:
        x: (n, d) and y: (m, d) points; n and m may differ.
        n_projections: number L of random directions; seed: picks them (same seed, same theta).
    """
    x64, y64 = _check_points(x, y)
    theta = random_directions(n_projections, x64.shape[1], seed)  # (L, d)
    w2 = wasserstein2_1d(theta @ x64.T, theta @ y64.T)  # (L,) from (L, n) and (L, m)
    return float(w2.mean().sqrt())


def _kernel_sum(a: Tensor, b: Tensor, bandwidths: Tensor, block: int = 1024) -> tuple[float, float]:
    """(sum_{i,j} k(a_i, b_j), sum_i k(a_i, b_i) if same length else 0) for the mixture kernel."""
    total, diag = 0.0, 0.0
    for start in range(0, a.shape[0], block):
        rows = a[start:start + block]  # (r, d)
        d2 = torch.cdist(rows, b).pow(2)  # (r, m) squared distances
        k = torch.exp(-d2.unsqueeze(-1) / (2.0 * bandwidths**2)).sum(dim=-1)  # (r, m)
        total += float(k.sum())
        if a.shape[0] == b.shape[0]:
            diag += float(k.diagonal(offset=start).sum())
    return total, diag


def mmd(x: Tensor, y: Tensor, bandwidths: Sequence[float] = (0.05, 0.1, 0.2, 0.5, 1.0),
        unbiased: bool = True) -> float:
    """MMD^2 between point sets with a mixture of RBF kernels (module doc for both estimators).

    Args:
        x: (n, d) and y: (m, d) points (n, m >= 2 for the unbiased estimator).
        bandwidths: the RBF widths s (> 0), in the units of the data.
    """
    x64, y64 = _check_points(x, y, min_points=2 if unbiased else 1)
    if len(bandwidths) == 0 or min(float(s) for s in bandwidths) <= 0:
        raise ValueError(f"bandwidths must be a non-empty list of positive widths, got "
                         f"{list(bandwidths)}")
    widths = torch.tensor([float(s) for s in bandwidths], dtype=torch.float64)  # (S,)
    n, m = x64.shape[0], y64.shape[0]
    k_xx, diag_x = _kernel_sum(x64, x64, widths)
    k_yy, diag_y = _kernel_sum(y64, y64, widths)
    k_xy, _ = _kernel_sum(x64, y64, widths)
    if unbiased:
        within = (k_xx - diag_x) / (n * (n - 1)) + (k_yy - diag_y) / (m * (m - 1))
        return within - 2 * k_xy / (n * m)
    return k_xx / n**2 + k_yy / m**2 - 2 * k_xy / (n * m)
