"""Flow-matching teacher training on an interpolation path (``boss_core.paths``).

For data x1, noise z ~ N(0, I) and r ~ U[0, 1), the path ``config.path`` gives
t = t_max r (t = 0 noise, t = 1 data) and

    x_t = alpha(t) x1 + sigma(t) z,     target u = alpha'(t) x1 + sigma'(t) z,
    L(theta) = (1 / B) sum_b (1 / D) || v_theta(x_t^b, t^b) - u^b ||^2

i.e. the squared error averaged over the D = prod(data_shape) dimensions and the batch
(``F.mse_loss``), so the learning rate does not depend on the image size. The default path
``linear`` (rectified flow: alpha = t, sigma = 1 - t, t_max = 1) runs exactly the operations

    x_t = (1 - t) z + t x1,     target u = x1 - z      (t = r, unscaled).

The network learns d x_t / d t in the path's own t, so it samples with the same ``v(x, t)``
interface as any other teacher; ``cosine`` and ``vp`` are the other choices (``vp`` trains on
t <= 1 - 1e-3 only, as its target is singular at t = 1; see ``boss_core.paths``).

Trained by ``boss_core.training.train`` (Adam with a linear warm-up, grad-norm clipping, the
EMA of ``boss_core.ema``, the checkpoint ``teacher.pt`` written every ``log_every`` steps).
Step s draws its batch indices, noise, times (and label drop-out) from ``step_generator(seed, s)``
on the CPU, then moves them to the device; with Adam state and the EMA warm-up depending only on
s, a run resumed from its checkpoint at step s is bit-identical on the CPU to an uninterrupted
one.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ConfigMixin, check_bool, check_device_name, check_int, check_number
from .device import resolve_device
from .paths import LINEAR, PATHS, get_path
from .seeds import step_generator
from .training import Checkpoint, LoopSettings
from .training import train as train_loop

CHECKPOINT_NAME = "teacher.pt"
# Settings that may change between an interrupted run and its resume.
_RESUMABLE = {"iterations", "progress", "log_every", "device"}


@dataclass(frozen=True)
class TeacherConfig(ConfigMixin):
    """The ``teacher`` section of params.yaml.

    iterations: total optimiser steps (a resumed run continues up to this count).
    lr: Adam learning rate, linearly warmed up over the first ``warmup`` steps.
    ema_decay: EMA decay (with the warm-up of ``boss_core.ema``).
    grad_clip: max global gradient norm, or None for no clipping.
    label_dropout: probability of replacing a label by the "no label" token (class-conditional
        training only), which also trains the unconditional mode.
    device: "cpu", "cuda", "cuda:<i>" or "auto".
    log_every: steps between progress-bar updates, callback calls and checkpoints.
    path: the interpolation path trained on, one of ``boss_core.paths.PATHS`` (linear, the
        default rectified flow; cosine; vp).
    The defaults train the default digits teacher (``ModelConfig()``) in about 2 minutes on
    2 CPU cores.
    """

    iterations: int = 2500
    batch_size: int = 256
    lr: float = 1e-3
    warmup: int = 100
    ema_decay: float = 0.999
    grad_clip: float | None = 1.0
    label_dropout: float = 0.0
    seed: int = 0
    device: str = "auto"
    log_every: int = 100
    progress: bool = True
    path: str = "linear"

    def __post_init__(self):
        if not isinstance(self.path, str) or self.path not in PATHS:
            raise ValueError(f"path must be one of {sorted(PATHS)}, got {self.path!r}")
        check_int("iterations", self.iterations, 1)
        check_int("batch_size", self.batch_size, 1)
        check_int("warmup", self.warmup, 0)
        check_int("seed", self.seed, 0)
        check_int("log_every", self.log_every, 1)
        check_number("lr", self.lr, lambda v: v > 0, "> 0")
        check_number("ema_decay", self.ema_decay, lambda v: 0 <= v < 1, "in [0, 1)")
        check_number("label_dropout", self.label_dropout, lambda v: 0 <= v < 1, "in [0, 1)")
        if self.grad_clip is not None:
            check_number("grad_clip", self.grad_clip, lambda v: v > 0, "> 0 or None")
        check_device_name(self.device)
        check_bool("progress", self.progress)


@dataclass(frozen=True)
class TeacherProgress:
    """Passed to the callback every ``log_every`` steps and after the last step.

    step: optimiser steps completed; loss: mean loss over the steps since the previous call.
    """

    step: int
    loss: float


@dataclass(frozen=True, eq=False)
class TeacherResult:
    """A trained teacher.

    ema_model: the EMA weights (use these for sampling); model: the final raw weights.
    losses: (S, 2) float64 array of (step, loss) rows for every step run so far (including the
    history carried in a resumed checkpoint). wall_time_s: training seconds, across resumes.
    resumed_from: the checkpoint step this run started at (0: from scratch).
    """

    ema_model: nn.Module
    model: nn.Module
    losses: np.ndarray
    config: TeacherConfig
    step: int
    wall_time_s: float
    resumed_from: int = 0


def _check_inputs(model: nn.Module, data: Tensor, labels: Tensor | None) -> int | None:
    """Validate data/labels against the model; return num_classes when training conditionally."""
    if not isinstance(data, Tensor) or not data.is_floating_point() or data.dim() < 2:
        raise ValueError("data must be a floating tensor of shape (M, *data_shape)")
    if data.shape[0] < 1:
        raise ValueError("data is empty (M = 0)")
    finite = torch.isfinite(data.reshape(data.shape[0], -1)).all(dim=1)
    if not bool(finite.all()):
        row = int(torch.nonzero(~finite)[0, 0])
        raise ValueError(f"data contains NaN or Inf (first bad row: {row})")
    num_classes = getattr(model, "num_classes", None)
    if num_classes is None:
        return None  # unconditional model: labels, if any, are not used
    if labels is None:
        raise ValueError(f"the model is class-conditional (num_classes={num_classes}); pass labels")
    if labels.shape != (data.shape[0],) or labels.is_floating_point():
        raise ValueError(f"labels must be an integer tensor of shape ({data.shape[0]},)")
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise ValueError(
            f"labels must lie in [0, {num_classes}), got {int(labels.min())}..{int(labels.max())}"
        )
    return int(num_classes)


def train_teacher(
    model: nn.Module,
    data: Tensor,
    config: TeacherConfig,
    labels: Tensor | None = None,
    callback: Callable[[TeacherProgress], None] | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    on_checkpoint: Callable[[int], None] | None = None,
) -> TeacherResult:
    """Train ``model`` as a flow-matching velocity on ``data`` (module doc for the loss).

    Args:
        model: velocity network ``model(x, t)`` or, with ``num_classes`` set, ``model(x, t, y=)``.
            Trained in place (moved to the config's device).
        data: (M, *data_shape) floating tensor, e.g. images in [-1, 1].
        labels: (M,) int64 class labels; used only when the model has ``num_classes``.
        callback: called with a ``TeacherProgress`` every ``log_every`` steps and at the end.
        checkpoint_dir: where ``teacher.pt`` is written every ``log_every`` steps and at the
            end (atomically); an existing one there is resumed from.
        on_checkpoint: ``on_checkpoint(step)`` right after each checkpoint is in place.
    Raises:
        ValueError: bad data or labels (before any compute); a checkpoint that is corrupt,
            from another architecture or other settings, or past ``iterations``.
        FloatingPointError: the loss became NaN or Inf; the message names the step.
    """
    if not isinstance(config, TeacherConfig):
        raise ValueError(f"config must be a TeacherConfig, got {type(config).__name__}")
    num_classes = _check_inputs(model, data, labels)
    device = resolve_device(config.device)

    model.to(device)
    dtype = next(model.parameters()).dtype
    data = data.to(device=device, dtype=dtype)
    labels = labels.to(device=device, dtype=torch.long) if num_classes is not None else None
    n_data, data_shape = data.shape[0], tuple(data.shape[1:])
    path = get_path(config.path)

    def step_loss(net: nn.Module, step: int) -> Tensor:
        """L_s on the batch drawn from ``step_generator(seed, s)`` (module doc)."""
        gen = step_generator(config.seed, step)
        index = torch.randint(n_data, (config.batch_size,), generator=gen)  # (B,)
        noise = torch.randn((config.batch_size, *data_shape), generator=gen)  # (B, *data_shape)
        t = torch.rand(config.batch_size, generator=gen)  # (B,) ~ U[0, 1]
        x1 = data[index.to(device)]  # (B, *data_shape)
        z = noise.to(device=device, dtype=dtype)
        t = t.to(device=device, dtype=dtype)
        if path is LINEAR:  # today's operations exactly (module doc), so runs stay bit-identical
            t_b = t.view(-1, *([1] * len(data_shape)))  # (B, 1, ..., 1) for broadcasting
            x_t = (1.0 - t_b) * z + t_b * x1
            target = x1 - z
        else:
            t = t * path.t_max  # (B,) in [0, t_max)
            x_t = path.interpolate(x1, z, t)  # (B, *data_shape)
            target = path.target(x1, z, t)  # (B, *data_shape)
        extras = {}
        if num_classes is not None:
            y = labels[index.to(device)]  # (B,)
            if config.label_dropout > 0:
                drop = torch.rand(config.batch_size, generator=gen) < config.label_dropout
                y = torch.where(drop.to(device), torch.full_like(y, num_classes), y)
            extras["y"] = y
        return F.mse_loss(net(x_t, t, **extras), target)

    def report(step: int, loss: float, _val: float | None) -> None:
        callback(TeacherProgress(step, loss))

    trained = train_loop(
        model, step_loss, LoopSettings.of(config, "teacher", config.log_every, config.log_every),
        checkpoint=Checkpoint.at(checkpoint_dir, CHECKPOINT_NAME, config.to_dict(), _RESUMABLE),
        callback=report if callback is not None else None, on_checkpoint=on_checkpoint)
    return TeacherResult(
        ema_model=trained.ema_model, model=model, losses=trained.losses, config=config,
        step=trained.step, wall_time_s=trained.wall_time_s, resumed_from=trained.resumed_from)
