"""What every step shares: its context, its MLflow run, its Prefect task and its command line.

A step is a function ``run(ctx: StepContext) -> dict`` (a small JSON-able summary) plus the
params sections it reads. ``execute`` runs it inside a nested MLflow run; ``prefect_task`` wraps
``execute`` as a Prefect task for ``flows.pipeline``; ``main`` is the ``python -m tasks.<step>``
entry point that ``dvc.yaml`` calls.

Prefect under DVC: when ``PREFECT_API_URL`` is set (e.g. ``make prefect`` is running and you
export its URL), each stage runs as a one-task Prefect flow and shows in its UI. Without it the
stage calls the same function directly instead of paying for a temporary Prefect server in
every stage process (bench/stage_overhead.py measures both; see BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import tracking
from .params import Params, ParamsError, load_params, parse_override
from .workspace import Workspace

log = logging.getLogger("boss")
StepFn = Callable[["StepContext"], dict]


@dataclass
class StepContext:
    name: str
    params: Params
    ws: Workspace
    client: Any  # mlflow.MlflowClient
    run_id: str
    parent_id: str
    started: float = field(default_factory=time.perf_counter)

    def log_metrics(self, values: Mapping[str, float], step: int = 0,
                    parent: bool = False) -> None:
        """Finite values to this step's run (and to the parent run when ``parent``)."""
        tracking.log_metrics(self.client, self.run_id, values, step)
        if parent:
            tracking.log_metrics(self.client, self.parent_id, values, step)

    def log_curve(self, name: str, rows, every: int = 1) -> None:
        """An (S, 2) array of (step, value) rows as one metric with ``step=``."""
        tracking.log_series(self.client, self.run_id, name, rows, every)

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None,
                     parent: bool = False) -> None:
        path = Path(path)
        run = self.parent_id if parent else self.run_id
        if path.is_dir():
            self.client.log_artifacts(run, str(path), artifact_path)
        else:
            self.client.log_artifact(run, str(path), artifact_path)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, str(value))


def execute(name: str, fn: StepFn, sections: Iterable[str], params: Params,
            ws: Workspace) -> dict:
    """Run one step in a nested MLflow run; logs and returns its summary."""
    sections = tuple(sections)
    log.info("step %s: start (out=%s)", name, ws.out)
    with tracking.step_run(name, ws.repo, params.run.experiment, params.flat(sections),
                           params.flat()) as (client, run_id, parent):
        ctx = StepContext(name, params, ws, client, run_id, parent)
        summary = fn(ctx) or {}
        wall = time.perf_counter() - ctx.started
        ctx.log_metrics({"wall_seconds": wall})
    log.info("step %s: done in %.1f s %s", name, wall, _brief(summary))
    return summary


def _brief(summary: Mapping[str, Any]) -> str:
    parts = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
             for k, v in summary.items() if isinstance(v, (int, float, str))]
    return ("(" + ", ".join(parts) + ")") if parts else ""


class StepTask:
    """The step as a Prefect task ``task(params, ws) -> summary``, built on first use.

    Importing a step module builds no Prefect object (and does not import Prefect): a DVC
    stage that runs the step directly never pays for it. Attribute access (``retries``,
    ``submit``, ``with_options``...) goes to the real ``prefect.Task``.
    """

    def __init__(self, name: str, fn: StepFn, sections: Iterable[str], retries: int = 0,
                 options: Mapping[str, Any] | None = None):
        self.name, self.fn, self.sections = name, fn, tuple(sections)
        self._retries, self._options, self._task = retries, dict(options or {}), None

    def with_options(self, **options) -> StepTask:
        return StepTask(self.name, self.fn, self.sections, self._retries,
                        {**self._options, **options})

    def build(self):
        if self._task is None:
            from prefect import task
            from prefect.cache_policies import NO_CACHE

            name, fn, sections = self.name, self.fn, self.sections

            def run_step(params: Params, ws: Workspace) -> dict:
                return execute(name, fn, sections, params, ws)

            run_step.__name__ = f"{name}_step"
            built = task(run_step, name=name, retries=self._retries, retry_delay_seconds=2,
                         cache_policy=NO_CACHE)
            self._task = built.with_options(**self._options) if self._options else built
        return self._task

    def __call__(self, params: Params, ws: Workspace) -> dict:
        return self.build()(params, ws)

    def __getattr__(self, attr: str):
        if attr.startswith("_"):
            raise AttributeError(attr)
        return getattr(self.build(), attr)


def prefect_task(name: str, fn: StepFn, sections: Iterable[str], retries: int = 0) -> StepTask:
    """The step as a (lazily built) Prefect task ``task(params, ws) -> summary``.

    ``retries`` is for steps whose failures are I/O (reading user files, the registry); the
    deterministic math steps keep 0, since rerunning them gives the same error.
    """
    return StepTask(name, fn, sections, retries)


def setup_logging() -> None:
    """INFO lines from the ``boss`` logger on stderr (``BOSS_LOG_LEVEL`` changes the level).

    Importing Prefect installs its own root handler at WARNING, so the ``boss`` logger gets
    a handler of its own rather than relying on ``logging.basicConfig``.
    """
    level = os.environ.get("BOSS_LOG_LEVEL", "INFO")
    boss = logging.getLogger("boss")
    boss.setLevel(level)
    if not any(getattr(h, "_boss", False) for h in boss.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s",
                                               datefmt="%H:%M:%S"))
        handler._boss = True
        boss.addHandler(handler)
        boss.propagate = False
    for noisy in ("alembic", "mlflow.store.db.utils", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def parser(name: str, doc: str | None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m tasks.{name}", description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default="params.yaml", help="params file (default params.yaml)")
    p.add_argument("--out", default=None,
                   help="folder for outputs/, results/, checkpoints/ (default: the repo root)")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="SECTION.KEY=VALUE", help="override one params key (repeatable)")
    return p


def use_prefect() -> bool:
    """``BOSS_PREFECT``: "1" always runs stages as Prefect flows (a temporary server per process
    when no API is set), "0" never, "auto" (default) when ``PREFECT_API_URL`` is set."""
    mode = os.environ.get("BOSS_PREFECT", "auto").lower()
    if mode not in ("0", "1", "auto"):
        raise ValueError(f"BOSS_PREFECT must be 0, 1 or auto, got {mode!r}")
    return mode == "1" or (mode == "auto" and bool(os.environ.get("PREFECT_API_URL")))


def main(name: str, fn: StepFn, sections: Iterable[str], doc: str | None = None,
         argv: list[str] | None = None, add_args=None, bind=None, tracked: bool = True) -> int:
    """``python -m tasks.<name>``: load params (errors before compute), run, exit 0/1/2.

    ``add_args(parser)`` adds step options; ``bind(args) -> (name, fn)`` then picks the step.
    ``tracked=False`` (a torchrun rank other than 0) runs ``fn`` with a context that has no
    MLflow run (``client`` None) and no Prefect flow; ``fn`` must not log through it.
    """
    p = parser(name, doc)
    if add_args is not None:
        add_args(p)
    args = p.parse_args(argv)
    if bind is not None:
        name, fn = bind(args)
    setup_logging()
    try:
        params = load_params(args.params, dict(parse_override(o) for o in args.overrides))
    except ParamsError as err:
        log.error("%s", err)
        return 2
    ws = Workspace.at(Path(args.params).resolve().parent, args.out)
    try:
        if not tracked:
            fn(StepContext(name, params, ws, None, "", ""))
        elif use_prefect():
            tracking.check_prefect_api()
            from prefect import flow

            step_task = prefect_task(name, fn, sections)
            flow(name=f"boss-stage-{name}", log_prints=True)(
                lambda: step_task(params, ws))()
        else:
            execute(name, fn, sections, params, ws)
    except (ValueError, FileNotFoundError, ConnectionError) as err:
        # Bad input (a file, folder or key the message names): one line, exit 2. The step's
        # MLflow run is already marked FAILED; BOSS_LOG_LEVEL=DEBUG shows the traceback.
        log.debug("step %s failed", name, exc_info=True)
        log.error("error: %s", " ".join(str(err).split()) or type(err).__name__)
        return 2
    return 0
