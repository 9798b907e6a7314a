"""Demo: train the digits teacher, search schedules, compare end-point errors with uniform.

    python -m boss_core.demo [--iterations 6000] [--n-steps 100] [--max-nfe 10] ...

1. Train a flow-matching teacher on scikit-learn's 8x8 digits (embedded, offline).
2. From ``--search-samples`` noises: the BOSS cost matrix on an N-step grid and its Bellman
   schedules for every K <= max-nfe; the global (end-point) search too.
3. On fresh noises (another seed): the end-point RMSE of each K-step schedule against the
   N-step teacher from the same noise, for Bellman, global, uniform, time-shift and EDM grids.
   The table shows each RMSE and its ratio to uniform (lower is better).

Prints only; writes no files. Use ``--help`` for the options.
"""

from __future__ import annotations

import argparse
import time

import torch

from .bellman import bellman_schedules, global_schedules
from .cost import cost_matrix
from .data import load_digits_images
from .device import resolve_device
from .grids import uniform_grid
from .metrics import endpoint_rmse
from .models import ModelConfig, build_model, count_parameters
from .presets import PRESETS
from .sampling import euler_sample
from .seeds import sample_noise
from .teacher import TeacherConfig, train_teacher


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m boss_core.demo", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    teacher = TeacherConfig()
    parser.add_argument("--arch", default=ModelConfig().arch, choices=["mlp", "unet"],
                        help="teacher architecture (default: %(default)s)")
    parser.add_argument("--iterations", type=int, default=teacher.iterations,
                        help="teacher training steps (default: %(default)s)")
    parser.add_argument("--n-steps", type=int, default=100,
                        help="fine grid N for the teacher and the cost (default: %(default)s)")
    parser.add_argument("--max-nfe", type=int, default=10,
                        help="largest K to schedule (default: %(default)s)")
    parser.add_argument("--search-samples", type=int, default=500,
                        help="noises M for the cost and global search (default: %(default)s)")
    parser.add_argument("--eval-samples", type=int, default=1000,
                        help="fresh noises for the end-point errors (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=500,
                        help="batch of the sampling sweeps (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed for everything (default: 0)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (default: auto)")
    parser.add_argument("--no-global", action="store_true",
                        help="skip the global search (about K·N network calls)")
    args = parser.parse_args(argv)
    if not 1 <= args.max_nfe <= args.n_steps:
        parser.error(f"--max-nfe must be in [1, --n-steps={args.n_steps}], got {args.max_nfe}")
    for name in ("iterations", "search_samples", "eval_samples", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    data = load_digits_images()
    model = build_model(ModelConfig(arch=args.arch), data.data_shape)
    print(f"digits: {len(data)} images {data.data_shape}; teacher {args.arch} with "
          f"{count_parameters(model):,} parameters on {device}")
    config = TeacherConfig(iterations=args.iterations, seed=args.seed, device=str(device))
    result = train_teacher(model, data.x, config)
    teacher = result.ema_model.eval()
    print(f"teacher trained in {result.wall_time_s:.0f} s, final loss {result.losses[-1, 1]:.4f}")

    def noise(seed_offset: int, count: int):
        return sample_noise(data.data_shape, args.seed + seed_offset, 0, count, device=device)

    start = time.perf_counter()
    search_noise = noise(1, args.search_samples)
    cost = cost_matrix(teacher, search_noise, args.n_steps, batch_size=args.batch_size,
                       progress=True)
    methods = {"bellman": bellman_schedules(cost, args.max_nfe)}
    print(f"cost matrix + Bellman DP: {time.perf_counter() - start:.1f} s")
    if not args.no_global:
        start = time.perf_counter()
        methods["bellman_global"] = global_schedules(
            teacher, search_noise, args.n_steps, args.max_nfe, batch_size=args.batch_size,
            progress=True)
        print(f"global search: {time.perf_counter() - start:.1f} s")
    for name, build in PRESETS.items():
        methods[name] = {k: build(k) for k in range(1, args.max_nfe + 1)}

    eval_noise = noise(2, args.eval_samples)

    def sample(times):
        parts = [euler_sample(teacher, chunk, times)
                 for chunk in eval_noise.split(args.batch_size)]
        return torch.cat(parts)

    reference = sample(uniform_grid(args.n_steps))
    rmse = {name: {k: endpoint_rmse(sample(s.times), reference) for k, s in table.items()}
            for name, table in methods.items()}
    names = list(methods)
    print(f"\nend-point RMSE against the {args.n_steps}-step teacher on {args.eval_samples} "
          f"fresh noises (ratio to uniform in brackets; lower is better)")
    print(f"{'NFE':>4} " + " ".join(f"{n:>20}" for n in names))
    for k in range(1, args.max_nfe + 1):
        base = rmse["uniform"][k]
        cells = [f"{rmse[n][k]:.4f} ({rmse[n][k] / base:.2f})" if base > 0
                 else f"{rmse[n][k]:.4f} (-)" for n in names]
        print(f"{k:>4} " + " ".join(f"{c:>20}" for c in cells))
    print("\nBellman schedules (grid indices):")
    for k, sched in methods["bellman"].items():
        print(f"  K={k:>2}: {list(sched.indices)}")


if __name__ == "__main__":
    main()
