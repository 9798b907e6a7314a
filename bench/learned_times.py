"""Learned step times against the searched grids: end-point RMSE against the N-step teacher.

For each teacher path (the 2-D 8-mode Gaussian mixture teacher of tests/conftest.py, trained
on ``--paths``, default linear and cosine; with ``--digits`` also a small digits teacher) and
each of ``--seeds`` seeds s (teacher weights, search noises and evaluation noises all from s),
the schedules of uniform, bellman, bellman_global and learned_times (started from the greedy
search, the default; learned_bellman and learned_uniform: from Bellman's and the uniform
grid) are found through ``boss_core.protocol``'s search
step on ``--search-samples`` search noises, as the pipeline finds them. Each schedule then
samples ``--eval-samples`` fresh noises with the teacher; the RMSE is

    sqrt( (1 / M) sum_m || x_K(z_m) - X_N(z_m) ||^2 )

against the N-step uniform Euler teacher from the same noises (the pipeline's endpoint_rmse).
Printed per (path, K): mean and std over seeds of each row, the ratio to bellman's, and the
network calls and seconds of each search. Run: ``python bench/learned_times.py``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import hardware  # noqa: E402

from boss_core import protocol  # noqa: E402
from boss_core.data import load_digits_images, make_gaussian_mixture  # noqa: E402
from boss_core.grids import uniform_grid  # noqa: E402
from boss_core.methods import MethodOptions  # noqa: E402
from boss_core.models import ModelConfig, build_model  # noqa: E402
from boss_core.sampling import euler_sample  # noqa: E402
from boss_core.seeds import eval_seeds, sample_noise, search_seed  # noqa: E402
from boss_core.shards import cost_shard  # noqa: E402
from boss_core.sweep import SweepConfig  # noqa: E402
from boss_core.teacher import TeacherConfig, train_teacher  # noqa: E402

ROWS = ("uniform", "bellman", "bellman_global", "learned_times", "learned_bellman",
        "learned_uniform")
STARTS = {"learned_bellman": "bellman", "learned_uniform": "uniform"}  # learned_times: default


def mixture_teacher(path: str, seed: int):
    """The conftest fixture's teacher (600 Adam steps of 256 points), on ``path``."""
    data = make_gaussian_mixture(2000, seed=seed)
    model = build_model(ModelConfig(arch="mlp", hidden=64, depth=2, time_embed_dim=16), (2,),
                        seed=seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        result = train_teacher(model, data.x, TeacherConfig(
            iterations=600, batch_size=256, lr=3e-3, device="cpu", progress=False, path=path,
            seed=seed))
    return result.ema_model.eval().requires_grad_(False), (2,)


def digits_teacher(path: str, seed: int, iterations: int):
    """A small digits U-Net teacher (the default ModelConfig, ``iterations`` steps)."""
    digits = load_digits_images()
    model = build_model(ModelConfig(), tuple(digits.x.shape[1:]), seed=seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        result = train_teacher(model, digits.x, TeacherConfig(
            iterations=iterations, device="cpu", progress=False, path=path, seed=seed))
    return result.ema_model.eval().requires_grad_(False), tuple(digits.x.shape[1:])


def rmse(teacher, times, noise, targets, batch: int) -> float:
    sq = 0.0
    for lo in range(0, noise.shape[0], batch):
        end = euler_sample(teacher, noise[lo:lo + batch], times)
        sq += float(((end - targets[lo:lo + batch]).double() ** 2).sum())
    return math.sqrt(sq / noise.shape[0])


def one_seed(teacher, shape, seed: int, args) -> dict:
    """{(row, K): (rmse, search calls, search seconds)} on one seed's noises."""
    nfes, n, batch = tuple(args.nfes), args.n_steps, args.batch_size
    config = SweepConfig(methods=("teacher", "uniform", "bellman", "bellman_global",
                                  "learned_times"), nfes=nfes, n_steps=n,
                         search_samples=args.search_samples, batch_size=batch, seed=seed)
    start = time.perf_counter()
    cost = cost_shard(teacher, shape, search_seed(seed), 0, args.search_samples, n, batch)
    cost_search = {"search_nfe": -(-args.search_samples // batch) * n,
                   "search_evaluations": args.search_samples * n,
                   "wall_seconds": time.perf_counter() - start}
    noise = sample_noise(shape, search_seed(seed), 0, args.search_samples)
    learned = {"iterations": args.iterations, "lr": args.lr, "samples": args.samples,
               "batch_size": args.train_batch}
    table, spent = protocol.search_schedules(
        config, MethodOptions({"learned_times": learned}), cost=cost, cost_search=cost_search,
        teacher=teacher, noise=noise)
    for row, init in STARTS.items():
        other, other_spent = protocol.search_schedules(
            SweepConfig(methods=("teacher", "learned_times"), nfes=nfes, n_steps=n,
                        search_samples=args.search_samples, batch_size=batch, seed=seed),
            MethodOptions({"learned_times": {**learned, "init": init}}), cost=cost,
            cost_search=cost_search, teacher=teacher, noise=noise)
        table[row], spent[row] = other["learned_times"], other_spent["learned_times"]
    spent.setdefault("uniform", protocol.Cost())
    test = sample_noise(shape, eval_seeds(seed, 1)[0], 0, args.eval_samples)
    targets = torch.cat([euler_sample(teacher, test[lo:lo + batch], uniform_grid(n))
                         for lo in range(0, test.shape[0], batch)])
    return {(row, k): (rmse(teacher, table[row][k].times, test, targets, batch),
                       spent[row].search_nfe, spent[row].wall_seconds)
            for row in ROWS for k in nfes}


def report(name: str, results: list[dict], nfes) -> None:
    print(f"\n### {name}  (mean ± std over {len(results)} seeds; ratio = row / bellman)")
    print("| K | row | endpoint RMSE | ratio to bellman | search calls | search s |")
    print("|---|---|---|---|---|---|")
    for k in nfes:
        base = statistics.mean(r[("bellman", k)][0] for r in results)
        for row in ROWS:
            vals = [r[(row, k)][0] for r in results]
            mean, std = statistics.mean(vals), statistics.pstdev(vals)
            calls = statistics.mean(r[(row, k)][1] for r in results)
            secs = statistics.mean(r[(row, k)][2] for r in results)
            print(f"| {k} | {row} | {mean:.4f} ± {std:.4f} | {mean / base:.3f} | "
                  f"{calls:.0f} | {secs:.1f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--paths", nargs="+", default=["linear", "cosine"])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--nfes", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--n-steps", type=int, default=100)
    parser.add_argument("--search-samples", type=int, default=500)
    parser.add_argument("--eval-samples", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--train-batch", type=int, default=64)
    parser.add_argument("--digits", action="store_true", help="also a small digits teacher")
    parser.add_argument("--digits-iterations", type=int, default=800)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(hardware())
    print(" ".join(sys.argv))
    jobs = [("mixture", p) for p in args.paths] + ([("digits", "linear")] if args.digits else [])
    for data, path in jobs:
        results, start = [], time.perf_counter()
        for seed in range(args.seeds):
            teacher, shape = (mixture_teacher(path, seed) if data == "mixture"
                              else digits_teacher(path, seed, args.digits_iterations))
            results.append(one_seed(teacher, shape, seed, args))
        report(f"{data}, teacher.path={path} ({time.perf_counter() - start:.0f} s)", results,
               args.nfes)


if __name__ == "__main__":
    main()
