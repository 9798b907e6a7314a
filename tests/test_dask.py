"""Sharded work on a real Dask cluster equals the single-process run.

The cluster is ``dask scheduler`` + 2 ``dask worker`` processes on 127.0.0.1, reached by
address (tests/dask_helpers.py), and the shards are Prefect tasks on prefect-dask's
``DaskTaskRunner`` (tasks/runtime/shards.py), exactly as the pipeline maps them.

Tolerances:
- Shards on batch boundaries: every network call sees the batch it sees in one process, so
  the teacher paths are bit-identical and the cost sums differ only in the order of float64
  additions of the per-batch sums: 1e-12 relative on every entry (measured ~2e-16), and
  pairs and samples are equal bit for bit. This needs the same torch thread count on both
  sides (1 here): the float64 Gram products are summed in a thread-count-dependent order
  (16 threads against 1 differ by 1.7e-12, BENCHMARKS.md).
- Shards that cut batches: batch compositions change, and a float32 conv/matmul may round
  differently for another batch size (~1 ulp = 6e-8 relative on each output). Over N = 20
  Euler steps the states drift by a few ulp, and c(i, j) (j >= i + 2) is a squared residual,
  a difference of such states: measured 2e-7 to 5e-7 relative for shards of 10, 24 and 40
  samples at batch 16. We allow 1e-5 relative (20x). c(i, i+1) is 0 up to rounding by
  construction, so relative error there means nothing: it gets an absolute floor of
  1e-12 x the largest entry (measured 1e-16).
In both cases the Bellman schedules are identical for every K.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from dask_helpers import dask_cluster

from boss_core.bellman import bellman_schedules
from boss_core.config import ScaleConfig
from boss_core.cost import cost_matrix
from boss_core.features import FeatureNet
from boss_core.fidelity import FidelityConfig, build_extractor
from boss_core.models import ModelConfig, build_model
from boss_core.pairs import teacher_pairs
from boss_core.schedule import Schedule
from boss_core.seeds import sample_noise
from boss_core.shards import (
    cost_shard,
    merge_costs,
    merge_pairs,
    merge_samples,
    pairs_shard,
    sample_shard,
    shard_ranges,
)
from tasks.runtime.shards import map_shards

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SHAPE, N, BATCH, M, SEED = (1, 8, 8), 20, 16, 64, 7


@pytest.fixture(scope="module")
def cluster(prefect_server_api):
    with dask_cluster(prefect_server_api, 2) as (address, api):
        yield address, api


@pytest.fixture(autouse=True)
def one_torch_thread():
    """The workers compute with one torch thread; so does the single-process reference here.
    Float32 convolutions and the float64 Gram sums are reduced in a thread-count-dependent
    order, so equal thread counts are part of "bit-identical" (CI runs pytest with torch's
    default of one thread per core)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def teacher():
    """A small U-Net with every weight perturbed: a fresh one outputs v = 0 (its last layer
    starts at zero), which would make every cost 0 and every comparison vacuous."""
    config = ModelConfig(arch="unet", base_channels=8, channel_mults=(1, 2))
    model = build_model(config, SHAPE, seed=3).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
    return model


def _scale(address: str, shard_samples: int) -> ScaleConfig:
    return ScaleConfig(runner="dask", dask_address=address, shard_samples=shard_samples)


def _dask_map(cluster, monkeypatch, fn, shards, job):
    address, api = cluster
    monkeypatch.setenv("PREFECT_API_URL", api)
    return map_shards("test", fn, shards, _scale(address, 0), job, progress=False)


def _single_cost(teacher):
    noise = sample_noise(SHAPE, SEED, 0, M)
    with torch.no_grad():
        return cost_matrix(teacher, noise, N, BATCH)


def _upper(a: np.ndarray) -> np.ndarray:
    return a[np.triu_indices(a.shape[0], 1)]


@pytest.mark.parametrize("shard_samples", [32, 24])
def test_dask_cost_matrix_equals_single_process(cluster, teacher, monkeypatch, shard_samples):
    shards = shard_ranges(M, shard_samples, BATCH)
    assert len(shards) >= 2
    job = {"velocity": teacher, "data_shape": SHAPE, "seed": SEED, "n_steps": N,
           "batch_size": BATCH, "device": "cpu"}
    merged = merge_costs(_dask_map(cluster, monkeypatch, cost_shard, shards, job))
    single = _single_cost(teacher)
    assert single.sum[np.triu_indices(N + 1, 2)].min() > 0  # a bending field: jumps cost
    assert merged.n_samples == single.n_samples == M
    got, want = _upper(merged.sum), _upper(single.sum)
    if shard_samples % BATCH == 0:
        rel = np.abs(got - want) / np.maximum(np.abs(want), np.finfo(np.float64).tiny)
        assert rel.max() <= 1e-12, f"aligned shards: max relative difference {rel.max():.3g}"
    else:
        floor = 1e-12 * np.abs(want).max()
        err = np.abs(got - want)
        assert np.all(err <= 1e-5 * np.abs(want) + floor), (
            f"unaligned shards: max relative difference "
            f"{(err / np.maximum(np.abs(want), floor)).max():.3g}")
    ours, theirs = bellman_schedules(merged, N), bellman_schedules(single, N)
    assert {k: s.indices for k, s in ours.items()} == {k: s.indices for k, s in theirs.items()}


def test_dask_pairs_and_samples_equal_single_process(cluster, teacher, monkeypatch):
    shards = shard_ranges(M, 32, BATCH)
    schedules = {("boss", 2): Schedule.from_indices([0, 7, N], N),
                 ("distill", 4): Schedule.from_indices([0, 5, 10, 15, N], N)}
    job = {"velocity": teacher, "schedules": schedules, "n_steps": N, "data_shape": SHAPE,
           "seed": SEED, "batch_size": BATCH, "device": "cpu", "reflow": True}
    chords, ends = merge_pairs(_dask_map(cluster, monkeypatch, pairs_shard, shards, job))
    with torch.no_grad():
        want_chords, want_ends = teacher_pairs(teacher, schedules, N, SHAPE, seed=SEED, start=0,
                                               count=M, batch_size=BATCH, reflow=True)
    for key, want in want_chords.items():
        for field in ("x", "t", "target", "sample"):
            assert torch.equal(getattr(chords[key], field), getattr(want, field)), (key, field)
    for field in ("z", "x1", "sample"):
        assert torch.equal(getattr(ends, field), getattr(want_ends, field)), field

    rows = {("uniform", 2): (teacher, np.linspace(0, 1, 3)),
            ("bellman", 2): (teacher, np.array([0.0, 0.35, 1.0]))}
    job = {"rows": rows, "teacher": teacher, "data_shape": SHAPE, "seeds": [100, 101],
           "n_steps": N, "batch_size": BATCH, "device": "cpu"}
    single = sample_shard(rows, teacher, SHAPE, [100, 101], N, 0, M, BATCH, device="cpu")
    merged = merge_samples(_dask_map(cluster, monkeypatch, sample_shard, shards, job))
    _assert_same_draws(merged, single)
    # features extracted on the workers (the FID extractor travels, images do not)
    torch.manual_seed(1)
    extractor = build_extractor(FidelityConfig(kid_subset_size=8, n_seeds=2),
                                FeatureNet(1, 10, feature_dim=16).eval())
    job["featurize"] = extractor.features
    featured = merge_samples(_dask_map(cluster, monkeypatch, sample_shard, shards, job))
    assert featured.values[("uniform", 2, 0)].shape == (M, 16)
    for key, x in single.values.items():
        assert torch.equal(featured.values[key], extractor.features(x)), key
    _assert_same_errors(featured, single)


def _assert_same_draws(merged, single):
    assert merged.count == single.count == M
    assert sorted(merged.values) == sorted(single.values)
    for key in single.values:
        assert torch.equal(merged.values[key], single.values[key]), key
    _assert_same_errors(merged, single)


def _assert_same_errors(merged, single):
    assert single.sq_err[("reference", N)] == 0 and single.sq_err[("uniform", 2)] > 0
    for key, value in single.sq_err.items():  # float64 sums in another order
        assert merged.sq_err[key] == pytest.approx(value, rel=1e-12, abs=0), key


def test_local_cluster_default_needs_no_address_and_no_prefect_server(teacher, monkeypatch):
    """scale.runner dask with no address: a LocalCluster of 2 worker processes, and a
    temporary Prefect server for the shard tasks (the workers inherit its URL)."""
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.delenv("BOSS_DASK_ADDRESS", raising=False)
    shards = shard_ranges(M, 32, BATCH)
    job = {"velocity": teacher, "data_shape": SHAPE, "seed": SEED, "n_steps": N,
           "batch_size": BATCH, "device": "cpu"}
    scale = ScaleConfig(runner="dask", dask_workers=2, shard_samples=32)
    merged = merge_costs(map_shards("test", cost_shard, shards, scale, job, progress=False))
    single = _single_cost(teacher)
    rel = np.abs(_upper(merged.sum) - _upper(single.sum)) / np.maximum(
        np.abs(_upper(single.sum)), np.finfo(np.float64).tiny)
    assert rel.max() <= 1e-12
    assert "PREFECT_API_URL" not in os.environ  # the temporary server is gone
