"""The same params give the same schedules, bit-identical weights and the same metrics.json
on the CPU: two copies of the repository run `dvc repro` on the tiny profile, in two folders
and two process trees, and are compared. The first is the session's shared run
(``tiny_repro``), the second ``second_tiny_repro`` (tests/conftest.py)."""

from __future__ import annotations

import json

import pytest

from tasks.runtime.io import load_tensors

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_two_runs_give_identical_results(tiny_repro, second_tiny_repro):
    a, b = tiny_repro, second_tiny_repro
    assert a != b
    for rel in ("outputs/schedules/schedules.json", "results/metrics.json"):
        left, right = json.loads((a / rel).read_text()), json.loads((b / rel).read_text())
        if rel.endswith("schedules.json"):  # search wall times differ; schedules must not
            left.pop("search"), right.pop("search")
        assert left == right, rel
    models = sorted(p.relative_to(a) for p in (a / "outputs").rglob("model.safetensors"))
    assert len(models) >= 10  # the teacher and every student
    assert models == sorted(p.relative_to(b) for p in (b / "outputs").rglob("model.safetensors"))
    for rel in models:
        ta, _ = load_tensors(a / rel)
        tb, _ = load_tensors(b / rel)
        assert ta.keys() == tb.keys()
        for key in ta:
            assert ta[key].equal(tb[key]), (rel, key)
