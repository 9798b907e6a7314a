"""A local Prefect server (and the served pipeline) as child processes, stopped by PID.

    python -m flows.local_server --serve [--port 4200] [--name boss-default]
        [--params-file params.yaml]

starts ``prefect server start`` on 127.0.0.1, then ``python -m flows.serve`` against it, prints
the UI address and the command that triggers a run, and stops both on Ctrl-C. Without
``--serve`` it only runs the server. ``prefect_server()`` is the same server as a context
manager (the tests use it).
"""

from __future__ import annotations

import argparse
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


def deployment_id(api_url: str, full_name: str) -> str | None:
    """The id of deployment ``flow/name``, or None while it is not registered."""
    flow_name, _, name = full_name.partition("/")
    try:
        reply = httpx.get(f"{api_url}/deployments/name/{flow_name}/{name}", timeout=5.0)
    except httpx.HTTPError:
        return None
    return reply.json()["id"] if reply.status_code == 200 else None


def wait_for_deployment(api_url: str, full_name: str, proc: subprocess.Popen | None = None,
                        timeout: float = 90.0) -> str:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the serve process exited with code {proc.returncode}")
        found = deployment_id(api_url, full_name)
        if found:
            return found
        time.sleep(0.5)
    raise TimeoutError(f"deployment {full_name} not registered after {timeout:.0f} s")


def start_serve(api_url: str, name: str = "boss-default", params_file: str = "params.yaml",
                cwd: str | os.PathLike | None = None, env: Mapping[str, str] | None = None,
                log_file: str | os.PathLike | None = None, limit: int = 1) -> subprocess.Popen:
    """``python -m flows.serve`` against ``api_url``, in its own process group; ``limit``
    flow runs at a time."""
    child_env = {**os.environ, **QUIET_ENV, "PREFECT_API_URL": api_url,
                 "PREFECT_RUNNER_POLL_FREQUENCY": "1", **(env or {})}
    out = open(log_file, "ab") if log_file else None
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "flows.serve", "--name", name, "--params-file", params_file,
             "--limit", str(limit)],
            cwd=cwd, env=child_env, stdout=out, stderr=subprocess.STDOUT if out else None,
            stdin=subprocess.DEVNULL, start_new_session=True)
    finally:
        if out is not None:
            out.close()  # the child holds its own copy


def main(argv: list[str] | None = None) -> int:
    from flows.serve import DEFAULT_NAME, trigger_command

    parser = argparse.ArgumentParser(prog="python -m flows.local_server", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=None,
                        help="server port (default 4200 when free, else a free port)")
    parser.add_argument("--home", default=None, help="PREFECT_HOME (default ~/.prefect)")
    parser.add_argument("--serve", action="store_true",
                        help="also serve the pipeline deployment")
    parser.add_argument("--name", default=DEFAULT_NAME, help="deployment name")
    parser.add_argument("--params-file", default="params.yaml", help="base params file")
    args = parser.parse_args(argv)

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    # Ctrl-C, and SIGTERM from make or kill, stop both children (SIGINT is ignored in jobs
    # started with & by a non-interactive shell unless a handler is set).
    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)
    port = args.port or (4200 if port_is_free(4200) else free_port())
    started = time.monotonic()
    with prefect_server(port, args.home) as api_url:
        ui = api_url.removesuffix("/api")
        print(f"Prefect server healthy after {time.monotonic() - started:.1f} s: UI {ui}",
              flush=True)
        serve = None
        try:
            if args.serve:
                serve = start_serve(api_url, args.name, args.params_file)
                wait_for_deployment(api_url, f"boss-pipeline/{args.name}", serve)
                print(f"deployment boss-pipeline/{args.name} is served. Trigger a run with:\n"
                      f"  PREFECT_API_URL={api_url} {trigger_command(args.name)}\n"
                      "Ctrl-C stops the server and the runner.", flush=True)
            while serve is None or serve.poll() is None:
                time.sleep(1)
            print(f"the serve process exited with code {serve.returncode}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("stopping the runner and the server", flush=True)
            return 0
        finally:
            for signum in (signal.SIGINT, signal.SIGTERM):  # a second one must not orphan them
                signal.signal(signum, signal.SIG_IGN)
            if serve is not None:
                stop_process(serve)


if __name__ == "__main__":
    sys.exit(main())
