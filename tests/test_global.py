import numpy as np
import pytest
import torch
from fields import GaussianField

from boss_core.bellman import global_schedules
from boss_core.grids import uniform_grid
from boss_core.presets import uniform_schedule
from boss_core.sampling import euler_sample
from boss_core.velocity import NFECounter


def field():
    return GaussianField(mu=torch.tensor([2.0, -1.0, 0.5], dtype=torch.float64), s=0.05)


def endpoint_mse(velocity, z, times, teacher):
    return ((euler_sample(velocity, z, times) - teacher) ** 2).sum(1).mean().item()


def test_reported_cost_is_the_resampled_endpoint_error():
    z = torch.randn(64, 3, dtype=torch.float64)
    n = 40
    teacher = euler_sample(field(), z, uniform_grid(n))
    schedules = global_schedules(field(), z, n, 6, batch_size=16)
    assert sorted(schedules) == [1, 2, 3, 4, 5, 6]
    for sched in schedules.values():
        assert sched.indices[0] == 0 and sched.indices[-1] == n
        assert sched.cost == pytest.approx(endpoint_mse(field(), z, sched.times, teacher),
                                           rel=1e-10)


def test_float32_model_cost_matches_resampling():
    f32 = GaussianField(mu=torch.tensor([2.0, -1.0, 0.5]), s=0.05)
    z = torch.randn(50, 3)
    teacher = euler_sample(f32, z, uniform_grid(30))
    for sched in global_schedules(f32, z, 30, 4, batch_size=50).values():
        assert sched.cost == pytest.approx(endpoint_mse(f32, z, sched.times, teacher), rel=1e-6)


def test_greedy_layer_choice_matches_exhaustive_two_step_search():
    # For K = 2 the greedy DP is exact: it must find the best single interior point.
    z = torch.randn(32, 3, dtype=torch.float64)
    n = 20
    teacher = euler_sample(field(), z, uniform_grid(n))
    errors = [endpoint_mse(field(), z, np.array([0.0, m / n, 1.0]), teacher) for m in range(1, n)]
    sched = global_schedules(field(), z, n, 2)[2]
    assert sched.indices == (0, 1 + int(np.argmin(errors)), n)
    assert sched.cost == pytest.approx(min(errors), rel=1e-10)


def test_beats_uniform_on_curved_field():
    z = torch.randn(200, 3, dtype=torch.float64)
    n = 60
    schedules = global_schedules(field(), z, n, 8, batch_size=100)
    held_out = torch.randn(400, 3, dtype=torch.float64)
    teacher = euler_sample(field(), held_out, uniform_grid(n))
    for k in range(2, 9):
        ours = endpoint_mse(field(), held_out, schedules[k].times, teacher)
        base = endpoint_mse(field(), held_out, uniform_schedule(k).times, teacher)
        assert ours < base, k


def test_network_calls_scale_as_k_times_n():
    counter = NFECounter(field())
    n, k_max, m, bs = 30, 5, 40, 20
    global_schedules(counter, torch.randn(m, 3, dtype=torch.float64), n, k_max, batch_size=bs)
    batches = m // bs
    teacher_calls = n * batches
    assert counter.nfe - teacher_calls <= k_max * n * batches
    assert counter.nfe - teacher_calls >= (k_max - 1) * (n - k_max) * batches


def test_bad_input():
    z = torch.randn(4, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="K"):
        global_schedules(field(), z, 5, 6)
    with pytest.raises(ValueError, match="n_steps"):
        global_schedules(field(), z, 0, 1)
    with pytest.raises(ValueError, match="batch_size"):
        global_schedules(field(), z, 5, 2, batch_size=0)
