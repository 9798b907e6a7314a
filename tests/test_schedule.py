"""Contract test over every schedule builder, plus presets and exports."""

import json

import numpy as np
import pytest
import torch
from fields import GaussianField

from boss_core.bellman import bellman_schedules, global_schedules
from boss_core.cost import cost_matrix
from boss_core.presets import PRESETS, edm_schedule, preset_schedule, shift_schedule
from boss_core.schedule import Schedule, schedules_from_json, schedules_to_json

N = 24
K_MAX = 10
FIELD = GaussianField(mu=torch.tensor([1.0, -1.0], dtype=torch.float64), s=0.1)
Z = torch.randn(16, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


def all_builders():
    yield from ((name, lambda k, f=f: f(k)) for name, f in PRESETS.items())
    bell = bellman_schedules(cost_matrix(FIELD, Z, N), K_MAX)
    yield "bellman", bell.__getitem__
    glob = global_schedules(FIELD, Z, N, K_MAX)
    yield "bellman_global", glob.__getitem__
    yield "from_indices", lambda k: Schedule.from_indices(np.linspace(0, N, k + 1).round(), N)


@pytest.mark.parametrize(("name", "build"), list(all_builders()), ids=lambda v: str(v)[:16])
def test_schedule_contract(name, build):
    for k in range(1, K_MAX + 1):
        sched = build(k)
        t = sched.times
        assert t.dtype == np.float64
        assert t.shape == (k + 1,)
        assert t[0] == 0.0 and t[-1] == 1.0
        assert np.all(np.diff(t) > 0)
        assert sched.nfe == k
        assert not t.flags.writeable
        if sched.indices is not None:
            np.testing.assert_array_equal(t, np.array(sched.indices) / sched.n_steps)


def test_shift_formula():
    # sigma = 1 - t, sigma' = s sigma / (1 + (s - 1) sigma)
    k, s = 7, 3.0
    sched = shift_schedule(k, shift=s)
    sigma = 1 - np.arange(k + 1) / k
    np.testing.assert_allclose(1 - sched.times, s * sigma / (1 + (s - 1) * sigma), atol=1e-15)
    assert np.all(np.diff(sched.times)[:3] < 1.0 / k)  # s > 1 crowds steps near the noise
    np.testing.assert_allclose(shift_schedule(k, shift=1.0).times, np.arange(k + 1) / k, atol=1e-15)


def test_edm_formula():
    k, rho, lo, hi = 6, 7.0, 0.002, 80.0
    sched = edm_schedule(k)
    sigma = (1 / (sched.times[1:-1]) - 1) ** (1 / rho)  # invert t = 1 / (1 + sigma)
    ramp = hi ** (1 / rho) + np.arange(1, k) / (k - 1) * (lo ** (1 / rho) - hi ** (1 / rho))
    np.testing.assert_allclose(sigma, ramp, rtol=1e-10)
    assert sched.times[0] == 0.0


def test_exports_round_trip():
    sched = Schedule.from_indices([0, 3, 10, 24], 24, cost=0.25, name="bellman")
    back = Schedule.from_json(sched.to_json())
    np.testing.assert_array_equal(back.times, sched.times)
    assert (back.indices, back.cost, back.name) == (sched.indices, 0.25, "bellman")
    assert back.n_steps == 24
    grid = sched.time_grid()
    assert grid.dtype == torch.float64
    np.testing.assert_array_equal(grid.numpy(), sched.times)
    np.testing.assert_array_equal(sched.to_diffusers_sigmas(), 1 - sched.times[:-1])
    table = {3: sched, 1: Schedule.from_indices([0, 24], 24)}
    loaded = schedules_from_json(schedules_to_json(table))
    assert {k: v.indices for k, v in loaded.items()} == {k: v.indices for k, v in table.items()}
    assert list(json.loads(schedules_to_json(table))) == ["1", "3"]


@pytest.mark.parametrize("times", [[0.0, 0.5, 0.4, 1.0], [0.0, 1.0 + 1e-16, 1.0],
                                   [1e-9, 1.0], [0.0, 0.999999], [0.0, float("inf"), 1.0]])
def test_bad_grid_rejected(times):
    with pytest.raises(ValueError, match="times"):
        Schedule(times=times)


def test_bad_builder_arguments():
    for k in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="K"):
            preset_schedule("uniform", k)
    with pytest.raises(ValueError, match="unknown preset"):
        preset_schedule("cosine", 4)
    with pytest.raises(ValueError, match="indices"):
        Schedule.from_indices([0, 5, 9], 10)
    with pytest.raises(ValueError, match="unknown schedule keys"):
        Schedule.from_dict({"times": [0, 1], "colour": 1})
