"""The same params give the same schedules, bit-identical weights and the same metrics.json
on the CPU: a second copy of the repository runs `dvc repro` on the tiny profile and is
compared with the session's shared run (``tiny_repro``, tests/conftest.py), a run made in
another folder and another process tree from the same working tree."""

from __future__ import annotations

import json

import pytest
from pipeline_helpers import BIN, copy_repo, run

from tasks.runtime.io import load_tensors

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_two_runs_give_identical_results(tiny_repro, tmp_path):
    a = tiny_repro
    b = copy_repo(tmp_path / "b")
    run([str(BIN / "dvc"), "repro"], b, timeout=1800)
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
