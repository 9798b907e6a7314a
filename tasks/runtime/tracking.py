"""MLflow: one parent run per pipeline invocation, one nested run per step.

The store defaults to ``sqlite:///<repo root>/mlflow.db`` (an absolute path, so ``dvc exp run``
copies log to the same place) with artifacts in ``<repo root>/mlartifacts``;
``MLFLOW_TRACKING_URI`` overrides it (use a tracking server for concurrent runs).

Finding the parent run, in order:
1. ``BOSS_PARENT_RUN_ID`` in the environment (set by the Prefect flow ``flows.pipeline``);
2. the ``dvc`` process this step runs under: every stage of one ``dvc repro`` / ``dvc exp run``
   shares the tag ``boss.invocation = dvc-<pid>-<start time>`` and so one parent run;
3. otherwise a new parent run for this process.
Nothing about the parent is written to DVC-tracked files.

Who makes the MLflow calls (``BOSS_TRACKING_AGENT``): a stage process that has not imported
MLflow (every DVC stage) sends its calls for a SQLite store to the tracking agent
(tasks/runtime/tracking_agent.py), which imports MLflow once for all stages: importing MLflow
and opening the store in every stage process cost more than importing torch. "auto" (the
default) does that; "1" uses the agent even where MLflow is already imported; "0" never (MLflow
in this process, as a long-lived process that has imported it, such as the Prefect flow, always
does). An http(s) tracking server is always called in-process.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .workspace import repo_root

PARENT_ENV = "BOSS_PARENT_RUN_ID"
AGENT_ENV = "BOSS_TRACKING_AGENT"
OWNER_TAG = "boss.owner"  # host:pid:start time of the process a step run belongs to
INVOCATION_TAG = "boss.invocation"
log = logging.getLogger("boss")


def tracking_uri(repo: Path) -> str:
    """``MLFLOW_TRACKING_URI``, else the SQLite file at the root that owns ``repo``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repo_root(repo) / 'mlflow.db'}"


def check_reachable(url: str, what: str, timeout: float = 5.0) -> None:
    """Raise ConnectionError at once (not after hours of compute) if ``url``'s health
    endpoint does not answer within ``timeout`` seconds."""
    import httpx

    try:
        response = httpx.get(url, timeout=timeout)
        response.raise_for_status()
    except (httpx.HTTPError, OSError) as err:
        raise ConnectionError(f"{what} at {url} is unreachable ({err.__class__.__name__}: "
                              f"{err}); start it, or unset the variable that points there"
                              ) from err


def check_tracking_server(repo: Path) -> None:
    """An http(s) MLFLOW_TRACKING_URI must answer /health before any step starts."""
    uri = tracking_uri(repo)
    if uri.startswith(("http://", "https://")):
        check_reachable(uri.rstrip("/") + "/health", "the MLflow tracking server "
                        "(MLFLOW_TRACKING_URI)")


def check_prefect_api() -> None:
    """A set PREFECT_API_URL must answer /health before a flow or stage starts."""
    api = os.environ.get("PREFECT_API_URL")
    if api:
        check_reachable(api.rstrip("/") + "/health", "the Prefect API (PREFECT_API_URL)")


def use_agent(uri: str) -> bool:
    """Whether this process sends its MLflow calls to the tracking agent (module doc)."""
    mode = os.environ.get(AGENT_ENV, "auto").lower()
    if mode not in ("0", "1", "auto"):
        raise ValueError(f"{AGENT_ENV} must be 0, 1 or auto, got {mode!r}")
    if mode == "0" or not uri.startswith("sqlite:") or not hasattr(os, "fork"):
        return False  # no AF_UNIX / fcntl agent on Windows
    return mode == "1" or "mlflow" not in sys.modules


def connect(repo: Path):
    """The client a step logs through: the tracking agent's (``use_agent``), else an
    ``mlflow.MlflowClient`` with the tracking URI set for this process."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    check_tracking_server(repo)
    uri = tracking_uri(repo)
    if use_agent(uri):
        from .tracking_agent import connect as connect_agent

        client = connect_agent(uri)
        if client is not None:
            return client
    import mlflow

    mlflow.set_tracking_uri(uri)
    return mlflow.MlflowClient()


def setup(repo: Path, experiment: str) -> str:
    """Point MLflow (in this process) at the store and experiment; returns the experiment id."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    check_tracking_server(repo)
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(repo))
    return ensure_experiment(mlflow.MlflowClient(), repo, experiment)


def ensure_experiment(client, repo: Path, experiment: str) -> str:
    """The id of ``experiment``, created (artifacts in <root>/mlartifacts for SQLite) if new."""
    found = client.get_experiment_by_name(experiment)
    if found is not None:
        return found.experiment_id
    location = None
    if tracking_uri(repo).startswith("sqlite:"):
        location = (repo_root(repo) / "mlartifacts").as_uri()
    try:
        return client.create_experiment(experiment, artifact_location=location)
    except Exception:  # another process created it first
        return client.get_experiment_by_name(experiment).experiment_id


def git_commit(repo: Path) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True,
                             text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def _dvc_invocation() -> str | None:
    """``dvc-<pid>-<create time>`` of the nearest ``dvc`` ancestor process, if any."""
    import psutil

    try:
        proc = psutil.Process().parent()
        while proc is not None:
            cmd = proc.cmdline()
            if any(Path(part).name in ("dvc", "dvc.exe") for part in cmd[:2]) or (
                    len(cmd) > 2 and cmd[1:3] == ["-m", "dvc"]):
                return f"dvc-{proc.pid}-{int(proc.create_time())}"
            proc = proc.parent()
    except (psutil.Error, OSError):
        return None
    return None


def process_owner(pid: int | None = None) -> str:
    """``host:pid:start time`` of a process (default: this one)."""
    import socket

    import psutil

    proc = psutil.Process(pid)
    return f"{socket.gethostname()}:{proc.pid}:{int(proc.create_time())}"


def _owner_alive(owner: str) -> bool:
    import socket

    import psutil

    host, _, rest = owner.partition(":")
    pid, _, started = rest.partition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return True  # another machine's run: not ours to judge
    try:
        return int(psutil.Process(int(pid)).create_time()) == int(started or -1)
    except (psutil.Error, ValueError):
        return False


def mark_dead_runs_killed(client, experiment_id: str) -> list[str]:
    """Step runs left RUNNING by a process that no longer exists (a SIGKILL, a power cut)
    are marked KILLED, and so are their parents, so nothing stays RUNNING forever."""
    try:
        stale = [r for r in client.search_runs(
            [experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=200)
            if OWNER_TAG in r.data.tags and not _owner_alive(r.data.tags[OWNER_TAG])]
        for run in stale:
            client.set_terminated(run.info.run_id, status="KILLED")
            parent = run.data.tags.get("mlflow.parentRunId")
            if parent and client.get_run(parent).info.status == "RUNNING":
                client.set_terminated(parent, status="KILLED")
        if stale:
            log.warning("marked %d step run(s) of dead processes KILLED", len(stale))
        return [r.info.run_id for r in stale]
    except Exception as err:  # bookkeeping only: never stop a step for it
        log.warning("could not check for runs of dead processes: %s", err)
        return []


def start_parent(experiment_id: str, repo: Path, name: str, params: Mapping[str, Any],
                 tags: Mapping[str, str] | None = None, client=None) -> str:
    """Create a parent run (left RUNNING) with the flattened params; returns its id.

    ``client``: default an in-process ``mlflow.MlflowClient`` (after ``setup``).
    """
    client = client or _in_process_client()
    all_tags = {"boss.kind": "pipeline", **(tags or {})}
    commit = git_commit(repo)
    if commit:
        all_tags["mlflow.source.git.commit"] = commit
    run = client.create_run(experiment_id, run_name=name, tags=all_tags)
    log_params(client, run.info.run_id, params)
    return run.info.run_id


def find_parent(experiment_id: str, repo: Path, params: Mapping[str, Any],
                client=None) -> str:
    """The parent run of this invocation (module doc), created if there is none yet."""
    if os.environ.get(PARENT_ENV):
        return os.environ[PARENT_ENV]
    client = client or _in_process_client()
    key = _dvc_invocation()
    if key is not None:
        found = client.search_runs(
            [experiment_id], filter_string=f"tags.`{INVOCATION_TAG}` = '{key}'", max_results=1)
        if found:
            return found[0].info.run_id
    name = f"dvc repro {time.strftime('%Y-%m-%d %H:%M:%S')}" if key else "pipeline"
    return start_parent(experiment_id, repo, name, params,
                        {INVOCATION_TAG: key or f"pid-{os.getpid()}"}, client)


def _in_process_client():
    import mlflow

    return mlflow.MlflowClient()


def _entity_types(client) -> tuple[type, type]:
    """(Param, Metric): MLflow's entities, or the agent client's records (no MLflow import)."""
    types = getattr(client, "entity_types", None)
    if types is not None:
        return types
    from mlflow.entities import Metric, Param

    return Param, Metric


def log_params(client, run_id: str, params: Mapping[str, Any]) -> None:
    Param, _ = _entity_types(client)  # noqa: N806 (a class)
    items = [Param(k, str(v)[:6000]) for k, v in sorted(params.items())]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i:i + 100])


def log_metrics(client, run_id: str, values: Mapping[str, float], step: int = 0) -> None:
    """Finite values only (a NaN never reaches MLflow)."""
    _log_points(client, run_id, [(k, step, v) for k, v in values.items()])


def log_series(client, run_id: str, name: str, rows, every: int = 1) -> None:
    """An (S, 2) array of (step, value) rows as one metric with ``step=``, every ``every``-th
    row; non-finite values are dropped."""
    _log_points(client, run_id, [(name, s, v) for s, v in rows[::every]])


def _log_points(client, run_id: str, points) -> None:
    """(name, step, value) triples in batches of 500 (MLflow's limit per call)."""
    import math

    _, Metric = _entity_types(client)  # noqa: N806 (a class)
    stamp = int(time.time() * 1000)
    items = [Metric(name, float(v), stamp, int(step)) for name, step, v in points
             if math.isfinite(float(v))]
    for i in range(0, len(items), 500):
        client.log_batch(run_id, metrics=items[i:i + 500])


@contextmanager
def step_run(step: str, repo: Path, experiment: str, params: Mapping[str, Any],
             all_params: Mapping[str, Any]) -> Iterator[tuple[Any, str, str]]:
    """A nested run for ``step`` under the invocation's parent.

    Yields (client, run id, parent id). A failure marks both runs FAILED (the parent keeps
    its earlier metrics); success marks the step FINISHED and the parent FINISHED until the
    next step reopens it, so no run is left RUNNING when the pipeline stops.
    """
    client = connect(repo)
    experiment_id = ensure_experiment(client, repo, experiment)
    mark_dead_runs_killed(client, experiment_id)
    parent = find_parent(experiment_id, repo, all_params, client)
    if client.get_run(parent).info.status != "RUNNING":
        client.update_run(parent, status="RUNNING")
    tags = {"mlflow.parentRunId": parent, "boss.step": step, OWNER_TAG: process_owner()}
    commit = git_commit(repo)
    if commit:
        tags["mlflow.source.git.commit"] = commit
    run = client.create_run(experiment_id, run_name=step, tags=tags)
    run_id = run.info.run_id
    log_params(client, run_id, params)
    try:
        yield client, run_id, parent
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        client.set_terminated(parent, status="FAILED")
        raise
    client.set_terminated(run_id, status="FINISHED")
    if os.environ.get(PARENT_ENV) is None:  # the flow ends its own parent
        client.set_terminated(parent, status="FINISHED")


def retry(fn, attempts: int = 3, delay: float = 2.0, what: str = "MLflow call"):
    """Call ``fn()``; on an I/O error (OSError, which covers ConnectionError and TimeoutError)
    wait and try again, ``delay`` doubling each time, at most ``attempts`` calls in all.

    Anything else (an MlflowException included: MLflow's client already retries its HTTP
    calls) is raised at once.
    """
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except OSError as err:
            if attempt == attempts:
                raise
            log.warning("%s failed (%s); retry %d/%d", what, err, attempt, attempts - 1)
            time.sleep(delay * 2 ** (attempt - 1))


def register_model(client, run_id: str, name: str, artifact_path: str,
                   tags: Mapping[str, str]) -> str:
    """Register the run's artifact folder ``artifact_path`` (safetensors + config + schedule;
    no pickle) as a new version of ``name``; returns the version."""
    try:
        client.create_registered_model(name, description=(
            "A BOSS-straightened velocity model: model.safetensors (weights + config in its "
            "metadata) and schedule.json. Load with `python -m tasks.cli.sample --registry NAME`."))
    except Exception as err:  # an MlflowException, or the agent's AgentError carrying one
        text = f"{getattr(err, 'error_code', None)} {err}"
        if "RESOURCE_ALREADY_EXISTS" not in text and "already exists" not in text:
            raise
    source = f"{client.get_run(run_id).info.artifact_uri}/{artifact_path}"
    version = retry(lambda: client.create_model_version(name, source, run_id=run_id,
                                                        tags=dict(tags)),
                    what=f"registering {name}")
    return version.version
