"""Nothing is lost to a SIGKILL: tasks/runtime/faults.py kills a step at a chosen point (after k
checkpoints, between an artifact's temporary file and its rename), then the earlier outputs
must be intact, no half-written artifact visible, and a rerun must resume from the last
checkpoint and give the bytes of an uninterrupted run (CPU, same seeds).

The end-to-end cases run the stages as subprocesses in one copy of the repository on a small
2-D profile (moons, an MLP teacher; every stage start costs ~10 s of imports, so the copy is
shared and each reference run is the stage run uninterrupted in the same workspace).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from pipeline_helpers import ROOT, copy_repo, env, run

from tasks.runtime import faults
from tasks.runtime import io as tio

KILLED = -signal.SIGKILL
TEMP = re.compile(r"^\..+\.\d+\.[a-z0-9_]{8}(\.[A-Za-z0-9]+)?\.tmp$")


def temps(folder: Path) -> list[Path]:
    """``atomic_path`` temporaries under ``folder`` (any depth)."""
    return [p for p in folder.rglob("*") if TEMP.match(p.name)]


def python(code: str, cwd: Path, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env(**extra),
                          capture_output=True, text=True, timeout=120, check=False)


# --- the hook itself (fast) ---------------------------------------------------------------


def test_parse_accepts_point_and_count_and_rejects_the_rest():
    assert faults.parse("teacher.checkpoint:2") == ("teacher.checkpoint", 2)
    assert faults.parse("artifact.write/metrics.json:1") == ("artifact.write/metrics.json", 1)
    for bad in ("teacher.checkpoint", "teacher.checkpoint:0", ":3", "x:two", "x:-1"):
        with pytest.raises(ValueError, match="BOSS_FAULT"):
            faults.parse(bad)


def test_fault_point_is_a_no_op_without_the_variable(monkeypatch):
    monkeypatch.delenv(faults.ENV, raising=False)
    for _ in range(3):
        faults.fault_point("teacher.checkpoint")
    monkeypatch.setenv(faults.ENV, "other.point:1")  # another point: counted nowhere
    faults.fault_point("teacher.checkpoint")
    faults.fault_point("artifact.write", "cost.safetensors")
    monkeypatch.setenv(faults.ENV, "oops")
    with pytest.raises(ValueError, match="<point>:<n>"):
        faults.fault_point("teacher.checkpoint")


def test_fault_point_kills_on_the_nth_visit_of_its_point_only(tmp_path):
    code = ("from tasks.runtime.faults import fault_point\n"
            "for i in range(5):\n"
            "    print(i, flush=True)\n"
            "    fault_point('artifact.write', 'a.json')\n"
            "    fault_point('artifact.write', 'b.json')\n")
    done = python(code, ROOT, BOSS_FAULT="artifact.write/b.json:3")
    assert done.returncode == KILLED
    assert done.stdout.split() == ["0", "1", "2"]
    done = python(code, ROOT, BOSS_FAULT="artifact.write:3")  # any file: a.json, b.json, a.json
    assert done.returncode == KILLED and done.stdout.split() == ["0", "1"]
    assert python(code, ROOT).returncode == 0


def test_killed_atomic_write_keeps_the_old_file_and_the_next_write_sweeps_its_temp(
        tmp_path, monkeypatch):
    target = tmp_path / "out" / "metrics.json"
    tio.write_json(target, {"old": 1})
    old = target.read_bytes()
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
            f"from tasks.runtime.io import write_json\n"
            f"write_json({str(target)!r}, {{'new': 2}})\n")
    done = python(code, tmp_path, BOSS_FAULT="artifact.write:1")
    assert done.returncode == KILLED, done.stderr[-2000:]
    assert target.read_bytes() == old  # the rename never happened
    [left] = temps(tmp_path)
    assert left.parent == target.parent and left.name.startswith(".metrics.json.")
    assert '"new": 2' in left.read_text()  # complete, but hidden and never read
    # A temporary of a live writer (this process) is kept; the dead writer's one is swept by
    # the first atomic write of a later process in that folder.
    live = target.parent / f".metrics.json.{os.getpid()}.abcdefgh.tmp"
    live.write_text("in flight")
    os.utime(live, (0, 0))
    monkeypatch.setattr(tio, "_STARTED", time.time() + 1)  # "this process started later"
    monkeypatch.setattr(tio, "_swept", set())
    tio.write_json(target, {"newer": 3})
    assert tio.read_json(target) == {"newer": 3}
    assert temps(tmp_path) == [live]
    assert (target.stat().st_mode & 0o777) == 0o666 & ~tio._UMASK  # not mkstemp's 0600


def test_saved_tensors_are_the_same_bytes_every_time(tmp_path):
    """safetensors orders the metadata by a Rust HashMap (a new order per map); save_tensors
    sorts it, so equal tensors and metadata give equal bytes and DVC hashes across reruns."""
    tensors = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.zeros(2, dtype=torch.int64)}
    meta = {name: {"value": i} for i, name in enumerate("abcdefgh")}
    files = []
    for i in range(8):
        tio.save_tensors(tmp_path / f"{i}.safetensors", tensors, meta)
        files.append((tmp_path / f"{i}.safetensors").read_bytes())
    assert len(set(files)) == 1
    loaded, back = tio.load_tensors(tmp_path / "0.safetensors")
    assert back == meta and all(torch.equal(loaded[k], tensors[k]) for k in tensors)


# --- the pipeline steps (slow) --------------------------------------------------------------

SETTINGS = ["data.name=moons", "data.n=2000", "model.arch=mlp", "model.hidden=64",
            "model.depth=2", "teacher.iterations=200", "teacher.log_every=50",
            "sweep.methods=[teacher,uniform,bellman,boss]",
            "sweep.eval_samples=100"]  # straighten: 60 iterations, checkpoint every 20 (tiny)


def stage(repo: Path, step: str, *args: str, fault: str | None = None,
          expect: int = 0) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", f"tasks.{step}", *args]
    for kv in SETTINGS:
        cmd += ["--set", kv]
    extra = {"BOSS_LOG_LEVEL": "INFO"}
    if fault is not None:
        extra["BOSS_FAULT"] = fault
    done = run(cmd, repo, check=False, timeout=300, **extra)
    assert done.returncode == expect, (f"{step} {args} (fault {fault}) returned "
                                       f"{done.returncode}:\n{done.stderr[-4000:]}")
    return done


def snapshot(folder: Path) -> dict[str, bytes]:
    """{relative path: bytes} of every file under ``folder``."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def without(files: dict[str, bytes], *names: str) -> dict[str, bytes]:
    return {k: v for k, v in files.items() if Path(k).name not in names}


def same_tensors(a: Path, b: Path, ignore: tuple[str, ...] = ("wall_seconds",)) -> bool:
    """Bit-identical tensors and equal metadata, timing keys aside."""
    (ta, ma), (tb, mb) = tio.load_tensors(a), tio.load_tensors(b)
    return (ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
            and without(ma, *ignore) == without(mb, *ignore))


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    dest = copy_repo(tmp_path_factory.mktemp("faults"))
    stage(dest, "prepare")
    return dest


@pytest.fixture(scope="module")
def teacher_ref(repo):
    stage(repo, "teacher")
    return snapshot(repo / "outputs" / "teacher")


@pytest.fixture(scope="module")
def cost_ref(repo, teacher_ref, tmp_path_factory):
    stage(repo, "cost")
    keep = tmp_path_factory.mktemp("cost_ref")
    for name, data in snapshot(repo / "outputs" / "cost").items():
        (keep / name).write_bytes(data)
    return keep


@pytest.fixture(scope="module")
def boss_ref(repo, cost_ref):
    stage(repo, "schedules")
    stage(repo, "pairs")
    stage(repo, "straighten", "--method", "boss")
    return snapshot(repo / "outputs" / "students" / "boss")


@pytest.mark.slow
@pytest.mark.e2e
def test_teacher_killed_after_two_checkpoints_resumes_to_the_same_weights(repo, teacher_ref):
    out = repo / "outputs" / "teacher"
    prepared = snapshot(repo / "outputs" / "prepare")
    assert not list((repo / "checkpoints" / "teacher").rglob("teacher.pt"))  # done: cleared
    stage(repo, "teacher", fault="teacher.checkpoint:2", expect=KILLED)
    [ckpt] = (repo / "checkpoints" / "teacher").rglob("teacher.pt")
    assert torch.load(ckpt, weights_only=True)["step"] == 100  # log_every 50, 2 checkpoints
    assert snapshot(out) == teacher_ref  # the earlier model is intact, nothing half-written
    assert snapshot(repo / "outputs" / "prepare") == prepared
    assert not temps(repo / "outputs") and not temps(repo / "checkpoints")
    done = stage(repo, "teacher")
    assert "teacher: resuming from step 100" in done.stderr
    assert tio.read_json(out / "summary.json")["iterations"] == 200
    # model.safetensors, losses.csv and loss.png byte for byte (summary.json holds seconds)
    assert without(snapshot(out), "summary.json") == without(teacher_ref, "summary.json")
    assert not ckpt.parent.exists()  # finished: checkpoint folder removed


@pytest.mark.slow
@pytest.mark.e2e
def test_cost_killed_mid_write_keeps_the_old_matrix_and_the_rerun_clears_the_temp(
        repo, teacher_ref, cost_ref):
    out = repo / "outputs" / "cost"
    before, teacher = snapshot(out), snapshot(repo / "outputs" / "teacher")
    stage(repo, "cost", fault="artifact.write/cost.safetensors:1", expect=KILLED)
    [left] = temps(out)  # the killed writer's complete temporary, hidden beside the target
    assert left.name.startswith(".cost.safetensors.")
    assert snapshot(out) == {**before, left.name: left.read_bytes()}  # old files intact
    assert snapshot(repo / "outputs" / "teacher") == teacher
    stage(repo, "cost")
    assert not temps(out)  # swept by the rerun's first write there
    assert sorted(p.name for p in out.iterdir()) == ["cost.safetensors", "summary.json"]
    # the uninterrupted run's matrix (its metadata and summary.json hold wall seconds)
    assert same_tensors(out / "cost.safetensors", cost_ref / "cost.safetensors")
    assert (without(tio.read_json(out / "summary.json"), "wall_seconds")
            == without(tio.read_json(cost_ref / "summary.json"), "wall_seconds"))


@pytest.mark.slow
@pytest.mark.e2e
def test_straighten_killed_after_a_checkpoint_resumes_to_the_same_students(repo, boss_ref):
    """K = 1, 2, 4 take 60 steps each, a checkpoint every 20: the 4th checkpoint is K=2's
    first. The rerun takes K=1 from its final checkpoint and K=2 from step 20."""
    out = repo / "outputs" / "students" / "boss"
    root = repo / "checkpoints" / "straighten"
    assert not list(root.rglob("straighten.pt"))  # the uninterrupted run cleared its own
    upstream = {name: snapshot(repo / "outputs" / name) for name in ("pairs", "teacher")}
    stage(repo, "straighten", "--method", "boss", fault="straighten.checkpoint:4",
          expect=KILLED)
    steps = {ckpt.relative_to(root).parts[1]: torch.load(ckpt, weights_only=True)["step"]
             for ckpt in root.rglob("straighten.pt")}
    assert steps == {"nfe_1": 60, "nfe_2": 20}
    assert not list(out.rglob("*.safetensors")) and not temps(out)  # nothing half-written
    assert {n: snapshot(repo / "outputs" / n) for n in upstream} == upstream
    done = stage(repo, "straighten", "--method", "boss")
    assert "straighten boss nfe_1: resumed from step 60" in done.stderr
    assert "straighten boss nfe_2: resumed from step 20" in done.stderr
    assert "nfe_4: resumed" not in done.stderr
    # models, schedules and losses byte for byte (costs.json holds wall seconds)
    assert without(snapshot(out), "costs.json") == without(boss_ref, "costs.json")
    assert not list(root.rglob("straighten.pt"))


@pytest.mark.slow
@pytest.mark.e2e
def test_evaluate_killed_mid_metrics_leaves_no_metrics_and_the_rerun_matches(repo, boss_ref):
    results = repo / "results"
    assert not (results / "metrics.json").exists()
    stage(repo, "evaluate", fault="artifact.write/metrics.json:1", expect=KILLED)
    assert not (results / "metrics.json").exists()  # absent, not half-written
    assert not (results / "costs.json").exists()
    assert [p.name.split(".")[1] for p in temps(results)] == ["metrics"]
    stage(repo, "evaluate")
    assert not temps(results)
    rerun = {n: (results / n).read_bytes() for n in ("metrics.json", "costs.json")}
    stage(repo, "evaluate")  # the uninterrupted reference
    assert {n: (results / n).read_bytes() for n in rerun} == rerun
