"""What a flow run of the pipeline needs around its steps: its plan (params checked before
compute, its own run folder), its provenance, its MLflow parent run, the embedded data, and
the torchrun launch of a straightening method. ``flows.pipeline`` chains the steps with these.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tasks.runtime.params import Params, ParamsError, load_params
from tasks.runtime.workspace import Workspace

log = logging.getLogger("boss")

REPO = Path(__file__).resolve().parents[1]
HEADLINE = ("boss", "uniform")


@dataclass(frozen=True)
class RunPlan:
    """What one flow run reads and where it writes; built before any compute."""

    params: Params
    params_file: Path
    ws: Workspace  # ws.repo: params, data, MLflow store; ws.out: this run's folder
    name: str
    overrides: Mapping[str, Any] = field(default_factory=dict)  # on top of params_file

    @property
    def run_dir(self) -> Path:
        return self.ws.out


def _flow_run_identity() -> tuple[str | None, str | None]:
    """(name, id) of the current Prefect flow run, or (None, None) outside one."""
    try:
        from prefect.runtime import flow_run
    except ImportError:  # pragma: no cover - prefect is a dependency
        return None, None
    run_id = flow_run.id
    name = flow_run.name if run_id else None
    return (str(name) if name else None), (str(run_id) if run_id else None)


def resolve_params_file(params_file: str | os.PathLike) -> Path:
    """An absolute path: as given, else relative to the working directory, else to the repo."""
    path = Path(params_file).expanduser()
    if path.is_absolute():
        return path
    if (Path.cwd() / path).is_file():
        return (Path.cwd() / path).resolve()
    return (REPO / path).resolve()


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "run"


def default_run_dir(repo: Path, name: str | None, run_id: str | None) -> Path:
    """``<repo>/runs/<flow run name>``; a name already used gets the run id appended."""
    runs = repo / "runs"
    base = _safe(name) if name else time.strftime("local-%Y%m%d-%H%M%S")
    path = runs / base
    if path.exists():
        suffix = run_id[:8] if run_id else f"{os.getpid()}-{time.time_ns() % 10**6}"
        path = runs / f"{base}-{suffix}"
    return path


def prepare_run(overrides: Mapping[str, Any] | None = None,
                params_file: str | os.PathLike = "params.yaml",
                run_dir: str | os.PathLike | None = None) -> RunPlan:
    """Load and check the params (ParamsError naming the key), then pick the run folder.

    Creates nothing: the flow makes the folder once this has passed.
    """
    if overrides is not None and not isinstance(overrides, Mapping):
        raise ParamsError(f"overrides must be a mapping of section.key to value, "
                          f"got {type(overrides).__name__}")
    path = resolve_params_file(params_file)
    params = load_params(path, dict(overrides or {}))
    repo = path.parent
    name, run_id = _flow_run_identity()
    out = Path(run_dir).expanduser() if run_dir is not None else default_run_dir(repo, name,
                                                                                   run_id)
    if not out.is_absolute():
        out = repo / out
    ws = Workspace.at(repo, out)
    if ws.out == ws.repo:
        raise ParamsError(f"run_dir {str(out)!r} is the repo root: the flow never writes into "
                          "the DVC workspace")
    return RunPlan(params, path, ws, name or ws.out.name, dict(overrides or {}))


def ensure_data(plan: RunPlan) -> None:
    """Write the embedded digits when the params read them from ``<repo>/data/digits``."""
    data = plan.params.data
    if data.name != "npy" or data.root is None:
        return
    if plan.ws.data_path(data.root).resolve() == (plan.ws.repo / "data" / "digits").resolve():
        from tasks.cli.embed import write_digits

        written = write_digits(plan.ws.repo / "data")
        if written:
            log.info("embedded digits written: %s", [p.name for p in written])


def write_provenance(plan: RunPlan) -> Path:
    from tasks.runtime.io import write_text

    path = plan.run_dir / "params.yaml"
    write_text(path, yaml.safe_dump(dict(plan.params.raw), sort_keys=False))
    return path


@contextmanager
def parent_run(plan: RunPlan) -> Iterator[str]:
    """One MLflow parent run for the flow run, FINISHED or FAILED with it.

    ``BOSS_PARENT_RUN_ID`` points every step's nested run at it while the flow runs (it is
    process-wide: run one flow per process, as ``flow.serve`` does).
    """
    import mlflow

    from tasks.runtime import tracking

    name, run_id = _flow_run_identity()
    experiment_id = tracking.setup(plan.ws.repo, plan.params.run.experiment)
    tags = {"prefect.flow_run_id": run_id or "", "prefect.flow_run_name": name or "",
            "boss.run_dir": str(plan.run_dir),
            tracking.INVOCATION_TAG: f"prefect-{run_id or os.getpid()}"}
    parent = tracking.start_parent(experiment_id, plan.ws.repo, f"flow {plan.name}",
                                   plan.params.flat(), tags)
    client = mlflow.MlflowClient()
    previous = os.environ.get(tracking.PARENT_ENV)
    os.environ[tracking.PARENT_ENV] = parent
    try:
        yield parent
    except BaseException:
        client.set_terminated(parent, status="FAILED")
        raise
    else:
        client.set_terminated(parent, status="FINISHED")
    finally:
        if previous is None:
            os.environ.pop(tracking.PARENT_ENV, None)
        else:
            os.environ[tracking.PARENT_ENV] = previous


def headline(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The boss and uniform rows of results/metrics.json ({method: {"nfe_K": {...}}})."""
    return {m: dict(metrics[m]) for m in HEADLINE if m in metrics}


def straighten_command(plan: RunPlan, method: str) -> list[str]:
    """``python -m tasks.runtime.launch straighten`` for this run: the same params file,
    overrides and
    run folder, so torchrun's rank 0 writes where the in-process task would."""
    from tasks.runtime.launch import build_command

    argv = ["--method", method, "--params", str(plan.params_file), "--out", str(plan.ws.out)]
    for key, value in plan.overrides.items():
        argv += ["--set", f"{key}={json.dumps(value)}"]  # JSON is YAML
    return build_command(plan.params.scale, "straighten", argv)


def launched_task(method: str):
    """The straighten step of ``method`` on ``scale.world_size`` ranks, as a Prefect task.

    The child inherits ``BOSS_PARENT_RUN_ID`` (its MLflow run nests under the flow's) and
    ``MLFLOW_TRACKING_URI``. On several nodes the other nodes run ``python -m tasks.runtime.launch``
    themselves (docs/scaling.md).
    """
    from prefect import task
    from prefect.cache_policies import NO_CACHE

    def run_launched(plan: RunPlan) -> None:
        cmd = straighten_command(plan, method)
        log.info("straighten %s on %d ranks: %s", method, plan.params.scale.world_size,
                 " ".join(cmd))
        done = subprocess.run(cmd, cwd=plan.ws.repo, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"straighten {method} under torchrun exited with "
                               f"{done.returncode}")

    return task(run_launched, name=f"straighten_{method}", cache_policy=NO_CACHE)
