"""Step 6, pairs: the straightening targets, from ONE teacher pass.

    python -m tasks.pairs [--params params.yaml]

For every K, the teacher's chords along each schedule a selected student learns
(``boss_core.protocol.pair_targets``: bellman for boss and boss_lora, the uniform fine-grid
K-grid for distill_uniform, ...): inputs x_{t_k} (the teacher's state), times t_k and targets
(x_{t_{k+1}} - x_{t_k}) / (t_{k+1} - t_k). Plus reflow pairs (noise, N-step end point) when a
reflow student is selected. ``sweep.pair_samples`` noises, seeded per sample
(``boss_core.seeds.pairs_seed``), in seed-range shards on the ``scale`` runner
(tasks/runtime/shards.py), concatenated in seed order. A class-conditional teacher runs
sample i at label y_i = i mod C, guided by ``sweep.guidance``, and the pairs keep y.
Writes outputs/pairs/pairs.safetensors: tensors "<schedule>.nfe_K.<field>" and "reflow.<field>".
"""

from __future__ import annotations

import sys

import torch

from boss_core.protocol import pair_targets, wants_reflow
from boss_core.seeds import pairs_seed
from boss_core.shards import merge_pairs, pairs_shard

from .runtime.artifacts import (
    conditioning_of,
    load_prepared,
    load_schedules,
    load_teacher,
    pairs_file,
)
from .runtime.io import save_tensors
from .runtime.shards import map_shards, portable, shard_plan
from .runtime.step import StepContext, main, prefect_task

NAME, SECTIONS = "pairs", ("sweep", "run")


def run(ctx: StepContext) -> dict:
    s = ctx.params.sweep
    shape = load_prepared(ctx.ws).data_shape
    targets = pair_targets(s, load_schedules(ctx.ws))
    teacher = load_teacher(ctx.ws, ctx.params.run.device, ctx.params.model.import_path)
    scale, cond = ctx.params.scale, conditioning_of(ctx.params)
    shards = shard_plan(scale, s.pair_samples, s.batch_size)
    job = {"velocity": portable(cond.teacher(teacher), scale), "schedules": targets,
           "n_steps": s.n_steps, "data_shape": tuple(shape), "seed": pairs_seed(s.seed),
           "batch_size": s.batch_size, "device": ctx.params.run.device,
           "reflow": wants_reflow(s), "num_classes": cond.num_classes}
    parts = map_shards(NAME, pairs_shard, shards, scale, job, ctx.params.run.progress)
    chords, ends = merge_pairs(parts)
    tensors = {}
    for (name, k), pairs in chords.items():
        for field in ("x", "t", "target", "sample", "y"):
            if getattr(pairs, field) is not None:  # y: only a class-conditional teacher's
                tensors[f"{name}.nfe_{k}.{field}"] = getattr(pairs, field)
    if ends is not None:
        tensors.update({f"reflow.{f}": getattr(ends, f) for f in ("z", "x1", "sample", "y")
                        if getattr(ends, f) is not None})
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise FloatingPointError(f"pairs step: non-finite teacher states in {bad}")
    save_tensors(pairs_file(ctx.ws), tensors, {"keys": sorted({k.rsplit(".", 1)[0]
                                                               for k in tensors})})
    count = {key: len(p) for key, p in chords.items()}
    return {"chord_sets": len(count), "chord_pairs": sum(count.values()),
            "reflow_pairs": 0 if ends is None else len(ends)}


task = prefect_task(NAME, run, SECTIONS)

if __name__ == "__main__":
    sys.exit(main(NAME, run, SECTIONS, __doc__))
