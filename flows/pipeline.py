"""The whole pipeline as one Prefect flow: ``boss_pipeline(overrides, params_file, run_dir)``.

The flow chains the step tasks of ``tasks/`` in the order of ``dvc.yaml`` (prepare, teacher,
features, cost, schedules, pairs, the four straighten methods, evaluate, report). It is what
``python -m flows.serve`` deploys as ``boss-pipeline/<name>``::

    prefect deployment run 'boss-pipeline/boss-default' \\
        --param overrides='{"straighten.iterations": 100}' --watch

Each flow run writes into its own folder, ``runs/<flow run name>/`` under the repo (or
``run_dir``), with the layout of the DVC workspace (outputs/, results/, checkpoints/) plus
the effective ``params.yaml``; the DVC workspace at the repo root is never touched. Params
(with overrides) are checked before any compute: a bad key fails the flow at once, naming
the key. All steps log nested MLflow runs under one parent run per flow run.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from prefect import flow

from flows.runs import (  # noqa: F401 (the flow's helpers, re-exported for callers)
    RunPlan,
    default_run_dir,
    ensure_data,
    headline,
    launched_task,
    parent_run,
    prepare_run,
    resolve_params_file,
    straighten_command,
    write_provenance,
)
from tasks import (
    cost,
    evaluate,
    features,
    pairs,
    prepare,
    report,
    schedules,
    straighten,
    teacher,
)
from tasks.runtime.io import read_json

log = logging.getLogger("boss")

FLOW_NAME = "boss-pipeline"
STRAIGHTEN_METHODS = ("boss", "boss_lora", "reflow_uniform", "distill_uniform")


def run_steps(plan: RunPlan) -> None:
    """The step tasks in dvc.yaml's order; each raises on failure (no compute retries)."""
    params, ws = plan.params, plan.ws
    for module in (prepare, teacher, features, cost, schedules, pairs):
        module.task(params, ws)
    for method in STRAIGHTEN_METHODS:
        if params.scale.world_size > 1:  # DDP: torchrun in a child process
            launched_task(method)(plan)
        else:
            straighten.make_task(method)(params, ws)
    evaluate.task(params, ws)
    report.task(params, ws)


@flow(name=FLOW_NAME, log_prints=True, retries=0)
def boss_pipeline(overrides: dict[str, Any] | None = None, params_file: str = "params.yaml",
                  run_dir: str | None = None) -> dict[str, Any]:
    """The BOSS pipeline, prepare to report, in its own run folder.

    Args:
        overrides: ``{"section.key": value}`` on top of the params file, e.g.
            ``{"straighten.iterations": 100}``; a bad key fails the run before any compute.
        params_file: the base params (relative: to the working directory, else the repo).
        run_dir: where outputs/, results/, checkpoints/ go (default ``runs/<flow run name>``
            under the params file's folder).
    """
    plan = prepare_run(overrides, params_file, run_dir)  # before any compute or file
    if log.level == logging.NOTSET:  # step logs reach Prefect via PREFECT_LOGGING_EXTRA_LOGGERS
        log.setLevel(os.environ.get("BOSS_LOG_LEVEL", "INFO"))
    log.info("boss-pipeline: params %s, run folder %s", plan.params_file, plan.run_dir)
    plan.run_dir.mkdir(parents=True, exist_ok=True)
    write_provenance(plan)
    ensure_data(plan)
    with parent_run(plan) as parent:
        run_steps(plan)
    metrics = read_json(plan.ws.results / "metrics.json")
    summary = {"run_dir": str(plan.run_dir), "mlflow_parent_run_id": parent,
               **headline(metrics)}
    print(f"boss-pipeline done: {plan.run_dir}")
    return summary
