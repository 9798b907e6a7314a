"""Student-aware schedules (boss_core/student_schedule.py) and the row boss_student."""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
import torch

from boss_core.bellman import bellman_schedules
from boss_core.cost import CostMatrix, cost_matrix
from boss_core.distances import swd
from boss_core.methods import MethodOptions
from boss_core.pairs import teacher_pairs
from boss_core.schedule import Schedule
from boss_core.straighten import StraightenConfig
from boss_core.student_schedule import (
    chords_along,
    mixed_cost,
    noises_of,
    schedule_bias,
    student_cost,
    student_rounds,
)
from boss_core.sweep import SweepConfig, run_sweep
from tasks.runtime.params import ParamsError, load_params


def test_a_student_equal_to_the_teacher_has_the_teachers_cost_exactly(mixture_teacher):
    noise = torch.randn(48, 2, generator=torch.Generator().manual_seed(2))
    mine, theirs = student_cost(mixture_teacher, mixture_teacher, noise, 12, batch_size=20)
    reference = cost_matrix(mixture_teacher, noise, 12, batch_size=20)
    np.testing.assert_array_equal(mine.sum, theirs.sum)
    np.testing.assert_array_equal(theirs.sum, reference.sum)
    assert mine.n_samples == theirs.n_samples == 48
    # another student prices the jumps differently (the check can fail)
    other = copy.deepcopy(mixture_teacher)
    with torch.no_grad():
        next(other.parameters()).mul_(1.1)
    changed, _ = student_cost(other, mixture_teacher, noise, 12, batch_size=20)
    assert np.abs(changed.values - theirs.values)[np.triu_indices(13, 2)].max() > 1e-4


def test_the_dp_on_a_mixed_student_cost_is_the_brute_force_optimum(mixture_teacher):
    n, k = 7, 3
    noise = torch.randn(32, 2, generator=torch.Generator().manual_seed(4))
    other = copy.deepcopy(mixture_teacher)
    with torch.no_grad():
        next(other.parameters()).mul_(0.9)
    mine, theirs = student_cost(other, mixture_teacher, noise, n)
    for weight in (0.0, 0.3, 1.0):
        cost = mixed_cost(mine, theirs, weight)
        best = min(itertools.combinations(range(1, n), k - 1),
                   key=lambda inner: sum(cost[a, b] for a, b in zip(
                       (0, *inner), (*inner, n), strict=True)))
        found = bellman_schedules(cost, k)[k]
        assert tuple(found.indices) == (0, *best, n), weight
    # weight 1 is the teacher's cost: BOSS's schedule
    assert bellman_schedules(mixed_cost(mine, theirs, 1.0), k)[k].indices == \
        bellman_schedules(theirs, k)[k].indices


def test_schedule_bias_compares_its_jumps_with_others_of_the_same_length():
    n = 6
    teacher = np.triu(np.arange(1.0, 50.0)[:(n + 1) ** 2].reshape(n + 1, n + 1), 1)
    schedule = Schedule.from_indices([0, 2, 4, 6], n)
    student = teacher.copy()
    for a, b in ((0, 2), (2, 4), (4, 6)):
        student[a, b] *= 0.25
    bias = schedule_bias(CostMatrix(student, 1), CostMatrix(teacher, 1), schedule)
    assert bias["on"] == pytest.approx(0.25)
    assert bias["off"] == pytest.approx(1.0)


def test_chords_along_a_schedule_are_the_pairs_steps_chords(mixture_teacher):
    n = 10
    schedule = Schedule.from_indices([0, 3, 10], n)
    chords, _ = teacher_pairs(mixture_teacher, {"s": schedule}, n, (2,), seed=5, start=0,
                              count=30, batch_size=16)
    z, sample, y = noises_of(chords["s"])
    again = chords_along(mixture_teacher, z, sample, y, schedule, batch_size=16)
    for field in ("x", "t", "target", "sample"):
        torch.testing.assert_close(getattr(again, field), getattr(chords["s"], field),
                                   rtol=0, atol=0)


def sweep_of(**kw):
    return SweepConfig(**{"methods": ("teacher", "boss", "boss_student"), "nfes": (2, 4),
                          "n_steps": 16, "search_samples": 64, "pair_samples": 96,
                          "eval_samples": 96, "n_seeds": 2, "batch_size": 96, **kw})


TRAIN = StraightenConfig(iterations=30, batch_size=48, warmup=5, eval_every=15, device="cpu",
                         progress=False)


def score_of():
    ref = torch.randn(300, 2, generator=torch.Generator().manual_seed(3))
    return lambda samples: {"swd": swd(samples, ref, seed=0)}


def test_teacher_weight_one_is_boss_and_its_calls_are_counted(mixture_teacher):
    options = MethodOptions({"boss_student": {"teacher_weight": 1.0, "cost_samples": 40}})
    metrics, costs, _ = run_sweep(mixture_teacher, (2,), score_of(), sweep_of(), TRAIN,
                                  options=options, progress=False)
    for k in (2, 4):
        assert metrics["boss_student"][f"nfe_{k}"] == metrics["boss"][f"nfe_{k}"]
        cost = costs["boss_student"][f"nfe_{k}"]
        assert cost["iterations"] == 30  # the schedule repeated: no second training
        # 3 per sample per training step, then N teacher and N student calls per cost path
        assert cost["train_evaluations"] == 3 * 30 * 48 + 2 * 40 * 16


def test_rounds_straighten_again_on_the_dp_of_the_mixed_cost(mixture_teacher):
    n = 12
    start = Schedule.from_indices([0, 1, n], n)  # a poor schedule: the DP moves off it
    chords = teacher_pairs(mixture_teacher, {"s": start}, n, (2,), seed=5, start=0, count=30,
                           batch_size=16)[0]["s"]
    student = copy.deepcopy(mixture_teacher)
    with torch.no_grad():
        next(student.parameters()).mul_(0.9)
    fits = []

    def fit(pairs, r):
        fits.append(pairs)
        return r

    found = student_rounds(fit, lambda fitted: student, mixture_teacher, chords, start,
                           rounds=3, teacher_weight=0.25, cost_samples=20, batch_size=16)
    z, sample, y = noises_of(chords)
    mine, theirs = student_cost(student, mixture_teacher, z[:20], n, 16)
    expected = bellman_schedules(mixed_cost(mine, theirs, 0.25), 2)[2]
    assert expected.indices != start.indices
    assert found.schedule.indices == expected.indices
    # round 2's student prices the jumps as round 1's did: the same schedule, so it stops
    assert found.trainings == len(fits) == 2 and found.fitted == 1
    assert [r.schedule.indices for r in found.rounds] == [start.indices, expected.indices]
    again = chords_along(mixture_teacher, z, sample, y, expected, 16)
    torch.testing.assert_close(fits[1].target, again.target, rtol=0, atol=0)
    assert fits[0] is chords
    assert found.rounds[0].bias["on"] > 0 and found.rounds[1].bias["off"] > 0


def test_bad_student_options_fail_before_compute_naming_the_key():
    with pytest.raises(ValueError, match=r"boss_student\.rounds"):
        MethodOptions({"boss_student": {"rounds": 0}})
    with pytest.raises(ParamsError, match=r"methods\.boss_student\.teacher_weight"):
        load_params(overrides={"methods.boss_student.teacher_weight": 1.5})
    with pytest.raises(ParamsError, match=r"methods\.boss_student\.cost_samples"):
        load_params(overrides={"methods.boss_student.cost_samples": 0})
