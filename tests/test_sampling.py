import numpy as np
import pytest
import torch
from fields import GaussianField, constant_field, quadratic_path_field, straight_field

from boss_core.grids import uniform_grid
from boss_core.sampling import euler_sample, euler_trajectory, heun_sample
from boss_core.velocity import (
    DiffusersFlowAdapter,
    NFECounter,
    RectifiedFlowAdapter,
    VelocityError,
)

GRID = np.array([0.0, 0.07, 0.3, 0.31, 0.8, 1.0])  # deliberately uneven


def test_euler_exact_for_constant_field():
    z = torch.randn(5, 3, dtype=torch.float64)
    b = torch.tensor([0.5, -2.0, 3.0], dtype=torch.float64)
    out = euler_sample(constant_field(b), z, GRID)
    torch.testing.assert_close(out, z + b, rtol=0, atol=1e-14)


def test_euler_exact_for_straight_paths():
    z = torch.randn(7, 2, 3, dtype=torch.float64)
    x1 = torch.randn(7, 2, 3, dtype=torch.float64)
    out = euler_sample(straight_field(x1), z, GRID)
    torch.testing.assert_close(out, x1, rtol=0, atol=1e-13)


def test_heun_exact_for_quadratic_paths_and_euler_error_closed_form():
    z = torch.randn(4, 2, dtype=torch.float64)
    b = torch.tensor([1.0, -1.0], dtype=torch.float64)
    c = torch.tensor([2.0, 0.5], dtype=torch.float64)
    field = quadratic_path_field(b, c)
    torch.testing.assert_close(heun_sample(field, z, GRID), z + b + c, rtol=0, atol=1e-13)
    euler_err = -c * float(np.sum(np.diff(GRID) ** 2))
    torch.testing.assert_close(euler_sample(field, z, GRID), z + b + c + euler_err,
                               rtol=0, atol=1e-13)


def test_samplers_converge_on_gaussian_field():
    field = GaussianField(mu=torch.tensor([2.0, -1.0], dtype=torch.float64), s=0.2)
    z = torch.randn(16, 2, dtype=torch.float64)
    exact = field.exact(z)
    err_euler = (euler_sample(field, z, uniform_grid(400)) - exact).abs().max().item()
    err_heun = (heun_sample(field, z, uniform_grid(50)) - exact).abs().max().item()
    # first order: 0.0026 at N=400 here; second order: 4.8e-4 at N=50
    assert err_euler < 5e-3
    assert err_heun < 1e-3
    coarse = (euler_sample(field, z, uniform_grid(4)) - exact).abs().max().item()
    assert coarse > 10 * err_euler  # the oracle can tell a bad integration


def test_euler_keeps_noise_dtype():
    z = torch.randn(3, 2, dtype=torch.float32)
    b = torch.tensor([1.0, 2.0], dtype=torch.float64)
    out = euler_sample(lambda x, t: b.expand(x.shape[0], 2), z, GRID)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, z + b.float())


def test_times_passed_to_model_have_x_dtype_and_batch_shape():
    seen = []

    def v(x, t):
        seen.append((t.dtype, tuple(t.shape), t[0].item()))
        return torch.zeros_like(x)

    euler_sample(v, torch.zeros(6, 2, dtype=torch.float32), torch.tensor(GRID))
    assert seen == [(torch.float32, (6,), pytest.approx(float(np.float32(t)))) for t in GRID[:-1]]


def test_trajectory_matches_sampler_bitwise_and_records_velocities():
    field = GaussianField(mu=torch.tensor([1.0, 0.0]), s=0.3)
    z = torch.randn(5, 2)
    traj = euler_trajectory(field, z, GRID)
    assert torch.equal(traj.final, euler_sample(field, z, GRID))
    for k in range(len(GRID) - 1):
        t_k = torch.full((5,), GRID[k], dtype=torch.float32)
        assert torch.equal(traj.velocities[k], field(traj.states[k], t_k))
    assert torch.equal(traj.states[0], z)


def test_nfe_counter_counts_calls_and_samples():
    counter = NFECounter(lambda x, t: torch.zeros_like(x))
    euler_sample(counter, torch.zeros(3, 1), GRID)
    heun_sample(counter, torch.zeros(3, 1), GRID)
    steps = len(GRID) - 1
    assert counter.nfe == 3 * steps
    assert counter.n_evaluations == 9 * steps


def test_extras_pass_through_untouched():
    labels = torch.tensor([3, 1])

    def v(x, t, y):
        assert y is labels
        return y.to(x.dtype)[:, None].expand_as(x)

    out = euler_sample(v, torch.zeros(2, 4), GRID, extras={"y": labels})
    torch.testing.assert_close(out, labels.float()[:, None].expand(2, 4))


def test_rectified_flow_adapter_label():
    labels = []

    def net(x, label):
        labels.append(label.clone())
        return torch.ones_like(x)

    adapter = RectifiedFlowAdapter(net)
    out = adapter(torch.zeros(3, 2), torch.tensor([0.0, 0.5, 1.0]))
    torch.testing.assert_close(out, torch.ones(3, 2))
    eps = 1e-3
    expected = torch.tensor([eps, eps + (1 - eps) * 0.5, 1.0]) * 999
    torch.testing.assert_close(labels[0], expected)


def test_diffusers_adapter_sigma_timestep_and_sign():
    class Out:
        def __init__(self, sample):
            self.sample = sample

    def net(x, timestep):  # predicts noise - data = -(velocity)
        return Out(x * timestep[:, None])

    adapter = DiffusersFlowAdapter(net)
    x, t = torch.randn(3, 2), torch.tensor([0.0, 0.25, 1.0])
    torch.testing.assert_close(adapter(x, t), -x * ((1 - t) * 1000)[:, None])


@pytest.mark.parametrize("sampler", [euler_sample, heun_sample, euler_trajectory])
def test_bad_velocity_output_names_the_step(sampler):
    def wrong_shape(x, t):
        return torch.zeros(x.shape[0], 1) if t[0] > 0.5 else torch.zeros_like(x)

    heun = sampler is heun_sample  # Heun's corrector reaches t_{k+1} within step k
    with pytest.raises(VelocityError, match=r"step 3 \(corrector\).*shape" if heun
                       else r"step 4 .*shape"):
        sampler(wrong_shape, torch.zeros(2, 3), GRID)

    def nan_at_step_2(x, t):
        return torch.full_like(x, float("nan")) if abs(t[0] - 0.3) < 1e-6 else x

    with pytest.raises(VelocityError, match=r"step 1 \(corrector\).*NaN" if heun
                       else r"step 2 .*NaN"):
        sampler(nan_at_step_2, torch.zeros(2, 3), GRID)


@pytest.mark.parametrize("times", [[0.0, 0.5, 0.5, 1.0], [0.1, 1.0], [0.0, 0.9], [0.0],
                                   [0.0, float("nan"), 1.0], [[0.0, 1.0]]])
def test_bad_grid_raises_before_any_call(times):
    calls = NFECounter(lambda x, t: x)
    with pytest.raises(ValueError):
        euler_sample(calls, torch.zeros(1, 1), times)
    assert calls.nfe == 0
