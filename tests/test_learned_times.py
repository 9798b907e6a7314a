"""Learned step times (boss_core/learned_times.py): the parametrisation, the gradient through
the Euler solver, the optimum against brute force on a closed-form field, the row through the
sweep with its network calls, and its options."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from fields import GaussianField, constant_field

from boss_core import protocol
from boss_core.bellman import bellman_schedules
from boss_core.distances import swd
from boss_core.grids import uniform_grid
from boss_core.learned_times import (
    LearnTimesConfig,
    endpoint_loss,
    euler_endpoint,
    learn_times,
    learned_schedules,
    logits_of,
    teacher_endpoints,
    times_of,
)
from boss_core.methods import REGISTRY, MethodOptions, grid_search_names
from boss_core.seeds import sample_noise, search_seed
from boss_core.shards import cost_shard
from boss_core.straighten import StraightenConfig
from boss_core.sweep import SweepConfig, run_sweep
from boss_core.velocity import NFECounter
from tasks.runtime.params import ParamsError, load_params

CURVED = GaussianField(torch.tensor([2.0, -1.0], dtype=torch.float64), s=0.05)  # bends near 1
N = 100


def test_times_are_sorted_with_exact_ends_and_logits_invert_them():
    gen = torch.Generator().manual_seed(0)
    for k in (1, 2, 5, 9):
        theta = 3.0 * torch.randn(k, generator=gen, dtype=torch.float64)
        t = times_of(theta)
        assert t.shape == (k + 1,)
        assert float(t[0]) == 0.0 and float(t[-1]) == 1.0  # exactly, not up to rounding
        assert bool((torch.diff(t) > 0).all())
        np.testing.assert_allclose(torch.diff(t)[:-1], torch.softmax(theta, 0)[:-1],
                                   rtol=1e-12)
        np.testing.assert_allclose(times_of(logits_of(t)), t, rtol=0, atol=1e-15)
    np.testing.assert_array_equal(times_of(torch.zeros(4, dtype=torch.float64)),
                                  [0.0, 0.25, 0.5, 0.75, 1.0])
    with pytest.raises(ValueError, match="theta"):
        times_of(torch.zeros((2, 2)))


def test_gradient_of_the_euler_end_point_wrt_theta_matches_finite_differences():
    z = torch.randn(5, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    theta = torch.tensor([0.3, -0.2, 0.1, 0.4], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda th: euler_endpoint(CURVED, z, times_of(th)),
                                    (theta,), eps=1e-6, atol=1e-7)


def test_the_network_weights_get_no_gradient_and_backward_passes_count_two():
    net = torch.nn.Linear(3, 2).double()
    counter = NFECounter(lambda x, t: net(torch.cat([x, t[:, None]], 1)))
    z = torch.randn(7, 2, dtype=torch.float64)
    targets = teacher_endpoints(counter, z, 10, 4)  # 2 chunks x 10 steps, no gradient
    assert (counter.nfe, counter.n_evaluations) == (20, 70)
    counter.reset()
    config = LearnTimesConfig(iterations=3, batch_size=5, lr=0.1, init="uniform")
    result = learn_times(counter, z, targets, uniform_grid(3), config, batch_size=4)
    assert all(p.grad is None for p in net.parameters())
    # 3 iterations x 3 steps x (1 forward + 2 backward), the full loss twice in 2 chunks
    assert result.nfe == counter.nfe == 3 * 3 * 3 + 2 * 2 * 3
    assert result.evaluations == counter.n_evaluations == 3 * 3 * 3 * 5 + 2 * 3 * 7


def _endpoints_of_many(field, z: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
    """(C, M, D) K-step Euler end points of the (M, D) noises on each of C grids (C, K + 1)."""
    c, m = times.shape[0], z.shape[0]
    x = z.repeat(c, 1)  # (C M, D): grid-major
    for k in range(times.shape[1] - 1):
        t_cur = times[:, k].repeat_interleave(m)  # (C M,)
        h = (times[:, k + 1] - times[:, k]).repeat_interleave(m)[:, None]  # (C M, 1)
        x = x + h * field(x, t_cur)
    return x.reshape(c, m, -1)


def _brute_force(z, targets, k: int, points: int):
    """min over every grid with interior times on {1/points, ..} (K = 2, 3): (loss, times)."""
    inner = np.arange(1, points) / points
    grids = [(0.0, *c, 1.0) for c in itertools.combinations(inner, k - 1)]
    times = torch.tensor(grids, dtype=torch.float64)  # (C, K + 1)
    ends = _endpoints_of_many(CURVED, z, times)  # (C, M, D)
    loss = ((ends - targets[None]) ** 2).sum(-1).mean(-1)  # (C,)
    best = int(loss.argmin())
    return float(loss[best]), times[best]


@pytest.mark.parametrize("k, points", [(2, 1000), (3, 120)])
def test_learned_times_reach_the_brute_force_optimum_and_beat_uniform(k, points):
    z = torch.randn(128, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    targets = teacher_endpoints(CURVED, z, N, 128)
    best, best_times = _brute_force(z, targets, k, points)
    config = LearnTimesConfig(iterations=300, lr=0.1, batch_size=128, samples=128,
                              init="uniform")
    result = learn_times(CURVED, z, targets, uniform_grid(k), config)
    uniform = float(endpoint_loss(euler_endpoint(CURVED, z, torch.tensor(uniform_grid(k))),
                                  targets))
    assert result.start_loss == pytest.approx(uniform, rel=1e-12)
    assert uniform > 3 * best  # uniform is far from optimal on this field
    assert result.schedule.cost == result.end_loss
    assert result.end_loss <= best * 1.01  # the grid's optimum is an upper bound
    np.testing.assert_allclose(result.schedule.times, best_times, atol=3.0 / points)
    assert result.schedule.indices is None and result.schedule.name == "learned_times"


def test_on_a_field_constant_in_time_every_schedule_is_exact():
    b = torch.tensor([0.7, -1.3], dtype=torch.float64)
    z = torch.randn(64, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    targets = z + b
    result = learn_times(constant_field(b), z, targets, [0.0, 0.1, 0.15, 1.0],
                         LearnTimesConfig(iterations=20, batch_size=16))
    assert result.start_loss < 1e-28 and result.end_loss < 1e-28
    assert max(result.losses) < 1e-28


def test_a_learned_start_that_ends_worse_keeps_its_start():
    z = torch.randn(32, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    targets = teacher_endpoints(CURVED, z, N, 32)
    start = bellman_schedules(cost_shard(CURVED, (2,), 0, 0, 64, N, 64), 2)[2].times
    good = learn_times(CURVED, z, targets, start, LearnTimesConfig(iterations=50, lr=0.02))
    wild = learn_times(CURVED, z, targets, start, LearnTimesConfig(iterations=5, lr=50.0))
    assert good.end_loss < good.start_loss and good.schedule.cost == good.end_loss
    assert wild.end_loss > wild.start_loss
    np.testing.assert_allclose(wild.schedule.times, start, rtol=0, atol=1e-15)
    assert wild.schedule.cost == wild.start_loss


def test_learned_schedules_use_the_first_samples_and_their_labels():
    seen = []

    def field(x, t, y):
        seen.append(y.clone())
        return CURVED(x, t) + 0.1 * y[:, None].to(x.dtype)

    z = torch.randn(40, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    y = torch.arange(40) % 3
    config = LearnTimesConfig(iterations=4, batch_size=8, samples=24, init="uniform")
    out = learned_schedules(field, z, 10, (1, 2), config, extras={"y": y}, batch_size=16)
    assert sorted(out.by_k) == [1, 2]
    assert set(torch.cat(seen).tolist()) == {0, 1, 2} and max(len(s) for s in seen) == 16
    assert out.by_k[1].losses.tolist() == [0.0] * 4  # no interior time: nothing trained
    np.testing.assert_array_equal(out.by_k[1].schedule.times, [0.0, 1.0])
    # teacher: 2 chunks x 10 steps; K = 1: 2 full losses x 2 chunks; K = 2: 4 x 2 x 3 + 2 x 2 x 2
    assert out.nfe == 20 + 4 + (24 + 8)
    assert out.evaluations == 24 * 10 + 2 * 24 + (4 * 2 * 3 * 8 + 2 * 2 * 24)


def test_the_row_flows_through_the_sweep_with_its_calls_counted(mixture_teacher):
    config = SweepConfig(methods=("teacher", "uniform", "bellman", "learned_times"), nfes=(2, 3),
                         n_steps=16, search_samples=96, eval_samples=64, n_seeds=2,
                         batch_size=64)
    options = MethodOptions({"learned_times": {"iterations": 30, "samples": 80,
                                               "batch_size": 32, "init": "bellman"}})
    exact = torch.randn(256, 2, generator=torch.Generator().manual_seed(6))

    def score(samples):
        return {"swd": swd(samples, exact, seed=0)}

    metrics, costs, _ = run_sweep(mixture_teacher, (2,), score, config,
                                  StraightenConfig(iterations=1, device="cpu", progress=False),
                                  options=options, progress=False)
    assert list(metrics) == list(config.methods)
    for k in (2, 3):
        row = metrics["learned_times"][f"nfe_{k}"]
        assert math.isfinite(row["endpoint_rmse"]) and row["endpoint_rmse"] > 0
    # the pipeline's search noises give the same times as a direct call
    cost = cost_shard(mixture_teacher, (2,), search_seed(0), 0, 96, 16, 64)
    noise = sample_noise((2,), search_seed(0), 0, 96)
    table, spent = protocol.search_schedules(config, options, cost=cost, teacher=mixture_teacher,
                                             noise=noise)
    opts = LearnTimesConfig(**options.of("learned_times"))
    direct = learned_schedules(mixture_teacher, noise, 16, (2, 3), opts, batch_size=64,
                               starts=bellman_schedules(cost, 3))
    for k in (2, 3):
        np.testing.assert_array_equal(table["learned_times"][k].times,
                                      direct.by_k[k].schedule.times)
        assert direct.by_k[k].end_loss <= direct.by_k[k].start_loss  # no worse than Bellman's
    # calls: 80 end points x 16 steps (2 chunks of 64), 30 steps x 3K, 2 full losses x 2 chunks
    calls = 2 * 16 + sum(30 * 3 * k + 2 * 2 * k for k in (2, 3))
    assert direct.nfe == calls
    cost_calls = 2 * 16  # the cost matrix: 96 paths in 2 batches x 16 steps (Bellman start)
    for k in (2, 3):
        assert costs["learned_times"][f"nfe_{k}"]["search_nfe"] == calls + cost_calls
        assert costs["learned_times"][f"nfe_{k}"]["sample_nfe"] == k
    assert costs["bellman"]["nfe_2"]["search_nfe"] == cost_calls
    assert costs["learned_times"]["nfe_2"]["search_evaluations"] == direct.evaluations + 96 * 16
    assert spent["learned_times"].search_nfe == calls  # no cost_search given: no charge for it


def test_the_row_is_a_non_default_teacher_search_off_the_fine_grid():
    method = REGISTRY["learned_times"]
    assert not method.default and not method.trained and method.search.needs == "teacher"
    assert "learned_times" not in grid_search_names()  # no chord student's target
    assert "learned_times" not in SweepConfig().methods
    with pytest.raises(ValueError, match="straighten_schedule"):
        SweepConfig(straighten_schedule="learned_times")
    assert method.search.reads_cost({"init": "bellman"})
    assert not method.search.reads_cost({"init": "uniform"})


@pytest.mark.parametrize("key, value", [("iterations", -1), ("lr", 0.0), ("batch_size", 0),
                                        ("samples", 1.5), ("init", "magic"), ("seed", -2)])
def test_bad_options_fail_before_compute_naming_the_key(key, value):
    with pytest.raises(ParamsError, match=rf"methods\.learned_times\.{key}"):
        load_params(overrides={f"methods.learned_times.{key}": value})
    with pytest.raises(ValueError, match=rf"learned_times\.{key}"):
        MethodOptions({"learned_times": {key: value}})


def test_options_are_params_keys_with_their_defaults():
    params = load_params(overrides={"methods.learned_times.iterations": 7})
    assert params.methods.of("learned_times")["iterations"] == 7
    assert dict(load_params().methods.of("learned_times")) == LearnTimesConfig().to_dict()


def test_the_default_start_is_the_greedy_search_and_ends_no_worse_than_it():
    config = SweepConfig(methods=("teacher", "bellman_global", "learned_times"), nfes=(2, 3),
                         n_steps=20, search_samples=64, batch_size=64)
    z = torch.randn(64, 2, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    options = MethodOptions({"learned_times": {"iterations": 40, "batch_size": 32}})
    assert options.of("learned_times")["init"] == "bellman_global"
    cost = cost_shard(CURVED, (2,), 0, 0, 64, 20, 64)
    table, spent = protocol.search_schedules(config, options, cost=cost, teacher=CURVED,
                                             noise=z)
    for k in (2, 3):
        assert table["learned_times"][k].cost <= table["bellman_global"][k].cost * (1 + 1e-9)
    # its own greedy search (as many calls as the row's), 20 end-point steps, 40 x 3K + 2K
    own = 20 + sum(40 * 3 * k + 2 * k for k in (2, 3))
    assert spent["learned_times"].search_nfe == spent["bellman_global"].search_nfe + own
