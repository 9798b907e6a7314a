"""Step 2, teacher: train the flow-matching teacher, or load your own pretrained one.

    python -m tasks.teacher [--params params.yaml] [--set teacher.iterations=500]

With ``model.weights`` set, the named state_dict is loaded into the network ``model`` builds
(your own architecture by import path, with its adapter) and nothing is trained. Otherwise the
teacher trains from scratch, checkpointing every ``teacher.log_every`` steps to
checkpoints/teacher/<params hash>/teacher.pt (atomically) and resuming from there after a crash:
the resumed weights are bit-identical on the CPU to an uninterrupted run's (tests/test_faults.py
kills it at the fault point ``teacher.checkpoint``, see tasks/runtime/faults.py).
Writes outputs/teacher/model.safetensors (EMA weights + config) and losses.csv.
"""

from __future__ import annotations

import logging
import shutil
import sys
import time

import numpy as np
import torch

from boss_core.models import build_model, count_parameters
from boss_core.teacher import train_teacher

from .runtime.artifacts import load_prepared, teacher_file
from .runtime.faults import fault_point
from .runtime.io import atomic_path, save_model, write_json
from .runtime.step import StepContext, main, prefect_task

log = logging.getLogger("boss")
NAME, SECTIONS = "teacher", ("data", "model", "teacher")
CHECKPOINT = "teacher.pt"


def load_checkpoint(path, model) -> dict:
    """A teacher checkpoint for ``model``, read with ``weights_only=True`` (no code runs).

    Raises:
        ValueError naming the file: truncated or corrupt, not a teacher checkpoint, or saved
            for another architecture (delete it to train from the start).
    """
    hint = f"teacher checkpoint {path}"
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as err:  # zip, pickle and weights_only refusals all mean a bad file
        raise ValueError(f"{hint} is corrupt or not a checkpoint ({err.__class__.__name__}: "
                         f"{str(err).splitlines()[0][:200]}); delete it to start over") from err
    needed = {"step", "model", "ema", "optimizer", "losses"}
    if not isinstance(state, dict) or not needed <= set(state):
        raise ValueError(f"{hint} is not a teacher checkpoint (needs keys {sorted(needed)})")
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state["model"].items()}
    if found != expected:
        diff = sorted(set(found) ^ set(expected)) or sorted(
            k for k in expected if found[k] != expected[k])
        raise ValueError(f"{hint} was saved for another architecture (differs at "
                         f"{diff[:3]}); delete it to start over")
    return state


def run(ctx: StepContext) -> dict:
    p = ctx.params
    data = load_prepared(ctx.ws)
    out = ctx.ws.step(NAME)
    config = p.model.to_dict()
    if p.model.weights is not None:
        from boss_core.models.external import build_pretrained

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
    ckpt = ckpt_dir / CHECKPOINT
    model = build_model(p.model, data.data_shape, seed=p.teacher.seed)
    start = load_checkpoint(ckpt, model) if ckpt.is_file() else None
    if start is not None:
        log.info("teacher: resuming from step %d of %s", start["step"], ckpt)
        ctx.set_tags({"resumed_from_step": start["step"]})

    earlier_s = float(start.get("wall_seconds", 0.0)) if start is not None else 0.0
    started = time.perf_counter()

    def on_progress(progress):
        ctx.log_metrics({"loss": progress.loss}, step=progress.step)
        state = {**progress.snapshot(),  # + training seconds so far, across resumes
                 "wall_seconds": earlier_s + time.perf_counter() - started}
        with atomic_path(ckpt) as tmp:
            torch.save(state, tmp)
        fault_point("teacher.checkpoint")

    result = train_teacher(model, data.x, p.teacher, labels=data.y, callback=on_progress,
                           start_state=start)
    save_model(teacher_file(ctx.ws), result.ema_model, config, data.data_shape)
    with atomic_path(out / "losses.csv") as tmp:
        np.savetxt(tmp, result.losses, delimiter=",", header="step,loss", comments="")
    from .runtime.plots import loss_curves

    loss_curves({"teacher": result.losses}, out / "loss.png", title="teacher training loss")
    ctx.log_artifact(out / "loss.png", "figures")
    summary = {"iterations": result.step, "final_loss": float(result.losses[-50:, 1].mean()),
               "parameters": count_parameters(result.ema_model),
               "train_seconds": earlier_s + result.wall_time_s}
    write_json(out / "summary.json", summary)
    shutil.rmtree(ckpt_dir, ignore_errors=True)  # finished: the model file is the result
    return summary


task = prefect_task(NAME, run, SECTIONS)

if __name__ == "__main__":
    sys.exit(main(NAME, run, SECTIONS, __doc__))
