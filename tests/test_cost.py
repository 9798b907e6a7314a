import numpy as np
import pytest
import torch
from fields import GaussianField, quadratic_path_field

from boss_core.cost import CostMatrix, cost_matrix
from boss_core.velocity import NFECounter

# Gram-form rounding on c(i, i+1) for unit-scale data in float64 ("a few 1e-13").
DIAG_TOL = 1e-12


def curved_field(dtype=torch.float64):
    return GaussianField(mu=torch.tensor([1.5, -0.5, 0.25], dtype=dtype), s=0.1)


def test_hand_computed_case():
    # v(x, t) = x, N = 2 (h = 1/2): x_1 = 1.5 x_0, x_2 = 2.25 x_0.
    # c(0, 2) = mean ||x_2 - x_0 - 1 * x_0||^2 = mean ||0.25 x_0||^2 = 0.0625 * mean(5, 9).
    z = torch.tensor([[1.0, 2.0], [3.0, 0.0]], dtype=torch.float64)
    cost = cost_matrix(lambda x, t: x, z, 2, batch_size=1)
    assert cost.n_samples == 2
    assert cost.values[0, 2] == pytest.approx(0.4375, rel=1e-14)
    assert cost.values[0, 1] == pytest.approx(0.0, abs=DIAG_TOL)
    assert cost.values[1, 2] == pytest.approx(0.0, abs=DIAG_TOL)
    assert cost.sum[0, 2] == pytest.approx(0.875, rel=1e-14)
    assert np.isinf(cost.values[np.tril_indices(3)]).all()


def test_closed_form_for_quadratic_paths():
    # v = b + 2 c t on t_i = i / N: c(i, j) = ||c||^2 h^4 (j - i)^2 (j - i - 1)^2, h = 1 / N.
    n = 12
    c = torch.tensor([0.7, -1.3], dtype=torch.float64)
    field = quadratic_path_field(torch.tensor([1.0, 2.0], dtype=torch.float64), c)
    cost = cost_matrix(field, torch.randn(9, 2, dtype=torch.float64), n, batch_size=4)
    i, j = np.triu_indices(n + 1, k=1)
    expected = float(c @ c) * (1.0 / n) ** 4 * ((j - i) ** 2 * (j - i - 1) ** 2)
    np.testing.assert_allclose(cost.values[i, j], expected, rtol=1e-9, atol=1e-13)


def test_adjacent_jumps_cost_zero():
    z = torch.randn(50, 3, dtype=torch.float64)
    gram = cost_matrix(curved_field(), z, 30, batch_size=16)
    assert np.abs(np.diag(gram.values, 1)).max() <= DIAG_TOL
    # Computed as a residual in the model's dtype, the teacher's own step is exactly 0.
    z32 = z.float()
    direct = cost_matrix(curved_field(torch.float32), z32, 30, batch_size=16, method="direct")
    assert np.all(np.diag(direct.values, 1) == 0.0)


def test_gram_matches_direct_residuals():
    z = torch.randn(40, 3, dtype=torch.float64)
    gram = cost_matrix(curved_field(), z, 25, batch_size=7)
    direct = cost_matrix(curved_field(), z, 25, batch_size=7, method="direct")
    i, j = np.triu_indices(26, k=2)
    np.testing.assert_allclose(gram.values[i, j], direct.values[i, j], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("method", ["gram", "direct"])
def test_independent_of_batch_size(method):
    # 1e-10 relative per entry, plus for the Gram form a floor of 1e-13 of the largest
    # entry: its float64 GEMM rounds each entry by ~1e-16 of the squared bend of the paths
    # (measured 1.4e-17 absolute here, on entries up to 2e-2), which dominates only the
    # tiny near-diagonal entries. The direct form is per-sample exact, so no floor.
    z = torch.randn(60, 3, dtype=torch.float64)
    ref = cost_matrix(curved_field(), z, 20, batch_size=60, method=method).values
    i, j = np.triu_indices(21, k=1)
    floor = 1e-13 * ref[i, j].max() if method == "gram" else 0.0
    for bs in (1, 7, 32):
        other = cost_matrix(curved_field(), z, 20, batch_size=bs, method=method).values
        np.testing.assert_allclose(other[i, j], ref[i, j], rtol=1e-10, atol=floor)


def test_shards_merge_to_single_pass():
    z = torch.randn(48, 3, dtype=torch.float64)
    whole = cost_matrix(curved_field(), z, 16, batch_size=8)
    shards = [cost_matrix(curved_field(), z[a:a + 16], 16, batch_size=8) for a in (0, 16, 32)]
    merged = shards[0].merge(shards[1]) + shards[2]
    assert merged.n_samples == 48
    np.testing.assert_allclose(merged.sum, whole.sum, rtol=1e-12, atol=1e-14)
    i, j = np.triu_indices(17, k=1)
    np.testing.assert_allclose(merged.values[i, j], whole.values[i, j], rtol=1e-12, atol=1e-14)
    # An unequal split is weighted by sample counts, not averaged per shard.
    uneven = cost_matrix(curved_field(), z[:5], 16) + cost_matrix(curved_field(), z[5:], 16)
    np.testing.assert_allclose(uneven.values[i, j], whole.values[i, j], rtol=1e-12, atol=1e-14)


def test_iterable_of_batches_matches_tensor_and_is_streamed():
    z = torch.randn(30, 3, dtype=torch.float64)
    consumed = []

    def batches():
        for a in range(0, 30, 10):
            consumed.append(a)
            yield z[a:a + 10]

    counter = NFECounter(curved_field())
    streamed = cost_matrix(counter, batches(), 10, batch_size=4)
    assert consumed == [0, 10, 20]
    assert counter.nfe == 10 * 9  # N calls per batch of <= 4: batches of 4, 4, 2 per chunk
    ref = cost_matrix(curved_field(), z, 10, batch_size=4)
    np.testing.assert_allclose(streamed.sum, ref.sum, rtol=1e-12, atol=30 * DIAG_TOL)


def test_network_calls_are_only_the_teacher_steps():
    counter = NFECounter(curved_field())
    cost_matrix(counter, torch.randn(20, 3, dtype=torch.float64), 15, batch_size=10)
    assert counter.nfe == 2 * 15


def test_merge_rejects_other_grid_and_bad_input():
    a = cost_matrix(curved_field(), torch.randn(4, 3, dtype=torch.float64), 5)
    b = cost_matrix(curved_field(), torch.randn(4, 3, dtype=torch.float64), 6)
    with pytest.raises(ValueError, match="different grids"):
        a.merge(b)
    with pytest.raises(ValueError, match="n_steps"):
        cost_matrix(curved_field(), torch.randn(4, 3), 0)
    with pytest.raises(ValueError, match="batch_size"):
        cost_matrix(curved_field(), torch.randn(4, 3), 5, batch_size=0)
    with pytest.raises(ValueError, match="empty"):
        cost_matrix(curved_field(), iter([]), 5)
    with pytest.raises(ValueError, match="n_samples"):
        CostMatrix(np.zeros((3, 3)), 0)


def test_heun_teacher_closed_form_for_quadratic_paths():
    # Heun follows x_t = z + b t + c t^2 exactly, so c(i, j) = ||c||^2 (t_j - t_i)^4.
    n = 10
    c = torch.tensor([0.7, -1.3], dtype=torch.float64)
    field = quadratic_path_field(torch.tensor([1.0, 2.0], dtype=torch.float64), c)
    counter = NFECounter(field)
    cost = cost_matrix(counter, torch.randn(5, 2, dtype=torch.float64), n, solver="heun")
    assert counter.nfe == 2 * n
    i, j = np.triu_indices(n + 1, k=1)
    np.testing.assert_allclose(cost.values[i, j], float(c @ c) * ((j - i) / n) ** 4,
                               rtol=1e-9, atol=1e-15)
    with pytest.raises(ValueError, match="solver"):
        cost_matrix(field, torch.randn(5, 2), n, solver="rk4")
