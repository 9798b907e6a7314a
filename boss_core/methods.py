"""The method registry: every row of the results table, declared once.

A method says how its K-step schedules are found, whether and how the network is fine-tuned
to them, and so what samples each row::

    teacher           the N-step uniform teacher: the reference row (keyed nfe_N)
    uniform/shift/edm preset grids, the teacher samples
    bellman           BOSS's schedule: the Bellman DP on the cost matrix, the teacher samples
    bellman_global    the greedy end-point search, the teacher samples
    boss, boss_lora   the teacher fine-tuned (full / LoRA) on its chords along
                      ``sweep.straighten_schedule``, one student per K
    reflow_uniform    reflow on (noise, N-step end point) pairs, one student for every K,
                      sampled on the uniform grid
    distill_uniform   fine-tuned on the chords of the uniform K-grid on the fine grid
    bellman_gits      the Bellman DP with GITS's discount on the future cost (not default)
    learned_times     K - 1 times trained by gradient through the K-step Euler solver to the
                      teacher's end points (``boss_core.learned_times``), the teacher samples
                      (not default)
    boss_rollout      the teacher fine-tuned on its own K-step rollouts along
                      ``sweep.straighten_schedule`` (``boss_core.rollout``; not default)
    learned_times_ft  boss_rollout (end point, full backpropagation) with the schedule's K - 1
                      times trained with the weights, from ``sweep.straighten_schedule``'s
                      (``boss_core.rollout``; each student samples on its own times; not
                      default)
    boss_student      boss, then the Bellman DP re-run on the student's own jump errors and
                      straightened again (``boss_core.student_schedule``; not default)

Adding a method is one ``Method`` in ``REGISTRY`` below (plus its options under params.yaml's
``methods`` section and a test). The stages, the Prefect flow, the in-memory sweep
(``boss_core.sweep``), metrics.json, MLflow, the model registry names, the plots, the report
and dvc.yaml (generated: ``python -m tasks.cli.dvcyaml``) all iterate this registry; the
shared steps live in ``boss_core.protocol``.

A schedule search reads one of (``Search.needs``):

- ``"nothing"``: the K (and N) alone, e.g. a preset grid;
- ``"cost"``: the cost matrix c(i, j) = E||x_j - x_i - (t_j - t_i) v(x_i, t_i)||^2 of the
  teacher's N-step paths (one teacher pass, shared by every cost method);
- ``"teacher"``: the teacher and the search noises (its own passes, counted in network calls;
  a backward pass counts 2). Such a search may also read the cost matrix (``Search.reads_cost``:
  a learned schedule started from Bellman's); it then pays the cost's calls too.

A search whose times may lie off the fine grid (``Search.on_grid`` False) is no target for
the chord students (``sweep.straighten_schedule``): their pairs are taken on the fine grid.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from torch import Tensor

from .bellman import bellman_schedules, global_schedules
from .config import check_number
from .cost import CostMatrix
from .learned_times import LearnTimesConfig, learned_schedules
from .pairs import uniform_on_grid
from .presets import PRESETS
from .rollout import check_rollout_options, check_timed_options
from .schedule import Schedule
from .student_schedule import check_student_options
from .velocity import VelocityFn

NEEDS = ("nothing", "cost", "teacher")
STRAIGHTEN = "straighten"  # ``Method.schedule_of``: the schedule sweep.straighten_schedule names


@dataclass(frozen=True)
class SearchInputs:
    """What a schedule search may read.

    nfes: the K to build; n_steps: N, the fine grid t_i = i / N; cost: the teacher's
    ``CostMatrix`` ((N + 1, N + 1), needs "cost"); teacher, noise: the teacher v(x, t) and the
    (M, ...) search noises (needs "teacher"); extras: the teacher's conditioning of those
    noises ({"y": (M,) labels} of a class-conditional teacher, else {}); batch_size: paths per
    teacher call.
    """

    nfes: tuple[int, ...]
    n_steps: int
    cost: CostMatrix | None = None
    teacher: VelocityFn | None = None
    noise: Tensor | None = None
    extras: Mapping[str, Any] = field(default_factory=dict)
    batch_size: int = 500
    progress: bool = False


@dataclass(frozen=True)
class Search:
    """How a method finds its schedules: ``build(inputs, options) -> {K: Schedule}`` for every
    K in ``inputs.nfes``, reading what ``needs`` names.

    reads_cost: ``reads_cost(options)`` True when a "teacher" search also reads the cost
    matrix (None: never). on_grid: its times are fine-grid points (``Schedule.indices``).
    """

    needs: str
    build: Callable[[SearchInputs, Mapping[str, Any]], dict[int, Schedule]]
    reads_cost: Callable[[Mapping[str, Any]], bool] | None = None
    on_grid: bool = True

    def __post_init__(self):
        if self.needs not in NEEDS:
            raise ValueError(f"Search.needs must be one of {NEEDS}, got {self.needs!r}")


KINDS = ("chords", "reflow", "rollout", "rounds")


@dataclass(frozen=True)
class Training:
    """How a method fine-tunes the teacher (``boss_core.straighten``).

    kind: "chords", regress on the teacher's chords (x_{t_k}, t_k, (x_{t_{k+1}} - x_{t_k}) /
    (t_{k+1} - t_k)) along the method's schedule, one student per K; "reflow", regress on
    (noise, N-step end point) interpolants, one student shared by every K; "rollout", the
    student's own K Euler steps from the reflow pairs' noises on the method's schedule
    (``boss_core.rollout``), one student per K; "rounds", "chords", then the schedule
    re-searched on the student's own jump errors and "chords" again, one student and one
    schedule of its own per K (``boss_core.student_schedule``).
    lora: train a rank-``sweep.lora_rank`` LoRA adapter (merged after training) instead of
    every weight.
    learn_times: ("rollout" only) the schedule's times train with the weights
    (``boss_core.rollout``'s learned times, option ``times_lr``); each student then samples
    on its own times.
    """

    kind: str = "chords"
    lora: bool = False
    learn_times: bool = False

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"Training.kind must be one of {KINDS}, got {self.kind!r}")
        if self.learn_times and self.kind != "rollout":
            raise ValueError(f"Training.learn_times needs kind 'rollout', got {self.kind!r}")

    @property
    def shared(self) -> bool:
        """One student for every K (reflow learns no schedule)."""
        return self.kind == "reflow"

    @property
    def learns_chords(self) -> bool:
        """Its students start from the teacher's chords along its schedule (the pairs step)."""
        return self.kind in ("chords", "rounds")

    @property
    def needs_ends(self) -> bool:
        """Its students read the (noise, N-step end point) pairs (the pairs step's reflow)."""
        return self.kind in ("reflow", "rollout")

    @property
    def own_schedule(self) -> bool:
        """Its students sample on schedules of their own, found while training."""
        return self.kind == "rounds" or self.learn_times


@dataclass(frozen=True)
class Method:
    """One row of the results.

    search: how it finds its own schedules (None: it uses ``schedule_of``'s; ``STRAIGHTEN``
        there means the schedule ``sweep.straighten_schedule`` names).
    training: None when the teacher samples on the schedule.
    options: its settings and their defaults (params.yaml ``methods.<name>.<key>``);
        ``check(options)`` raises ValueError naming a bad one.
    default: in the default ``sweep.methods``.
    reference: the N-step teacher row that end-point errors are measured against.
    """

    name: str
    summary: str
    search: Search | None = None
    schedule_of: str | None = None
    training: Training | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    check: Callable[[Mapping[str, Any]], None] | None = None
    default: bool = True
    reference: bool = False

    def __post_init__(self):
        object.__setattr__(self, "options", MappingProxyType(dict(self.options)))
        if not self.reference and (self.search is None) == (self.schedule_of is None):
            raise ValueError(f"method {self.name}: give exactly one of search, schedule_of")

    @property
    def trained(self) -> bool:
        return self.training is not None

    def schedule_name(self, straighten_schedule: str) -> str:
        """The schedule table this method samples with (and, if trained, learns)."""
        if self.search is not None:
            return self.name
        if self.schedule_of == STRAIGHTEN:
            return straighten_schedule
        return self.schedule_of


def _preset(name: str) -> Search:
    return Search("nothing", lambda inp, opts: {k: PRESETS[name](k) for k in inp.nfes})


def _bellman(inp: SearchInputs, opts: Mapping[str, Any]) -> dict[int, Schedule]:
    table = bellman_schedules(inp.cost, max(inp.nfes), discount=opts.get("discount", 1.0))
    return {k: table[k] for k in inp.nfes}


def _global(inp: SearchInputs, opts: Mapping[str, Any]) -> dict[int, Schedule]:
    table = global_schedules(inp.teacher, inp.noise, inp.n_steps, max(inp.nfes),
                             inp.batch_size, extras=inp.extras, progress=inp.progress)
    return {k: table[k] for k in inp.nfes}


def _check_discount(opts: Mapping[str, Any]) -> None:
    check_number("discount", opts["discount"], lambda v: v > 0, "> 0")


def _learned(inp: SearchInputs, opts: Mapping[str, Any]) -> dict[int, Schedule]:
    """Learned times (``boss_core.learned_times``) from ``opts["init"]``'s schedules."""
    config = LearnTimesConfig(**opts)
    starts = None
    if config.init == "bellman":
        starts = bellman_schedules(inp.cost, max(inp.nfes))
    elif config.init == "bellman_global":
        starts = _global(inp, opts)
    found = learned_schedules(inp.teacher, inp.noise, inp.n_steps, inp.nfes, config,
                              starts=starts, extras=inp.extras, batch_size=inp.batch_size,
                              progress=inp.progress)
    return {k: found.by_k[k].schedule for k in inp.nfes}


REGISTRY: dict[str, Method] = {m.name: m for m in (
    Method("teacher", "the pretrained model, N-step uniform Euler (the reference row)",
           reference=True),
    Method("uniform", "uniform steps t_k = k / K", search=_preset("uniform")),
    Method("shift", "SD3's time shift (s = 3) of the uniform grid", search=_preset("shift")),
    Method("edm", "Karras et al.'s rho = 7 grid mapped to flow time", search=_preset("edm")),
    Method("bellman", "BOSS's schedule: the Bellman DP on the teacher's cost matrix",
           search=Search("cost", _bellman)),
    Method("bellman_global", "greedy search of the teacher's end-point error",
           search=Search("teacher", _global)),
    Method("boss", "BOSS: the teacher fine-tuned on its chords along the searched schedule",
           schedule_of=STRAIGHTEN, training=Training("chords")),
    Method("boss_lora", "BOSS with a LoRA adapter (merged after training)",
           schedule_of=STRAIGHTEN, training=Training("chords", lora=True)),
    Method("reflow_uniform", "reflow on (noise, end point) pairs, uniform steps, one model",
           schedule_of="uniform", training=Training("reflow")),
    Method("distill_uniform", "fine-tuned on the chords of the uniform K-grid",
           search=Search("nothing", lambda inp, opts: {k: uniform_on_grid(k, inp.n_steps)
                                                       for k in inp.nfes}),
           training=Training("chords")),
    Method("bellman_gits", "GITS: the Bellman DP with a discount on the future cost",
           search=Search("cost", _bellman), options={"discount": 1.15}, check=_check_discount,
           default=False),
    Method("learned_times", "K - 1 times learned through the Euler solver to the teacher's "
           "end points", search=Search("teacher", _learned, on_grid=False,
                                       reads_cost=lambda opts: opts["init"] == "bellman"),
           options=LearnTimesConfig().to_dict(), check=lambda opts: LearnTimesConfig(**opts),
           default=False),
    Method("boss_rollout", "the teacher fine-tuned on its own K-step rollouts on the searched "
           "schedule", schedule_of=STRAIGHTEN, training=Training("rollout"),
           options={"target": "endpoint", "backprop": "step"}, check=check_rollout_options,
           default=False),
    Method("learned_times_ft", "the teacher fine-tuned on its own K-step rollouts with the "
           "schedule's times learned alongside", schedule_of=STRAIGHTEN,
           training=Training("rollout", learn_times=True),
           options={"target": "endpoint", "backprop": "full", "times_lr": 0.02},
           check=check_timed_options, default=False),
    Method("boss_student", "boss, then re-scheduled on the student's own jump errors and "
           "straightened again", schedule_of=STRAIGHTEN, training=Training("rounds"),
           options={"rounds": 1, "teacher_weight": 0.5, "cost_samples": 500},
           check=check_student_options, default=False),
)}


def get(name: str) -> Method:
    """The registered method ``name``; ValueError listing the known ones otherwise."""
    if name not in REGISTRY:
        raise ValueError(f"unknown method {name!r}; known: {list(REGISTRY)}")
    return REGISTRY[name]


def names() -> tuple[str, ...]:
    """Every registered method, in table order."""
    return tuple(REGISTRY)


def default_names() -> tuple[str, ...]:
    return tuple(name for name, m in REGISTRY.items() if m.default)


def trained_names() -> tuple[str, ...]:
    """The methods that fine-tune a student (each one straighten stage)."""
    return tuple(name for name, m in REGISTRY.items() if m.trained)


def row_names() -> tuple[str, ...]:
    """Every registered method but the reference row (the lines of the plots)."""
    return tuple(name for name, m in REGISTRY.items() if not m.reference)


def grid_search_names() -> tuple[str, ...]:
    """The searches on the teacher's fine grid (cost matrix or teacher paths): the schedules a
    student can learn (``sweep.straighten_schedule``) and whose step sizes are plotted."""
    return tuple(name for name, m in REGISTRY.items()
                 if m.search is not None and m.search.needs != "nothing" and m.search.on_grid)


@dataclass(frozen=True)
class MethodOptions:
    """The ``methods`` section of params.yaml: ``{method: {option: value}}``, filled from each
    method's defaults; unknown methods or options and bad values raise ValueError naming
    ``<method>.<option>``."""

    values: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def __post_init__(self):
        merged = {}
        for name, given in dict(self.values).items():
            if name not in REGISTRY:
                raise ValueError(f"{name}: unknown method; known: {list(REGISTRY)}")
            method = REGISTRY[name]
            if not isinstance(given, Mapping):
                raise ValueError(f"{name} must be a mapping of options, got {given!r}")
            unknown = sorted(set(given) - set(method.options))
            if unknown:
                raise ValueError(f"{name}.{unknown[0]}: unknown option of {name}; "
                                 f"known: {sorted(method.options)}")
        for name, method in REGISTRY.items():
            if method.options:
                opts = {**method.options, **dict(self.values).get(name, {})}
                if method.check is not None:
                    try:
                        method.check(opts)
                    except ValueError as err:
                        raise ValueError(f"{name}.{err}") from err
                merged[name] = MappingProxyType(opts)
        object.__setattr__(self, "values", MappingProxyType(merged))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> MethodOptions:
        return cls(dict(values or {}))

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {name: dict(opts) for name, opts in self.values.items()}

    def of(self, name: str) -> Mapping[str, Any]:
        """The options of method ``name`` (empty when it has none)."""
        return self.values.get(name, MappingProxyType({}))
