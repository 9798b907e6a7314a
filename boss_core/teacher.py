"""Flow-matching (rectified-flow) teacher training.

For data x1, noise z ~ N(0, I) and t ~ U[0, 1] (t = 0 noise, t = 1 data):

    x_t = (1 - t) z + t x1,     target u = x1 - z,
    L(theta) = (1 / B) sum_b (1 / D) || v_theta(x_t^b, t^b) - u^b ||^2

i.e. the squared error averaged over the D = prod(data_shape) dimensions and the batch
(``F.mse_loss``), so the learning rate does not depend on the image size.

Step s draws its batch indices, noise, times (and label drop-out) from ``step_generator(seed, s)``
on the CPU, then moves them to the device; with Adam state and the EMA warm-up depending only on
s, a run resumed from ``TeacherResult.state_dict()`` at step s is bit-identical on the CPU to an
uninterrupted one.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from .config import ConfigMixin, check_bool, check_device_name, check_int, check_number
from .device import resolve_device
from .ema import EMA
from .seeds import step_generator


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
    log_every: steps between progress-bar updates and callback calls.
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

    def __post_init__(self):
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

    step: optimiser steps completed; loss: mean loss over the steps since the previous call;
    snapshot(): the resumable state (see ``TeacherResult.state_dict``), built only on demand.
    """

    step: int
    loss: float
    snapshot: Callable[[], dict[str, Any]]


@dataclass(frozen=True, eq=False)
class TeacherResult:
    """A trained teacher.

    ema_model: the EMA weights (use these for sampling); model: the final raw weights.
    losses: (S, 2) float64 array of (step, loss) rows for every step run so far (including the
    history carried in a ``start_state``).
    """

    ema_model: nn.Module
    model: nn.Module
    losses: np.ndarray
    config: TeacherConfig
    step: int
    wall_time_s: float
    optimizer_state: dict[str, Any]

    def state_dict(self) -> dict[str, Any]:
        """Snapshot for ``train_teacher(..., start_state=...)``: model, ema, optimizer, step."""
        return _snapshot(self.step, self.model, self.ema_model, self.optimizer_state,
                         self.losses.tolist(), self.config)


def _snapshot(step: int, model: nn.Module, ema_model: nn.Module, optimizer_state: dict,
              losses: list, config: TeacherConfig) -> dict[str, Any]:
    """Deep copies of everything a resumed run needs (safe to keep while training goes on)."""
    return {
        "step": step,
        "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "ema": {k: v.detach().clone() for k, v in ema_model.state_dict().items()},
        "optimizer": copy.deepcopy(optimizer_state),
        "losses": [list(row) for row in losses],
        "config": config.to_dict(),
    }


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
    start_state: Mapping[str, Any] | None = None,
) -> TeacherResult:
    """Train ``model`` as a flow-matching velocity on ``data`` (module doc for the loss).

    Args:
        model: velocity network ``model(x, t)`` or, with ``num_classes`` set, ``model(x, t, y=)``.
            Trained in place (moved to the config's device).
        data: (M, *data_shape) floating tensor, e.g. images in [-1, 1].
        labels: (M,) int64 class labels; used only when the model has ``num_classes``.
        callback: called with a ``TeacherProgress`` every ``log_every`` steps and at the end.
        start_state: a ``TeacherResult.state_dict()`` to resume from (its step <= iterations).
    Raises:
        ValueError: bad data, labels or start_state (before any compute).
        FloatingPointError: the loss became NaN or Inf; the message names the step.
    """
    if not isinstance(config, TeacherConfig):
        raise ValueError(f"config must be a TeacherConfig, got {type(config).__name__}")
    num_classes = _check_inputs(model, data, labels)
    start_step = 0 if start_state is None else int(start_state["step"])
    if not 0 <= start_step <= config.iterations:
        raise ValueError(f"start_state step {start_step} is outside [0, {config.iterations}]")
    device = resolve_device(config.device)

    model.to(device).train()
    dtype = next(model.parameters()).dtype
    data = data.to(device=device, dtype=dtype)
    labels = labels.to(device=device, dtype=torch.long) if num_classes is not None else None
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    ema = EMA(model, config.ema_decay)
    history: list[tuple[int, float]] = []
    if start_state is not None:
        model.load_state_dict(start_state["model"])
        ema.load_state_dict(start_state["ema"])
        optimizer.load_state_dict(start_state["optimizer"])
        history = [(int(s), float(v)) for s, v in start_state.get("losses", [])]

    n_data, data_shape = data.shape[0], tuple(data.shape[1:])
    bar = tqdm(
        total=config.iterations, initial=start_step, disable=not config.progress,
        desc="teacher", dynamic_ncols=True,
    )
    window: list[float] = []

    def snapshot(step_done: int) -> dict[str, Any]:
        return _snapshot(step_done, model, ema.model, optimizer.state_dict(), history, config)

    started = time.perf_counter()
    for step in range(start_step, config.iterations):
        gen = step_generator(config.seed, step)
        index = torch.randint(n_data, (config.batch_size,), generator=gen)  # (B,)
        noise = torch.randn((config.batch_size, *data_shape), generator=gen)  # (B, *data_shape)
        t = torch.rand(config.batch_size, generator=gen)  # (B,) ~ U[0, 1]
        x1 = data[index.to(device)]  # (B, *data_shape)
        z = noise.to(device=device, dtype=dtype)
        t = t.to(device=device, dtype=dtype)
        t_b = t.view(-1, *([1] * len(data_shape)))  # (B, 1, ..., 1) for broadcasting
        x_t = (1.0 - t_b) * z + t_b * x1
        extras = {}
        if num_classes is not None:
            y = labels[index.to(device)]  # (B,)
            if config.label_dropout > 0:
                drop = torch.rand(config.batch_size, generator=gen) < config.label_dropout
                y = torch.where(drop.to(device), torch.full_like(y, num_classes), y)
            extras["y"] = y

        loss = F.mse_loss(model(x_t, t, **extras), x1 - z)
        loss_value = float(loss.item())
        if not math.isfinite(loss_value):
            bar.close()
            raise FloatingPointError(f"teacher loss is {loss_value} at step {step}")

        lr_scale = min(1.0, (step + 1) / config.warmup) if config.warmup else 1.0
        for group in optimizer.param_groups:
            group["lr"] = config.lr * lr_scale
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        ema.update(model, step)

        history.append((step, loss_value))
        window.append(loss_value)
        step_done = step + 1
        if step_done % config.log_every == 0 or step_done == config.iterations:
            mean_loss = float(np.mean(window))
            window.clear()
            bar.set_postfix(loss=f"{mean_loss:.4f}")
            bar.update(step_done - bar.n)
            if callback is not None:
                callback(TeacherProgress(step_done, mean_loss, lambda s=step_done: snapshot(s)))
    bar.close()
    wall = time.perf_counter() - started

    model.eval()
    return TeacherResult(
        ema_model=ema.model,
        model=model,
        losses=np.array(history, dtype=np.float64).reshape(-1, 2),
        config=config,
        step=config.iterations,
        wall_time_s=wall,
        optimizer_state=copy.deepcopy(optimizer.state_dict()),
    )
