"""The evaluation sweep on digits (FID/KID) or a 2-D mixture (swd/mmd), with the targets.

    python bench/sweep.py --dataset digits --out /tmp/sweep_digits [--iterations 2000]
    python bench/sweep.py --dataset mixture --out /tmp/sweep_mixture

Trains the default teacher (digits) or a small MLP (mixture), searches schedules, trains
boss / boss_lora / distill_uniform per K and one reflow_uniform model at the same iteration
budget, and scores every method at NFE 1, 2, 4, 6, 8, 10 over 3 noise seeds. Writes
metrics.json, costs.json, metrics.csv and metrics.md to --out and prints the table and the
ratios the targets in BENCHMARKS.md are stated in.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import hardware  # noqa: E402

from boss_core.data import load_digits_images, make_gaussian_mixture  # noqa: E402
from boss_core.distances import mmd, swd  # noqa: E402
from boss_core.features import FeatureNetConfig, train_feature_net  # noqa: E402
from boss_core.fidelity import FidelityConfig, build_extractor, fid_kid  # noqa: E402
from boss_core.models import ModelConfig, build_model  # noqa: E402
from boss_core.straighten import StraightenConfig  # noqa: E402
from boss_core.sweep import METHODS, SweepConfig, run_sweep  # noqa: E402
from boss_core.teacher import TeacherConfig, train_teacher  # noqa: E402


def digits_setup(args):
    data = load_digits_images()
    teacher = build_model(ModelConfig(), data.data_shape, seed=args.seed)
    teacher = train_teacher(teacher, data.x, TeacherConfig(seed=args.seed, device="cpu",
                                                           progress=False)).ema_model
    feat = train_feature_net(data.x, data.y, FeatureNetConfig(device="cpu"))
    print(f"feature classifier held-out accuracy: {feat.heldout_accuracy:.4f}")
    extractor = build_extractor(FidelityConfig(kid_subset_size=1000, device="cpu"), feat.net)
    reference = extractor.reference(data.x)

    def score(samples):
        out = fid_kid(samples, reference, extractor)
        return {"fid": out["fid"], "kid": out["kid"]}

    return teacher, data.data_shape, score, len(data), "fid", 1000


def mixture_setup(args):
    data = make_gaussian_mixture(5000, seed=args.seed)
    teacher = build_model(ModelConfig(arch="mlp", hidden=128, depth=3), (2,), seed=args.seed)
    teacher = train_teacher(teacher, data.x, TeacherConfig(
        iterations=3000, lr=2e-3, seed=args.seed, device="cpu", progress=False)).ema_model
    reference = make_gaussian_mixture(2000, seed=args.seed + 1).x

    def score(samples):
        return {"swd": swd(samples, reference, seed=0), "mmd": mmd(samples, reference)}

    return teacher, (2,), score, 2000, "swd", 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=["digits", "mixture"], default="digits")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--iterations", type=int, default=2000,
                        help="straightening iterations per model (default 2000)")
    parser.add_argument("--batch-size", type=int, default=128, help="straightening batch")
    parser.add_argument("--pair-samples", type=int, default=3000)
    parser.add_argument("--nfes", type=int, nargs="+", default=[1, 2, 4, 6, 8, 10])
    parser.add_argument("--methods", nargs="+", default=list(METHODS),
                        help="subset of methods (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"hardware: {hardware()}")
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    teacher, shape, score, n_eval, key, min_eval = (digits_setup if args.dataset == "digits"
                                          else mixture_setup)(args)
    config = SweepConfig(methods=tuple(args.methods), nfes=tuple(args.nfes),
                         eval_samples=n_eval, seed=args.seed, pair_samples=args.pair_samples)
    train = StraightenConfig(iterations=args.iterations, batch_size=args.batch_size,
                             lr=1e-3 if args.dataset == "digits" else 2e-3, warmup=100,
                             ema_decay=0.999, checkpoint_every=0, device="cpu",
                             progress=False, seed=args.seed)
    metrics, costs, frame = run_sweep(teacher, shape, score, config, train,
                                      checkpoint_root=args.out / "checkpoints",
                                      min_eval_samples=min_eval)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (args.out / "costs.json").write_text(json.dumps(costs, indent=2))
    frame.to_csv(args.out / "metrics.csv", index=False)
    (args.out / "metrics.md").write_text(frame.to_markdown(index=False, floatfmt=".4g"))
    print(frame.to_markdown(index=False, floatfmt=".4g"))
    t_row = metrics["teacher"][f"nfe_{config.n_steps}"]
    print(f"\nteacher {key} at N={config.n_steps}: {t_row[key]:.4g} "
          f"± {t_row[key + '_std']:.2g}")
    for k in config.nfes:
        row = {m: metrics[m][f"nfe_{k}"] for m in metrics if m != "teacher"}
        nan = {key: float("nan"), "endpoint_rmse": float("nan")}
        b, bell = row.get("boss", nan), row.get("bellman", nan)
        two_std = 2 * max(b.get(key + "_std", 0.0), t_row[key + "_std"])
        gain = bell[key] - b[key]
        kept = ((bell[key] - row.get("boss_lora", nan)[key]) / gain if gain > 0
                else float("nan"))
        print(f"K={k:>2}: boss/teacher {key} {b[key] / t_row[key]:.2f}; boss - teacher "
              f"{b[key] - t_row[key]:+.3g} (2 x max std {two_std:.3g}); boss/reflow "
              f"{b[key] / row.get('reflow_uniform', nan)[key]:.2f}; boss/distill "
              f"{b[key] / row.get('distill_uniform', nan)[key]:.2f}; LoRA gain kept "
              f"{kept:.2f}; rmse boss/uniform "
              f"{b['endpoint_rmse'] / row.get('uniform', nan)['endpoint_rmse']:.2f}")
    print(f"total wall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
