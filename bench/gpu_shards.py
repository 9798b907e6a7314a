"""Seed-range shards on a bigger machine: Dask workers on the CPU cores and on the GPU.

    python bench/gpu_shards.py [--device cuda] [--workers 1,2,4] [--samples 2048]

For each device (cpu, and --device when it differs) it computes the cost step's work, M teacher
paths of N Euler steps with the default digits U-Net (16 channels, weights perturbed so the
field bends), first in one process, then with a ``distributed.LocalCluster`` of W one-thread
worker processes mapping ``boss_core.shards.cost_shard`` over seed ranges (raw Dask: the
device machine has no Prefect). It prints paths per second, the ratio to one worker and to the
in-process run, and the largest relative difference of the merged cost sum from the
in-process one (shards are whole batches, so it should be ~1e-16). Cluster start-up is
excluded (one warm-up map first). Workers get ``tasks.runtime.shards.WORKER_ENV`` (the malloc
setting the pipeline gives them) unless ``--no-malloc-fix``. Needs dask and distributed.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from boss_core.models import ModelConfig, build_model  # noqa: E402
from boss_core.shards import cost_shard, merge_costs, shard_ranges  # noqa: E402
from tasks.runtime.shards import WORKER_ENV  # noqa: E402

SHAPE = (1, 8, 8)


def teacher() -> torch.nn.Module:
    model = build_model(ModelConfig(arch="unet", base_channels=16, channel_mults=(1, 2)),
                        SHAPE, seed=0).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model


def in_process(model, args, device: str, threads: int):
    torch.set_num_threads(threads)
    job = dict(data_shape=SHAPE, seed=1, n_steps=args.n_steps, batch_size=args.batch,
               device=device)
    cost_shard(model, start=0, count=args.batch, **job)  # warm-up
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = cost_shard(model, start=0, count=args.samples, **job)
    return out, time.perf_counter() - start


def on_dask(model, args, device: str, workers: int):
    from distributed import Client, LocalCluster

    shards = shard_ranges(args.samples, args.shard, args.batch)
    job = dict(data_shape=SHAPE, seed=1, n_steps=args.n_steps, batch_size=args.batch,
               device=device)
    env = dict(WORKER_ENV) if args.malloc_fix else {}
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                      host="127.0.0.1", dashboard_address=None, env=env) as cluster, \
            Client(cluster) as client:
        remote = client.scatter(model.cpu(), broadcast=True)
        client.gather([client.submit(cost_shard, remote, start=0, count=args.batch,
                                     pure=False, **job) for _ in range(workers)])
        start = time.perf_counter()
        futures = [client.submit(cost_shard, remote, start=s, count=n, pure=False, **job)
                   for s, n in shards]
        parts = client.gather(futures)
        merged = merge_costs(parts)
        return merged, time.perf_counter() - start, len(shards)


def rel_diff(a, b) -> float:
    iu = np.triu_indices(a.sum.shape[0], 2)
    return float(np.max(np.abs(a.sum[iu] - b.sum[iu]) / np.abs(b.sum[iu])))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--workers", default="1,2,4", help="comma-separated worker counts")
    p.add_argument("--samples", type=int, default=2048, help="teacher paths M")
    p.add_argument("--n-steps", type=int, default=100, help="fine grid N")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--shard", type=int, default=256, help="samples per shard")
    p.add_argument("--no-malloc-fix", dest="malloc_fix", action="store_false",
                   help="leave out tasks.runtime.shards.WORKER_ENV "
                        "(MALLOC_MMAP_THRESHOLD_) on workers")
    args = p.parse_args(argv)
    print(f"# host: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, cuda: "
          f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}")
    print(f"# M={args.samples} paths, N={args.n_steps}, batch {args.batch}, "
          f"shards of {args.shard}, worker env {WORKER_ENV if args.malloc_fix else 'default'}")
    model = teacher()
    devices = ["cpu"] + ([args.device] if args.device != "cpu" else [])
    for device in devices:
        base_threads = os.cpu_count() if device == "cpu" else 1
        ref, wall = in_process(model, args, device, base_threads)
        base = args.samples / wall
        print(f"{device}: in-process ({base_threads} torch threads): {base:9.1f} paths/s")
        one = None
        for w in [int(x) for x in args.workers.split(",")]:
            merged, wall, n = on_dask(teacher(), args, device, w)
            rate = args.samples / wall
            one = one or rate
            print(f"{device}: dask {w} worker(s) x 1 thread, {n} shards: {rate:9.1f} paths/s"
                  f"  vs 1 worker {rate / one:5.2f}x  vs in-process {rate / base:5.2f}x"
                  f"  max rel diff {rel_diff(merged, ref):.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
