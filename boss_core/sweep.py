"""The evaluation sweep over one dataset, in memory: every method at every NFE, at equal
budgets, through the same steps as the pipeline's stages (``boss_core.protocol``).

The rows are the methods of the registry (``boss_core.methods``) that ``sweep.methods``
selects. Each (method, K) is scored over ``n_seeds`` noise seeds: the caller's distribution
score (FID/KID for images, swd/mmd for 2-D) as mean and population std, and
``endpoint_rmse`` against the N-step teacher from the same noises, pooled over all seeds'
samples. Given the same teacher, data and settings, ``run_sweep`` returns the metrics the
DVC stages write (one shard per step, as the ``local`` runner does).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn

from . import protocol
from .config import ConfigMixin, check_int, check_number
from .guidance import check_guidance_weight, num_classes_of
from .methods import (
    REGISTRY,
    MethodOptions,
    default_names,
    grid_search_names,
    names,
    trained_names,
)
from .protocol import Cost, metrics_frame
from .seeds import pairs_seed, sample_noise, search_seed
from .shards import cost_shard, merge_costs, merge_pairs, pairs_shard, sample_shard
from .straighten import StraightenConfig

METHODS = names()
TRAINED = trained_names()
Score = Callable[[Tensor], dict[str, float]]
__all__ = ["METHODS", "TRAINED", "Cost", "SweepConfig", "metrics_frame", "run_sweep"]


@dataclass(frozen=True)
class SweepConfig(ConfigMixin):
    """The ``sweep`` section of params.yaml (evaluation and the pairs/search sizes).

    guidance: the classifier-free guidance weight w of a class-conditional teacher
    (``boss_core.guidance``); None: plain conditional (or unconditional) sampling.
    """

    methods: tuple[str, ...] = default_names()
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
    guidance: float | None = None

    def __post_init__(self):
        object.__setattr__(self, "methods", tuple(self.methods))
        check_guidance_weight(self.guidance)
        if self.guidance is not None:
            object.__setattr__(self, "guidance", float(self.guidance))
        object.__setattr__(self, "nfes", tuple(self.nfes))
        unknown = [m for m in self.methods if m not in REGISTRY]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown} in methods; known: {list(REGISTRY)}")
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
        grid_searches = list(grid_search_names())
        if self.straighten_schedule not in grid_searches:
            raise ValueError(f"straighten_schedule must name a searched schedule, one of "
                             f"{grid_searches} (bellman is BOSS), got "
                             f"{self.straighten_schedule!r}")


def run_sweep(teacher: nn.Module, data_shape, score: Score, config: SweepConfig,
              train_config: StraightenConfig, *, options: MethodOptions | None = None,
              checkpoint_root=None, device=None, progress: bool = True,
              min_eval_samples: int = 1, featurize=None, num_classes: int | None = None,
              label_dropout: float | None = None, classify=None):
    """Search, train and evaluate, as the stages do. Returns (metrics dict, costs dict,
    metrics DataFrame).

    ``num_classes``: C of a class-conditional teacher (None: ``teacher.num_classes``, or
    unconditional); with ``config.guidance`` w every teacher call is guided
    (``boss_core.guidance``). ``label_dropout``: the teacher's, to refuse w != 1 on a teacher
    whose unconditional mode was never trained (None: not checked). ``classify``: one seed's
    values (samples, or features with ``featurize``) -> (M,) predicted classes; a
    conditional run's rows then get ``class_accuracy``.

    ``options``: the methods' settings (params.yaml ``methods``; None: their defaults).
    ``min_eval_samples``: the fewest samples ``score`` accepts (KID's ``kid_subset_size``),
    checked against ``config.eval_samples`` before any compute. ``featurize``: samples ->
    features that ``score`` takes (the FID extractor's), None to score samples.
    """
    if config.eval_samples < min_eval_samples:
        raise ValueError(f"eval_samples={config.eval_samples} is fewer than the score needs "
                         f"({min_eval_samples}, e.g. KID's kid_subset_size)")
    if not isinstance(train_config, StraightenConfig):
        raise ValueError(f"train_config must be a StraightenConfig, got "
                         f"{type(train_config).__name__}")
    options = options or MethodOptions()
    num_classes = num_classes_of(teacher) if num_classes is None else num_classes
    cond = protocol.conditioning(config, num_classes, label_dropout)  # before any compute
    teacher = teacher.eval()
    guided = cond.teacher(teacher)
    for m in protocol.selected(config):
        protocol.check_student(m, teacher, config)  # before any compute
    shape, n, batch = tuple(data_shape), config.n_steps, config.batch_size

    start = time.perf_counter()  # the cost step
    cost = merge_costs([cost_shard(guided, shape, search_seed(config.seed), 0,
                                   config.search_samples, n, batch, device=device,
                                   num_classes=cond.num_classes)])
    calls = cond.calls_per_step
    cost_search = {"search_nfe": -(-config.search_samples // batch) * n * calls,
                   "search_evaluations": cost.n_samples * n * calls,
                   "wall_seconds": time.perf_counter() - start}
    noise = None
    if protocol.needs_teacher_search(config):
        dev = next(teacher.parameters()).device
        noise = sample_noise(shape, search_seed(config.seed), 0, config.search_samples,
                             device=dev)
    table, search_costs = protocol.search_schedules(  # the schedules step
        config, options, cost=cost, cost_search=cost_search, teacher=teacher, noise=noise,
        cond=cond, progress=progress)

    chords, ends = merge_pairs([pairs_shard(  # the pairs step: one teacher pass
        guided, protocol.pair_targets(config, table), n, shape, pairs_seed(config.seed), 0,
        config.pair_samples, batch, device=device, reflow=protocol.wants_reflow(config),
        num_classes=cond.num_classes)])

    students, student_costs = {}, {}
    for m in protocol.selected(config):  # the straighten steps
        if not m.trained:
            continue
        target = protocol.schedule_name(m, config)

        def pairs_of(k, target=target):
            return ends if k == 0 else chords[(target, k)]

        def checkpoint_of(k, name=m.name):
            return (None if checkpoint_root is None
                    else f"{checkpoint_root}/{name}/{protocol.student_tag(k)}")

        fitted = protocol.fit_method(m, teacher, pairs_of, config, train_config,
                                     checkpoint_of=checkpoint_of, schedules=table[target],
                                     options=options.of(m.name), cond=cond)
        students[m.name] = fitted.by_k
        student_costs[m.name] = protocol.student_costs_of(m.name, config, fitted.costs)

    plan = protocol.sampling_plan(config, teacher, table,  # the evaluate step
                                  lambda method, k: students[method][k].model, cond=cond,
                                  own_schedule=lambda method, k: students[method][k].schedule)
    drawn = sample_shard(protocol.sampled_rows(plan), guided, shape,
                         protocol.evaluation_seeds(config), n, 0, config.eval_samples, batch,
                         device=device, featurize=featurize, progress=progress,
                         num_classes=cond.num_classes)
    metrics = protocol.score_rows(plan, drawn, score, config, progress=progress, cond=cond,
                                  classify=classify)
    return metrics, protocol.cost_table(config, search_costs, student_costs, cond), \
        metrics_frame(metrics)
