"""The same params give the same schedules, bit-identical weights and the same metrics.json
on the CPU: two copies of the repository run `dvc repro` on the tiny profile and compare."""

from __future__ import annotations

import json

import pytest
from pipeline_helpers import BIN, copy_repo, run

from tasks.runtime.io import load_tensors

pytestmark = pytest.mark.slow


def test_two_runs_give_identical_results(tmp_path):
    repos = [copy_repo(tmp_path / name) for name in ("a", "b")]
    for repo in repos:
        run([str(BIN / "dvc"), "repro"], repo, timeout=900)
    a, b = repos
    for rel in ("outputs/schedules/schedules.json", "results/metrics.json"):
        left, right = json.loads((a / rel).read_text()), json.loads((b / rel).read_text())
        if rel.endswith("schedules.json"):  # search wall times differ; schedules must not
            left.pop("search"), right.pop("search")
        assert left == right, rel
    models = sorted(p.relative_to(a) for p in (a / "outputs").rglob("model.safetensors"))
    assert len(models) >= 10  # the teacher and every student
    for rel in models:
        ta, _ = load_tensors(a / rel)
        tb, _ = load_tensors(b / rel)
        assert ta.keys() == tb.keys()
        for key in ta:
            assert ta[key].equal(tb[key]), (rel, key)
