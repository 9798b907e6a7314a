"""Step 2, teacher: train the flow-matching teacher, or load your own pretrained one.

    python -m tasks.teacher [--params params.yaml] [--set teacher.iterations=500]

With ``model.weights`` set, the named state_dict is loaded into the network ``model`` builds
(your own architecture by import path, with its adapter) and nothing is trained. Otherwise the
teacher trains from scratch; ``boss_core.teacher.train_teacher`` checkpoints every
``teacher.log_every`` steps to checkpoints/teacher/<params hash>/teacher.pt (atomically) and
resumes from there after a crash: the resumed weights are bit-identical on the CPU to an
uninterrupted run's (tests/test_faults.py kills it at the fault point ``teacher.checkpoint``,
see tasks/runtime/faults.py).
Writes outputs/teacher/model.safetensors (EMA weights + config) and losses.csv.
"""

from __future__ import annotations

import logging
import shutil
import sys

import numpy as np

from boss_core.models import build_model, count_parameters
from boss_core.teacher import train_teacher

from .runtime.artifacts import load_prepared, teacher_file
from .runtime.faults import fault_point
from .runtime.io import atomic_path, save_model, write_json
from .runtime.step import StepContext, main, prefect_task

log = logging.getLogger("boss")
NAME, SECTIONS = "teacher", ("data", "model", "teacher")


def run(ctx: StepContext) -> dict:
    p = ctx.params
    data = load_prepared(ctx.ws)
    out = ctx.ws.step(NAME)
    config = p.model.to_dict()
    if p.model.weights is not None:
        from boss_core.models import build_pretrained

        weights = str(ctx.ws.data_path(p.model.weights))
        model = build_pretrained(p.model.__class__.from_dict({**config, "weights": weights}),
                                 data.data_shape)
        save_model(teacher_file(ctx.ws), model, {**config, "weights": None}, data.data_shape,
                   {"source": weights})
        ctx.set_tags({"teacher.source": weights})
        summary = {"pretrained": weights, "parameters": count_parameters(model)}
        write_json(out / "summary.json", summary)
        return summary

    ckpt_dir = ctx.ws.checkpoints(NAME) / ctx.params.digest(SECTIONS)
    model = build_model(p.model, data.data_shape, seed=p.teacher.seed)
    result = train_teacher(
        model, data.x, p.teacher, labels=data.y, checkpoint_dir=ckpt_dir,
        callback=lambda progress: ctx.log_metrics({"loss": progress.loss}, step=progress.step),
        on_checkpoint=lambda step: fault_point("teacher.checkpoint"))
    if result.resumed_from:
        log.info("teacher: resuming from step %d of %s: done, trained on to step %d",
                 result.resumed_from, ckpt_dir, result.step)
        ctx.set_tags({"resumed_from_step": result.resumed_from})
    save_model(teacher_file(ctx.ws), result.ema_model, config, data.data_shape)
    with atomic_path(out / "losses.csv") as tmp:
        np.savetxt(tmp, result.losses, delimiter=",", header="step,loss", comments="")
    from .runtime.plots import loss_curves

    loss_curves({"teacher": result.losses}, out / "loss.png", title="teacher training loss")
    ctx.log_artifact(out / "loss.png", "figures")
    summary = {"iterations": result.step, "final_loss": float(result.losses[-50:, 1].mean()),
               "parameters": count_parameters(result.model),  # the EMA copy is frozen
               "train_seconds": result.wall_time_s}
    write_json(out / "summary.json", summary)
    shutil.rmtree(ckpt_dir, ignore_errors=True)  # finished: the model file is the result
    return summary


task = prefect_task(NAME, run, SECTIONS)

if __name__ == "__main__":
    sys.exit(main(NAME, run, SECTIONS, __doc__))
