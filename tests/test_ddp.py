"""Straightening under torchrun (DistributedDataParallel, gloo on the CPU) equals one process.

tests/ddp_worker.py trains a small MLP on synthetic 2-D pairs (reflow: t drawn from the step's
generator for the whole global batch; chords: fixed pairs) with the global batch B = 64 and
writes each rank's losses and weights. One process with B = 64 is the reference.

Tolerance. W ranks compute the same math as one process; only float32 reduction order differs
(each rank's mean over B / W rows, then DDP's (1 / W) sum over ranks, against one mean over B
rows), and Adam's division by sqrt(v) carries those last-bit differences into the weights.
Measured on this 2-core CPU, 240 steps: max |weight difference| 2.4e-7 (reflow) and 3.6e-7
(chords, 300 steps) for weights up to 1.4 in size, i.e. two float32 ulps; max relative
difference of the per-step loss 1.8e-7 (reflow) and 3.0e-7 (chords); validation losses
7e-8. The tests allow WEIGHT_ATOL = 1.5e-6 and LOSS_RTOL = 1.5e-6 (4 to 5 times the
measured values), while training moves the weights by more than 0.1 from the teacher, so a
wrong shard (an unequal split, another t, a missing gradient average) fails them by orders of
magnitude. Two ranks against two ranks (a resumed run, the two ranks of one run, one node of
two against two processes on one node) are bit-identical: every rank averages the same
gradients and gloo's all-reduce gives every rank the same sum.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ddp_worker import make_pairs, train
from pipeline_helpers import ROOT, env

from boss_core.distributed import Dist
from boss_core.models import ModelConfig, build_model
from boss_core.straighten import CHECKPOINT_NAME, StraightenConfig, straighten, trainable_copy
from tasks.runtime import launch
from tasks.runtime.launch import build_command, free_port

WORKER = Path(__file__).with_name("ddp_worker.py")
TORCHRUN = str(Path(sys.executable).parent / "torchrun")
WEIGHT_ATOL = 1.5e-6  # measured 3.6e-7 (module doc)
LOSS_RTOL = 1.5e-6  # measured 3.0e-7
ITERATIONS, HALF = 240, 120  # a checkpoint at HALF, evaluations every 40 steps


def torchrun(out: Path, *args: str, nproc: int = 2) -> list[str]:
    return [TORCHRUN, "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
            "--master_port", str(free_port()), str(WORKER), str(out), *args]


def run_all(cmds: list[list[str]], timeout: float = 120) -> list[tuple[int, str]]:
    """Start every command at once (each in its own session, one thread), wait for all;
    [(exit code, stderr tail)]. Whatever is left running is killed by process group id."""
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, start_new_session=True)
             for cmd in cmds]
    try:
        errs = [p.communicate(timeout=timeout)[1][-3000:] for p in procs]
        return [(p.returncode, err) for p, err in zip(procs, errs, strict=True)]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def ok(cmds: list[list[str]]) -> None:
    for code, err in run_all(cmds):
        assert code == 0, err


def load(folder: Path, rank: int = 0) -> dict:
    return torch.load(folder / f"rank{rank}.pt", weights_only=True)


def max_diff(a: dict, b: dict, key: str) -> float:
    assert a[key].keys() == b[key].keys()
    return max(float((a[key][k] - b[key][k]).abs().max()) for k in a[key])


def assert_identical(a: dict, b: dict) -> None:
    for key in ("losses", "val_losses"):
        assert torch.equal(a[key], b[key]), key
    assert max_diff(a, b, "model") == 0.0 and max_diff(a, b, "ema") == 0.0


def assert_close(a: dict, b: dict) -> None:
    """Equal up to float32 reduction order (WEIGHT_ATOL, LOSS_RTOL; module doc)."""
    for key in ("losses", "val_losses"):
        assert a[key].shape == b[key].shape and torch.equal(a[key][:, 0], b[key][:, 0])
        rel = ((a[key][:, 1] - b[key][:, 1]).abs() / b[key][:, 1].abs()).max()
        assert rel <= LOSS_RTOL, (key, float(rel))
    for key in ("model", "ema"):
        assert max_diff(a, b, key) <= WEIGHT_ATOL, (key, max_diff(a, b, key))
    assert max_diff(b, {"model": b["teacher"]}, "model") > 1e5 * WEIGHT_ATOL  # it trained


@pytest.fixture(scope="module")
def one(tmp_path_factory):
    """{pairs kind: the one-process reference} (in this process)."""
    folder = tmp_path_factory.mktemp("one")
    return {kind: train(folder / kind, Dist(), kind, ITERATIONS) for kind in ("reflow", "chord")}


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    """The uninterrupted 2-rank reflow run, both ranks."""
    folder = tmp_path_factory.mktemp("two")
    ok([torchrun(folder, "--iterations", str(ITERATIONS))])
    return [load(folder, 0), load(folder, 1)]


@pytest.mark.e2e
@pytest.mark.slow
def test_two_ranks_match_one_process_with_the_same_global_batch(one, two):
    assert two[0]["world_size"] == 2 and one["reflow"]["world_size"] == 1
    assert_identical(two[0], two[1])  # the ranks agree bit for bit
    assert_close(two[0], one["reflow"])
    assert two[0]["losses"].shape == (ITERATIONS, 2)


@pytest.mark.e2e
@pytest.mark.slow
def test_interrupted_two_rank_run_resumes_exactly_and_in_one_process(one, two, tmp_path):
    ckpt = tmp_path / "ckpt"
    args = ["--iterations", str(ITERATIONS), "--ckpt", str(ckpt),
            "--checkpoint-every", str(HALF)]
    [(code, err)] = run_all([torchrun(tmp_path / "killed", *args, "--exit-at", str(HALF))])
    assert code != 0 and re.search(r"exitcode\s*:\s*3", err)  # os._exit(3) after the save
    assert not (tmp_path / "killed").exists()
    assert torch.load(ckpt / CHECKPOINT_NAME, weights_only=True)["step"] == HALF
    shutil.copytree(ckpt, tmp_path / "ckpt_one")

    ok([torchrun(tmp_path / "resumed", *args)])
    resumed = load(tmp_path / "resumed")
    assert resumed["resumed_from"] == HALF
    assert_identical(resumed, two[0])  # exact: same ranks, same reductions

    alone = train(tmp_path / "alone", Dist(), "reflow", ITERATIONS, ckpt=tmp_path / "ckpt_one",
                  checkpoint_every=HALF)
    assert alone["resumed_from"] == HALF
    assert_close(alone, one["reflow"])


@pytest.mark.e2e
@pytest.mark.slow
def test_one_process_checkpoint_resumes_on_two_ranks(one, two, tmp_path):
    ckpt = tmp_path / "ckpt"
    first = train(tmp_path / "first", Dist(), "reflow", HALF, ckpt=ckpt)  # stops at HALF
    assert torch.equal(first["losses"], one["reflow"]["losses"][:HALF])
    ok([torchrun(tmp_path / "resumed", "--iterations", str(ITERATIONS), "--ckpt", str(ckpt))])
    resumed = load(tmp_path / "resumed")
    assert resumed["resumed_from"] == HALF
    assert torch.equal(resumed["losses"][:HALF], one["reflow"]["losses"][:HALF])
    assert_close(resumed, two[0])
    assert_close(resumed, one["reflow"])


@pytest.mark.e2e
@pytest.mark.slow
def test_two_nodes_rendezvous_over_c10d_and_match_one_process(one, tmp_path):
    """Two torchrun agents (--nnodes 2, one process each) meet at one c10d endpoint on
    127.0.0.1, as two machines would; chord pairs this time."""
    endpoint, rdzv_id = f"127.0.0.1:{free_port()}", f"test-{os.getpid()}"
    node = [TORCHRUN, "--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d",
            "--rdzv_endpoint", endpoint, "--rdzv_id", rdzv_id, str(WORKER), str(tmp_path),
            "--pairs", "chord", "--iterations", str(ITERATIONS)]
    ok([node, node])
    ranks = [load(tmp_path, 0), load(tmp_path, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert_identical(ranks[0], ranks[1])
    assert_close(ranks[0], one["chord"])


# --- bad input and the launcher (fast, in this process) -------------------------------------


def test_batch_not_divisible_by_the_world_size_fails_before_compute(tmp_path):
    teacher = build_model(ModelConfig(arch="mlp", hidden=16, depth=1, time_embed_dim=8), (2,),
                          seed=0)
    student = trainable_copy(teacher)
    pairs = make_pairs("reflow", 32, seed=1)
    config = StraightenConfig(iterations=5, batch_size=64, device="cpu", progress=False)
    with pytest.raises(ValueError, match=r"global batch size 64 .*not divisible by the world "
                                         r"size 3"):
        straighten(student, pairs, config, checkpoint_dir=tmp_path / "c",
                   dist=Dist(rank=1, world_size=3))
    with pytest.raises(ValueError, match="needs torch.distributed's process group"):
        straighten(student, pairs, config, checkpoint_dir=tmp_path / "c",
                   dist=Dist(rank=1, world_size=2))  # 64 / 2 is fine, but no group
    assert not (tmp_path / "c").exists()
    assert all(torch.equal(a, b) for a, b in zip(student.state_dict().values(),
                                                 teacher.state_dict().values(), strict=True))
    assert [Dist(r, 4).rank_slice(64) for r in range(4)] == [
        slice(0, 16), slice(16, 32), slice(32, 48), slice(48, 64)]


def test_dist_from_env_reads_torchrun_variables():
    assert Dist.from_env({}) == Dist(0, 1, 0) and not Dist.from_env({}).active
    d = Dist.from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (d.rank, d.world_size, d.local_rank, d.is_main, d.active) == (3, 4, 1, False, True)
    assert d.device("cuda:0") == torch.device("cuda", 1) and d.device("cpu").type == "cpu"
    with pytest.raises(ValueError, match="outside world_size"):
        Dist.from_env({"RANK": "2", "WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="bad torchrun environment"):
        Dist.from_env({"RANK": "x"})
    assert float(Dist().all_mean(torch.tensor(2.5))) == 2.5


def test_launcher_command_comes_from_params_scale():
    from boss_core.config import ScaleConfig

    argv = ["--method", "boss", "--set", "scale.nnodes=2"]
    python = "/venv/bin/python"
    assert build_command(ScaleConfig(), "straighten", argv, python) == [
        python, "-m", "tasks.straighten", *argv]
    scale = ScaleConfig(nnodes=2, nproc_per_node=3, rdzv_endpoint="node0:29400", rdzv_id="j7")
    assert build_command(scale, "straighten", argv, python) == [
        "/venv/bin/torchrun", "--nnodes", "2", "--nproc_per_node", "3",
        "--rdzv_backend", "c10d", "--rdzv_endpoint", "node0:29400", "--rdzv_id", "j7",
        "-m", "tasks.straighten", *argv]
    local = build_command(ScaleConfig(nproc_per_node=2), "straighten", argv, python, port=4321)
    assert local[local.index("--rdzv_endpoint") + 1] == "127.0.0.1:4321"
    assert local[local.index("--nnodes") + 1] == "1"
    with pytest.raises(ValueError, match="unknown step"):
        build_command(ScaleConfig(), "teacher", argv, python)


def test_launcher_applies_overrides_to_scale_and_refuses_an_uneven_batch(monkeypatch, caplog):
    """``--set`` reaches the launcher's own reading of scale; an uneven split stops it with
    exit 2 and one line, before torchrun starts."""
    boss = logging.getLogger("boss")  # it does not propagate to caplog's root handler
    monkeypatch.setattr(boss, "handlers", [*boss.handlers, caplog.handler])
    started = []
    monkeypatch.setattr(launch, "run_child", lambda cmd: started.append(cmd) or 0)
    params = str(ROOT / "params.yaml")
    code = launch.main(["straighten", "--method", "boss", "--params", params,
                        "--set", "scale.nproc_per_node=3", "--set", "straighten.batch_size=64"])
    assert code == 2 and not started
    assert "not divisible by the world size 3" in caplog.text
    argv = ["--method", "boss", "--params", params, "--set", "scale.nproc_per_node=2",
            "--set", "straighten.batch_size=64"]
    assert launch.main(["straighten", *argv]) == 0
    [cmd] = started
    assert cmd[:5] == [TORCHRUN, "--nnodes", "1", "--nproc_per_node", "2"]
    assert cmd[cmd.index("-m"):] == ["-m", "tasks.straighten", *argv]


def test_launcher_help_and_exit_codes(capsys):
    with pytest.raises(SystemExit) as done:
        launch.main(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    for word in ("torchrun", "scale.nnodes", "rdzv_endpoint", "every node"):
        assert word in text
    assert launch.run_child([sys.executable, "-c", "import sys; sys.exit(5)"]) == 5
    killed = launch.run_child([sys.executable, "-c", "import os; os.kill(os.getpid(), 9)"])
    assert killed == 128 + 9


def test_launcher_runs_an_unselected_method_in_process(monkeypatch):
    """A method that sweep.methods leaves out only gets its "skipped" marker: no torchrun."""
    started, ran = [], []
    monkeypatch.setattr(launch, "run_child", lambda cmd: started.append(cmd) or 0)
    monkeypatch.setattr(importlib.import_module("tasks.straighten"), "main_cli",
                        lambda argv: ran.append(argv) or 0)
    params = str(ROOT / "params.yaml")
    scale = ["--set", "scale.nproc_per_node=2", "--set", "straighten.batch_size=64"]
    argv = ["--method", "boss", "--params", params, *scale, "--set", "sweep.methods=[uniform]"]
    assert launch.main(["straighten", *argv]) == 0
    assert ran == [argv] and not started
    selected = ["--method", "boss", "--params", params, *scale]
    assert launch.main(["straighten", *selected]) == 0
    assert ran == [argv] and len(started) == 1
