"""The method registry: one entry per row, its options, and the GITS row added through it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fields import GaussianField
from torch import nn

from boss_core import protocol
from boss_core.bellman import bellman_schedules
from boss_core.distances import swd
from boss_core.methods import (
    REGISTRY,
    STRAIGHTEN,
    Method,
    MethodOptions,
    Search,
    default_names,
    trained_names,
)
from boss_core.seeds import search_seed
from boss_core.shards import cost_shard
from boss_core.straighten import StraightenConfig
from boss_core.sweep import SweepConfig, run_sweep
from tasks.runtime.params import ParamsError, build_params, load_params


class Field(nn.Module):
    """A closed-form velocity field as a module (the sweep moves and evaluates modules)."""

    def __init__(self, field):
        super().__init__()
        self.field, self.anchor = field, nn.Parameter(torch.zeros(()))

    def forward(self, x, t):
        return self.field(x, t)


CURVED = GaussianField(torch.tensor([2.0, -1.0]), s=0.05)  # paths bend hard near t = 1
TRAIN = StraightenConfig(iterations=1, device="cpu", progress=False)


def test_every_entry_names_its_schedule_and_trained_entries_learn_a_searched_one():
    for name, m in REGISTRY.items():
        assert m.name == name
        if m.reference:
            continue
        target = m.schedule_name("bellman")
        assert REGISTRY[target].search is not None, name
        if m.schedule_of == STRAIGHTEN:
            assert m.schedule_name("bellman_gits") == "bellman_gits"
    assert "bellman_gits" not in default_names()
    assert set(trained_names()) == {"boss", "boss_lora", "reflow_uniform", "distill_uniform",
                                    "boss_rollout", "learned_times_ft", "boss_student"}
    with pytest.raises(ValueError, match="exactly one"):
        Method("bad", "neither", training=None)


def test_gits_row_is_the_discounted_dp_and_shows_in_the_sweep():
    config = SweepConfig(methods=("teacher", "uniform", "bellman", "bellman_gits"),
                         nfes=(2, 3), n_steps=24, search_samples=64, eval_samples=64,
                         n_seeds=2, batch_size=64)
    exact = CURVED.exact(torch.randn(400, 2, generator=torch.Generator().manual_seed(5)))

    def score(samples):
        return {"swd": swd(samples, exact, seed=0)}

    options = MethodOptions({"bellman_gits": {"discount": 1.5}})
    metrics, costs, frame = run_sweep(Field(CURVED), (2,), score, config, TRAIN,
                                      options=options, progress=False)
    assert list(metrics) == list(config.methods)
    assert set(frame["method"]) == set(config.methods)
    cost = cost_shard(Field(CURVED), (2,), search_seed(0), 0, 64, 24, 64)
    table, spent = protocol.search_schedules(config, options, cost=cost)
    gits, plain = bellman_schedules(cost, 3, discount=1.5), bellman_schedules(cost, 3)
    for k in (2, 3):
        np.testing.assert_array_equal(table["bellman_gits"][k].times, gits[k].times)
        np.testing.assert_array_equal(table["bellman"][k].times, plain[k].times)
    assert any(not np.array_equal(gits[k].times, plain[k].times) for k in (2, 3))
    # it pays for the cost matrix like bellman, and its row is scored like every other
    assert costs["bellman_gits"]["nfe_2"]["search_nfe"] == costs["bellman"]["nfe_2"][
        "search_nfe"] > 0
    for k in (2, 3):
        assert metrics["bellman_gits"][f"nfe_{k}"]["endpoint_rmse"] > 0


def test_gits_discount_is_a_params_key_checked_before_compute(tmp_path):
    params = load_params(overrides={"methods.bellman_gits.discount": 1.3})
    assert params.methods.of("bellman_gits")["discount"] == 1.3
    flat = params.flat(["methods"])  # every method's options, each as methods.<name>.<key>
    assert flat["methods.bellman_gits.discount"] == 1.3
    assert set(flat) == {f"methods.{name}.{key}" for name, m in REGISTRY.items()
                         for key in m.options}
    assert load_params().methods.of("bellman_gits")["discount"] == 1.15
    with pytest.raises(ParamsError, match=r"methods\.bellman_gits\.discount"):
        load_params(overrides={"methods.bellman_gits.discount": 0})
    with pytest.raises(ParamsError, match=r"methods\.bellman_gits\.speed"):
        load_params(overrides={"methods.bellman_gits.speed": 2})
    with pytest.raises(ParamsError, match=r"methods\.magic"):
        build_params({"methods": {"magic": {"x": 1}}})


def test_a_new_entry_flows_through_the_protocol(monkeypatch):
    """One more registry entry is a row everywhere the protocol goes: search, plan, costs."""
    entry = Method("halves", "the uniform grid, doubled", search=Search(
        "nothing", lambda inp, opts: {k: REGISTRY["uniform"].search.build(
            inp, opts)[k] for k in inp.nfes}))
    monkeypatch.setitem(REGISTRY, "halves", entry)
    config = SweepConfig(methods=("teacher", "halves"), nfes=(2,), n_steps=8)
    cost = cost_shard(Field(CURVED), (2,), 0, 0, 8, 8, 8)
    table, _ = protocol.search_schedules(config, MethodOptions(), cost=cost)
    plan = protocol.sampling_plan(config, CURVED, table)
    np.testing.assert_array_equal(plan["halves"][2][1], [0.0, 0.5, 1.0])
    assert protocol.cost_table(config, {}, {})["halves"]["nfe_2"]["search_nfe"] == 0
