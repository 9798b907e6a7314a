"""Step 5, schedules: the K-step schedules of every method, for every NFE in sweep.nfes.

    python -m tasks.schedules [--params params.yaml]

Each method of the registry (boss_core/methods.py) with a search of its own builds its table
(``boss_core.protocol.search_schedules``): the preset grids and the cost-matrix methods
(bellman, BOSS's DP, and bellman_gits) always, the teacher searches (bellman_global, about
K x N calls) only when a selected method uses them. Writes outputs/schedules/schedules.json
{"n_steps", "schedules": {name: {"nfe_K": schedule}}, "search": {name: cost}} and logs it.
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from boss_core.protocol import needs_teacher_search, search_schedules

from .runtime.artifacts import (
    conditioning_of,
    load_cost,
    schedules_file,
    schedules_to_dict,
    search_inputs,
)
from .runtime.io import write_json
from .runtime.step import StepContext, main, prefect_task

NAME, SECTIONS = "schedules", ("sweep", "methods", "run")


def run(ctx: StepContext) -> dict:
    s = ctx.params.sweep
    cost, cost_meta = load_cost(ctx.ws)
    if cost.n_steps != s.n_steps:
        raise ValueError(f"the cost matrix has N={cost.n_steps} but sweep.n_steps={s.n_steps}:"
                         " rerun the cost step")
    teacher = noise = None
    if needs_teacher_search(s):
        teacher, noise = search_inputs(ctx)
    cost_search = {"search_nfe": cost_meta["nfe"], "search_evaluations": cost_meta["evaluations"],
                   "wall_seconds": cost_meta["wall_seconds"]}
    with torch.no_grad():
        table, spent = search_schedules(s, ctx.params.methods, cost=cost,
                                        cost_search=cost_search, teacher=teacher, noise=noise,
                                        cond=conditioning_of(ctx.params),
                                        progress=ctx.params.run.progress)
    for name, by_k in table.items():
        for k, schedule in by_k.items():
            if not np.isfinite(schedule.times).all():
                raise FloatingPointError(f"schedules step: {name} at K={k} has non-finite times")
    path = schedules_file(ctx.ws)
    write_json(path, {"n_steps": s.n_steps, "schedules": schedules_to_dict(table),
                      "search": {name: vars(c) for name, c in spent.items()}})
    ctx.log_artifact(path, "schedules")
    for name, by_k in table.items():
        for k, schedule in by_k.items():
            if schedule.cost is not None:
                ctx.log_metrics({f"{name}.cost": float(schedule.cost)}, step=k)
    return {"nfes": list(s.nfes), "methods": sorted(table)}


task = prefect_task(NAME, run, SECTIONS)

if __name__ == "__main__":
    sys.exit(main(NAME, run, SECTIONS, __doc__))
