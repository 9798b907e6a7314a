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
import signal
import subprocess
import sys
import time
from collections.abc import Mapping

import httpx

from tasks.runtime.servers import (  # noqa: F401 (re-exported for the tests and benches)
    QUIET_ENV,
    ApiUrl,
    free_port,
    port_is_free,
    prefect_executable,
    prefect_server,
    stop_process,
    wait_healthy,
)


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
