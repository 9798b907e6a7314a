"""tests/test_ddp.py's worker: ``straighten`` on synthetic pairs, alone or under torchrun.

    [torchrun ... ] tests/ddp_worker.py OUT --pairs reflow --iterations 240 [--ckpt DIR]
        [--checkpoint-every N] [--exit-at STEP] [--batch B]

Every rank builds the same teacher (a small MLP, seed 0) and the same pairs (seeded), trains
with ``Dist.from_env()`` and writes OUT/rank<r>.pt: losses, val_losses, step, resumed_from
and the live and EMA weights. ``--exit-at STEP`` ends the process with ``os._exit(3)`` in
``on_checkpoint`` at that step (after the checkpoint is durable on every rank): a kill that
skips every ``finally`` and exit handler.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from boss_core.distributed import Dist  # noqa: E402
from boss_core.models import ModelConfig, build_model  # noqa: E402
from boss_core.pairs import ChordPairs, ReflowPairs  # noqa: E402
from boss_core.straighten import StraightenConfig, straighten, trainable_copy  # noqa: E402


def make_pairs(kind: str, count: int, seed: int):
    """Synthetic 2-D pairs: reflow (noise z, end point x1 on a ring) or chords (x, t, a
    target velocity that bends with t)."""
    gen = torch.Generator().manual_seed(seed)
    sample = torch.arange(count)
    z = torch.randn(count, 2, generator=gen)
    angle = torch.rand(count, generator=gen) * 2 * torch.pi
    x1 = 2.0 * torch.stack([angle.cos(), angle.sin()], dim=1)  # (M, 2)
    if kind == "reflow":
        return ReflowPairs(z, x1, sample)
    t = torch.rand(count, generator=gen, dtype=torch.float64)  # (P,)
    x = (1 - t.float())[:, None] * z + t.float()[:, None] * x1  # (P, 2)
    target = (x1 - z) * (1 + t.float()[:, None]) + 0.3 * x.flip(1)  # (P, 2)
    return ChordPairs(x, t, target, sample)


def train(out: str | Path, dist: Dist, pairs: str = "reflow", iterations: int = 240,
          batch: int = 64, ckpt: str | Path | None = None, checkpoint_every: int = 0,
          exit_at: int = 0) -> dict:
    """One ``straighten`` run; writes and returns this rank's results (see the module doc)."""
    torch.manual_seed(1234 + dist.rank)  # a rank-dependent global RNG: must not matter
    teacher = build_model(ModelConfig(arch="mlp", hidden=64, depth=2, time_embed_dim=16),
                          (2,), seed=0)
    train_pairs, val = make_pairs(pairs, 512, seed=1), make_pairs(pairs, 64, seed=2)
    config = StraightenConfig(iterations=iterations, batch_size=batch, lr=2e-3, warmup=20,
                              eval_every=40, ema_decay=0.99, device="cpu",
                              checkpoint_every=checkpoint_every, progress=False)

    def on_checkpoint(step: int) -> None:
        if step == exit_at:
            sys.stdout.flush()
            os._exit(3)

    result = straighten(trainable_copy(teacher), train_pairs, config, val=val,
                        checkpoint_dir=ckpt, on_checkpoint=on_checkpoint, dist=dist)
    state = {"losses": torch.from_numpy(result.losses),
             "val_losses": torch.from_numpy(result.val_losses),
             "step": result.step, "resumed_from": result.resumed_from,
             "world_size": dist.world_size, "teacher": teacher.state_dict(),
             "model": result.model.state_dict(), "ema": result.ema_model.state_dict()}
    Path(out).mkdir(parents=True, exist_ok=True)
    torch.save(state, Path(out) / f"rank{dist.rank}.pt")
    return state


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--pairs", choices=("reflow", "chord"), default="reflow")
    p.add_argument("--iterations", type=int, default=240)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--ckpt", default=None)
    p.add_argument("--checkpoint-every", type=int, default=0)
    p.add_argument("--exit-at", type=int, default=0)
    args = p.parse_args(argv)
    dist = Dist.from_env()
    dist.init_process_group(torch.device("cpu"))
    try:
        train(args.out, dist, args.pairs, args.iterations, args.batch, args.ckpt,
              args.checkpoint_every, args.exit_at)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
