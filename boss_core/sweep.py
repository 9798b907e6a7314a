"""The evaluation sweep over one dataset: every method at every NFE, at equal budgets.

Methods (the keys of the pipeline's metrics file):

- ``teacher``: the pretrained model, N-step uniform Euler (row ``nfe_<N>``);
- ``uniform``, ``shift``, ``edm``: the teacher on preset grids;
- ``bellman``, ``bellman_global``: the teacher on the searched schedules (no training);
- ``boss``, ``boss_lora``: straightened to the searched schedule (full / LoRA), one model per K;
- ``reflow_uniform``: reflow on (noise, teacher end point) pairs, sampled with uniform steps;
- ``distill_uniform``: straightened to the uniform K-grid's chords, one model per K.

Each (method, K) is scored over ``n_seeds`` noise seeds: the caller's distribution score
(FID/KID for images, swd/mmd for 2-D) as mean and population std, and ``endpoint_rmse``
against the N-step teacher from the same noises, pooled over all seeds' samples.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import Tensor, nn

from .bellman import bellman_schedules, global_schedules
from .config import ConfigMixin, check_int, check_number
from .cost import cost_matrix
from .grids import uniform_grid
from .lora import add_lora, check_lora_rank
from .metrics import aggregate
from .pairs import holdout_mask, teacher_pairs, uniform_on_grid
from .presets import PRESETS, uniform_schedule
from .schedule import Schedule
from .seeds import sample_noise
from .straighten import StraightenConfig, straighten, trainable_copy
from .velocity import NFECounter

METHODS = ("teacher", "uniform", "shift", "edm", "bellman", "bellman_global", "boss",
           "boss_lora", "reflow_uniform", "distill_uniform")
TRAINED = ("boss", "boss_lora", "reflow_uniform", "distill_uniform")
Score = Callable[[Tensor], dict[str, float]]


@dataclass(frozen=True)
class SweepConfig(ConfigMixin):
    """The ``sweep`` section of params.yaml (evaluation and the pairs/search sizes)."""

    methods: tuple[str, ...] = METHODS
    nfes: tuple[int, ...] = (1, 2, 4, 6, 8, 10)
    n_steps: int = 100
    search_samples: int = 500
    pair_samples: int = 3000
    holdout_fraction: float = 0.1
    straighten_schedule: str = "bellman"
    lora_rank: int = 4
    eval_samples: int = 1797
    n_seeds: int = 3
    seed: int = 0
    batch_size: int = 500

    def __post_init__(self):
        object.__setattr__(self, "methods", tuple(self.methods))
        object.__setattr__(self, "nfes", tuple(self.nfes))
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown} in methods; known: {list(METHODS)}")
        for name in ("n_steps", "search_samples", "pair_samples", "eval_samples", "batch_size",
                     "lora_rank"):
            check_int(name, getattr(self, name), 1)
        check_int("seed", self.seed, 0)
        check_int("n_seeds", self.n_seeds, 2)
        if not self.nfes:
            raise ValueError("nfes must list at least one K")
        for k in self.nfes:
            check_int("nfes entry", k, 1)
            if k > self.n_steps:
                raise ValueError(f"nfes entry {k} exceeds n_steps={self.n_steps}")
        check_number("holdout_fraction", self.holdout_fraction, lambda v: 0 <= v < 1,
                     "in [0, 1)")
        if self.straighten_schedule not in ("bellman", "bellman_global"):
            raise ValueError("straighten_schedule must be 'bellman' (BOSS) or 'bellman_global', "
                             f"got {self.straighten_schedule!r}")


@dataclass
class Cost:
    """What a row cost: training iterations, wall seconds, trainable parameters, and the
    network calls (batched) and per-sample evaluations spent on its schedule search."""

    iterations: int = 0
    wall_seconds: float = 0.0
    trainable_params: int = 0
    search_nfe: int = 0
    search_evaluations: int = 0


@dataclass
class Searched:
    schedules: dict[str, dict[int, Schedule]]
    costs: dict[str, Cost] = field(default_factory=dict)


def search(teacher: nn.Module, data_shape, config: SweepConfig, device=None,
           progress: bool = False) -> Searched:
    """Bellman (local cost) and global schedules for every K in ``config.nfes``."""
    k_max = max(config.nfes)
    noise = sample_noise(tuple(data_shape), config.seed + 1, 0, config.search_samples,
                         device=device)
    out = Searched({})
    for name in ("bellman", "bellman_global"):
        if not _needs(name, config):
            continue
        counter, start = NFECounter(teacher), time.perf_counter()
        if name == "bellman":
            table = bellman_schedules(cost_matrix(counter, noise, config.n_steps,
                                                  config.batch_size, progress=progress), k_max)
        else:
            table = global_schedules(counter, noise, config.n_steps, k_max, config.batch_size,
                                     progress=progress)
        out.schedules[name] = {k: table[k] for k in config.nfes}
        out.costs[name] = Cost(wall_seconds=time.perf_counter() - start,
                               search_nfe=counter.nfe, search_evaluations=counter.n_evaluations)
    return out


def _needs(schedule_name: str, config: SweepConfig) -> bool:
    users = [m for m in config.methods if m == schedule_name or (
        m in ("boss", "boss_lora") and config.straighten_schedule == schedule_name)]
    return bool(users)


def train_students(teacher: nn.Module, data_shape, searched: Searched, config: SweepConfig,
                   train_config: StraightenConfig, checkpoint_root=None, device=None,
                   progress: bool = False):
    """Train every requested student. Returns ({method: {K: model}}, {method: {K: Cost}}).

    boss / boss_lora straighten to ``searched.schedules[config.straighten_schedule]``,
    distill_uniform to the uniform K-grid on the fine grid; reflow_uniform is one model
    shared by every K. All see the same pairs budget and ``train_config``.
    """
    if "boss_lora" in config.methods:
        check_lora_rank(teacher, config.lora_rank)  # fail before any compute
    n, nfes = config.n_steps, config.nfes
    groups = {}  # target schedules per K, one teacher pass per group
    if {"boss", "boss_lora"} & set(config.methods):
        groups[("boss", "boss_lora")] = searched.schedules[config.straighten_schedule]
    if "distill_uniform" in config.methods:
        groups[("distill_uniform",)] = {k: uniform_on_grid(k, n) for k in nfes}
    models: dict[str, dict[int, nn.Module]] = {}
    costs: dict[str, dict[int, Cost]] = {}

    def fit(method, k, student, pairs):
        train, val = _split(pairs, config)
        ckpt = None if checkpoint_root is None else f"{checkpoint_root}/{method}/nfe_{k}"
        result = straighten(student, train, train_config, val=val, checkpoint_dir=ckpt)
        models.setdefault(method, {})[k] = result.ema_model
        costs.setdefault(method, {})[k] = Cost(train_config.iterations, result.wall_time_s,
                                               result.trainable_params)

    targets = {(methods, k): schedules[k] for methods, schedules in groups.items()
               for k in nfes}
    pairs, ends = teacher_pairs(teacher, targets, n, data_shape, seed=config.seed + 2, start=0,
                                count=config.pair_samples, batch_size=config.batch_size,
                                device=device, reflow="reflow_uniform" in config.methods,
                                progress=progress)  # one teacher pass for every student
    for (methods, k), chords in pairs.items():
        for method in (m for m in methods if m in config.methods):
            student = (add_lora(teacher, config.lora_rank, seed=train_config.seed)
                       if method == "boss_lora"
                       else trainable_copy(teacher))
            fit(method, k, student, chords)
    if ends is not None:
        fit("reflow_uniform", 0, trainable_copy(teacher), ends)
        shared, cost = models["reflow_uniform"].pop(0), costs["reflow_uniform"].pop(0)
        models["reflow_uniform"] = {k: shared for k in nfes}  # one model serves every K
        costs["reflow_uniform"] = {k: cost for k in nfes}
    return models, costs


def _split(pairs, config: SweepConfig):
    held = holdout_mask(pairs.sample, config.seed + 2, config.holdout_fraction)
    return pairs.subset(~held), pairs.subset(held)


def sampling_plan(teacher: nn.Module, searched: Searched, students, config: SweepConfig):
    """{method: {K: (velocity, times)}}: what each row samples with. The teacher row is keyed
    by its network calls N."""
    n = config.n_steps
    plan: dict[str, dict[int, tuple]] = {}
    for method in config.methods:
        if method == "teacher":
            plan[method] = {n: (teacher, uniform_grid(n))}
        elif method in PRESETS:
            plan[method] = {k: (teacher, PRESETS[method](k).times) for k in config.nfes}
        elif method in ("bellman", "bellman_global"):
            plan[method] = {k: (teacher, searched.schedules[method][k].times)
                            for k in config.nfes}
        elif method in ("boss", "boss_lora"):
            table = searched.schedules[config.straighten_schedule]
            plan[method] = {k: (students[method][k], table[k].times) for k in config.nfes}
        elif method == "distill_uniform":
            plan[method] = {k: (students[method][k], uniform_on_grid(k, n).times)
                            for k in config.nfes}
        else:  # reflow_uniform
            plan[method] = {k: (students[method][k], uniform_schedule(k).times)
                            for k in config.nfes}
    return plan


def eval_seeds(config: SweepConfig) -> list[int]:
    """The evaluation's noise seeds: ``seed + 100 + s`` for s < n_seeds."""
    return [config.seed + 100 + s for s in range(config.n_seeds)]


def sampled_rows(plan) -> dict[tuple[str, int], tuple]:
    """{(method, K): (velocity, times)} of a plan, less the teacher row (it is the reference)."""
    return {(m, k): row for m, table in plan.items() if m != "teacher"
            for k, row in table.items()}


def evaluate(plan, teacher: nn.Module, data_shape, score: Score, config: SweepConfig,
             device=None, progress: bool = True, samples=None) -> dict[str, dict[str, dict]]:
    """Score every (method, K) over ``config.n_seeds`` noise seeds.

    Args:
        score: one seed's (M, ...) samples, or features when ``samples`` was drawn with
            ``featurize``, -> {name: value}.
        samples: the merged ``boss_core.shards.Drawn`` over samples 0 .. eval_samples-1
            (sharded runs); None draws them here in one piece.
    Returns:
        {method: {"nfe_K": {<score keys>, <key>_std, endpoint_rmse, n_samples, n_seeds}}}.
        endpoint_rmse pools every seed's samples against the N-step teacher from the same
        noises, so the teacher row's is exactly 0.
    """
    from tqdm.auto import tqdm

    from .shards import sample_shard

    if samples is None:
        samples = sample_shard(sampled_rows(plan), teacher, data_shape, eval_seeds(config),
                               config.n_steps, 0, config.eval_samples, config.batch_size,
                               device=device, progress=progress)
    if samples.count != config.eval_samples:
        raise ValueError(f"drawn {samples.count} samples per seed, expected "
                         f"sweep.eval_samples={config.eval_samples}")
    seeds = range(config.n_seeds)
    rows = [(m, k) for m, table in plan.items() for k in table]
    metrics: dict[str, dict[str, dict[str, float]]] = {}
    for method, k in tqdm(rows, desc="score", disable=not progress):
        key = ("reference", config.n_steps) if method == "teacher" else (method, k)
        row = aggregate([score(samples.values[(*key, s)]) for s in seeds])
        row["endpoint_rmse"] = samples.endpoint_rmse(key, config.n_seeds)
        row["n_samples"] = config.eval_samples
        bad = [name for name, value in row.items() if not math.isfinite(value)]
        if bad:
            raise FloatingPointError(f"evaluation of {method} at nfe_{k} gave non-finite {bad}")
        metrics.setdefault(method, {})[f"nfe_{k}"] = row
    return metrics


def cost_table(config: SweepConfig, searched: Searched, student_costs) -> dict:
    """{method: {"nfe_K": Cost fields}}; trained rows also carry their schedule's search."""
    out: dict[str, dict[str, dict]] = {}
    for method in config.methods:
        keys = [config.n_steps] if method == "teacher" else list(config.nfes)
        for k in keys:
            cost = Cost()
            if method in student_costs:
                cost = Cost(**vars(student_costs[method][k]))
            schedule = (config.straighten_schedule if method in ("boss", "boss_lora")
                        else method)
            if schedule in searched.costs:
                found = searched.costs[schedule]
                cost.search_nfe, cost.search_evaluations = found.search_nfe, \
                    found.search_evaluations
                if method == schedule:
                    cost.wall_seconds = found.wall_seconds
            out.setdefault(method, {})[f"nfe_{k}"] = vars(cost)
    return out


def metrics_frame(metrics: dict):
    """A pandas DataFrame with one row per (method, nfe), in method order then NFE."""
    import pandas as pd

    records = [{"method": m, "nfe": int(key.split("_")[1]), **row}
               for m, table in metrics.items() for key, row in table.items()]
    frame = pd.DataFrame.from_records(records)
    return frame.sort_values(["method", "nfe"], key=lambda col: col.map(
        {m: i for i, m in enumerate(METHODS)}) if col.name == "method" else col,
        kind="stable").reset_index(drop=True)


def run_sweep(teacher: nn.Module, data_shape, score: Score, config: SweepConfig,
              train_config: StraightenConfig, *, checkpoint_root=None, device=None,
              progress: bool = True, min_eval_samples: int = 1):
    """Search, train and evaluate. Returns (metrics dict, costs dict, metrics DataFrame).

    ``min_eval_samples``: the fewest samples ``score`` accepts (KID's ``kid_subset_size``),
    checked against ``config.eval_samples`` before any compute.
    """
    if config.eval_samples < min_eval_samples:
        raise ValueError(f"eval_samples={config.eval_samples} is fewer than the score needs "
                         f"({min_eval_samples}, e.g. KID's kid_subset_size)")
    if not isinstance(train_config, StraightenConfig):
        raise ValueError(f"train_config must be a StraightenConfig, got "
                         f"{type(train_config).__name__}")
    teacher = teacher.eval()
    searched = search(teacher, data_shape, config, device=device, progress=progress)
    models, student_costs = train_students(teacher, data_shape, searched, config, train_config,
                                           checkpoint_root=checkpoint_root, device=device,
                                           progress=progress)
    plan = sampling_plan(teacher, searched, models, config)
    metrics = evaluate(plan, teacher, data_shape, score, config, device=device,
                       progress=progress)
    return metrics, cost_table(config, searched, student_costs), metrics_frame(metrics)
