"""The one optimisation loop (teacher and students) and its resumable checkpoint.

Step s = 0, 1, ..., S - 1 (S = ``iterations``) of ``train``, on the parameters theta with
``requires_grad``:

    L_s    = loss(net, s)                              a scalar; its batch comes from step s alone
    lr_s   = lr * min(1, (s + 1) / warmup)             (lr_s = lr when warmup = 0)
    g_s    = grad L_s * min(1, c / ||grad L_s||_2)     global-norm clipping, c = grad_clip
    theta  <- Adam(theta, g_s, lr_s)
    theta_ema <- d_s theta_ema + (1 - d_s) theta        ``boss_core.ema`` (started from theta)

Every ``log_every`` steps and after the last: the mean of L over those steps, ``evaluate``
on the EMA model (a held-out loss, recorded in ``val_losses``), the progress bar and
``callback(step, mean_loss, val_loss_or_None)``. A non-finite L_s stops with
FloatingPointError naming s.

Checkpoint ``checkpoint_dir/<file_name>``, written atomically (temporary file, then rename)
every ``checkpoint_every`` steps (0: never before the end) and after the last step:

    {"step", "model", "ema", "optimizer", "losses", "val_losses", "config", "wall_seconds"}

A run that finds it resumes there, provided every config key outside ``resumable`` matches
(and the step is <= S). As each step depends only on s and the state, a resumed run is
bit-identical on the CPU to an uninterrupted one; ``wall_time_s`` adds the seconds spent
before the interruption.

Data parallel (``dist`` with W > 1 ranks; ``boss_core.distributed``): ``loss`` gets the
DistributedDataParallel wrapper, whose backward averages the gradients over ranks, and each
rank's logged L_s is the mean of the W rank losses. Rank 0 alone reads the checkpoint (its
bytes are broadcast) and writes it; a barrier follows each write, then ``on_checkpoint(step)``
runs on every rank. The world size is not stored, so any W resumes any checkpoint.
"""

from __future__ import annotations

import io
import math
import os
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .distributed import Dist
from .ema import EMA


@dataclass(frozen=True)
class LoopSettings:
    """The loop's knobs. name labels the progress bar and the non-finite-loss error."""

    name: str
    iterations: int
    lr: float
    warmup: int
    grad_clip: float | None
    ema_decay: float
    log_every: int
    checkpoint_every: int
    progress: bool

    @classmethod
    def of(cls, config: Any, name: str, log_every: int, checkpoint_every: int) -> LoopSettings:
        """From a config with iterations, lr, warmup, grad_clip, ema_decay and progress."""
        return cls(name, config.iterations, config.lr, config.warmup, config.grad_clip,
                   config.ema_decay, log_every, checkpoint_every, config.progress)

    def lr_at(self, step: int) -> float:
        """lr_s of the module doc (linear warm-up)."""
        return self.lr * (min(1.0, (step + 1) / self.warmup) if self.warmup else 1.0)


@dataclass(frozen=True)
class TrainResult:
    """losses: (S, 2) (step, loss) rows of every step run so far, across resumes;
    val_losses: (V, 2) (step, evaluate(EMA)); resumed_from: the checkpoint step this run
    started at (0: fresh); trainable_params: the number of entries of theta."""

    model: nn.Module
    ema_model: nn.Module
    losses: np.ndarray
    val_losses: np.ndarray
    step: int
    resumed_from: int
    wall_time_s: float
    trainable_params: int


@dataclass(frozen=True)
class Checkpoint:
    """The checkpoint file ``path`` and the settings it must agree with: ``config`` (a
    config's ``to_dict()``, stored with it) outside the keys ``resumable``."""

    path: Path
    config: Mapping[str, Any]
    resumable: frozenset[str]

    @classmethod
    def at(cls, directory: str | os.PathLike | None, file_name: str, config: Mapping[str, Any],
           resumable) -> Checkpoint | None:
        """None for no directory (no checkpointing)."""
        if directory is None:
            return None
        return cls(Path(directory) / file_name, dict(config), frozenset(resumable))

    def read(self, dist: Dist) -> dict | None:
        """The saved state on every rank (None: no file). Rank 0 alone reads the file, so the
        other ranks need no shared filesystem; a read error is raised on every rank."""
        blob, error = None, None
        if dist.is_main and self.path.exists():
            try:
                blob = self.path.read_bytes()
            except OSError as err:
                error = f"checkpoint {self.path} cannot be read: {err}"
        blob, error = dist.broadcast((blob, error))
        if error is not None:
            raise ValueError(error)
        if blob is None:
            return None
        try:  # weights_only: tensors and plain containers, no code runs
            state = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
            state["step"] = int(state["step"])
            theirs = {k: v for k, v in state["config"].items() if k not in self.resumable}
        except Exception as err:  # zip, pickle and weights_only refusals all mean a bad file
            raise self.refuse(err) from err
        mine = {k: v for k, v in self.config.items() if k not in self.resumable}
        if mine != theirs:
            diff = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
            raise ValueError(f"checkpoint {self.path} was written with other settings: {diff} "
                             "(delete it to start over)")
        return state

    def write(self, state: dict, dist: Dist) -> None:
        """Rank 0 writes ``state`` atomically; every rank returns once the file is in place."""
        if dist.is_main:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.",
                                       suffix=".tmp")
            os.close(fd)
            try:
                torch.save(state, tmp)
                os.replace(tmp, self.path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        dist.barrier()

    def refuse(self, err: Exception) -> ValueError:
        """The error for a file that cannot be this model's checkpoint."""
        first = (str(err).splitlines() or [""])[0][:200]
        return ValueError(f"checkpoint {self.path} does not match this model or is corrupt "
                          f"({err.__class__.__name__}: {first}); delete it to start over")


def train(
    model: nn.Module,
    loss: Callable[[nn.Module, int], Tensor],
    settings: LoopSettings,
    *,
    checkpoint: Checkpoint | None = None,
    evaluate: Callable[[nn.Module], float] | None = None,
    callback: Callable[[int, float, float | None], None] | None = None,
    on_checkpoint: Callable[[int], None] | None = None,
    dist: Dist | None = None,
) -> TrainResult:
    """Run steps up to ``settings.iterations`` on ``model`` in place (see the module doc).

    Args:
        model: already on its device; its parameters with ``requires_grad`` are trained.
        loss: ``loss(net, step)``, the scalar L_s; ``net`` is ``model`` or its DDP wrapper.
        checkpoint: where to resume from and save to (None: neither).
        evaluate: ``evaluate(ema_model)`` at each log step (e.g. a held-out loss).
        callback: ``callback(step, mean_loss, val_loss)`` at each log step, rank 0 only.
        on_checkpoint: ``on_checkpoint(step)`` after each durable save, on every rank.
        dist: this process's rank (None: one process; a multi-rank one needs its group).
    Raises:
        ValueError: no trainable parameter; a checkpoint that is unreadable, corrupt, from
            another model or other settings, or past ``iterations``.
        FloatingPointError: L_s is NaN or Inf.
    """
    dist = Dist() if dist is None else dist
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    model.train()
    optimizer = torch.optim.Adam(params, lr=settings.lr)
    ema = EMA(model, settings.ema_decay)
    start, losses, val_losses, earlier_s = 0, [], [], 0.0
    state = checkpoint.read(dist) if checkpoint is not None else None
    if state is not None:
        if state["step"] > settings.iterations:
            raise ValueError(f"checkpoint {checkpoint.path} is at step {state['step']}, past "
                             f"iterations = {settings.iterations}")
        try:
            model.load_state_dict(state["model"])
            ema.load_state_dict(state["ema"])
            optimizer.load_state_dict(state["optimizer"])
            start, losses = state["step"], [list(row) for row in state["losses"]]
            val_losses = [list(row) for row in state.get("val_losses", [])]
            earlier_s = float(state.get("wall_seconds", 0.0))
        except Exception as err:  # missing keys, other shapes, another optimiser layout
            raise checkpoint.refuse(err) from err
    # DDP averages the gradients over ranks in backward (and checks that every rank holds
    # the same weights); the EMA, the optimizer and the checkpoint see the module itself.
    net = model
    if dist.active:
        device = params[0].device
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    def save(done: int) -> None:
        checkpoint.write({"step": done, "model": model.state_dict(), "ema": ema.state_dict(),
                          "optimizer": optimizer.state_dict(), "losses": losses,
                          "val_losses": val_losses, "config": dict(checkpoint.config),
                          "wall_seconds": earlier_s + time.perf_counter() - started}, dist)
        if on_checkpoint is not None:
            on_checkpoint(done)

    bar = tqdm(total=settings.iterations, initial=start, desc=settings.name, dynamic_ncols=True,
               disable=not settings.progress or not dist.is_main)
    window: list[float] = []
    started = time.perf_counter()
    for step in range(start, settings.iterations):
        loss_s = loss(net, step)
        value = float(dist.all_mean(loss_s)) if dist.active else float(loss_s.item())
        if not math.isfinite(value):
            bar.close()
            raise FloatingPointError(f"{settings.name} loss is {value} at step {step}")
        for group in optimizer.param_groups:
            group["lr"] = settings.lr_at(step)
        optimizer.zero_grad(set_to_none=True)
        loss_s.backward()
        if settings.grad_clip is not None:
            nn.utils.clip_grad_norm_(params, settings.grad_clip)
        optimizer.step()
        ema.update(model, step)
        losses.append([step, value])
        window.append(value)
        done = step + 1
        if done % settings.log_every == 0 or done == settings.iterations:
            val_loss = evaluate(ema.model) if evaluate is not None else None
            if val_loss is not None:
                val_losses.append([done, val_loss])
            mean = float(np.mean(window))
            window.clear()
            shown = {"loss": f"{mean:.4f}"}
            if evaluate is not None:
                shown["val"] = f"{val_loss:.4f}"
            bar.set_postfix(shown)
            bar.update(done - bar.n)
            if callback is not None and dist.is_main:
                callback(done, mean, val_loss)
        if checkpoint is not None and (
                (settings.checkpoint_every and done % settings.checkpoint_every == 0)
                or done == settings.iterations):
            save(done)
    bar.close()
    del net  # DDP's gradient hooks go with it
    model.eval()
    return TrainResult(
        model=model, ema_model=ema.model,
        losses=np.array(losses, dtype=np.float64).reshape(-1, 2),
        val_losses=np.array(val_losses, dtype=np.float64).reshape(-1, 2),
        step=settings.iterations, resumed_from=start,
        wall_time_s=earlier_s + time.perf_counter() - started,
        trainable_params=sum(p.numel() for p in params))
