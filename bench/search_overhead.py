"""Schedule-search overhead: trajectories + cost + DP against the trajectories alone.

On the digits teacher architecture (the default ``ModelConfig``; timings do not depend on the
weights, so it is used untrained unless --train-iterations is given), for M noises on an
N-step grid in batches:

- baseline: ``euler_trajectory`` over all batches (the N network calls per batch that any
  schedule search must make, keeping states and velocities);
- local: ``cost_matrix`` (same trajectories + float64 Gram cost) + ``bellman_schedules``;
- local, direct residuals: the same with ``method="direct"`` (the naive per-row loop);
- global: ``global_schedules`` (about K·N network calls).

Prints each time, its ratio to the baseline, and the network calls. Run:
``python bench/search_overhead.py``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import hardware  # noqa: E402

from boss_core.bellman import bellman_schedules, global_schedules  # noqa: E402
from boss_core.cost import cost_matrix  # noqa: E402
from boss_core.data import load_digits_images  # noqa: E402
from boss_core.grids import uniform_grid  # noqa: E402
from boss_core.models import ModelConfig, build_model  # noqa: E402
from boss_core.sampling import euler_trajectory  # noqa: E402
from boss_core.seeds import sample_noise  # noqa: E402
from boss_core.teacher import TeacherConfig, train_teacher  # noqa: E402
from boss_core.velocity import NFECounter  # noqa: E402


def timed(fn, repeats: int):
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default=ModelConfig().arch, choices=["mlp", "unet"])
    parser.add_argument("--samples", type=int, default=500, help="M (default 500)")
    parser.add_argument("--batch", type=int, default=250, help="batch size (default 250)")
    parser.add_argument("--n-steps", type=int, default=100, help="N (default 100)")
    parser.add_argument("--max-nfe", type=int, default=10, help="K_max (default 10)")
    parser.add_argument("--repeats", type=int, default=3, help="best of R runs (default 3)")
    parser.add_argument("--train-iterations", type=int, default=0,
                        help="train the teacher first for this many steps (default 0)")
    parser.add_argument("--skip-global", action="store_true")
    args = parser.parse_args()
    print(f"hardware: {hardware()}")
    torch.manual_seed(0)
    data = load_digits_images()
    model = build_model(ModelConfig(arch=args.arch), data.data_shape)
    if args.train_iterations:
        model = train_teacher(model, data.x, TeacherConfig(
            iterations=args.train_iterations, device="cpu", progress=False)).ema_model
    model.eval()
    noise = sample_noise(data.data_shape, 0, 0, args.samples)
    grid = uniform_grid(args.n_steps)
    counter = NFECounter(model)

    def trajectories():
        for chunk in noise.split(args.batch):
            euler_trajectory(counter, chunk, grid)

    def local(method):
        def run():
            cost = cost_matrix(counter, noise, args.n_steps, batch_size=args.batch, method=method)
            return bellman_schedules(cost, args.max_nfe)
        return run

    rows = []
    for label, fn in [("trajectories only (baseline)", trajectories),
                      ("local: cost (Gram) + DP", local("gram")),
                      ("local: cost (direct) + DP", local("direct")),
                      ("global end-point search", lambda: global_schedules(
                          counter, noise, args.n_steps, args.max_nfe, batch_size=args.batch))]:
        if label.startswith("global") and args.skip_global:
            continue
        counter.reset()
        seconds, _ = timed(fn, 1 if label.startswith("global") else args.repeats)
        calls = counter.nfe // (1 if label.startswith("global") else args.repeats)
        rows.append((label, seconds, calls))
    base = rows[0][1]
    print(f"arch={args.arch} M={args.samples} batch={args.batch} N={args.n_steps} "
          f"K_max={args.max_nfe}; best of {args.repeats} (global: 1 run)")
    print(f"{'method':<30} {'seconds':>9} {'ratio':>7} {'network calls':>14}")
    for label, seconds, calls in rows:
        print(f"{label:<30} {seconds:>9.3f} {seconds / base:>7.2f} {calls:>14}")


if __name__ == "__main__":
    main()
