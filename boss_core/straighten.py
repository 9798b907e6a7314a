"""Straightening: regress a velocity network onto teacher chords (BOSS phase 2).

For pairs (x, tau, u) from ``boss_core.pairs`` (chords for BOSS and distill-K; interpolants
for reflow), the loss is the squared error averaged over dims and batch:

    L(theta) = mean_{b} (1/D) || v_theta(x_b, tau_b) - u_b ||^2

(class-conditional pairs carry labels y_b: the student is v_theta(x_b, tau_b, y_b), one call,
regressed on the chords of the teacher's guided field; ``boss_core.guidance``)

trained by ``boss_core.training.train`` (Adam with a linear warm-up, grad-norm clipping, an
EMA started from the teacher's weights, the checkpoint ``straighten.pt`` and its resume).
Step s draws its batch from ``step_generator(seed, s)``, so a run resumed from its
checkpoint is bit-identical on the CPU to an uninterrupted one. Only parameters with
``requires_grad`` are trained (LoRA freezes the base weights).

Data parallel (``dist`` with W > 1 ranks, under torchrun; see ``boss_core.distributed``):
every rank draws the same global batch of B = ``batch_size`` rows from
``step_generator(seed, s)`` and trains on its rows ``dist.rank_slice(B)`` under
DistributedDataParallel, whose gradient average is the global-batch mean gradient. The logged
loss is the mean of the W shard losses (= the global-batch loss); clipping, Adam and the EMA
see the averaged gradient, identical on every rank. A checkpoint of a W-rank run resumes with
any other W. Equal to one process up to float32 reduction order (tests/test_ddp.py states the
tolerance).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ConfigMixin, check_bool, check_device_name, check_int, check_number
from .device import resolve_device
from .distributed import Dist
from .seeds import step_generator
from .training import Checkpoint, LoopSettings
from .training import train as train_loop

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
        err = (model(x.to(dtype), t.to(dtype), **pairs.extras(index)) - target.to(dtype)) ** 2
        total += float(err.reshape(err.shape[0], -1).mean(dim=1).double().sum())
        count += index.shape[0]
    return total / count


def trainable_copy(model: nn.Module) -> nn.Module:
    """A deep copy with every parameter trainable (full fine-tuning from a frozen teacher)."""
    student = copy.deepcopy(model)
    for p in student.parameters():
        p.requires_grad_(True)
    return student


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
    rows, dtype, _, train, val = place_training(model, train, val, config, dist)

    def step_loss(net: nn.Module, step: int) -> Tensor:
        """L_s on this rank's shard of the global batch drawn from ``step_generator(seed, s)``."""
        gen = step_generator(config.seed, step)
        index = torch.randint(len(train), (config.batch_size,), generator=gen)  # (B,)
        x, t, target = train.batch(index, gen)  # the global batch, the same on every rank
        x, t, target = x[rows], t[rows], target[rows]  # (B / W, ...): this rank's shard
        extras = {k: v[rows] for k, v in train.extras(index).items()}  # {} or {"y": (B / W,)}
        return F.mse_loss(net(x.to(dtype), t.to(dtype), **extras), target.to(dtype))

    def held_out(ema_model: nn.Module) -> float:
        return straightening_loss(ema_model, val, seed=config.seed)

    # The EMA restarts from the teacher's weights (the model as passed in).
    trained = train_loop(
        model, step_loss,
        LoopSettings.of(config, "straightening", config.eval_every, config.checkpoint_every),
        checkpoint=Checkpoint.at(checkpoint_dir, CHECKPOINT_NAME, config.to_dict(), _RESUMABLE),
        evaluate=held_out if val is not None else None,
        callback=callback, on_checkpoint=on_checkpoint, dist=dist)
    return result_of(model, trained)


def place_training(model: nn.Module, train, val, config: StraightenConfig, dist: Dist):
    """The checks and placement every straightening loop starts with: a StraightenConfig,
    training pairs, trainable parameters, a batch the world size divides; the model and the
    pairs moved to this rank's device.

    Returns (rows: this rank's slice of every global batch, dtype of the trainable weights,
    device, train on the device, val on the device or None when empty).
    """
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
    model.to(device)
    train = train.to(device)
    val = val.to(device) if val is not None and len(val) else None
    return rows, params[0].dtype, device, train, val


def result_of(model: nn.Module, trained) -> StraightenResult:
    """The StraightenResult of ``boss_core.training.train``'s outcome on ``model``."""
    return StraightenResult(
        ema_model=trained.ema_model, model=model, losses=trained.losses,
        val_losses=trained.val_losses, step=trained.step, wall_time_s=trained.wall_time_s,
        trainable_params=trained.trainable_params,
        total_params=sum(p.numel() for p in model.parameters()),
        resumed_from=trained.resumed_from)
