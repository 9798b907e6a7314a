"""The evaluation protocol's steps, one implementation each, shared by the pipeline's stages
(tasks/) and the in-memory sweep (``boss_core.sweep.run_sweep``).

Every step iterates the method registry (``boss_core.methods``) over ``sweep.methods``:

1. ``search_schedules``: each method's schedule table {K: Schedule}, with what the search cost;
2. ``pair_targets`` / ``wants_reflow``: which teacher chords (and reflow pairs) to compute,
   one teacher pass for every student;
3. ``fit_method``: one method's students (one per K, or one shared);
4. ``sampling_plan``: what each row samples with, {method: {K: (velocity, times)}};
5. ``score_rows``: every row over the evaluation seeds; ``cost_table``: what each row cost.

Noise sets are kept apart by named seed offsets (``boss_core.seeds``).

Class-conditional teachers (``conditioning``: C from the model, w = ``sweep.guidance``):
every teacher call, in the cost matrix, the searches, the pairs, the reference row and the
evaluation rows, is the guided field ``guidance.guided(teacher, w, C)`` at the labels
y_i = i mod C of its noise set (2 network calls when w != 1); the students take the labels
and learn the guided chords (1 call per step). Rows stay keyed by K; the costs count calls.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from .grids import uniform_grid
from .guidance import Conditioning, check_guidance
from .lora import add_lora, check_lora_rank, merge_lora
from .methods import REGISTRY, Method, MethodOptions, SearchInputs, get
from .metrics import aggregate, class_accuracy
from .pairs import holdout_mask
from .rollout import evaluations_per_sample, straighten_rollout
from .schedule import Schedule
from .seeds import eval_seeds, pairs_seed
from .straighten import StraightenConfig, StraightenResult, straighten, trainable_copy
from .student_schedule import student_rounds
from .velocity import NFECounter, VelocityFn

Table = dict[str, dict[int, Schedule]]  # {schedule name: {K: Schedule}}
UNCONDITIONAL = Conditioning()  # no labels, no guidance: the default run
Score = Callable[[Tensor], dict[str, float]]


@dataclass
class Cost:
    """What a row cost: training iterations, wall seconds, trainable parameters, the network
    calls (batched) and per-sample evaluations spent on its schedule search, and
    ``sample_nfe``, the network calls of one sample (K, or 2K for a guided teacher).

    The budget, in per-sample network evaluations (a forward pass 1, a backward pass 2; one
    guided teacher step 2 forwards), for a trained row (None elsewhere: left out)::

        pairs_evaluations  = pair_samples * N * calls_per_step   (the teacher's paths that
                                                                  give every student's pairs)
        train_evaluations  = 3 * iterations * batch_size         (chords, reflow)
                             or counted by the rollout / rounds kinds (teacher calls included)
        budget_evaluations = search_evaluations + pairs_evaluations + train_evaluations

    A schedule-only row's budget is its search_evaluations; the reference row's is 0.
    """

    iterations: int = 0
    wall_seconds: float = 0.0
    trainable_params: int = 0
    search_nfe: int = 0
    search_evaluations: int = 0
    sample_nfe: int = 0
    pairs_evaluations: int | None = None
    train_evaluations: int | None = None
    budget_evaluations: int = 0


def conditioning(sweep, num_classes: int | None, label_dropout: float | None = None,
                 pretrained: bool = False) -> Conditioning:
    """The run's labels and guidance: C = ``num_classes`` (the model's; None unconditional),
    w = ``sweep.guidance``. Raises ValueError naming the key a model cannot honour
    (``guidance.check_guidance``) before any compute."""
    check_guidance(sweep.guidance, num_classes, label_dropout, pretrained)
    return Conditioning(num_classes, sweep.guidance)


def selected(sweep) -> list[Method]:
    """The registry entries of ``sweep.methods``, in its order."""
    return [get(name) for name in sweep.methods]


def schedule_name(method: str | Method, sweep) -> str:
    """The schedule table ``method`` samples with (and, if trained, learns)."""
    method = get(method) if isinstance(method, str) else method
    return method.schedule_name(sweep.straighten_schedule)


def searches_to_run(sweep) -> list[str]:
    """Every search that needs no teacher pass of its own (presets and cost-matrix methods:
    cheap, always run) plus the teacher searches a selected method uses."""
    used = {schedule_name(m, sweep) for m in selected(sweep) if not m.reference}
    return [name for name, m in REGISTRY.items() if m.search is not None
            and (m.search.needs != "teacher" or name in used)]


def needs_teacher_search(sweep) -> bool:
    return any(REGISTRY[name].search.needs == "teacher" for name in searches_to_run(sweep))


def search_schedules(sweep, options: MethodOptions, *, cost=None,
                     cost_search: Mapping[str, Any] | None = None,
                     teacher: VelocityFn | None = None, noise: Tensor | None = None,
                     cond: Conditioning = UNCONDITIONAL, progress: bool = False
                     ) -> tuple[Table, dict[str, Cost]]:
    """Each searched schedule for every K in ``sweep.nfes``.

    Args:
        cost: the teacher's ``CostMatrix`` (N = ``sweep.n_steps``).
        cost_search: what computing ``cost`` took ({search_nfe, search_evaluations,
            wall_seconds}); every cost method is charged it.
        teacher, noise: for teacher searches (``needs_teacher_search``); their network calls
            are counted here (a guided teacher's 2 per evaluation, a backward pass 2 more);
            one that also reads the cost (``Search.reads_cost``) pays ``cost_search`` too.
        cond: the labels of the noises (y_i = i mod C) and the guidance of the teacher.
    Returns:
        ({name: {K: Schedule}}, {name: Cost} for the searches that spent network calls).
    """
    table: Table = {}
    spent: dict[str, Cost] = {}
    for name in searches_to_run(sweep):
        search = REGISTRY[name].search
        velocity, counter, extras, start = teacher, None, {}, time.perf_counter()
        if search.needs == "teacher":
            if teacher is None or noise is None:
                raise ValueError(f"the {name} search needs the teacher and the search noises")
            counter = NFECounter(teacher)  # inside the guidance: counts both of its calls
            velocity = cond.teacher(counter)
            extras = cond.extras(0, noise.shape[0], noise.device)
        reads_cost = search.needs == "cost" or (search.reads_cost is not None
                                                and search.reads_cost(options.of(name)))
        if reads_cost and cost is None:
            raise ValueError(f"the {name} search needs the cost matrix")
        inputs = SearchInputs(tuple(sweep.nfes), sweep.n_steps, cost=cost, teacher=velocity,
                              noise=noise, extras=extras, batch_size=sweep.batch_size,
                              progress=progress)
        table[name] = search.build(inputs, options.of(name))
        if search.needs == "teacher":
            spent[name] = Cost(wall_seconds=time.perf_counter() - start,
                               search_nfe=counter.nfe,
                               search_evaluations=counter.n_evaluations)
            if reads_cost and cost_search is not None:  # it pays for the cost matrix too
                for key in ("search_nfe", "search_evaluations", "wall_seconds"):
                    setattr(spent[name], key, getattr(spent[name], key) + cost_search[key])
        elif search.needs == "cost" and cost_search is not None:
            spent[name] = Cost(**{k: cost_search[k] for k in
                                  ("search_nfe", "search_evaluations", "wall_seconds")})
    return table, spent


def pair_targets(sweep, table: Table) -> dict[tuple[str, int], Schedule]:
    """{(schedule name, K): Schedule} whose teacher chords the selected chord students learn
    (students sharing a schedule share its chords)."""
    names = []
    for m in selected(sweep):
        if m.trained and m.training.learns_chords:
            name = schedule_name(m, sweep)
            if name not in names:
                names.append(name)
    return {(name, k): table[name][k] for name in names for k in sweep.nfes}


def wants_reflow(sweep) -> bool:
    """Whether a selected student reads the (noise, end point) pairs (reflow, rollout)."""
    return any(m.trained and m.training.needs_ends for m in selected(sweep))


def split_pairs(pairs, sweep):
    """(train, held-out) pairs: a sample is held out by (pairs seed, its index) alone."""
    held = holdout_mask(pairs.sample, pairs_seed(sweep.seed), sweep.holdout_fraction)
    return pairs.subset(~held), pairs.subset(held)


def check_student(method: str | Method, teacher: nn.Module, sweep) -> None:
    """Fail before any compute when the teacher cannot take the method's student."""
    method = get(method) if isinstance(method, str) else method
    if method.trained and method.training.lora:
        check_lora_rank(teacher, sweep.lora_rank)


def training_keys(method: str | Method, sweep) -> list[int]:
    """The students of a method: one per K, or [0] for one shared by every K."""
    method = get(method) if isinstance(method, str) else method
    return [0] if method.training.shared else list(sweep.nfes)


def student_tag(k: int) -> str:
    return "shared" if k == 0 else f"nfe_{k}"


@dataclass(frozen=True, eq=False)
class Fitted:
    """A trained student: ``model`` samples (LoRA merged); ``result`` the training record;
    ``schedule`` the schedule it learnt when it found one of its own (``Training.own_schedule``;
    None: the method's); ``info`` what its training measured (e.g. each round's schedule)."""

    model: nn.Module
    result: StraightenResult
    schedule: Schedule | None = None
    info: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class Students:
    """One method's students: ``by_k`` {K: Fitted} (a shared one under every K) and
    ``costs`` {tag: {iterations, wall_seconds, trainable_params}}."""

    by_k: dict[int, Fitted] = field(default_factory=dict)
    costs: dict[str, dict[str, Any]] = field(default_factory=dict)
    trained: dict[int, Fitted] = field(default_factory=dict)  # by training key (0 = shared)


def fit_method(method: str | Method, teacher: nn.Module, pairs_of: Callable[[int], Any],
               sweep, train_config: StraightenConfig, *,
               checkpoint_of: Callable[[int], Any] | None = None,
               on_checkpoint: Callable[[int], None] | None = None, dist=None,
               on_fitted: Callable[[int, Fitted], None] | None = None,
               schedules: Mapping[int, Schedule] | None = None,
               options: Mapping[str, Any] | None = None,
               cond: Conditioning = UNCONDITIONAL) -> Students:
    """Fine-tune ``method``'s students from ``teacher``.

    Args:
        pairs_of: ``pairs_of(k)`` the method's pairs for K = k (k = 0: reflow pairs, which
            the rollout kind reads for every K).
        checkpoint_of: ``checkpoint_of(k)`` the folder ``straighten`` checkpoints in (None: no
            checkpoints).
        on_fitted: called with (k, Fitted) after each student (the pipeline logs it there).
        schedules: {K: Schedule} the method learns (``schedule_name``'s table); needed by the
            "rollout" and "rounds" kinds.
        options: the method's options (params.yaml ``methods.<name>``; None: its defaults).
        cond: the teacher's labels and guidance (the "rollout" chord target and the "rounds"
            kind call the teacher).
    Returns:
        ``Students``; under torchrun (``dist``) every rank returns the same models.
    """
    method = get(method) if isinstance(method, str) else method
    if not method.trained:
        raise ValueError(f"method {method.name} trains no student")
    check_student(method, teacher, sweep)
    kind = method.training.kind
    if kind in ("rollout", "rounds"):
        if schedules is None:
            raise ValueError(f"method {method.name} needs the schedules it learns")
        options = dict(method.options if options is None else options)
        if method.check is not None:
            try:
                method.check(options)
            except ValueError as err:
                raise ValueError(f"{method.name}.{err}") from err
    out = Students()
    for k in training_keys(method, sweep):
        checkpoint_dir = None if checkpoint_of is None else checkpoint_of(k)
        if kind == "rollout":
            fitted, extra = _fit_rollout(method, teacher, pairs_of(0), schedules[k], sweep,
                                         train_config, options, cond, checkpoint_dir,
                                         on_checkpoint, dist)
        elif kind == "rounds":
            fitted, extra = _fit_rounds(method, teacher, pairs_of(k), schedules[k], sweep,
                                        train_config, options, cond, checkpoint_dir,
                                        on_checkpoint, dist)
        else:
            train, val = split_pairs(pairs_of(k), sweep)
            result = straighten(_new_student(method, teacher, sweep, train_config), train,
                                train_config, val=val, checkpoint_dir=checkpoint_dir,
                                on_checkpoint=on_checkpoint, dist=dist)
            fitted, extra = Fitted(_merged(method, result), result), {
                "train_evaluations": 3 * train_config.iterations * train_config.batch_size}
        out.trained[k] = fitted
        out.costs[student_tag(k)] = {"iterations": train_config.iterations,
                                     "wall_seconds": fitted.result.wall_time_s,
                                     "trainable_params": fitted.result.trainable_params,
                                     **extra}
        if on_fitted is not None:
            on_fitted(k, fitted)
    out.by_k = {k: out.trained[0 if method.training.shared else k] for k in sweep.nfes}
    return out


def _new_student(method: Method, teacher: nn.Module, sweep, train_config) -> nn.Module:
    return (add_lora(teacher, sweep.lora_rank, seed=train_config.seed)
            if method.training.lora else trainable_copy(teacher))


def _merged(method: Method, result: StraightenResult) -> nn.Module:
    return merge_lora(result.ema_model) if method.training.lora else result.ema_model


def _fit_rollout(method, teacher, ends, schedule, sweep, train_config, options, cond,
                 checkpoint_dir, on_checkpoint, dist) -> tuple[Fitted, dict]:
    """A rollout student (``boss_core.rollout``) on the (noise, end point) pairs ``ends``;
    its cost counts 3K student calls and the chord target's teacher calls per sample."""
    train, val = split_pairs(ends, sweep)
    learn = method.training.learn_times
    result = straighten_rollout(
        _new_student(method, teacher, sweep, train_config), train, schedule, train_config,
        target=options["target"], backprop=options["backprop"], teacher=cond.teacher(teacher),
        val=val, checkpoint_dir=checkpoint_dir, on_checkpoint=on_checkpoint, dist=dist,
        times_lr=options["times_lr"] if learn else None)
    own = None
    if learn:  # the times trained with the weights: sample the network on the EMA's times
        own = result.ema_model.schedule(method.name)
        result = replace(result, ema_model=result.ema_model.net, model=result.model.net)
    per_sample = evaluations_per_sample(schedule, options["target"], cond.calls_per_step)
    return Fitted(_merged(method, result), result, own), {
        "train_evaluations": train_config.iterations * train_config.batch_size * per_sample}


def _fit_rounds(method, teacher, chords, schedule, sweep, train_config, options, cond,
                checkpoint_dir, on_checkpoint, dist) -> tuple[Fitted, dict]:
    """Straighten, re-schedule on the student's own jump errors, straighten again
    (``boss_core.student_schedule``); every teacher and student call is counted (training 3
    per sample and step)."""
    counter = NFECounter(teacher)
    guided = cond.teacher(counter)  # the counter inside the guidance counts both calls
    students: list[NFECounter] = []

    def fit(pairs, r: int) -> Fitted:
        train, val = split_pairs(pairs, sweep)
        result = straighten(_new_student(method, teacher, sweep, train_config), train,
                            train_config, val=val,
                            checkpoint_dir=None if checkpoint_dir is None
                            else Path(checkpoint_dir) / f"round_{r}",
                            on_checkpoint=on_checkpoint, dist=dist)
        return Fitted(_merged(method, result), result)

    def student_of(fitted: Fitted) -> NFECounter:
        students.append(NFECounter(fitted.model))
        return students[-1]

    start = time.perf_counter()
    found = student_rounds(fit, student_of, guided, chords, schedule,
                           rounds=options["rounds"], teacher_weight=options["teacher_weight"],
                           cost_samples=options["cost_samples"], batch_size=sweep.batch_size)
    last = found.fitted
    info = {"rounds": [{"indices": list(r.schedule.indices), **r.bias} for r in found.rounds]}
    trained_steps = found.trainings * train_config.iterations
    return Fitted(last.model, last.result, found.schedule, info), {
        "iterations": trained_steps, "wall_seconds": time.perf_counter() - start,
        "train_evaluations": (3 * trained_steps * train_config.batch_size
                              + counter.n_evaluations
                              + sum(c.n_evaluations for c in students))}


def sampling_plan(sweep, teacher: VelocityFn, table: Table,
                  student: Callable[[str, int], VelocityFn] | None = None,
                  cond: Conditioning = UNCONDITIONAL,
                  own_schedule: Callable[[str, int], Schedule] | None = None):
    """{method: {K: (velocity, times)}}: what each row samples with; the reference row is
    keyed by its N steps. ``student(method, K)`` gives a trained method's model (called with
    the labels, once per step); the teacher rows sample ``cond.teacher(teacher)`` (guided).
    ``own_schedule(method, K)``: the schedule a student found itself (``Training.own_schedule``
    methods), which it samples on."""
    teacher = cond.teacher(teacher)
    plan: dict[str, dict[int, tuple]] = {}
    for m in selected(sweep):
        if m.reference:
            plan[m.name] = {sweep.n_steps: (teacher, uniform_grid(sweep.n_steps))}
            continue
        times = table[schedule_name(m, sweep)]
        if m.trained and m.training.own_schedule:
            if own_schedule is None:
                raise ValueError(f"method {m.name} samples on its students' own schedules: "
                                 "give own_schedule")
            times = {k: own_schedule(m.name, k) for k in sweep.nfes}
        plan[m.name] = {k: (student(m.name, k) if m.trained else teacher, times[k].times)
                        for k in sweep.nfes}
    return plan


def sampled_rows(plan) -> dict[tuple[str, int], tuple]:
    """{(method, K): (velocity, times)} of a plan, less the reference row."""
    return {(m, k): row for m, table in plan.items() if not get(m).reference
            for k, row in table.items()}


def evaluation_seeds(sweep) -> list[int]:
    return eval_seeds(sweep.seed, sweep.n_seeds)


def score_rows(plan, samples, score: Score, sweep, progress: bool = False, *,
               cond: Conditioning = UNCONDITIONAL,
               classify: Callable[[Tensor], Tensor] | None = None
               ) -> dict[str, dict[str, dict]]:
    """Score every (method, K) over ``sweep.n_seeds`` noise seeds.

    Args:
        samples: ``boss_core.shards.Drawn`` over samples 0 .. eval_samples-1 of every seed.
        score: one seed's (M, ...) samples (or their features, when drawn with
            ``featurize``) -> {name: value}.
        cond, classify: for a class-conditional run, ``classify`` maps one seed's (M, ...)
            values to (M,) predicted classes, and each row gets ``class_accuracy``, the
            fraction equal to the labels the samples were drawn at (y_i = i mod C).
    Returns:
        {method: {"nfe_K": {<score keys>, <key>_std, [class_accuracy, class_accuracy_std,]
        endpoint_rmse, n_samples, n_seeds}}}. endpoint_rmse pools every seed's samples
        against the N-step teacher from the same noises, so the reference row's is exactly 0.
    """
    from tqdm.auto import tqdm

    if samples.count != sweep.eval_samples:
        raise ValueError(f"drawn {samples.count} samples per seed, expected "
                         f"sweep.eval_samples={sweep.eval_samples}")
    seeds = range(sweep.n_seeds)
    rows = [(m, k) for m, table in plan.items() for k in table]
    labels = cond.labels(0, sweep.eval_samples) if classify is not None else None

    def seed_scores(values: Tensor) -> dict[str, float]:
        out = score(values)
        if labels is not None:
            out["class_accuracy"] = class_accuracy(classify(values), labels)
        return out

    metrics: dict[str, dict[str, dict[str, float]]] = {}
    for method, k in tqdm(rows, desc="score", disable=not progress):
        key = ("reference", sweep.n_steps) if get(method).reference else (method, k)
        row = aggregate([seed_scores(samples.values[(*key, s)]) for s in seeds])
        row["endpoint_rmse"] = samples.endpoint_rmse(key, sweep.n_seeds)
        row["n_samples"] = sweep.eval_samples
        bad = [name for name, value in row.items() if not math.isfinite(value)]
        if bad:
            raise FloatingPointError(f"evaluation of {method} at nfe_{k} gave non-finite {bad}")
        metrics.setdefault(method, {})[f"nfe_{k}"] = row
    return metrics


def cost_table(sweep, search_costs: Mapping[str, Cost],
               student_costs: Mapping[str, Mapping[int, Cost]],
               cond: Conditioning = UNCONDITIONAL) -> dict:
    """{method: {"nfe_K": Cost fields}}: training from ``student_costs`` ({method: {K:
    Cost}}); every row also carries its schedule's search calls, and the row whose own search
    it is, the search's wall time; ``sample_nfe`` is K for a student, K times the teacher's
    calls per step (2 when guided) for a teacher row; a trained row's ``pairs_evaluations``
    and every row's ``budget_evaluations`` are ``Cost``'s (a student shared by every K is
    charged in full at each K)."""
    out: dict[str, dict[str, dict]] = {}
    for m in selected(sweep):
        keys = [sweep.n_steps] if m.reference else list(sweep.nfes)
        schedule = None if m.reference else schedule_name(m, sweep)
        for k in keys:
            cost = Cost(**vars(student_costs[m.name][k])) if m.name in student_costs else Cost()
            cost.sample_nfe = k if m.trained else k * cond.calls_per_step
            if schedule in search_costs:
                found = search_costs[schedule]
                cost.search_nfe = found.search_nfe
                cost.search_evaluations = found.search_evaluations
                if m.name == schedule:
                    cost.wall_seconds = found.wall_seconds
            if m.trained:
                cost.pairs_evaluations = sweep.pair_samples * sweep.n_steps * cond.calls_per_step
            cost.budget_evaluations = (cost.search_evaluations + (cost.pairs_evaluations or 0)
                                       + (cost.train_evaluations or 0))
            out.setdefault(m.name, {})[f"nfe_{k}"] = {
                key: value for key, value in vars(cost).items() if value is not None}
    return out


def student_costs_of(method: str, sweep, costs: Mapping[str, Mapping[str, Any]]
                     ) -> dict[int, Cost]:
    """{K: Cost} of a method from its per-tag training costs ({tag: {...}})."""
    shared = get(method).training.shared
    return {k: Cost(**costs["shared" if shared else f"nfe_{k}"]) for k in sweep.nfes}


def metrics_frame(metrics: dict):
    """A pandas DataFrame with one row per (method, nfe), in registry order then NFE."""
    import pandas as pd

    order = {name: i for i, name in enumerate(REGISTRY)}
    records = [{"method": m, "nfe": int(key.split("_")[1]), **row}
               for m, table in metrics.items() for key, row in table.items()]
    frame = pd.DataFrame.from_records(records)
    return frame.sort_values(["method", "nfe"], key=lambda col: col.map(order)
                             if col.name == "method" else col,
                             kind="stable").reset_index(drop=True)
