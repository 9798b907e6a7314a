"""Step 4, cost: teacher trajectories on the fine grid and the BOSS cost matrix.

    python -m tasks.cost [--params params.yaml]

Runs ``sweep.search_samples`` N-step uniform Euler teacher paths (N = sweep.n_steps) in batches
of ``sweep.batch_size``, accumulating c(i, j), the mean squared error of one Euler jump from
grid point i to j. Memory is bounded by the batch. The paths are split into seed-range shards
mapped on the ``scale`` runner (in-process, or Dask: see tasks/runtime/shards.py); the matrix is the
merge of the shards' float64 sums. A class-conditional teacher runs path i at label
y_i = i mod C, guided by ``sweep.guidance`` (``boss_core.guidance``; 2 calls a step). Writes
outputs/cost/cost.safetensors (the float64 sum and the sample count, so shards merge exactly)
and summary.json.
"""

from __future__ import annotations

import sys
import time

import numpy as np
import torch

from boss_core.seeds import search_seed
from boss_core.shards import cost_shard, merge_costs

from .runtime.artifacts import conditioning_of, load_prepared, load_teacher
from .runtime.io import save_tensors, write_json
from .runtime.shards import map_shards, portable, shard_plan
from .runtime.step import StepContext, main, prefect_task

NAME, SECTIONS = "cost", ("sweep", "run")


def run(ctx: StepContext) -> dict:
    s, scale = ctx.params.sweep, ctx.params.scale
    shape = tuple(load_prepared(ctx.ws).data_shape)
    teacher = load_teacher(ctx.ws, ctx.params.run.device, ctx.params.model.import_path)
    cond = conditioning_of(ctx.params)
    shards = shard_plan(scale, s.search_samples, s.batch_size)
    start = time.perf_counter()
    job = {"velocity": portable(cond.teacher(teacher), scale), "data_shape": shape,
           "seed": search_seed(s.seed), "n_steps": s.n_steps, "batch_size": s.batch_size,
           "device": ctx.params.run.device, "num_classes": cond.num_classes}
    parts = map_shards(NAME, cost_shard, shards, scale, job, ctx.params.run.progress)
    cost = merge_costs(parts)
    wall = time.perf_counter() - start
    values = cost.values
    upper = values[np.triu_indices(s.n_steps + 1, 1)]
    if not np.isfinite(upper).all():
        raise FloatingPointError("cost step: the cost matrix holds NaN or Inf (the teacher's "
                                 "trajectories diverged)")
    batches = sum(-(-n // s.batch_size) for _, n in shards)
    calls = cond.calls_per_step  # a guided teacher step is 2 network calls
    summary = {"n_samples": cost.n_samples, "n_steps": s.n_steps,
               "nfe": batches * s.n_steps * calls,
               "evaluations": cost.n_samples * s.n_steps * calls, "shards": len(shards),
               "wall_seconds": wall,
               "one_step_cost": float(values[0, s.n_steps])}
    out = ctx.ws.step(NAME)
    save_tensors(out / "cost.safetensors", {"sum": torch.from_numpy(cost.sum)}, summary)
    write_json(out / "summary.json", summary)
    ctx.log_metrics({"search_nfe": summary["nfe"], "one_step_cost": summary["one_step_cost"]})
    return summary


task = prefect_task(NAME, run, SECTIONS)

if __name__ == "__main__":
    sys.exit(main(NAME, run, SECTIONS, __doc__))
