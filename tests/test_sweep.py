"""The evaluation sweep on tiny profiles: a 2-D mixture (swd/mmd) and digits (FID/KID)."""

import json

import numpy as np
import pytest

from boss_core.data import make_gaussian_mixture
from boss_core.distances import mmd, swd
from boss_core.fidelity import FidelityConfig, build_extractor, fid_kid
from boss_core.methods import default_names
from boss_core.models import ModelConfig, build_model
from boss_core.straighten import StraightenConfig
from boss_core.sweep import SweepConfig, run_sweep
from boss_core.teacher import TeacherConfig, train_teacher

METHODS = default_names()

TRAIN = StraightenConfig(iterations=150, batch_size=64, lr=2e-3, warmup=10, eval_every=50,
                         checkpoint_every=0, ema_decay=0.95, device="cpu", progress=False)


def small_teacher(data, config, iterations):
    model = build_model(config, data.data_shape, seed=0)
    return train_teacher(model, data.x, TeacherConfig(
        iterations=iterations, batch_size=256, lr=3e-3, device="cpu",
        progress=False)).ema_model


@pytest.fixture(scope="module")
def mixture_sweep(mixture_teacher):
    """The default rows on the session's 2-D teacher (8-mode mixture, tests/conftest.py)."""
    teacher = mixture_teacher
    reference = make_gaussian_mixture(400, seed=1).x

    def score(samples):
        return {"swd": swd(samples, reference, seed=0), "mmd": mmd(samples, reference)}

    config = SweepConfig(nfes=(1, 2, 4), n_steps=32, search_samples=200, pair_samples=400,
                         eval_samples=400, n_seeds=2, lora_rank=2, batch_size=200)
    return run_sweep(teacher, (2,), score, config, TRAIN, progress=False), config


def test_mixture_sweep_rows_and_oracles(mixture_sweep):
    (metrics, costs, frame), config = mixture_sweep
    assert list(metrics) == list(METHODS)
    assert list(metrics["teacher"]) == ["nfe_32"]
    assert metrics["teacher"]["nfe_32"]["endpoint_rmse"] == 0.0
    for method in METHODS[1:]:
        assert list(metrics[method]) == ["nfe_1", "nfe_2", "nfe_4"]
        for row in metrics[method].values():
            assert (row["n_samples"], row["n_seeds"]) == (400, 2)
            assert row["endpoint_rmse"] > 0
    uniform = [metrics["uniform"][f"nfe_{k}"]["endpoint_rmse"] for k in (1, 2, 4)]
    assert uniform[0] > uniform[1] > uniform[2]
    boss, uni = metrics["boss"]["nfe_2"], metrics["uniform"]["nfe_2"]
    assert boss["endpoint_rmse"] < uni["endpoint_rmse"]
    assert boss["swd"] < uni["swd"]
    # costs: trained rows record their budget, searched rows their network calls
    assert costs["boss"]["nfe_2"]["iterations"] == TRAIN.iterations
    assert costs["boss"]["nfe_2"]["search_nfe"] == costs["bellman"]["nfe_2"]["search_nfe"] > 0
    assert costs["bellman_global"]["nfe_4"]["search_nfe"] > costs["bellman"]["nfe_4"][
        "search_nfe"]
    assert costs["uniform"]["nfe_2"] == {"iterations": 0, "wall_seconds": 0.0,
                                         "trainable_params": 0, "search_nfe": 0,
                                         "search_evaluations": 0, "sample_nfe": 2,
                                         "budget_evaluations": 0}
    # the budget: search + the teacher's pair paths (pair_samples x N) + 3 x steps x batch
    pairs = config.pair_samples * config.n_steps
    for k in (1, 2, 4):
        boss, distill = costs["boss"][f"nfe_{k}"], costs["distill_uniform"][f"nfe_{k}"]
        assert boss["train_evaluations"] == 3 * TRAIN.iterations * TRAIN.batch_size
        assert boss["pairs_evaluations"] == distill["pairs_evaluations"] == pairs
        assert boss["budget_evaluations"] == (costs["bellman"][f"nfe_{k}"]["search_evaluations"]
                                              + pairs + boss["train_evaluations"])
        assert distill["budget_evaluations"] == pairs + distill["train_evaluations"]
        assert costs["bellman"][f"nfe_{k}"]["budget_evaluations"] == costs["bellman"][
            f"nfe_{k}"]["search_evaluations"] > 0
    assert 0 < costs["boss_lora"]["nfe_2"]["trainable_params"] < costs["boss"]["nfe_2"][
        "trainable_params"]
    assert len(frame) == 1 + (len(METHODS) - 1) * 3
    json.dumps(metrics)  # plain JSON types


def test_digits_sweep_fid(tmp_path, digits_feature_net):
    digits, features = digits_feature_net  # the session's FID classifier
    teacher = small_teacher(digits, ModelConfig(arch="mlp", hidden=256, depth=3), 500)
    net = features.net
    extractor = build_extractor(FidelityConfig(kid_subset_size=200, device="cpu"), net)
    reference = extractor.reference(digits.x)

    def score(samples):
        out = fid_kid(samples, reference, extractor)
        return {"fid": out["fid"], "kid": out["kid"]}

    config = SweepConfig(methods=("teacher", "uniform", "boss"), nfes=(1, 2, 4), n_steps=50,
                         search_samples=200, pair_samples=600, eval_samples=400, n_seeds=2,
                         batch_size=200)
    metrics, _, frame = run_sweep(teacher, digits.data_shape, score, config,
                                  StraightenConfig(**{**TRAIN.to_dict(), "iterations": 200}),
                                  checkpoint_root=tmp_path, progress=False,
                                  min_eval_samples=200)
    fid = {k: metrics["uniform"][f"nfe_{k}"]["fid"] for k in (1, 2, 4)}
    assert fid[1] > fid[2] > fid[4]
    assert metrics["boss"]["nfe_2"]["fid"] < fid[2]
    assert metrics["teacher"]["nfe_50"]["endpoint_rmse"] == 0.0
    assert set(metrics["boss"]["nfe_2"]) == {"fid", "fid_std", "kid", "kid_std", "endpoint_rmse",
                                             "n_samples", "n_seeds"}
    assert (tmp_path / "boss" / "nfe_2" / "straighten.pt").is_file()
    md = frame.to_markdown(index=False)
    assert md.count("\n") == len(frame) + 1


def test_bad_sweep_settings_fail_before_compute():
    with pytest.raises(ValueError, match="unknown method"):
        SweepConfig(methods=("boss", "magic"))
    with pytest.raises(ValueError, match="n_seeds"):
        SweepConfig(n_seeds=1)
    with pytest.raises(ValueError, match="exceeds n_steps"):
        SweepConfig(nfes=(2, 200), n_steps=100)
    with pytest.raises(ValueError, match="straighten_schedule"):
        SweepConfig(straighten_schedule="uniform")
    calls = []

    def teacher(x, t):
        calls.append(1)
        return x

    with pytest.raises(ValueError, match="kid_subset_size"):
        run_sweep(teacher, (2,), lambda s: {}, SweepConfig(eval_samples=100), TRAIN,
                  min_eval_samples=1000)
    assert calls == []
    np.testing.assert_equal(SweepConfig().nfes, (1, 2, 4, 6, 8, 10))
