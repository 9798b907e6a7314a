"""Straightening: regress a velocity network onto teacher chords (BOSS phase 2).

For pairs (x, tau, u) from ``boss_core.pairs`` (chords for BOSS and distill-K; interpolants
for reflow), the loss is the squared error averaged over dims and batch:

    L(theta) = mean_{b} (1/D) || v_theta(x_b, tau_b) - u_b ||^2

Adam with a linear warm-up, grad-norm clipping, and an EMA started from the teacher's
weights. Step s draws its batch from ``step_generator(seed, s)``, so a run resumed from its
checkpoint is bit-identical on the CPU to an uninterrupted one (its ``wall_time_s`` adds the
time spent before the interruption, kept in the checkpoint). Only parameters with
``requires_grad`` are trained (LoRA freezes the base weights).

Data parallel (``dist`` with W > 1 ranks, under torchrun; see ``boss_core.distributed``):
every rank draws the same global batch of B = ``batch_size`` rows from
``step_generator(seed, s)`` and trains on its rows ``dist.rank_slice(B)`` under
DistributedDataParallel, whose gradient average is the global-batch mean gradient. The logged
loss is the mean of the W shard losses (= the global-batch loss); clipping, Adam and the EMA
see the averaged gradient, identical on every rank. Rank 0 alone reads the checkpoint (and
sends its bytes to the others) and writes it; world size is not part of it, so a checkpoint
of a W-rank run resumes with any other W. Equal to one process up to float32 reduction order
(tests/test_ddp.py states the tolerance).
"""

from __future__ import annotations

import copy
import io
import math
import os
import pickle
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .config import ConfigMixin, check_bool, check_device_name, check_int, check_number
from .device import resolve_device
from .distributed import Dist
from .ema import EMA
from .seeds import step_generator

CHECKPOINT_NAME = "straighten.pt"
# Settings that may change between an interrupted run and its resume.
_RESUMABLE = {"iterations", "progress", "checkpoint_every", "eval_every", "device"}


@dataclass(frozen=True)
class StraightenConfig(ConfigMixin):
    """The ``straighten`` section of params.yaml (paper: lr 2e-4, clip 1.0, 12k iterations,
    batch 15; the defaults here fit a CPU)."""

    iterations: int = 2000
    batch_size: int = 128
    lr: float = 2e-4
    warmup: int = 100
    grad_clip: float | None = 1.0
    ema_decay: float = 0.999
    eval_every: int = 100
    checkpoint_every: int = 500
    seed: int = 0
    device: str = "auto"
    progress: bool = True

    def __post_init__(self):
        for name, low in (("iterations", 1), ("batch_size", 1), ("warmup", 0),
                          ("eval_every", 1), ("checkpoint_every", 0), ("seed", 0)):
            check_int(name, getattr(self, name), low)
        check_number("lr", self.lr, lambda v: v > 0, "> 0")
        check_number("ema_decay", self.ema_decay, lambda v: 0 <= v < 1, "in [0, 1)")
        if self.grad_clip is not None:
            check_number("grad_clip", self.grad_clip, lambda v: v > 0, "> 0 or None")
        check_device_name(self.device)
        check_bool("progress", self.progress)


@dataclass(frozen=True, eq=False)
class StraightenResult:
    """ema_model: sample with this; model: the live weights; losses: (S, 2) (step, loss);
    val_losses: (V, 2) (step, held-out loss of the EMA model); step: steps done;
    resumed_from: the checkpoint step this run started at (0: from the teacher)."""

    ema_model: nn.Module
    model: nn.Module
    losses: np.ndarray
    val_losses: np.ndarray
    step: int
    wall_time_s: float
    trainable_params: int
    total_params: int
    resumed_from: int = 0


@torch.no_grad()
def straightening_loss(model, pairs, batch_size: int = 1024, seed: int = 0) -> float:
    """Mean loss of ``model`` (a module or any velocity callable) over a whole pair set
    (reflow t drawn from ``seed``)."""
    gen = step_generator(seed, 0)
    total, count = 0.0, 0
    first = next(iter(model.parameters()), None) if isinstance(model, nn.Module) else None
    dtype = first.dtype if first is not None else pairs.batch(torch.arange(1), gen)[0].dtype
    for lo in range(0, len(pairs), batch_size):
        index = torch.arange(lo, min(lo + batch_size, len(pairs)))
        x, t, target = pairs.batch(index, gen)
        err = (model(x.to(dtype), t.to(dtype)) - target.to(dtype)) ** 2
        total += float(err.reshape(err.shape[0], -1).mean(dim=1).double().sum())
        count += index.shape[0]
    return total / count


def trainable_copy(model: nn.Module) -> nn.Module:
    """A deep copy with every parameter trainable (full fine-tuning from a frozen teacher)."""
    student = copy.deepcopy(model)
    for p in student.parameters():
        p.requires_grad_(True)
    return student


def _save_atomic(state: dict, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _read_checkpoint(path: Path | None, dist: Dist) -> bytes | None:
    """The checkpoint's bytes on every rank (None: no checkpoint); rank 0 alone reads the
    file, so the other ranks need no shared filesystem. A read error is raised everywhere."""
    blob, error = None, None
    if dist.is_main and path is not None and path.exists():
        try:
            blob = path.read_bytes()
        except OSError as err:
            error = f"checkpoint {path} cannot be read: {err}"
    blob, error = dist.broadcast((blob, error))
    if error is not None:
        raise ValueError(error)
    return blob


def _load_checkpoint(path: Path, blob: bytes, model: nn.Module, ema: EMA, optimizer,
                     config) -> dict:
    try:
        state = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, KeyError, ValueError, EOFError, OSError,
            pickle.UnpicklingError) as err:
        raise ValueError(f"checkpoint {path} does not match this model or is corrupt: "
                         f"{str(err).splitlines()[0]}") from err
    mine = {k: v for k, v in config.to_dict().items() if k not in _RESUMABLE}
    theirs = {k: v for k, v in state["config"].items() if k not in _RESUMABLE}
    if mine != theirs:
        diff = sorted(k for k in mine if mine[k] != theirs.get(k))
        raise ValueError(f"checkpoint {path} was written with other settings: {diff}")
    return state


def straighten(
    model: nn.Module,
    train,
    config: StraightenConfig,
    *,
    val=None,
    checkpoint_dir: str | os.PathLike | None = None,
    callback: Callable[[int, float, float | None], None] | None = None,
    on_checkpoint: Callable[[int], None] | None = None,
    dist: Dist | None = None,
) -> StraightenResult:
    """Fine-tune ``model`` (in place) on ``train`` pairs; see the module doc.

    Args:
        model: the teacher (or a LoRA-wrapped teacher) ``model(x, t)``.
        train, val: ``ChordPairs`` or ``ReflowPairs`` (val may be None).
        checkpoint_dir: where ``straighten.pt`` is written every ``checkpoint_every`` steps
            and at the end (atomically); an existing one there is resumed from.
        callback: ``callback(step, mean_loss, val_loss_or_None)`` every ``eval_every`` steps.
        on_checkpoint: ``on_checkpoint(step)`` right after each checkpoint is in place (the
            pipeline's fault-injection hook; anything that must follow a durable save); on
            every rank, after all ranks know the save is done.
        dist: this process's rank in a data-parallel job whose process group is initialised
            (None: one process). Only rank 0 touches ``checkpoint_dir`` and calls
            ``callback`` and the progress bar; every rank returns the same result.
    """
    dist = Dist() if dist is None else dist
    if not isinstance(config, StraightenConfig):
        raise ValueError(f"config must be a StraightenConfig, got {type(config).__name__}")
    if len(train) < 1:
        raise ValueError("no training pairs")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (use trainable_copy(teacher) "
                         "for full fine-tuning or add_lora(teacher, rank))")
    rows = dist.rank_slice(config.batch_size)  # this rank's rows of every global batch
    dist.check_ready()
    device = dist.device(resolve_device(config.device))
    ckpt = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None
    if ckpt is not None and dist.is_main:
        ckpt.parent.mkdir(parents=True, exist_ok=True)
    model.to(device).train()
    dtype = params[0].dtype
    train = train.to(device)
    val = val.to(device) if val is not None and len(val) else None
    optimizer = torch.optim.Adam(params, lr=config.lr)
    ema = EMA(model, config.ema_decay)  # restarted from the teacher's weights
    start, losses, val_losses, earlier_s = 0, [], [], 0.0
    blob = _read_checkpoint(ckpt, dist)
    if blob is not None:
        state = _load_checkpoint(ckpt, blob, model, ema, optimizer, config)
        start, losses, val_losses = state["step"], state["losses"], state["val_losses"]
        earlier_s = float(state.get("wall_seconds", 0.0))
    # DDP averages the gradients over ranks in backward (and checks that every rank holds
    # the same weights); the EMA, the optimizer and the checkpoint see the module itself.
    net = model
    if dist.active:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    def save(step_done: int) -> None:
        if dist.is_main:
            _save_atomic({"step": step_done, "model": model.state_dict(),
                          "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                          "losses": losses, "val_losses": val_losses,
                          "config": config.to_dict(),
                          "wall_seconds": earlier_s + time.perf_counter() - started}, ckpt)
        dist.barrier()  # the file is in place before any rank goes on (or is killed)
        if on_checkpoint is not None:
            on_checkpoint(step_done)

    bar = tqdm(total=config.iterations, initial=start, desc="straighten", dynamic_ncols=True,
               disable=not config.progress or not dist.is_main)
    window: list[float] = []
    started = time.perf_counter()
    for step in range(start, config.iterations):
        gen = step_generator(config.seed, step)
        index = torch.randint(len(train), (config.batch_size,), generator=gen)  # (B,)
        x, t, target = train.batch(index, gen)  # the global batch, the same on every rank
        x, t, target = x[rows], t[rows], target[rows]  # (B / W, ...): this rank's shard
        loss = F.mse_loss(net(x.to(dtype), t.to(dtype)), target.to(dtype))
        value = float(dist.all_mean(loss)) if dist.active else float(loss.item())
        if not math.isfinite(value):
            bar.close()
            raise FloatingPointError(f"straightening loss is {value} at step {step}")
        for group in optimizer.param_groups:
            group["lr"] = config.lr * (min(1.0, (step + 1) / config.warmup)
                                       if config.warmup else 1.0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip is not None:
            nn.utils.clip_grad_norm_(params, config.grad_clip)
        optimizer.step()
        ema.update(model, step)
        losses.append([step, value])
        window.append(value)
        done = step + 1
        if done % config.eval_every == 0 or done == config.iterations:
            val_loss = straightening_loss(ema.model, val, seed=config.seed) if val else None
            if val_loss is not None:
                val_losses.append([done, val_loss])
            mean = float(np.mean(window))
            window.clear()
            bar.set_postfix(loss=f"{mean:.4f}",
                            val=f"{val_loss:.4f}" if val_loss is not None else "-")
            bar.update(done - bar.n)
            if callback is not None and dist.is_main:
                callback(done, mean, val_loss)
        if ckpt is not None and ((config.checkpoint_every and done % config.checkpoint_every
                                  == 0) or done == config.iterations):
            save(done)
    bar.close()
    del net  # DDP's gradient hooks go with it
    model.eval()
    return StraightenResult(
        ema_model=ema.model, model=model,
        losses=np.array(losses, dtype=np.float64).reshape(-1, 2),
        val_losses=np.array(val_losses, dtype=np.float64).reshape(-1, 2),
        step=config.iterations, wall_time_s=earlier_s + time.perf_counter() - started,
        trainable_params=sum(p.numel() for p in params),
        total_params=sum(p.numel() for p in model.parameters()), resumed_from=start)
