"""The whole pipeline as one Prefect flow: ``boss_pipeline(overrides, params_file, run_dir)``.

The flow chains the step tasks of ``tasks/`` as ``dvc.yaml`` does (``pipeline_steps``: prepare,
teacher, features, cost, schedules, pairs, one straighten step per method, evaluate, report),
each after the steps whose outputs it reads. ``scale.flow_concurrency`` steps run at once when
they are independent (teacher beside features, the straightening methods beside each other;
flows/graph.py says how torch threads are shared); 1 (the default) runs them one after the
other in that order. It is what ``python -m flows.serve`` deploys as ``boss-pipeline/<name>``::

    prefect deployment run 'boss-pipeline/boss-default' \\
        --param overrides='{"straighten.iterations": 100}' --watch

Each flow run writes into its own folder, ``runs/<flow run name>/`` under the repo (or
``run_dir``), with the layout of the DVC workspace (outputs/, results/, checkpoints/) plus
the effective ``params.yaml``; the DVC workspace at the repo root is never touched. Params
(with overrides) are checked before any compute: a bad key fails the flow at once, naming
the key. All steps log nested MLflow runs under one parent run per flow run. A finished run
publishes its results table and its FID (or SWD) against NFE figure as Prefect artifacts
(flows/publish.py).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from prefect import flow

from boss_core.methods import trained_names
from flows.graph import Step, run_graph
from flows.publish import publish_results
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
from tasks.runtime.params import Params

log = logging.getLogger("boss")

FLOW_NAME = "boss-pipeline"


def straighten_methods(params: Params) -> list[str]:
    """The methods that get a straighten step (each writes outputs/students/<method>; one left
    out of ``sweep.methods`` writes an empty folder, as its DVC stage does)."""
    return list(trained_names())


def pipeline_steps(plan: RunPlan) -> list[Step]:
    """The steps in dvc.yaml's order, each ``after`` the stages whose outputs dvc.yaml lists
    among its deps (tests/test_flow.py checks the two agree)."""
    params, ws = plan.params, plan.ws
    run = (params, ws)
    students = []
    steps = [Step("prepare", prepare.task, run),
             Step("teacher", teacher.task, run, ("prepare",)),
             Step("features", features.task, run, ("prepare",)),
             Step("cost", cost.task, run, ("prepare", "teacher")),
             Step("schedules", schedules.task, run, ("teacher", "cost")),
             Step("pairs", pairs.task, run, ("teacher", "schedules"))]
    for method in straighten_methods(params):
        name, inputs = f"straighten_{method}", ("teacher", "schedules", "pairs")
        if params.scale.world_size > 1:  # DDP: torchrun in a child process, sized for the machine
            steps.append(Step(name, launched_task(method), (plan,), inputs, exclusive=True))
        else:
            steps.append(Step(name, straighten.make_task(method), run, inputs))
        students.append(name)
    steps += [Step("evaluate", evaluate.task, run,
                   ("prepare", "teacher", "features", "schedules", *students)),
              Step("report", report.task, run, ("cost", "schedules", "evaluate", *students))]
    return steps


def run_steps(plan: RunPlan) -> dict[str, Any]:
    """Every step, ``scale.flow_concurrency`` at once; a failed step fails the run (no
    compute retries). Returns {step: summary}."""
    return run_graph(pipeline_steps(plan), plan.params.scale.flow_concurrency)


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
    artifacts = publish_results(plan)
    summary = {"run_dir": str(plan.run_dir), "mlflow_parent_run_id": parent,
               "artifacts": artifacts, **headline(metrics)}
    print(f"boss-pipeline done: {plan.run_dir}")
    return summary
