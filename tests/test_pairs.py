import numpy as np
import pytest
import torch
from fields import GaussianField

from boss_core.grids import uniform_grid
from boss_core.pairs import (
    chord_pairs,
    holdout_mask,
    reflow_pairs,
    teacher_pairs,
    teacher_states_at,
    uniform_on_grid,
)
from boss_core.presets import uniform_schedule
from boss_core.sampling import euler_sample, euler_trajectory
from boss_core.schedule import Schedule
from boss_core.seeds import sample_noise
from boss_core.straighten import straightening_loss
from boss_core.velocity import NFECounter

N = 20
CURVED = GaussianField(mu=torch.tensor([1.5, -0.5]), s=0.1)


def straight_to(point):
    """v(x, t) = (a - x) / (1 - t): every path runs straight from its noise to a."""
    return lambda x, t: (point - x) / (1.0 - t)[:, None]


def test_chords_are_finite_differences_of_the_teacher_path():
    sched = Schedule.from_indices([0, 3, 11, 20], N)
    pairs = chord_pairs(CURVED, [sched], N, (2,), seed=5, start=0, count=6, batch_size=4)[3]
    traj = euler_trajectory(CURVED, sample_noise((2,), 5, 0, 6), uniform_grid(N))
    assert len(pairs) == 6 * 3
    for a, b in [(0, 3), (3, 11), (11, 20)]:
        rows = pairs.t == a / N
        order = torch.argsort(pairs.sample[rows])
        torch.testing.assert_close(pairs.x[rows][order], traj.states[a])
        torch.testing.assert_close(pairs.target[rows][order],
                                   (traj.states[b] - traj.states[a]) / ((b - a) / N))


def test_shards_reproduce_one_run():
    scheds = [uniform_on_grid(2, N), uniform_on_grid(4, N)]
    whole = chord_pairs(CURVED, scheds, N, (2,), seed=1, start=0, count=10, batch_size=3)
    parts = [chord_pairs(CURVED, scheds, N, (2,), seed=1, start=a, count=5, batch_size=5)
             for a in (0, 5)]
    for k in (2, 4):
        merged = type(whole[k]).concat([p[k] for p in parts])
        key_w = torch.argsort(whole[k].sample * 100 + (whole[k].t * N).long())
        key_m = torch.argsort(merged.sample * 100 + (merged.t * N).long())
        torch.testing.assert_close(whole[k].x[key_w], merged.x[key_m], rtol=0, atol=0)
        torch.testing.assert_close(whole[k].target[key_w], merged.target[key_m], rtol=0, atol=0)


def test_holdout_depends_only_on_seed_and_index():
    idx = torch.arange(4000)
    mask = holdout_mask(idx, seed=3, fraction=0.1)
    assert 0.08 < float(mask.double().mean()) < 0.12
    assert torch.equal(holdout_mask(idx[1000:2000], seed=3, fraction=0.1), mask[1000:2000])
    assert not torch.equal(holdout_mask(idx, seed=4, fraction=0.1), mask)
    with pytest.raises(ValueError, match="fraction"):
        holdout_mask(idx, seed=3, fraction=1.0)


def test_reflow_endpoints_are_the_teacher_samples():
    pairs = reflow_pairs(CURVED, N, (2,), seed=2, start=4, count=7, batch_size=3)
    z = sample_noise((2,), 2, 4, 7)
    torch.testing.assert_close(pairs.z, z, rtol=0, atol=0)
    torch.testing.assert_close(pairs.x1, euler_sample(CURVED, z, uniform_grid(N)))
    x_t, t, target = pairs.batch(torch.arange(7), torch.Generator().manual_seed(0))
    torch.testing.assert_close(x_t, (1 - t.float()[:, None]) * z + t.float()[:, None] * pairs.x1)
    torch.testing.assert_close(target, pairs.x1 - z)


def test_straightening_loss_zero_on_straight_paths_positive_on_curved():
    point = torch.tensor([2.0, -1.0], dtype=torch.float64)
    straight = straight_to(point)
    sched = Schedule.from_indices([0, 7, 15, 20], N)
    f64 = torch.float64
    pairs = chord_pairs(straight, [sched], N, (2,), seed=0, start=0, count=50, dtype=f64)[3]
    assert straightening_loss(straight, pairs) < 1e-24  # float64 rounding only
    curved64 = GaussianField(mu=torch.tensor([1.5, -0.5], dtype=f64), s=0.1)
    bent = chord_pairs(curved64, [sched], N, (2,), seed=0, start=0, count=50, dtype=f64)[3]
    assert straightening_loss(curved64, bent) > 1e-3


def test_teacher_states_at_and_bad_schedules():
    z = torch.randn(3, 2)
    states = teacher_states_at(CURVED, z, N, [0, 5, N])
    traj = euler_trajectory(CURVED, z, uniform_grid(N))
    torch.testing.assert_close(states, traj.states[[0, 5, N]], rtol=0, atol=0)
    with pytest.raises(ValueError, match="off the fine grid"):
        chord_pairs(CURVED, [uniform_schedule(3)], N, (2,), seed=0, start=0, count=2)
    with pytest.raises(ValueError, match="N=40"):
        chord_pairs(CURVED, [uniform_on_grid(2, 40)], N, (2,), seed=0, start=0, count=2)
    np.testing.assert_array_equal(uniform_on_grid(6, 100).indices, [0, 17, 33, 50, 67, 83, 100])
    with pytest.raises(ValueError, match="K repeats"):
        chord_pairs(CURVED, [uniform_on_grid(2, N), Schedule.from_indices([0, 3, N], N)], N,
                    (2,), seed=0, start=0, count=2)


def test_one_teacher_pass_serves_same_k_schedules_and_reflow():
    counter = NFECounter(CURVED)
    same_k = {"a": uniform_on_grid(2, N), "b": Schedule.from_indices([0, 3, N], N)}
    chords, ends = teacher_pairs(counter, same_k, N, (2,), seed=4, start=0, count=6,
                                 batch_size=6, reflow=True)
    assert counter.nfe == N  # one pass, however many schedules
    for key, sched in same_k.items():
        alone = chord_pairs(CURVED, [sched], N, (2,), seed=4, start=0, count=6)[2]
        torch.testing.assert_close(chords[key].target, alone.target, rtol=0, atol=0)
    alone = reflow_pairs(CURVED, N, (2,), seed=4, start=0, count=6)
    torch.testing.assert_close(ends.x1, alone.x1, rtol=0, atol=0)
