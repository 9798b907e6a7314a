"""A real Dask cluster for the tests: ``dask scheduler`` plus worker processes on 127.0.0.1,
reached by address, reporting to a running Prefect server (the session's). Every process is
stopped by its PID."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path

from flows.local_server import free_port, stop_process
from tasks.runtime.shards import WORKER_ENV

REPO = Path(__file__).resolve().parents[1]


def _stop_all(procs: list[subprocess.Popen]) -> None:
    """``stop_process`` on every process at once: each worker's graceful close takes seconds."""
    with ThreadPoolExecutor(max(1, len(procs))) as pool:
        list(pool.map(stop_process, procs))


def _dask() -> str:
    return str(Path(sys.executable).with_name("dask"))


@contextmanager
def dask_cluster(api: str, n_workers: int = 2, cwd: Path = REPO,
                 timeout: float = 120.0) -> Iterator[tuple[str, str]]:
    """Yields (scheduler address, ``api``); workers have one thread each and their shard
    sub-flows report to ``api``, a running Prefect server (conftest's ``prefect_server_api``:
    one per session rather than one per cluster, as a server start costs 12 s of CPU)."""
    from distributed import Client

    with ExitStack() as stack:
        home = stack.enter_context(tempfile.TemporaryDirectory(prefix="boss-dask-"))
        port = free_port()
        address = f"tcp://127.0.0.1:{port}"
        env = {**os.environ, **WORKER_ENV, "PREFECT_API_URL": api, "OMP_NUM_THREADS": "1",
               "PYTHONPATH": str(cwd), "DASK_LOGGING__DISTRIBUTED": "warning",
               "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
        log = stack.enter_context(open(Path(home) / "dask.log", "ab"))

        def start(args: list[str]) -> subprocess.Popen:
            return subprocess.Popen([_dask(), *args], cwd=cwd, env=env, stdout=log,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)

        scheduler = start(["scheduler", "--host", "127.0.0.1", "--port", str(port),
                           "--dashboard-address", ":0", "--no-show"])
        stack.callback(stop_process, scheduler)
        workers: list[subprocess.Popen] = []
        stack.callback(_stop_all, workers)  # before the scheduler (the stack unwinds LIFO)
        for _ in range(n_workers):
            workers.append(start(["worker", address, "--nthreads", "1", "--nworkers", "1",
                                  "--host", "127.0.0.1", "--dashboard-address", ":0",
                                  "--local-directory", str(Path(home) / "workers")]))
        with Client(address, timeout=timeout) as client:
            client.wait_for_workers(n_workers, timeout=timeout)
        yield address, str(api)
