"""Beyond BOSS: rollout straightening and student-aware schedules against boss and
distill_uniform, at equal optimiser steps and batch size.

    .venv/bin/python bench/beyond_boss.py [--iterations 200] [--seeds 0 1 2]
        [--rollouts endpoint,step ...] [--teacher-weight 0.5]
        [--equal-calls "chord,step" "endpoint,full" learned_times_ft]

On the 2-D 8-mode mixture, with a teacher on the linear path and one on the cosine path
(curved), for each straighten seed: boss, distill_uniform, boss_rollout with each (target,
backprop), learned_times_ft (end point, full backpropagation, times learned alongside) and
boss_student (1 round, teacher_weight 0.5), at K = 2 and 4, through
``run_sweep``. Prints the end-point RMSE and SWD (mean over the straighten seeds), their ratio
to boss, and each row's network calls per sample of training (a forward 1, a backward 2,
teacher calls included; boss: 3 x iterations x batch).

``--equal-calls TARGET,BACKPROP|ROW ...``: for each named rollout variant (or row, e.g.
learned_times_ft) that spends more than
10% more training calls than boss at some K, boss and distill_uniform are trained again at
that K with their iterations scaled by the ratio of calls (the same batch and pairs), and
the variant is compared with them at equal calls too (mean over the same seeds).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import hardware  # noqa: E402

from boss_core.data import make_gaussian_mixture  # noqa: E402
from boss_core.distances import swd  # noqa: E402
from boss_core.methods import MethodOptions  # noqa: E402
from boss_core.models import ModelConfig, build_model  # noqa: E402
from boss_core.straighten import StraightenConfig  # noqa: E402
from boss_core.sweep import SweepConfig, run_sweep  # noqa: E402
from boss_core.teacher import TeacherConfig, train_teacher  # noqa: E402

ROLLOUTS = [("endpoint", "step"), ("endpoint", "full"), ("chord", "step"), ("chord", "full")]
ROWS = ("learned_times_ft",)  # rows run as they are, beside the rollout variants


def teacher_on(path: str, data):
    model = build_model(ModelConfig(arch="mlp", hidden=64, depth=2, time_embed_dim=16), (2,),
                        seed=0)
    return train_teacher(model, data.x, TeacherConfig(
        iterations=1000, batch_size=256, lr=3e-3, device="cpu", progress=False,
        path=path)).ema_model.eval().requires_grad_(False)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iterations", type=int, default=200)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--paths", nargs="+", default=["linear", "cosine"])
    ap.add_argument("--equal-calls", nargs="*", default=[], metavar="TARGET,BACKPROP",
                    help="rollout variants to also compare with boss and distill_uniform "
                         "given the same training calls")
    ap.add_argument("--rollouts", nargs="+", default=[",".join(v) for v in ROLLOUTS],
                    metavar="TARGET,BACKPROP", help="the boss_rollout variants to run "
                    "(default: all four)")
    ap.add_argument("--teacher-weight", type=float, default=0.5,
                    help="boss_student's teacher_weight w (the DP's cost: w teacher's + "
                         "(1 - w) student's; default %(default)s)")
    args = ap.parse_args()
    variants = [tuple(v.split(",")) for v in args.rollouts]
    if any(v not in ROLLOUTS for v in variants):
        ap.error(f"--rollouts: known variants are {ROLLOUTS}")
    equal = [tuple(v.split(",")) if "," in v else v for v in args.equal_calls]
    unknown = [v for v in equal if v not in ROLLOUTS and v not in ROWS]
    if unknown:
        ap.error(f"--equal-calls: unknown variants {unknown}; known: {ROLLOUTS} and {ROWS}")
    torch.set_num_threads(1)
    print(hardware())
    data = make_gaussian_mixture(4000, seed=0)
    ref = data.x[:2000]
    sweep = SweepConfig(methods=("teacher", "boss", "distill_uniform", "boss_rollout",
                                 *ROWS, "boss_student"), nfes=(2, 4), n_steps=50,
                        search_samples=500, pair_samples=1000, eval_samples=1000, n_seeds=2,
                        batch_size=500)
    only_rollout = SweepConfig(**{**sweep.to_dict(), "methods": ("teacher", "boss_rollout")})

    def score(samples):
        return {"swd": swd(samples.float(), ref, seed=0)}

    for path in args.paths:
        start = time.perf_counter()
        teacher = teacher_on(path, data)
        print(f"\n== {path} path teacher ({time.perf_counter() - start:.0f} s to train); "
              f"straighten: {args.iterations} steps of batch 128, seeds {args.seeds}")
        rows: dict[str, dict] = {}
        for seed in args.seeds:
            train = StraightenConfig(iterations=args.iterations, batch_size=128, lr=1e-3,
                                     warmup=50, ema_decay=0.99, eval_every=100, seed=seed,
                                     device="cpu", progress=False)
            for i, (target, backprop) in enumerate(variants):
                options = MethodOptions({"boss_rollout": {"target": target,
                                                          "backprop": backprop},
                                         "boss_student": {"teacher_weight":
                                                          args.teacher_weight}})
                t0 = time.perf_counter()
                metrics, costs, _ = run_sweep(teacher, (2,), score,
                                              sweep if i == 0 else only_rollout, train,
                                              options=options, progress=False)
                wall = time.perf_counter() - t0
                for method in metrics:
                    if method == "teacher" or (i and method != "boss_rollout"):
                        continue
                    name = (f"boss_rollout[{target},{backprop}]" if method == "boss_rollout"
                            else method)
                    for k in sweep.nfes:
                        row = rows.setdefault(name, {}).setdefault(k, {"rmse": [], "swd": [],
                                                                      "calls": []})
                        m, c = metrics[method][f"nfe_{k}"], costs[method][f"nfe_{k}"]
                        row["rmse"].append(m["endpoint_rmse"])
                        row["swd"].append(m["swd"])
                        row["calls"].append(c.get("train_evaluations",
                                                  3 * c["iterations"] * train.batch_size))
                print(f"  seed {seed} rollout[{target},{backprop}] sweep: {wall:.0f} s",
                      flush=True)
        print(f"{'row':32s} {'K':>2s} {'RMSE':>14s} {'/boss':>6s} {'SWD':>14s} {'/boss':>6s} "
              f"{'train calls/1e6':>15s}")
        for name, by_k in rows.items():
            for k, row in by_k.items():
                boss = rows["boss"][k]
                r, s = np.array(row["rmse"]), np.array(row["swd"])
                print(f"{name:32s} {k:2d} {r.mean():7.4f}±{r.std():.4f} "
                      f"{r.mean() / np.mean(boss['rmse']):6.3f} {s.mean():7.4f}±{s.std():.4f} "
                      f"{s.mean() / np.mean(boss['swd']):6.3f} {np.mean(row['calls']) / 1e6:15.2f}")
        for variant in equal:
            name = variant if isinstance(variant, str) else "boss_rollout[{},{}]".format(*variant)
            _equal_calls(teacher, score, sweep, rows, name, args)


def _equal_calls(teacher, score, sweep, rows, variant: str, args) -> None:
    """boss and distill_uniform retrained with the variant's training calls, per K; prints the
    variant's end-point RMSE over theirs (per-seed ratios, mean ± std)."""
    print(f"-- equal calls: {variant} against boss and distill_uniform given its calls")
    for k in sweep.nfes:
        ratio = np.mean(rows[variant][k]["calls"]) / np.mean(rows["boss"][k]["calls"])
        if ratio <= 1.1:
            print(f"  K={k}: {ratio:.2f}x boss's calls, within 10%: the table above stands")
            continue
        iterations = int(round(args.iterations * ratio))
        base = {"boss": [], "distill_uniform": []}
        for seed in args.seeds:
            train = StraightenConfig(iterations=iterations, batch_size=128, lr=1e-3,
                                     warmup=50, ema_decay=0.99, eval_every=iterations,
                                     seed=seed, device="cpu", progress=False)
            config = SweepConfig(**{**sweep.to_dict(), "nfes": (k,),
                                    "methods": ("teacher", "boss", "distill_uniform")})
            metrics, _, _ = run_sweep(teacher, (2,), score, config, train, progress=False)
            for method in base:
                base[method].append(metrics[method][f"nfe_{k}"]["endpoint_rmse"])
        ours = np.array(rows[variant][k]["rmse"])
        for method, values in base.items():
            per_seed = ours / np.array(values)
            print(f"  K={k}: {ratio:.1f}x calls ({iterations} steps): {method} RMSE "
                  f"{np.mean(values):.4f}±{np.std(values):.4f}; {variant} / {method} = "
                  f"{per_seed.mean():.3f} ± {per_seed.std():.3f} (per-seed ratios)", flush=True)


if __name__ == "__main__":
    main()
