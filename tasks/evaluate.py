"""Step 8, evaluate: every method at every NFE, side by side, over ``sweep.n_seeds`` seeds.

    python -m tasks.evaluate [--params params.yaml]

Images are scored with FID and KID in the feature network's space (torch-fidelity), 2-D sets
with sliced Wasserstein distance and MMD; every row also gets the end-point RMSE against the
N-step teacher from the same noises (so the teacher's own row is exactly 0). The samples
are drawn in seed-range shards on the ``scale`` runner
(tasks/runtime/shards.py) and scored together.
A class-conditional run draws sample i at label y_i = i mod C (class-balanced), the teacher
rows with the guided teacher (``sweep.guidance``), and adds each row's ``class_accuracy``:
the share of samples the FID classifier puts in the class they were drawn at.
Writes results/metrics.json {method: {"nfe_K": {fid, fid_std, kid, kid_std, [class_accuracy,
class_accuracy_std,] endpoint_rmse, n_samples, n_seeds}}}, results/costs.json (training
iterations, wall seconds, trainable parameters, search calls, network calls per sample and
the budget in network evaluations per row, ``boss_core.protocol.Cost``; the budget is also
logged to MLflow as ``<method>.budget_evaluations`` at step K) and 64 samples per row for the
report's grids.
"""

from __future__ import annotations

import sys

import torch

from boss_core.distances import mmd, swd
from boss_core.features import load_feature_net, predict_from_features
from boss_core.fidelity import build_extractor, fid_kid_features
from boss_core.methods import get
from boss_core.protocol import Cost as RowCost
from boss_core.protocol import (
    cost_table,
    evaluation_seeds,
    sampled_rows,
    sampling_plan,
    score_rows,
    student_costs_of,
)
from boss_core.sampling import euler_sample
from boss_core.schedule import Schedule
from boss_core.seeds import sample_noise
from boss_core.shards import merge_samples, sample_shard

from .runtime.artifacts import (
    conditioning_of,
    is_image_data,
    load_prepared,
    load_schedules,
    load_student,
    load_teacher,
    student_dir,
)
from .runtime.io import read_json, save_tensors, write_json
from .runtime.shards import map_shards, portable, shard_plan
from .runtime.step import StepContext, main, prefect_task

NAME, SECTIONS = "evaluate", ("sweep", "fidelity", "run")
GRID_SAMPLES = 64


def scorer(ctx: StepContext, data):
    """(score, headline key, featurize, classify): images are scored on features that the
    sampling shards extract themselves (``featurize``), so only (M, D) features travel back;
    2-D sets are scored on the samples (featurize None). ``classify`` (features -> classes,
    the FID classifier's head) gives a class-conditional run's ``class_accuracy``; None for
    unconditional runs, 2-D sets and the inception extractor."""
    if not is_image_data(data.data_shape):
        reference = data.x

        def score_points(samples):
            return {"swd": swd(samples.float().cpu(), reference, seed=0),
                    "mmd": mmd(samples.float().cpu(), reference)}

        return score_points, "swd", None, None
    f = ctx.params.fidelity
    if len(data) < f.kid_subset_size:
        raise ValueError(f"fidelity.kid_subset_size={f.kid_subset_size} exceeds the "
                         f"{len(data)} reference images")
    net = ctx.ws.step("features") / "feature_net.safetensors"
    extractor = build_extractor(f, net if f.extractor == "classifier" else None)
    reference = extractor.reference(data.x)

    def score_features(features):
        out = fid_kid_features(features, reference, f)
        return {"fid": out["fid"], "kid": out["kid"]}

    classify = None
    if f.extractor == "classifier" and conditioning_of(ctx.params).conditional:
        classifier = load_feature_net(net)

        def classify(features):
            return predict_from_features(classifier, features)

    return score_features, "fid", extractor.features, classify


def plan(ctx: StepContext, teacher):
    """{method: {K: (velocity, times)}} (``boss_core.protocol.sampling_plan``): students are
    read from outputs/students/<method>/nfe_K; the reference row is keyed by its N steps;
    the teacher rows sample the guided teacher of a class-conditional run."""
    device = next(teacher.parameters()).device

    def student(method: str, k: int):
        model, _ = load_student(student_dir(ctx.ws, method, k), str(device),
                                ctx.params.model.import_path)
        return model

    def own_schedule(method: str, k: int) -> Schedule:  # what straighten wrote beside it
        return Schedule.from_dict(read_json(student_dir(ctx.ws, method, k) / "schedule.json"))

    return sampling_plan(ctx.params.sweep, teacher, load_schedules(ctx.ws), student,
                         cond=conditioning_of(ctx.params), own_schedule=own_schedule)


def costs(ctx: StepContext) -> dict:
    """{method: {"nfe_K": cost}} from the schedules' search and the students' training."""
    s = ctx.params.sweep
    search = read_json(ctx.ws.step("schedules") / "schedules.json")["search"]
    searched = {name: RowCost(**c) for name, c in search.items()}
    student = {m: student_costs_of(m, s, read_json(ctx.ws.step("students") / m / "costs.json"))
               for m in s.methods if get(m).trained}
    return cost_table(s, searched, student, conditioning_of(ctx.params))


def sharded_samples(ctx: StepContext, rows, teacher, data_shape, featurize=None):
    """Every row's samples (or their features) for every seed and their end-point errors,
    drawn in seed-range shards on the ``scale`` runner (``boss_core.shards.Drawn``)."""
    s, scale, cond = ctx.params.sweep, ctx.params.scale, conditioning_of(ctx.params)
    shards = shard_plan(scale, s.eval_samples, s.batch_size)
    job = {"rows": {key: (portable(v, scale), t) for key, (v, t) in sampled_rows(rows).items()},
           "teacher": portable(cond.teacher(teacher), scale), "data_shape": tuple(data_shape),
           "num_classes": cond.num_classes,
           "seeds": evaluation_seeds(s), "n_steps": s.n_steps, "batch_size": s.batch_size,
           "device": ctx.params.run.device, "featurize": featurize,
           "progress": ctx.params.run.progress and len(shards) == 1}
    parts = map_shards(NAME, sample_shard, shards, scale, job, ctx.params.run.progress)
    return merge_samples(parts)


@torch.no_grad()
def run(ctx: StepContext) -> dict:
    s = ctx.params.sweep
    data = load_prepared(ctx.ws)
    score, key, featurize, classify = scorer(ctx, data)  # checks before any sampling
    cond = conditioning_of(ctx.params)
    teacher = load_teacher(ctx.ws, ctx.params.run.device, ctx.params.model.import_path)
    device = next(teacher.parameters()).device
    rows = plan(ctx, teacher)
    drawn = sharded_samples(ctx, rows, teacher, data.data_shape, featurize)
    metrics = score_rows(rows, drawn, score, s, progress=ctx.params.run.progress, cond=cond,
                         classify=classify)
    write_json(ctx.ws.results / "metrics.json", metrics)
    spent = costs(ctx)
    write_json(ctx.ws.results / "costs.json", spent)
    noise = sample_noise(tuple(data.data_shape), evaluation_seeds(s)[0], 0, GRID_SAMPLES,
                         device=device)
    extras = cond.extras(0, GRID_SAMPLES, device)  # {} or {"y": i mod C}
    grids = {f"{m}.nfe_{k}": euler_sample(v, noise, t, extras=extras)
             for m, by_k in rows.items() for k, (v, t) in by_k.items()}
    save_tensors(ctx.ws.step(NAME) / "samples.safetensors", grids)
    for method, by_k in metrics.items():
        for nfe_key, row in by_k.items():
            k = int(nfe_key.split("_")[1])
            budget = spent[method][nfe_key]["budget_evaluations"]  # network evaluations
            ctx.log_metrics({**{f"{method}.{name}": value for name, value in row.items()
                                if name not in ("n_samples", "n_seeds")},
                             f"{method}.budget_evaluations": budget}, step=k, parent=True)
    headline = {}
    if "boss" in metrics and "uniform" in metrics:
        k = min(s.nfes)
        headline = {f"boss_over_uniform_{key}_at_{k}":
                    metrics["boss"][f"nfe_{k}"][key] / metrics["uniform"][f"nfe_{k}"][key]}
    return {"rows": sum(len(v) for v in metrics.values()), **headline}


task = prefect_task(NAME, run, SECTIONS)

if __name__ == "__main__":
    sys.exit(main(NAME, run, SECTIONS, __doc__))
