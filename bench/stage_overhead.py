"""Per-stage start-up cost: what a DVC stage process pays beyond ``import torch``.

    python bench/stage_overhead.py [--repeats 5] [--before REV] [--prefect]

Runs the cheapest stage (``python -m tasks.prepare`` on the embedded digits, tiny profile) in a
copy of the working tree, one thread, and a bare ``python -c 'import torch'``, interleaved
round by round so that a busy machine slows all of them alike. For each stage run the step's
own compute (its MLflow metric ``wall_seconds``: reading the data, the sample grid) is
subtracted from the process's wall time; what is left is the stage's start-up and shut-down
(interpreter, imports, params, the MLflow run), compared with the bare torch import:

- stage: the default (MLflow calls through the tracking agent, which is already running);
- first stage: the first stage of a run, which starts the agent (printed once; the store
  exists already: one untimed stage creates it first, in each copy);
- MLflow in-process: ``BOSS_TRACKING_AGENT=0``, the stage imports MLflow itself;
- before: with ``--before REV``, the same stage in a copy of git revision ``REV`` (e.g. the
  commit before this change), in the same rounds.

Every stage run must have logged a FINISHED nested run with its params, metrics and the
sample-grid artifact, or the benchmark fails. ``--prefect`` adds the stage as a Prefect flow
with a temporary server per process and against one shared server.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "tests"))
from common import hardware  # noqa: E402
from pipeline_helpers import copy_repo, env, run  # noqa: E402

STAGE = [sys.executable, "-m", "tasks.prepare"]
TARGET_S = 2.0  # a stage's start-up may cost at most this much more than `import torch`


def timed(cmd, cwd, **extra) -> float:
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=cwd, env=env(**extra), capture_output=True, text=True,
                          check=False)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{cmd} failed in {cwd}:\n{done.stderr[-3000:]}")
    return wall


def copy_revision(rev: str, dest: Path) -> Path:
    """``git archive rev`` with the tiny profile and the embedded data, committed (as
    ``copy_repo`` prepares the working tree)."""
    archive = subprocess.run(["git", "archive", "--format=tar", rev], cwd=ROOT,
                             capture_output=True, check=True).stdout
    dest.mkdir(parents=True)
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(dest, filter="data")
    run([sys.executable, "-m", "tasks.cli.profile", "tests/profiles/tiny.yaml", "--write",
         "params.yaml"], dest)
    run([sys.executable, "-m", "tasks.cli.embed"], dest)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "copy"]):
        run(cmd, dest)
    return dest


def step_seconds(repo: Path, count: int) -> list[float]:
    """The ``wall_seconds`` of the ``count`` prepare runs in ``repo``'s store, oldest first;
    each must be a FINISHED nested run with params, metrics and the sample grid."""
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("boss-tiny") or client.search_experiments(
        filter_string="name != 'Default'")[0]
    runs = client.search_runs([experiment.experiment_id],
                              filter_string="tags.`boss.step` = 'prepare'",
                              order_by=["attributes.start_time ASC"], max_results=1000)
    if len(runs) != count:
        raise RuntimeError(f"{repo}: {count} stage runs logged {len(runs)} MLflow runs")
    for r in runs:
        artifacts = [a.path for a in client.list_artifacts(r.info.run_id, "figures")]
        ok = (r.info.status == "FINISHED" and "mlflow.parentRunId" in r.data.tags
              and r.data.params and "n_samples" in r.data.metrics
              and "figures/real_samples.png" in artifacts)
        if not ok:
            raise RuntimeError(f"{repo}: stage run {r.info.run_id} is incomplete")
    return [r.data.metrics["wall_seconds"] for r in runs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--before", metavar="REV", help="also time the stage at git revision "
                        "REV (e.g. HEAD~1), in the same rounds")
    parser.add_argument("--prefect", action="store_true",
                        help="also time the stage as a Prefect flow (temporary / shared server)")
    args = parser.parse_args()
    print(f"hardware: {hardware()}")
    print(f"load average at start: {os.getloadavg()[0]:.1f} (1 min)")
    torch_cmd = [sys.executable, "-c", "import torch"]
    with tempfile.TemporaryDirectory() as tmp:
        repo = copy_repo(Path(tmp) / "repo")
        old = copy_revision(args.before, Path(tmp) / "before") if args.before else None
        walls: dict[str, list[float]] = {"import torch": []}
        order: list[str] = []  # the repo's stage runs in the order they ran (to match MLflow)
        # the agent waits 60 s for the next stage by default; the rounds put other processes
        # between two stages, so it waits longer here (it exits when the copy is removed)
        warm = {"BOSS_PREFECT": "0", "BOSS_TRACKING_AGENT_IDLE": "900"}
        # a fresh store: the first run creates the MLflow database (not timed)
        timed(STAGE, repo, BOSS_PREFECT="0", BOSS_TRACKING_AGENT="0")
        order.append("store creation")
        if old is not None:
            timed(STAGE, old, BOSS_PREFECT="0")
        first = timed(STAGE, repo, **warm)  # starts the tracking agent
        order.append("first stage")
        for _ in range(args.repeats):
            walls["import torch"].append(timed(torch_cmd, repo))
            for name, extra in (("stage", {}), ("MLflow in-process", {
                    "BOSS_TRACKING_AGENT": "0"})):
                walls.setdefault(name, []).append(timed(STAGE, repo, **warm, **extra))
                order.append(name)
            if old is not None:
                walls.setdefault(f"before ({args.before})", []).append(
                    timed(STAGE, old, BOSS_PREFECT="0"))
        computes: dict[str, list[float]] = {}
        for name, seconds in zip(order, step_seconds(repo, len(order)), strict=True):
            computes.setdefault(name, []).append(seconds)
        if old is not None:
            computes[f"before ({args.before})"] = step_seconds(old, args.repeats + 1)[1:]
        if args.prefect:
            prefect_rows(repo, args.repeats)
    base = statistics.median(walls["import torch"])
    print(f"\nmedian of {args.repeats} interleaved rounds; start-up = process wall - the "
          "step's own compute (MLflow wall_seconds)")
    print(f"{'':>26} {'wall':>6} {'step':>6} {'start-up':>9}   against `import torch`")
    print(f"{'import torch':>26} {base:6.2f} {'':>6} {base:9.2f}   1.00x")
    rows = {name: (statistics.median(w), statistics.median(computes[name]))
            for name, w in walls.items() if name != "import torch"}
    rows["first stage (starts agent)"] = (first, computes["first stage"][0])
    for name, (wall, step) in rows.items():
        start = wall - step
        print(f"{name:>26} {wall:6.2f} {step:6.2f} {start:9.2f}   {start / base:.2f}x "
              f"({start - base:+.2f} s)")
    extra = rows["stage"][0] - rows["stage"][1] - base
    verdict = "met" if extra <= TARGET_S else "NOT met"
    print(f"target (stage start-up <= import torch + {TARGET_S:.0f} s): {verdict} "
          f"({extra:+.2f} s)")


def prefect_rows(repo: Path, repeats: int) -> None:
    """The stage as a one-task Prefect flow: a temporary server per process, one shared server."""
    from flows.local_server import prefect_server

    home = repo.parent / "prefect"
    runs = {"temporary server": [timed(STAGE, repo, BOSS_PREFECT="1", PREFECT_HOME=str(home))
                                 for _ in range(repeats)]}
    start = time.perf_counter()
    with prefect_server(home=home) as api:
        print(f"shared Prefect server start: {time.perf_counter() - start:.1f} s (once per run)")
        runs["shared server"] = [timed(STAGE, repo, PREFECT_API_URL=str(api),
                                       PREFECT_HOME=str(home)) for _ in range(repeats)]
    for name, values in runs.items():
        print(f"prefect, {name:>16}: median {statistics.median(values):5.1f} s per stage; "
              f"runs {[round(v, 1) for v in values]}")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
