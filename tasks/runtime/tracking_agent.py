"""A local MLflow agent: the stage processes of one store send it their MlflowClient calls.

Importing MLflow and opening its SQLite (SQLAlchemy) store costs a fresh process about twice
what importing torch does (mlflow's eager imports, SQLAlchemy's mapper set-up, alembic), and
every DVC stage is a fresh process (bench/stage_overhead.py, BENCHMARKS.md). So a stage does
not import MLflow: it connects to an agent over a Unix socket, and the agent, which imported
MLflow once, makes the calls with its ``MlflowClient`` on the same store, one at a time, in
the order each stage sent them. Runs, nesting, params, metrics, tags, artifacts and registered
models are what the stage would have written itself; only the process that writes them differs.

One agent serves one (store URI, interpreter, checkout, MLflow install, ``MLFLOW_*``
environment); the first stage that needs it starts it (and waits for it, paying the import
once), later stages find it. It exits when no process has been connected for
``BOSS_TRACKING_AGENT_IDLE`` seconds (default 60; a ``dvc repro`` connects from stage to
stage), when its store's folder is removed, or when another agent took its socket. Its log is
``<socket>.log``, its socket under ``$XDG_RUNTIME_DIR`` or the temp dir in
``boss-tracking-<uid>/``.

Protocol: 4-byte big-endian length, then one JSON object, each way. Requests are
``{"op": "call", "method", "args", "kwargs"}`` (any MlflowClient method whose arguments are
JSON), ``{"op": "log_batch", "run_id", "metrics", "params", "tags"}`` (entities as lists) and
``{"op": "hello"}``. Replies are ``{"ok": value}`` with MLflow entities as
``{"__entity__": class name, property: value...}`` (read back as attribute records, e.g.
``run.info.status``, ``run.data.tags``), or ``{"error": {...}}``, raised again in the stage as
the same builtin exception type (ValueError, FileNotFoundError...) or as ``AgentError``
(an MlflowException, say), with MLflow's ``error_code``.
"""

from __future__ import annotations

import argparse
import builtins
import hashlib
import json
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any, NamedTuple

IDLE_ENV = "BOSS_TRACKING_AGENT_IDLE"
START_TIMEOUT = 180.0  # seconds a first stage waits for the agent's MLflow import, then falls back
_HEADER = struct.Struct(">I")
log = logging.getLogger("boss")


class ParamRecord(NamedTuple):
    """``mlflow.entities.Param`` without importing MLflow (what ``log_batch`` sends)."""

    key: str
    value: str


class MetricRecord(NamedTuple):
    """``mlflow.entities.Metric`` without importing MLflow: timestamp in ms, ``step``."""

    key: str
    value: float
    timestamp: int
    step: int


class AgentError(Exception):
    """An error the MLflow call raised in the agent (e.g. an MlflowException)."""

    def __init__(self, message: str, kind: str = "", error_code: str | None = None):
        super().__init__(message)
        self.kind, self.error_code = kind, error_code


def _send(sock: socket.socket, value: Any) -> None:
    body = json.dumps(value).encode()
    sock.sendall(_HEADER.pack(len(body)) + body)


def _recv_exactly(sock: socket.socket, size: int) -> bytes | None:
    chunks, left = [], size
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _recv(sock: socket.socket) -> Any:
    """The next message, or None when the peer closed the connection."""
    header = _recv_exactly(sock, _HEADER.size)
    if header is None:
        return None
    body = _recv_exactly(sock, _HEADER.unpack(header)[0])
    if body is None:
        return None
    return json.loads(body)


def _records(value: Any) -> Any:
    """A reply value with entity objects as attribute records (plain dicts stay dicts)."""
    if isinstance(value, dict):
        if "__entity__" in value:
            return SimpleNamespace(**{k: _records(v) for k, v in value.items()
                                      if k != "__entity__"})
        return {k: _records(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_records(v) for v in value]
    return value


def _raise(error: Mapping[str, Any]) -> None:
    kind, message = error.get("type", ""), error.get("message", "")
    builtin = getattr(builtins, kind, None) if error.get("module") == "builtins" else None
    if isinstance(builtin, type) and issubclass(builtin, Exception):
        raise builtin(message)
    raise AgentError(message, kind, error.get("error_code"))


class AgentClient:
    """The MlflowClient methods a step uses, sent to the agent at ``path``.

    ``client.<method>(*args, **kwargs)`` runs ``MlflowClient.<method>`` in the agent; the
    arguments must be JSON (local paths of ``log_artifact(s)`` are made absolute first).
    ``log_batch`` takes ``MetricRecord`` / ``ParamRecord`` lists (``entity_types``).
    Thread-safe (one request at a time); a forked child opens its own connection.
    """

    entity_types = (ParamRecord, MetricRecord)

    def __init__(self, path: Path, sock: socket.socket):
        self.path = path
        self._sock, self._pid, self._lock = sock, os.getpid(), threading.Lock()

    def _request(self, request: Mapping[str, Any]) -> Any:
        with self._lock:
            if self._pid != os.getpid():  # a forked child must not share the parent's stream
                self._sock = _open(self.path)
                self._pid = os.getpid()
            try:
                _send(self._sock, request)
                reply = _recv(self._sock)
            except OSError as err:
                raise ConnectionError(f"the MLflow tracking agent at {self.path} stopped "
                                      f"answering ({err}); its log: {self.path}.log") from err
        if reply is None:
            raise ConnectionError(f"the MLflow tracking agent at {self.path} closed the "
                                  f"connection; its log: {self.path}.log")
        if "error" in reply:
            _raise(reply["error"])
        return _records(reply.get("ok"))

    def log_batch(self, run_id: str, metrics=(), params=(), tags=()) -> None:
        self._request({"op": "log_batch", "run_id": run_id,
                       "metrics": [list(m) for m in metrics],
                       "params": [list(p) for p in params],
                       "tags": [[t.key, t.value] for t in tags]})

    def log_artifact(self, run_id: str, local_path: str, artifact_path: str | None = None):
        return self._call("log_artifact", run_id, os.path.abspath(local_path), artifact_path)

    def log_artifacts(self, run_id: str, local_dir: str, artifact_path: str | None = None):
        return self._call("log_artifacts", run_id, os.path.abspath(local_dir), artifact_path)

    def _call(self, method: str, *args, **kwargs):
        return self._request({"op": "call", "method": method, "args": list(args),
                              "kwargs": kwargs})

    def __getattr__(self, method: str):
        if method.startswith("_"):
            raise AttributeError(method)
        return lambda *args, **kwargs: self._call(method, *args, **kwargs)

    def close(self) -> None:
        self._sock.close()


# --- finding or starting the agent (the stage side) ----------------------------------------

def _project_root() -> Path:
    return Path(__file__).resolve().parents[2]


def socket_path(uri: str) -> Path:
    """Where the agent for ``uri`` (and this interpreter, checkout and environment) listens."""
    from importlib.util import find_spec

    spec = find_spec("mlflow")
    mlflow_stamp = os.stat(spec.origin).st_mtime_ns if spec and spec.origin else 0
    env = sorted((k, v) for k, v in os.environ.items()
                 if k.startswith("MLFLOW_") and k != "MLFLOW_TRACKING_URI")
    code = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()
    key = hashlib.sha256(json.dumps([uri, sys.executable, str(_project_root()), code,
                                     mlflow_stamp, env]).encode()).hexdigest()[:20]
    base = Path(os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir())
    return base / f"boss-tracking-{os.getuid()}" / f"{key}.sock"


def _open(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
    except OSError:
        sock.close()
        raise
    return sock


def _hello(path: Path) -> AgentClient | None:
    """A client of a live agent at ``path``, or None when there is none (or it is exiting)."""
    try:
        client = AgentClient(path, _open(path))
        client._request({"op": "hello"})
    except OSError:
        return None
    return client


@contextmanager
def _start_lock(path: Path):
    import fcntl

    with open(path.with_suffix(".lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # one starter per agent; the others wait, then connect
        yield


def connect(uri: str) -> AgentClient | None:
    """A client of the agent for ``uri``, starting the agent if none runs; None if it cannot
    start (the caller then uses MLflow in-process)."""
    path = socket_path(uri)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    folder = path.parent.stat()
    if folder.st_uid != os.getuid() or folder.st_mode & 0o077:
        log.warning("%s is not a private folder of this user; using MLflow in this process",
                    path.parent)
        return None
    client = _hello(path)
    if client is not None:
        return client
    with _start_lock(path):
        client = _hello(path)  # started by another stage while this one waited for the lock
        if client is not None:
            return client
        path.unlink(missing_ok=True)  # a dead agent's socket
        with open(f"{path}.log", "w") as log_file:
            agent = subprocess.Popen(
                [sys.executable, "-m", "tasks.runtime.tracking_agent", "--socket", str(path),
                 "--uri", uri], cwd=_project_root(), stdin=subprocess.DEVNULL,
                stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline and agent.poll() is None:
            if path.exists():
                client = _hello(path)
                if client is not None:
                    return client
            time.sleep(0.02)
    state = (f"exited with {agent.returncode}" if agent.poll() is not None
             else f"did not answer within {START_TIMEOUT:.0f} s")
    log.warning("the MLflow tracking agent %s (log %s.log); using MLflow in this process",
                state, path)
    return None


# --- the agent process ---------------------------------------------------------------------

def _plain(value: Any) -> Any:
    """An MLflow call's result as JSON: entities as {"__entity__": name, property: value}."""
    from mlflow.entities._mlflow_object import _MlflowObject

    if isinstance(value, _MlflowObject):
        return {"__entity__": type(value).__name__, **{k: _plain(v) for k, v in value}}
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


class Agent:
    """The MLflow side: one ``MlflowClient`` on ``uri``, a thread per connection, one call at
    a time (in arrival order), and the exit rules of the module doc."""

    def __init__(self, path: Path, uri: str, idle: float):
        import mlflow
        from mlflow.entities import Metric, Param, RunTag

        self.path, self.uri, self.idle = path, uri, idle
        self.client = mlflow.MlflowClient(tracking_uri=uri)
        self.client.search_experiments(max_results=1)  # open (create, migrate) the store now
        self._entities = Metric, Param, RunTag
        self._call_lock, self._state = threading.Lock(), threading.Lock()
        self._active, self._last, self._stop = 0, time.monotonic(), False
        self._store_folder = Path(uri.removeprefix("sqlite:///")).parent if uri.startswith(
            "sqlite:///") else None

    def execute(self, request: Mapping[str, Any]) -> dict[str, Any]:
        try:
            op = request.get("op")
            if op == "hello":
                return {"ok": {"pid": os.getpid(), "uri": self.uri}}
            if op == "log_batch":
                metric, param, tag = self._entities
                self.client.log_batch(
                    request["run_id"], metrics=[metric(*m) for m in request["metrics"]],
                    params=[param(*p) for p in request["params"]],
                    tags=[tag(*t) for t in request["tags"]])
                return {"ok": None}
            if op == "call":
                method = request["method"]
                fn = None if method.startswith("_") else getattr(self.client, method, None)
                if not callable(fn):
                    raise AttributeError(f"MlflowClient has no method {method!r}")
                return {"ok": _plain(fn(*request["args"], **request["kwargs"]))}
            raise ValueError(f"unknown request {op!r}")
        except Exception as err:
            return {"error": {"type": type(err).__name__, "module": type(err).__module__,
                              "message": str(err),
                              "error_code": getattr(err, "error_code", None)}}

    def _serve_connection(self, conn: socket.socket) -> None:
        try:
            while (request := _recv(conn)) is not None:
                with self._call_lock:
                    reply = self.execute(request)
                _send(conn, reply)
        except OSError:
            pass  # the stage went away mid-request (killed): its run is left to the KILLED check
        finally:
            conn.close()
            with self._state:
                self._active -= 1
                self._last = time.monotonic()

    def _accept(self, listener: socket.socket) -> bool:
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            return False
        with self._state:
            self._active += 1
        threading.Thread(target=self._serve_connection, args=(conn,), daemon=True).start()
        return True

    def stop(self, *_) -> None:
        """SIGTERM / SIGINT: leave at the next check (within a second), cleaning up."""
        self._stop = True

    def _should_exit(self, inode: int) -> bool:
        if self._stop:
            return True
        with self._state:
            if self._active == 0 and time.monotonic() - self._last > self.idle:
                return True
        if self._store_folder is not None and not self._store_folder.is_dir():
            return True
        try:
            return os.stat(self.path).st_ino != inode  # another agent took the socket
        except FileNotFoundError:
            return True

    def serve(self) -> None:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        staging = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        staging.unlink(missing_ok=True)
        listener.bind(str(staging))
        listener.listen(64)
        os.replace(staging, self.path)  # visible only now, with MLflow imported and the store open
        inode = os.stat(self.path).st_ino
        listener.settimeout(1.0)
        while self._accept(listener) or not self._should_exit(inode):
            pass
        with self._state:
            self._active += 1  # new connections after the unlink cannot arrive; drain the queued
        try:
            if os.stat(self.path).st_ino == inode:
                self.path.unlink()
        except FileNotFoundError:
            pass
        listener.settimeout(0.2)
        while self._accept(listener):
            pass
        listener.close()
        with self._state:
            self._active -= 1
        while True:  # let the drained connections finish
            with self._state:
                if self._active == 0:
                    break
            time.sleep(0.05)
        for extra in (f"{self.path}.log", self.path.with_suffix(".lock")):
            Path(extra).unlink(missing_ok=True)  # a clean exit: nothing to read in the log


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="the MLflow tracking agent (module doc); "
                                     "stages start it, not people")
    parser.add_argument("--socket", required=True, type=Path)
    parser.add_argument("--uri", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    agent = Agent(args.socket, args.uri, float(os.environ.get(IDLE_ENV, "60")))
    signal.signal(signal.SIGTERM, agent.stop)
    signal.signal(signal.SIGINT, agent.stop)
    agent.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
