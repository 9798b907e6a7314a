"""Step 7, straighten: fine-tune the teacher to its K-step schedule, one method per stage.

    python -m tasks.straighten --method boss [--params params.yaml]

Methods: the trained methods of the registry (boss_core/methods.py): boss (full fine-tuning
on the Bellman schedule's chords), boss_lora (the same with a rank-``sweep.lora_rank`` LoRA
adapter, merged after training), distill_uniform (chords of the uniform grid) and
reflow_uniform (one model on (noise, end point) pairs, used at every K); the training itself
is ``boss_core.protocol.fit_method``. All see the same pairs budget and ``straighten``
settings. A method left out of ``sweep.methods`` writes an empty folder. Checkpoints go to
checkpoints/straighten/<method>/<nfe_K|shared>/<params hash>/ and a killed run resumes from them
bit-identically (CPU); they are kept until every model file of the method is written, so a
run killed while training K=4 does not retrain K=1 and K=2 (tests/test_faults.py kills it at
the fault point ``straighten.checkpoint``, see tasks/runtime/faults.py).

Writes outputs/students/<method>/nfe_K/{model.safetensors, schedule.json, losses.csv} and
costs.json; each model is logged to MLflow and registered as "<experiment>-<method>-nfe<K>"
with its schedule attached.

Under torchrun (``python -m tasks.runtime.launch straighten ...`` with ``scale`` asking for
several processes; WORLD_SIZE > 1 in the environment) every rank joins the process group (gloo
on the CPU, NCCL on ``cuda:LOCAL_RANK``) and trains its share of each global batch; rank 0 alone
makes the MLflow run, writes outputs/ and checkpoints/, registers the models and clears the
checkpoints. The other ranks read the inputs and write nothing.
"""

from __future__ import annotations

import logging
import shutil
import sys

import numpy as np

from boss_core.device import resolve_device
from boss_core.distributed import Dist
from boss_core.methods import trained_names
from boss_core.protocol import check_student, fit_method, schedule_name, student_tag

from .runtime.artifacts import (
    conditioning_of,
    load_pairs,
    load_schedules,
    load_teacher,
    student_dir,
    teacher_file,
)
from .runtime.faults import fault_point
from .runtime.io import atomic_path, load_tensors, save_model, write_json
from .runtime.step import StepContext, main, prefect_task
from .runtime.tracking import register_model

log = logging.getLogger("boss")
NAME, SECTIONS = "straighten", ("model", "teacher", "sweep", "methods", "straighten", "run")


def run_method(ctx: StepContext, method: str, dist: Dist | None = None) -> dict:
    """Train the method's students; with ``dist`` (a torchrun rank) rank 0 alone writes and
    logs, and ``ctx`` of the other ranks is never used for tracking."""
    p, dist = ctx.params, dist or Dist()
    out = ctx.ws.step("students") / method
    if method not in p.sweep.methods:
        if dist.is_main:
            _fresh_folder(out)
            write_json(out / "costs.json", {})
        return {"method": method, "skipped": True}
    dist.rank_slice(p.straighten.batch_size)  # the batch splits evenly: checked before compute
    device = dist.device(resolve_device(p.straighten.device))
    dist.init_process_group(device)
    if dist.is_main:
        _fresh_folder(out)
    teacher = load_teacher(ctx.ws, str(dist.device(resolve_device(p.run.device))),
                           p.model.import_path)
    check_student(method, teacher, p.sweep)  # before any compute
    _, meta = load_tensors(teacher_file(ctx.ws))
    target = schedule_name(method, p.sweep)
    schedules = load_schedules(ctx.ws)[target]
    digest = p.digest(("data", "model", "teacher", "sweep", "methods", "straighten"))

    def checkpoint_of(k: int):
        return ctx.ws.checkpoints(NAME) / method / student_tag(k) / digest

    def logged(k, fitted) -> None:
        tag, result = student_tag(k), fitted.result
        if not dist.is_main:
            return
        if result.resumed_from:
            log.info("straighten %s %s: resumed from step %d of %s", method, tag,
                     result.resumed_from, checkpoint_of(k))
            ctx.set_tags({f"resumed_from_step.{tag}": result.resumed_from})
        ctx.log_curve(f"loss.{tag}", result.losses, every=max(1, len(result.losses) // 200))
        if len(result.val_losses):
            ctx.log_curve(f"val_loss.{tag}", result.val_losses)

    students = fit_method(method, teacher, lambda k: load_pairs(ctx.ws, target, k), p.sweep,
                          p.straighten, checkpoint_of=checkpoint_of, dist=dist,
                          on_checkpoint=lambda step: fault_point("straighten.checkpoint"),
                          on_fitted=logged, schedules=schedules, options=p.methods.of(method),
                          cond=conditioning_of(p))
    if not dist.is_main:
        return {"method": method, "rank": dist.rank}
    for k in p.sweep.nfes:
        fitted = students.by_k[k]
        folder = student_dir(ctx.ws, method, k)
        save_model(folder / "model.safetensors", fitted.model, meta["model_config"],
                   meta["data_shape"], {"method": method, "nfe": k})
        own = fitted.schedule  # a schedule the student found itself (Training.own_schedule)
        sampled = schedules[k] if own is None else own
        write_json(folder / "schedule.json", sampled.to_dict())
        with atomic_path(folder / "losses.csv") as tmp:
            np.savetxt(tmp, fitted.result.losses, delimiter=",", header="step,loss",
                       comments="")
        ctx.log_artifact(folder, f"models/{method}/nfe_{k}")
        if p.run.register_models:
            register_model(ctx.client, ctx.run_id, f"{p.run.experiment}-{method}-nfe{k}",
                           f"models/{method}/nfe_{k}",
                           {"method": method, "nfe": str(k),
                            "schedule": sampled.to_json()})
    write_json(out / "costs.json", students.costs)
    for k in students.trained:  # done: the model files are the result
        shutil.rmtree(checkpoint_of(k), ignore_errors=True)
    return {"method": method, "models": len(p.sweep.nfes),
            "train_seconds": sum(c["wall_seconds"] for c in students.costs.values())}


def _fresh_folder(folder) -> None:
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)


def main_cli(argv=None) -> int:
    dist = Dist.from_env()  # torchrun's RANK / WORLD_SIZE / LOCAL_RANK (absent: one process)

    def add_args(p):
        p.add_argument("--method", required=True, choices=trained_names(),
                       help="the student to train (a trained method of boss_core/methods.py)")

    def bind(args):
        return f"{NAME}_{args.method}", lambda ctx: run_method(ctx, args.method, dist)

    try:
        return main(NAME, None, SECTIONS, __doc__, argv, add_args=add_args, bind=bind,
                    tracked=dist.is_main)
    finally:
        dist.destroy_process_group()


def make_task(method: str):
    return prefect_task(f"{NAME}_{method}", lambda ctx: run_method(ctx, method), SECTIONS)


if __name__ == "__main__":
    sys.exit(main_cli())
