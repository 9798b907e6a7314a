"""Class-conditional teachers and classifier-free guidance (boss_core/guidance.py), through
the samplers, the shards and the in-memory sweep."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from fields import GaussianField

from boss_core.guidance import (
    Conditioning,
    GuidedVelocity,
    balanced_labels,
    check_guidance,
    guided,
)
from boss_core.sampling import euler_sample
from boss_core.schedule import Schedule
from boss_core.seeds import sample_noise
from boss_core.shards import (
    cost_shard,
    merge_costs,
    merge_pairs,
    merge_samples,
    pairs_shard,
    sample_shard,
)
from boss_core.straighten import StraightenConfig
from boss_core.sweep import SweepConfig, run_sweep
from boss_core.velocity import NFECounter

C = 3
MEANS = torch.tensor([[2.0, 0.0], [-1.0, 1.5], [0.0, -2.0], [0.3, 0.4]],  # rows 0..2, null 3
                     dtype=torch.float64)
S = 0.3


class LabelledGaussians:
    """v(x, t, y): the exact rectified-flow field to N(mu_y, S^2 I), per sample; y = C (the
    "no label" token) is the field to N(mu_C, S^2 I)."""

    def __call__(self, x, t, y):
        mu = MEANS[y].to(x.dtype)  # (B, 2)
        tt = t.view(-1, 1)
        sig = torch.sqrt((1 - tt) ** 2 + (tt * S) ** 2)
        dsig = (tt * S**2 - (1 - tt)) / sig
        return mu + dsig / sig * (x - tt * mu)


def test_guided_field_of_two_gaussians_is_the_gaussian_field_of_the_extrapolated_mean():
    """Both fields are linear in the mean, so v_w is the Gaussian field of
    mu_w = mu_null + w (mu_y - mu_null); w = 0 is the unconditional field, w = 1 (``guided``
    returns the model itself) the conditional one, exactly."""
    field = LabelledGaussians()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(12, 2, generator=gen, dtype=torch.float64)
    t = torch.rand(12, generator=gen, dtype=torch.float64) * 0.98
    y = balanced_labels(C, 0, 12)
    for w in (0.0, 0.5, 2.0, 4.0):
        out = GuidedVelocity(field, w, C)(x, t, y=y)
        for c in range(C):
            rows = y == c
            mu_w = MEANS[C] + w * (MEANS[c] - MEANS[C])
            want = GaussianField(mu_w, S)(x[rows], t[rows])
            torch.testing.assert_close(out[rows], want, rtol=1e-12, atol=1e-12)
    assert torch.equal(GuidedVelocity(field, 0.0, C)(x, t, y=y),
                       field(x, t, torch.full_like(y, C)))
    assert guided(field, 1.0, C) is field and guided(field, None, C) is field
    with pytest.raises(ValueError, match="labels"):
        GuidedVelocity(field, 2.0, C)(x, t)


def test_guided_euler_sampling_lands_on_the_guided_gaussian():
    """400 Euler steps of v_w from z reach mu_w + S z (the flow map of the Gaussian field)."""
    field = LabelledGaussians()
    z = sample_noise((2,), 0, 0, 9, dtype=torch.float64)
    y = balanced_labels(C, 0, 9)
    w = 2.5
    x1 = euler_sample(GuidedVelocity(field, w, C), z, np.linspace(0, 1, 401), extras={"y": y})
    mu_w = MEANS[C] + w * (MEANS[y] - MEANS[C])
    err = (x1 - (mu_w.double() + S * z)).abs().max()
    assert err < 0.02, err


def test_a_guided_evaluation_counts_two_network_calls():
    field = LabelledGaussians()
    z = sample_noise((2,), 0, 0, 5)
    y = balanced_labels(C, 0, 5)
    counter = NFECounter(field)
    euler_sample(guided(counter, 3.0, C), z, np.linspace(0, 1, 5), extras={"y": y})
    assert (counter.nfe, counter.n_evaluations) == (8, 40)
    counter.reset()
    euler_sample(guided(counter, 1.0, C), z, np.linspace(0, 1, 5), extras={"y": y})
    assert (counter.nfe, counter.n_evaluations) == (4, 20)
    assert Conditioning(C, 3.0).calls_per_step == 2
    assert Conditioning(C, 1.0).calls_per_step == Conditioning(C).calls_per_step == 1


def test_labels_are_class_balanced_and_the_same_in_any_shard_split():
    full = balanced_labels(C, 0, 100)
    counts = torch.bincount(full, minlength=C)
    assert counts.max() - counts.min() <= 1 and int(counts.sum()) == 100
    for cuts in ([0, 100], [0, 37, 100], [0, 1, 50, 99, 100]):
        parts = [balanced_labels(C, a, b - a) for a, b in zip(cuts[:-1], cuts[1:], strict=True)]
        assert torch.equal(torch.cat(parts), full)
    assert torch.equal(full[:6], torch.tensor([0, 1, 2, 0, 1, 2]))
    assert Conditioning().labels(0, 5) is None and Conditioning().extras(0, 5) == {}


def _conditional_mlp(seed=0):
    from boss_core.models import ModelConfig, build_model

    return build_model(ModelConfig(arch="mlp", hidden=32, depth=1, time_embed_dim=16,
                                   num_classes=C), (2,), seed=seed).eval()


def test_sharded_conditional_runs_equal_one_process():
    """The cost sum, the pairs (with their labels) and the samples of a guided teacher are
    the same whatever the (batch-aligned) shards."""
    teacher = guided(_conditional_mlp(), 2.0, C)
    shards = [(0, 8), (8, 8), (16, 4)]
    one = cost_shard(teacher, (2,), 1, 0, 20, 10, 8, num_classes=C)
    many = merge_costs([cost_shard(teacher, (2,), 1, s, n, 10, 8, num_classes=C)
                        for s, n in shards])
    np.testing.assert_allclose(many.sum, one.sum, rtol=1e-12)
    assert many.n_samples == one.n_samples == 20
    sched = {("bellman", 2): Schedule.from_indices([0, 4, 10], 10)}
    chords, ends = pairs_shard(teacher, sched, 10, (2,), 2, 0, 20, 8, reflow=True,
                               num_classes=C)
    chords_s, ends_s = merge_pairs([pairs_shard(teacher, sched, 10, (2,), 2, s, n, 8,
                                                reflow=True, num_classes=C) for s, n in shards])
    key = ("bellman", 2)
    for field in ("x", "t", "target", "sample", "y"):
        assert torch.equal(getattr(chords[key], field), getattr(chords_s[key], field)), field
    assert torch.equal(chords[key].y, chords[key].sample % C)
    assert torch.equal(ends.y, ends_s.y) and torch.equal(ends.x1, ends_s.x1)
    rows = {("uniform", 2): (teacher, np.linspace(0, 1, 3))}
    drawn = sample_shard(rows, teacher, (2,), [100, 101], 10, 0, 20, 8, num_classes=C)
    drawn_s = merge_samples([sample_shard(rows, teacher, (2,), [100, 101], 10, s, n, 8,
                                          num_classes=C) for s, n in shards])
    for key, value in drawn.values.items():
        assert torch.equal(value, drawn_s.values[key]), key


def test_the_sampled_labels_are_the_ones_the_teacher_gets():
    """A conditional teacher's reference samples at y_i = i mod C: with the Gaussian field,
    sample i lands on mean mu_{i mod C}."""
    rows = {}
    field = LabelledGaussians()
    drawn = sample_shard(rows, field, (2,), [100, 101], 200, 0, 9, 4, num_classes=C)
    x = drawn.values[("reference", 200, 0)]
    z = sample_noise((2,), 100, 0, 9)
    want = MEANS[balanced_labels(C, 0, 9)].float() + S * z
    assert (x - want).abs().max() < 0.02


def test_bad_guidance_settings_fail_before_compute():
    with pytest.raises(ValueError, match="guidance"):
        SweepConfig(guidance=-1.0)
    with pytest.raises(ValueError, match="guidance"):
        SweepConfig(guidance=float("nan"))
    with pytest.raises(ValueError, match="sweep.guidance"):
        check_guidance(2.0, None)
    with pytest.raises(ValueError, match="teacher.label_dropout"):
        check_guidance(2.0, C, label_dropout=0.0)
    check_guidance(2.0, C, label_dropout=0.0, pretrained=True)  # the user's responsibility
    check_guidance(1.0, C, label_dropout=0.0)  # plain conditional: no unconditional mode

    class Untouchable(torch.nn.Module):
        def forward(self, *args, **kwargs):
            raise AssertionError("computed before the check")

    config = SweepConfig(methods=("teacher", "uniform"), nfes=(2,), n_steps=4, search_samples=8,
                         pair_samples=8, eval_samples=8, batch_size=8, guidance=2.0)
    net = Untouchable()
    net.p = torch.nn.Parameter(torch.zeros(1))
    with pytest.raises(ValueError, match="sweep.guidance"):
        run_sweep(net, (2,), lambda s: {}, config, StraightenConfig(progress=False),
                  progress=False)
    with pytest.raises(ValueError, match="teacher.label_dropout"):
        run_sweep(net, (2,), lambda s: {}, config, StraightenConfig(progress=False),
                  progress=False, num_classes=C, label_dropout=0.0)


def test_params_refuse_guidance_of_an_unconditional_model():
    from tasks.runtime.params import ParamsError, load_params

    with pytest.raises(ParamsError, match="sweep.guidance"):
        load_params("params.yaml", {"sweep.guidance": 2.0})
    with pytest.raises(ParamsError, match="teacher.label_dropout"):
        load_params("params.yaml", {"sweep.guidance": 2.0, "model.num_classes": 10})
    params = load_params("params.yaml", {"sweep.guidance": 2.0, "model.num_classes": 10,
                                         "teacher.label_dropout": 0.1})
    assert params.sweep.guidance == 2.0


# ------------------------------------------------------------------- end to end, in memory


MODES = 3


@pytest.fixture(scope="module")
def conditional_mixture_teacher():
    """A conditional MLP trained (label drop-out 0.2) on 3 well-apart Gaussian modes."""
    from boss_core.data import make_gaussian_mixture
    from boss_core.models import ModelConfig, build_model
    from boss_core.teacher import TeacherConfig, train_teacher

    data = make_gaussian_mixture(3000, seed=0, n_modes=MODES, radius=1.5, std=0.15)
    model = build_model(ModelConfig(arch="mlp", hidden=64, depth=2, time_embed_dim=32,
                                    num_classes=MODES), (2,), seed=0)
    config = TeacherConfig(iterations=500, batch_size=256, lr=3e-3, warmup=20, ema_decay=0.99,
                           label_dropout=0.2, device="cpu", progress=False)
    return train_teacher(model, data.x, config, labels=data.y).ema_model.eval()


def _nearest_mode(samples):
    angles = 2 * math.pi * torch.arange(MODES) / MODES
    centres = 1.5 * torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)  # (C, 2)
    return torch.cdist(samples.float(), centres).argmin(dim=1)  # (M,)


def test_guidance_raises_class_accuracy_end_to_end(conditional_mixture_teacher):
    """Through the whole protocol (search, pairs, a guided-chord student, evaluation): w = 3
    samples the labels' modes far more often than w = 0 (the unconditional teacher, about
    1 / C); the guided teacher rows cost 2 calls per step, the student 1."""
    train = StraightenConfig(iterations=30, batch_size=64, lr=1e-3, warmup=5, ema_decay=0.9,
                             eval_every=30, checkpoint_every=0, device="cpu", progress=False)

    def score(samples):
        return {"mean_norm": float(samples.norm(dim=1).mean())}

    accuracy, costs = {}, {}
    for w in (0.0, 3.0):
        config = SweepConfig(methods=("teacher", "uniform", "bellman_global", "boss"),
                             nfes=(2,), n_steps=12, search_samples=30, pair_samples=60,
                             eval_samples=90, n_seeds=2, batch_size=45, guidance=w)
        metrics, costs[w], _ = run_sweep(conditional_mixture_teacher, (2,), score, config,
                                         train, device="cpu", progress=False,
                                         label_dropout=0.2, classify=_nearest_mode)
        accuracy[w] = {m: metrics[m][next(iter(metrics[m]))]["class_accuracy"]
                       for m in metrics}
    for method in ("teacher", "uniform", "boss"):
        assert accuracy[3.0][method] > accuracy[0.0][method] + 0.3, (method, accuracy)
    assert accuracy[3.0]["teacher"] > 0.9, accuracy
    assert accuracy[0.0]["teacher"] < 0.6, accuracy
    c = costs[3.0]
    assert c["teacher"]["nfe_12"]["sample_nfe"] == 24
    assert c["uniform"]["nfe_2"]["sample_nfe"] == 4 and c["boss"]["nfe_2"]["sample_nfe"] == 2
    assert c["boss"]["nfe_2"]["search_nfe"] == 12 * 2  # the cost matrix: N guided steps
    assert c["boss"]["nfe_2"]["pairs_evaluations"] == 60 * 12 * 2  # guided pair paths
    # the global search: N teacher steps, then 1 + 11 sources at K = 1, 2; twice each
    assert c["bellman_global"]["nfe_2"]["search_nfe"] == (12 + 1 + 11) * 2


def test_the_sample_cli_draws_a_conditional_student_at_balanced_labels_or_one_class():
    from tasks.cli.sample import sample_model

    student = _conditional_mlp(seed=1)
    schedule = Schedule.from_indices([0, 5, 10], 10)
    got = sample_model(student, schedule, (2,), 7, seed=4, batch_size=3)
    z = sample_noise((2,), 4, 0, 7)
    want = euler_sample(student, z, schedule.times, extras={"y": torch.arange(7) % C})
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    ones = sample_model(student, schedule, (2,), 7, seed=4, label=1)
    want = euler_sample(student, z, schedule.times, extras={"y": torch.ones(7, dtype=torch.long)})
    torch.testing.assert_close(ones, want, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="label"):
        sample_model(student, schedule, (2,), 7, seed=4, label=C)
    from boss_core.models import ModelConfig, build_model

    plain = build_model(ModelConfig(arch="mlp", hidden=8, depth=1, time_embed_dim=8), (2,))
    with pytest.raises(ValueError, match="unconditional"):
        sample_model(plain, schedule, (2,), 3, seed=0, label=0)
