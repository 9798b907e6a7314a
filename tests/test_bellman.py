import itertools

import numpy as np
import pytest
import torch
from fields import GaussianField

from boss_core.bellman import bellman_schedule, bellman_schedules
from boss_core.cost import cost_matrix
from boss_core.grids import uniform_grid
from boss_core.presets import uniform_schedule
from boss_core.sampling import euler_sample


def brute_force(cost: np.ndarray, k: int, discount: float = 1.0):
    """Every path 0 -> N with k jumps, in lexicographic order; the first minimum wins."""
    n = cost.shape[0] - 1
    best, best_path = np.inf, None
    for inner in itertools.combinations(range(1, n), k - 1):
        path = (0, *inner, n)
        total = sum(discount**s * cost[a, b] for s, (a, b) in enumerate(itertools.pairwise(path)))
        if total < best:
            best, best_path = total, path
    return best, best_path


def random_cost(rng, n):
    return np.triu(rng.random((n + 1, n + 1)), k=1)


@pytest.mark.parametrize("n", [1, 2, 5, 9, 14])
def test_dp_matches_brute_force(n):
    rng = np.random.default_rng(n)
    cost = random_cost(rng, n)
    schedules = bellman_schedules(cost, min(5, n))
    for k, sched in schedules.items():
        best, path = brute_force(cost, k)
        assert sched.indices == path
        assert sched.cost == pytest.approx(best, rel=1e-12)
        np.testing.assert_array_equal(sched.times, np.array(path) / n)


def test_ties_take_the_earliest_index():
    # Small integer costs make many paths tie exactly; sums of integers are exact.
    rng = np.random.default_rng(7)
    for _ in range(20):
        n = int(rng.integers(4, 11))
        cost = np.triu(rng.integers(0, 3, size=(n + 1, n + 1)).astype(float), k=1)
        for k, sched in bellman_schedules(cost, min(5, n)).items():
            best, path = brute_force(cost, k)
            assert sched.cost == best
            assert sched.indices == path


def test_all_zero_cost_gives_earliest_path():
    sched = bellman_schedule(np.zeros((8, 8)), 3)
    assert sched.indices == (0, 1, 2, 7)


@pytest.mark.parametrize("discount", [0.5, 1.15, 2.0])
def test_discounted_dp_matches_brute_force(discount):
    rng = np.random.default_rng(11)
    cost = random_cost(rng, 12)
    for k, sched in bellman_schedules(cost, 5, discount=discount).items():
        best, path = brute_force(cost, k, discount)
        assert sched.indices == path
        assert sched.cost == pytest.approx(best, rel=1e-12)


def test_one_pass_equals_separate_runs():
    cost = random_cost(np.random.default_rng(3), 30)
    table = bellman_schedules(cost, 8)
    for k in (1, 4, 8):
        assert bellman_schedule(cost, k).indices == table[k].indices


def test_bellman_beats_uniform_on_curved_field():
    field = GaussianField(mu=torch.tensor([2.0, -1.0, 0.5], dtype=torch.float64), s=0.05)
    n = 100
    cost = cost_matrix(field, torch.randn(200, 3, dtype=torch.float64), n, batch_size=64)
    z = torch.randn(500, 3, dtype=torch.float64)  # fresh noise: held-out evaluation
    teacher = euler_sample(field, z, uniform_grid(n))
    for k, sched in bellman_schedules(cost, 8).items():
        if k < 2:
            continue
        def err(times):
            return ((euler_sample(field, z, times) - teacher) ** 2).sum(1).mean().item()
        assert err(sched.times) < err(uniform_schedule(k).times), k


BAD_COSTS = [
    (np.zeros((3, 4)), "N\\+1"),
    (np.zeros((1, 1)), "N >= 1"),
    (np.where(np.eye(4) > 0, np.nan, 0.0), "NaN"),
    (np.triu(np.full((4, 4), -1.0), k=1), "negative"),
    (np.triu(np.full((4, 4), np.inf), k=1), "non-finite"),
]


@pytest.mark.parametrize(("cost", "message"), BAD_COSTS)
def test_bad_cost_raises(cost, message):
    with pytest.raises(ValueError, match=message):
        bellman_schedules(cost, 1)


def test_inf_below_diagonal_is_fine_and_bad_k_raises():
    cost = np.triu(np.ones((5, 5)), k=1)
    cost[np.tril_indices(5)] = np.inf
    assert bellman_schedule(cost, 4).indices == (0, 1, 2, 3, 4)
    for k in (0, 5, -1, 2.5):
        with pytest.raises(ValueError, match="K"):
            bellman_schedule(cost, k)
    with pytest.raises(ValueError, match="discount"):
        bellman_schedule(cost, 2, discount=0.0)
