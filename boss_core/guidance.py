"""Class-conditional teachers and classifier-free guidance (CFG).

A class-conditional velocity ``v(x, t, y=labels)`` takes labels y in [0, C); the label C is
the "no label" token (``boss_core.teacher``'s label drop-out trains it: the unconditional
mode). Classifier-free guidance with weight w samples the field

    v_w(x, t, y) = v(x, t, C) + w (v(x, t, y) - v(x, t, C))

w = 0: the unconditional field; w = 1: the plain conditional field; w > 1 trades diversity
for fidelity to the label. A guided evaluation costs 2 network calls: ``GuidedVelocity``
makes the unconditional call and the conditional call one after the other, so a call
counter inside it (``guided(NFECounter(model), w, C)``) counts both.

Labels of a noise set come from the sample index alone, class-balanced:

    y_i = i mod C,

so a shard [start, start + count) labels its samples as one process would, and M samples
hold floor(M / C) or ceil(M / C) of each class. No random draw is spent on them.

``Conditioning`` bundles the two settings the pipeline passes around (C, from the model, and
w, ``sweep.guidance``): the labels of a noise range, the teacher's sampled field and its
network calls per step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .velocity import VelocityFn


def balanced_labels(num_classes: int, start: int, count: int, device=None) -> Tensor:
    """(count,) int64 labels y_i = i mod C of samples i = start .. start + count - 1."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
    if start < 0 or count < 0:
        raise ValueError(f"start and count must be >= 0, got start={start}, count={count}")
    return (torch.arange(start, start + count, dtype=torch.int64) % num_classes).to(device)


class GuidedVelocity(nn.Module):
    """v_w(x, t, y) = v(x, t, C) + w (v(x, t, y) - v(x, t, C)), two calls of ``velocity``.

    Args:
        velocity: a class-conditional v(x, t, y=...) (a module is moved with this one).
        weight: w. num_classes: C, so the "no label" token is C.
    ``forward(x, t, y)``: x (B, ...), t (B,), y (B,) int64 in [0, C) -> (B, ...).
    """

    def __init__(self, velocity: VelocityFn, weight: float, num_classes: int):
        super().__init__()
        self.velocity = velocity
        self.weight = float(weight)
        self.num_classes = int(num_classes)

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None, **extras: Any) -> Tensor:
        if y is None:
            raise ValueError("a guided velocity needs the labels y of its samples")
        v_uncond = self.velocity(x, t, y=torch.full_like(y, self.num_classes), **extras)
        v_cond = self.velocity(x, t, y=y, **extras)
        return v_uncond + self.weight * (v_cond - v_uncond)  # (B, ...)


def guided(velocity: VelocityFn, weight: float | None, num_classes: int) -> VelocityFn:
    """The field sampled at guidance ``weight``: ``velocity`` itself for w None or 1 (the plain
    conditional field, one call per evaluation), else ``GuidedVelocity`` (two calls)."""
    if weight is None or float(weight) == 1.0:
        return velocity
    return GuidedVelocity(velocity, weight, num_classes)


def check_guidance_weight(weight: float | None, name: str = "guidance") -> None:
    """ValueError naming ``name`` unless ``weight`` is None or a finite number >= 0."""
    if weight is None:
        return
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) \
            or not math.isfinite(weight) or weight < 0:
        raise ValueError(f"{name} must be null or a finite number >= 0, got {weight!r}")


def check_guidance(weight: float | None, num_classes: int | None,
                   label_dropout: float | None = None, pretrained: bool = False) -> None:
    """Fail before compute on guidance a model cannot give.

    ValueError naming ``sweep.guidance`` for guidance (any weight) of an unconditional model
    (``model.num_classes`` null), or naming ``teacher.label_dropout`` for w != 1 on a teacher
    trained here without label drop-out (its "no label" mode is untrained; label_dropout None
    skips this check). A pretrained model's unconditional mode is the user's responsibility.
    """
    check_guidance_weight(weight, "sweep.guidance")
    if weight is None:
        return
    if num_classes is None:
        raise ValueError(f"sweep.guidance={weight} needs a class-conditional model: set "
                         "model.num_classes (and teacher.label_dropout > 0), or "
                         "sweep.guidance: null")
    if float(weight) != 1.0 and label_dropout is not None and label_dropout <= 0 \
            and not pretrained:
        raise ValueError(f"sweep.guidance={weight} mixes in the unconditional mode, which "
                         "teacher.label_dropout=0 never trains: set teacher.label_dropout > 0 "
                         "(e.g. 0.1) or sweep.guidance: 1.0 (plain conditional)")


def num_classes_of(model: Any) -> int | None:
    """C of a class-conditional model (its ``num_classes``, or its adapter's ``.net``'s);
    None for an unconditional one."""
    for candidate in (model, getattr(model, "net", None)):
        value = getattr(candidate, "num_classes", None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


@dataclass(frozen=True)
class Conditioning:
    """num_classes: C (None: unconditional, no labels anywhere); guidance: w (None: the
    plain conditional field)."""

    num_classes: int | None = None
    guidance: float | None = None

    def __post_init__(self):
        if self.num_classes is not None and (isinstance(self.num_classes, bool)
                                             or not isinstance(self.num_classes, int)
                                             or self.num_classes < 1):
            raise ValueError(f"num_classes must be null or an integer >= 1, "
                             f"got {self.num_classes!r}")
        check_guidance(self.guidance, self.num_classes)

    @property
    def conditional(self) -> bool:
        return self.num_classes is not None

    @property
    def guided(self) -> bool:
        return self.guidance is not None and float(self.guidance) != 1.0

    @property
    def calls_per_step(self) -> int:
        """Network calls of one teacher evaluation: 2 when guided, else 1."""
        return 2 if self.guided else 1

    def labels(self, start: int, count: int, device=None) -> Tensor | None:
        """(count,) labels of samples start .. start + count - 1, None when unconditional."""
        if self.num_classes is None:
            return None
        return balanced_labels(self.num_classes, start, count, device)

    def extras(self, start: int, count: int, device=None) -> dict[str, Tensor]:
        """The velocity's extras for those samples: {} or {"y": labels}."""
        y = self.labels(start, count, device)
        return {} if y is None else {"y": y}

    def teacher(self, velocity: VelocityFn) -> VelocityFn:
        """The teacher's sampled field: ``guided(velocity, w, C)``, or ``velocity`` itself."""
        if self.num_classes is None:
            return velocity
        return guided(velocity, self.guidance, self.num_classes)
