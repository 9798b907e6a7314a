"""Sliced Wasserstein-2 and MMD^2 against closed forms and brute force."""

import math
from itertools import pairwise

import pytest
import torch

from boss_core.distances import mmd, random_directions, swd, wasserstein2_1d


def gaussian(n, seed, mean=(0.0, 0.0)):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((n, 2), generator=gen, dtype=torch.float64) + torch.tensor(mean)


def test_swd_identical_sets_and_duplicated_points_are_zero():
    x = gaussian(300, 0)
    assert swd(x, x) == 0.0
    # x repeated twice is the same empirical measure with a different count (n=300 vs m=600)
    assert swd(x, torch.cat([x, x.flip(0)]), n_projections=64) < 1e-12


def test_swd_of_a_translated_copy_matches_the_projected_shift_exactly():
    # theta.(x + mu) = theta.x + theta.mu, so W_2^2 along theta is exactly (theta.mu)^2
    x = gaussian(500, 1)
    mu = torch.tensor([0.7, -0.3], dtype=torch.float64)
    theta = random_directions(128, 2, seed=5)
    expected = math.sqrt(float(((theta @ mu) ** 2).mean()))
    assert swd(x, x + mu, n_projections=128, seed=5) == pytest.approx(expected, rel=1e-10)


def test_swd_between_gaussians_matches_closed_form():
    # N(0, I) vs N(mu, I) in 2-D: SW_2^2 = E_theta (theta.mu)^2 = |mu|^2 / 2
    mu = (1.2, 0.0)
    value = swd(gaussian(5000, 2), gaussian(5000, 3, mean=mu), n_projections=2000, seed=0)
    assert value == pytest.approx(1.2 / math.sqrt(2.0), rel=0.03)


def test_wasserstein_1d_unequal_counts_matches_quantile_integral():
    gen = torch.Generator().manual_seed(4)
    a, b = torch.randn((3, 7), generator=gen).double(), torch.randn((3, 4), generator=gen).double()
    # midpoint rule on a grid that refines every breakpoint i/7 and j/4: exact for step functions
    grid = (torch.arange(7 * 4 * 10, dtype=torch.float64) + 0.5) / (7 * 4 * 10)
    qa = a.sort(dim=1).values[:, (grid * 7).floor().long()]
    qb = b.sort(dim=1).values[:, (grid * 4).floor().long()]
    brute = ((qa - qb) ** 2).mean(dim=1)
    torch.testing.assert_close(wasserstein2_1d(a, b), brute, rtol=1e-12, atol=1e-14)


def test_swd_grows_with_shift():
    x, y = gaussian(800, 5), gaussian(800, 6)
    values = [swd(x, y + torch.tensor([s, s]), seed=1) for s in (0.0, 0.25, 0.5, 1.0, 2.0)]
    assert all(a < b for a, b in pairwise(values)), values


def brute_mmd(x, y, bandwidths, unbiased):
    def k(a, b):
        d2 = float(((a - b) ** 2).sum())
        return sum(math.exp(-d2 / (2 * s * s)) for s in bandwidths)

    n, m = len(x), len(y)
    sxx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if not unbiased or i != j)
    syy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if not unbiased or i != j)
    sxy = sum(k(x[i], y[j]) for i in range(n) for j in range(m))
    if unbiased:
        return sxx / (n * (n - 1)) + syy / (m * (m - 1)) - 2 * sxy / (n * m)
    return sxx / n**2 + syy / m**2 - 2 * sxy / (n * m)


@pytest.mark.parametrize("unbiased", [True, False])
def test_mmd_matches_double_loop(unbiased):
    x, y = gaussian(9, 7), gaussian(6, 8, mean=(0.5, 0.0))
    widths = (0.3, 1.0, 2.5)
    assert mmd(x, y, widths, unbiased=unbiased) == pytest.approx(
        brute_mmd(x, y, widths, unbiased), rel=1e-12, abs=1e-14)


def test_mmd_is_zero_for_identical_sets_and_grows_with_shift():
    x, y = gaussian(1000, 9), gaussian(1000, 10)
    assert abs(mmd(x, x, unbiased=False)) < 1e-12  # a squared RKHS norm of exactly zero
    # the unbiased estimator is unbiased for independent sets: about 0 at no shift
    values = [mmd(x, y + torch.tensor([s, 0.0])) for s in (0.0, 0.4, 0.8, 1.6)]
    assert abs(values[0]) < 0.3 * values[1]
    assert all(a < b for a, b in pairwise(values)), values
    biased = [mmd(x, y + torch.tensor([s, 0.0]), unbiased=False) for s in (0.0, 0.4, 0.8, 1.6)]
    assert all(0 <= a < b for a, b in pairwise(biased)), biased


def test_bad_inputs_are_named():
    x = gaussian(10, 0)
    with pytest.raises(ValueError, match="dimension"):
        swd(x, torch.zeros((10, 3)))
    with pytest.raises(ValueError, match="bandwidths"):
        mmd(x, x, bandwidths=(1.0, 0.0))
    with pytest.raises(ValueError, match="y needs at least 2 points"):
        mmd(x, x[:1])
    with pytest.raises(ValueError, match=r"x must be a tensor of shape \(n, d\)"):
        swd(x[:, 0], x)
