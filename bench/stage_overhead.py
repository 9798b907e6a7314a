"""Per-stage start-up cost: how a DVC stage should run its Prefect task.

    python bench/stage_overhead.py [--repeats 3]

Runs the cheapest stage (``python -m tasks.prepare`` on the embedded digits) in a copy of the
repository three ways and prints the median wall seconds and their ratios:

- direct: the stage calls the step function (what ``dvc repro`` does by default);
- temporary server: BOSS_PREFECT=1 without PREFECT_API_URL, so every stage process starts
  Prefect's temporary server;
- shared server: one ``prefect server`` for the whole pipeline (started once, its start-up
  printed separately), stages run as Prefect flows against it.
The step's own compute is the same in all three, so the differences are pure overhead.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "tests"))
from common import hardware  # noqa: E402
from pipeline_helpers import copy_repo, env  # noqa: E402

from flows.local_server import prefect_server  # noqa: E402


def timed(cmd, cwd, **extra) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, env=env(**extra), check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"hardware: {hardware()}")
    stage = [sys.executable, "-m", "tasks.prepare"]
    with tempfile.TemporaryDirectory() as tmp:
        repo = copy_repo(Path(tmp) / "repo")
        home = Path(tmp) / "prefect"
        runs = {"direct": [], "temporary server": [], "shared server": []}
        for _ in range(args.repeats):
            runs["direct"].append(timed(stage, repo, BOSS_PREFECT="0"))
            runs["temporary server"].append(timed(stage, repo, BOSS_PREFECT="1",
                                                  PREFECT_HOME=str(home)))
        start = time.perf_counter()
        with prefect_server(home=home) as api:
            print(f"shared server start: {time.perf_counter() - start:.1f} s (once per run)")
            for _ in range(args.repeats):
                runs["shared server"].append(timed(stage, repo, PREFECT_API_URL=str(api),
                                                   PREFECT_HOME=str(home)))
    base = statistics.median(runs["direct"])
    for name, values in runs.items():
        med = statistics.median(values)
        print(f"{name:>17}: median {med:5.1f} s per stage ({med / base:.2f}x direct; "
              f"+{med - base:.1f} s); runs {[round(v, 1) for v in values]}")
    print(f"12 stages: direct {12 * base:.0f} s of start-up+prepare vs temporary servers "
          f"{12 * statistics.median(runs['temporary server']):.0f} s")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
