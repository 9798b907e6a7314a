"""The same params give the same schedules, bit-identical weights and the same metrics.json
on the CPU: the steps that draw random numbers (the teacher's training, the schedule
searches, a student's straightening and the evaluation's sampling) run again, forced, in a
copy of the session's shared run (``tiny_repro``), in another folder and other processes,
and their outputs are compared with the first run's."""

from __future__ import annotations

import json

import pytest
from pipeline_helpers import BIN, clone_repo, run

from tasks.runtime.io import load_tensors

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
AGAIN = ("teacher", "schedules", "straighten@boss", "evaluate")


def test_forced_reruns_in_another_folder_give_identical_results(tiny_repro, tmp_path):
    a = tiny_repro
    b = clone_repo(a, tmp_path / "again")
    stamps = {p: p.stat().st_mtime_ns for p in (b / "outputs").rglob("model.safetensors")}
    for stage in AGAIN:
        run([str(BIN / "dvc"), "repro", "--force", "--single-item", stage], b, timeout=900)
    models = sorted(p.relative_to(b) for p in stamps if p.stat().st_mtime_ns != stamps[p])
    # rewritten: the teacher and boss's student per K
    assert [str(m.parent) for m in models] == ["outputs/students/boss/nfe_1",
                                               "outputs/students/boss/nfe_2",
                                               "outputs/students/boss/nfe_4", "outputs/teacher"]
    for rel in models:
        ta, _ = load_tensors(a / rel)
        tb, _ = load_tensors(b / rel)
        assert ta.keys() == tb.keys()
        for key in ta:
            assert ta[key].equal(tb[key]), (rel, key)
    for rel in ("outputs/schedules/schedules.json", "results/metrics.json"):
        left, right = json.loads((a / rel).read_text()), json.loads((b / rel).read_text())
        if rel.endswith("schedules.json"):  # search wall times differ; schedules must not
            left.pop("search"), right.pop("search")
        assert left == right, rel
