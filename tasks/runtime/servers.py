"""Local services as child processes, stopped by PID: a Prefect server on 127.0.0.1.

``prefect_server()`` runs ``prefect server start`` for as long as a ``with`` block lasts (the
Dask shard runner and the tests use it); ``stop_process`` stops any child and its descendants.
``flows/local_server.py`` builds the served pipeline on top of these.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import httpx

QUIET_ENV = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_DISABLE_TELEMETRY": "true",
             "DVC_NO_ANALYTICS": "1"}
# An MLflow (3.x) tracking server starts 7 huey consumers and a job runner for its GenAI jobs
# (prompt optimisation, trace roll-ups) unless told not to. The pipeline runs none of them,
# and idle they poll: 15.5 s of CPU per 30 s (half a core) and 5 s more to start, measured on
# the 2-core machine. `make ui` and the tests' servers run without them.
MLFLOW_SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


class ApiUrl(str):
    """The server's API URL (a str) that also carries the server process (``.proc``)."""

    proc: subprocess.Popen

    @property
    def pid(self) -> int:
        return self.proc.pid


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: TIME_WAIT
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def prefect_executable() -> str:
    """The ``prefect`` next to this interpreter (the venv's), else the one on PATH."""
    local = Path(sys.executable).parent / "prefect"
    return str(local) if local.is_file() else (shutil.which("prefect") or "prefect")


def stop_process(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    """Stop ``proc`` and its descendants by PID: SIGTERM to all, SIGKILL after ``timeout``.

    Signalling the descendants too matters for ``flows.serve``: on SIGTERM Prefect's runner
    waits for its flow-run processes to finish, while a flow-run process given SIGTERM ends
    its run as Crashed at once.
    """
    import psutil

    if proc.poll() is not None:
        return
    try:
        tree = [psutil.Process(proc.pid)]
        tree += tree[0].children(recursive=True)
    except psutil.Error:
        tree = []
    for p in tree:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    try:
        proc.wait(timeout)  # reaps the direct child
    except subprocess.TimeoutExpired:
        pass
    _, alive = psutil.wait_procs(tree, timeout=2)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)
    if proc.poll() is None:
        proc.wait(5)


def wait_healthy(api_url: str, proc: subprocess.Popen | None = None,
                 timeout: float = 90.0) -> float:
    """Poll ``<api>/health`` until it answers true; returns the seconds waited."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"prefect server exited with code {proc.returncode} "
                               "before it was healthy")
        try:
            reply = httpx.get(f"{api_url}/health", timeout=2.0)
            if reply.status_code == 200 and reply.json() is True:
                return time.monotonic() - start
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.5)
    raise TimeoutError(f"prefect server at {api_url} not healthy after {timeout:.0f} s")


@contextmanager
def prefect_server(port: int | None = None, home: str | os.PathLike | None = None,
                   timeout: float = 90.0, log_file: str | os.PathLike | None = None,
                   env: Mapping[str, str] | None = None) -> Iterator[ApiUrl]:
    """Run ``prefect server start --host 127.0.0.1 --port <port>``; yields the API URL.

    The URL is a str with the server's ``Popen`` as ``.proc`` (and ``.pid``).

    ``port`` None picks a free one; ``home`` sets ``PREFECT_HOME`` (its SQLite database).
    The server runs in its own process group and is stopped by PID (SIGTERM, then SIGKILL).
    """
    port = port or free_port()
    api_url = ApiUrl(f"http://127.0.0.1:{port}/api")
    child_env = {**os.environ, **QUIET_ENV, **(env or {})}
    child_env.pop("PREFECT_API_URL", None)  # the server must not talk to another server
    if home is not None:
        Path(home).mkdir(parents=True, exist_ok=True)
        child_env["PREFECT_HOME"] = str(home)
    out = open(log_file, "ab") if log_file else subprocess.DEVNULL
    proc = subprocess.Popen(
        [prefect_executable(), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=child_env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        start_new_session=True)
    api_url.proc = proc
    try:
        wait_healthy(api_url, proc, timeout)
        yield api_url
    finally:
        stop_process(proc)
        if log_file:
            out.close()


