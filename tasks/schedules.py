"""Step 5, schedules: the K-step schedules of every method, for every NFE in sweep.nfes.

    python -m tasks.schedules [--params params.yaml]

- bellman: the Bellman DP on the cost matrix (BOSS's schedule), one pass for all K;
- bellman_global: the greedy end-point search (needs the teacher again, about K x N calls);
- uniform, shift, edm: the preset grids; distill_uniform: the uniform grid on the fine grid.
Writes outputs/schedules/schedules.json {"schedules": {method: {"nfe_K": schedule}},
"search": {method: cost}} and logs it to MLflow.
"""

from __future__ import annotations

import sys
import time

import numpy as np
import torch

from boss_core.bellman import bellman_schedules, global_schedules
from boss_core.cost import CostMatrix
from boss_core.pairs import uniform_on_grid
from boss_core.presets import PRESETS
from boss_core.velocity import NFECounter

from .runtime.artifacts import schedules_file, schedules_to_dict, search_inputs
from .runtime.io import load_tensors, write_json
from .runtime.step import StepContext, main, prefect_task

NAME, SECTIONS = "schedules", ("sweep", "run")


def load_cost(ctx: StepContext) -> tuple[CostMatrix, dict]:
    tensors, meta = load_tensors(ctx.ws.step("cost") / "cost.safetensors")
    return CostMatrix(tensors["sum"].numpy(), int(meta["n_samples"])), meta


def needs_global(sweep) -> bool:
    return "bellman_global" in sweep.methods or (
        sweep.straighten_schedule == "bellman_global"
        and bool({"boss", "boss_lora"} & set(sweep.methods)))


def run(ctx: StepContext) -> dict:
    s = ctx.params.sweep
    cost, cost_meta = load_cost(ctx)
    if cost.n_steps != s.n_steps:
        raise ValueError(f"the cost matrix has N={cost.n_steps} but sweep.n_steps={s.n_steps}:"
                         " rerun the cost step")
    k_max = max(s.nfes)
    local = bellman_schedules(cost, k_max)
    table = {"bellman": {k: local[k] for k in s.nfes}}
    search = {"bellman": {"search_nfe": cost_meta["nfe"],
                          "search_evaluations": cost_meta["evaluations"],
                          "wall_seconds": cost_meta["wall_seconds"]}}
    if needs_global(s):
        teacher, noise = search_inputs(ctx)
        counter, start = NFECounter(teacher), time.perf_counter()
        with torch.no_grad():
            found = global_schedules(counter, noise, s.n_steps, k_max, s.batch_size,
                                     progress=ctx.params.run.progress)
        table["bellman_global"] = {k: found[k] for k in s.nfes}
        search["bellman_global"] = {"search_nfe": counter.nfe,
                                    "search_evaluations": counter.n_evaluations,
                                    "wall_seconds": time.perf_counter() - start}
    for name, preset in PRESETS.items():
        table[name] = {k: preset(k) for k in s.nfes}
    table["distill_uniform"] = {k: uniform_on_grid(k, s.n_steps) for k in s.nfes}
    for name, by_k in table.items():
        for k, schedule in by_k.items():
            if not np.isfinite(schedule.times).all():
                raise FloatingPointError(f"schedules step: {name} at K={k} has non-finite times")
    path = schedules_file(ctx.ws)
    write_json(path, {"n_steps": s.n_steps, "schedules": schedules_to_dict(table),
                      "search": search})
    ctx.log_artifact(path, "schedules")
    for k in s.nfes:
        ctx.log_metrics({"bellman.cost": float(local[k].cost)}, step=k)
    return {"nfes": list(s.nfes), "methods": sorted(table)}


task = prefect_task(NAME, run, SECTIONS)

if __name__ == "__main__":
    sys.exit(main(NAME, run, SECTIONS, __doc__))
