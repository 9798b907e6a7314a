"""Seed-range shards without a cluster: the ranges, the exact merges, and the runner settings."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from boss_core.config import ScaleConfig
from boss_core.cost import cost_matrix
from boss_core.seeds import sample_noise
from boss_core.shards import aligned, cost_shard, merge_costs, shard_ranges
from flows.local_server import free_port
from tasks.runtime.shards import check_scheduler, dask_address, map_shards


@pytest.mark.parametrize("total,size,batch,workers", [
    (64, 32, 16, 1), (65, 24, 16, 1), (1000, 0, 64, 2), (7, 0, 100, 3), (5, 1, 1, 1)])
def test_shard_ranges_cover_every_sample_once_in_order(total, size, batch, workers):
    shards = shard_ranges(total, size, batch, workers)
    covered = [i for start, count in shards for i in range(start, start + count)]
    assert covered == list(range(total))
    if size == 0:  # one shard per worker (at most), whole batches
        assert len(shards) <= workers
        assert aligned(shards, batch)


def test_shard_ranges_reject_bad_sizes():
    for args in ((0, 1, 1), (10, -1, 1), (10, 1, 0), (10, 1.5, 1)):
        with pytest.raises(ValueError):
            shard_ranges(*args)


def test_local_runner_merge_equals_one_pass():
    """The in-process runner over 3 shards (one of them cutting a batch) against one pass."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))

    def velocity(x, t):
        return net(torch.cat([x, t.reshape(-1, 1).expand(x.shape[0], 1)], dim=1))

    shards = shard_ranges(40, 16, 8)
    job = {"velocity": velocity, "data_shape": (2,), "seed": 3, "n_steps": 12,
           "batch_size": 8, "device": "cpu"}
    merged = merge_costs(map_shards("t", cost_shard, shards, ScaleConfig(), job,
                                    progress=False))
    with torch.no_grad():
        single = cost_matrix(velocity, sample_noise((2,), 3, 0, 40), 12, 8)
    iu = np.triu_indices(13, 2)
    assert merged.n_samples == 40
    assert single.sum[iu].min() > 0
    np.testing.assert_allclose(merged.sum[iu], single.sum[iu], rtol=1e-12)
    # a shard dropped is caught
    fewer = merge_costs(map_shards("t", cost_shard, shards[:-1], ScaleConfig(), job,
                                   progress=False))
    assert fewer.n_samples == 32 and not np.allclose(fewer.sum[iu], single.sum[iu])


def test_dask_address_comes_from_the_environment_first(monkeypatch):
    scale = ScaleConfig(runner="dask", dask_address="tcp://10.0.0.1:8786")
    monkeypatch.delenv("BOSS_DASK_ADDRESS", raising=False)
    assert dask_address(scale) == "tcp://10.0.0.1:8786"
    monkeypatch.setenv("BOSS_DASK_ADDRESS", "tcp://127.0.0.1:9999")
    assert dask_address(scale) == "tcp://127.0.0.1:9999"
    monkeypatch.setenv("BOSS_DASK_ADDRESS", "127.0.0.1:9999")
    with pytest.raises(ValueError, match="BOSS_DASK_ADDRESS"):
        dask_address(scale)


def test_unreachable_scheduler_fails_fast_naming_the_setting(monkeypatch):
    monkeypatch.setenv("BOSS_DASK_ADDRESS", f"tcp://127.0.0.1:{free_port()}")
    with pytest.raises(ConnectionError, match="BOSS_DASK_ADDRESS"):
        check_scheduler(ScaleConfig(runner="dask"), timeout=2)
    check_scheduler(ScaleConfig(runner="local"))  # the local runner needs no scheduler


@pytest.mark.parametrize("values,key", [
    ({"runner": "spark"}, "runner"), ({"dask_address": "127.0.0.1:8786"}, "dask_address"),
    ({"nnodes": 2}, "rdzv_endpoint"), ({"nproc_per_node": 0}, "nproc_per_node"),
    ({"shard_samples": -1}, "shard_samples"), ({"rdzv_endpoint": "nohost"}, "rdzv_endpoint")])
def test_bad_scale_settings_name_the_key(values, key):
    with pytest.raises(ValueError, match=key):
        ScaleConfig(**values)
