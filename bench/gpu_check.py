"""The GPU path end to end on the default digits setup, with per-phase wall times.

    python bench/gpu_check.py [--device cuda] [--iterations 300] [--teacher-iterations 1500]
        [--methods ROW ...] [--nfes K ...] [--kid-subsets 100]

Trains the default teacher and the FID classifier, searches schedules (Bellman and global),
straightens the trained rows of ``--methods`` (default: the registry's default rows, boss /
boss_lora / reflow / distill) at the K of ``--nfes`` (default 2, 4, 8) and scores every
method with FID / KID (torch-fidelity, on the device) and end-point RMSE: the same library
calls the pipeline makes, with device set. Prints the hardware, each phase's seconds and the
boss / uniform FID ratios. Run it with --device cpu on the same machine for the baseline.
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

from boss_core.data import load_digits_images  # noqa: E402
from boss_core.features import FeatureNetConfig, train_feature_net  # noqa: E402
from boss_core.fidelity import FidelityConfig, build_extractor, fid_kid  # noqa: E402
from boss_core.methods import default_names  # noqa: E402
from boss_core.models import ModelConfig, build_model  # noqa: E402
from boss_core.straighten import StraightenConfig  # noqa: E402
from boss_core.sweep import SweepConfig, run_sweep  # noqa: E402
from boss_core.teacher import TeacherConfig, train_teacher  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--iterations", type=int, default=300, help="straightening steps")
    parser.add_argument("--teacher-iterations", type=int, default=1500)
    parser.add_argument("--kid-subsets", type=int, default=100,
                        help="KID subsets (torch-fidelity computes KID on the CPU in float64)")
    parser.add_argument("--methods", nargs="+", default=list(default_names()), metavar="ROW",
                        help="registry rows to run (boss_core.methods.REGISTRY)")
    parser.add_argument("--nfes", type=int, nargs="+", default=[2, 4, 8], help="the K")
    parser.add_argument("--out", type=Path, default=None, help="write metrics.json here")
    args = parser.parse_args()
    print(f"hardware: {hardware()}; device {args.device}; torch {torch.__version__}")
    if args.device.startswith("cuda"):
        print(f"gpu: {torch.cuda.get_device_name(0)}")
    times = {}
    start = time.perf_counter()
    data = load_digits_images()
    teacher = build_model(ModelConfig(), data.data_shape, seed=0)
    teacher = train_teacher(teacher, data.x, TeacherConfig(
        iterations=args.teacher_iterations, device=args.device, progress=False)).ema_model
    times["teacher"] = time.perf_counter() - start
    start = time.perf_counter()
    feat = train_feature_net(data.x, data.y, FeatureNetConfig(device=args.device,
                                                              progress=False))
    fidelity = FidelityConfig(device=args.device, kid_subsets=args.kid_subsets)
    extractor = build_extractor(fidelity, feat.net)
    reference = extractor.reference(data.x)
    times["features"] = time.perf_counter() - start
    print(f"feature classifier accuracy {feat.heldout_accuracy:.4f}; " + ", ".join(
        f"{k} {v:.1f} s" for k, v in times.items()), flush=True)

    def score(samples):
        out = fid_kid(samples, reference, extractor)
        return {"fid": out["fid"], "kid": out["kid"]}

    config = SweepConfig(methods=tuple(args.methods), nfes=tuple(args.nfes), pair_samples=1000)
    train = StraightenConfig(iterations=args.iterations, lr=1e-3, warmup=50, ema_decay=0.99,
                             checkpoint_every=0, device=args.device, progress=False)
    start = time.perf_counter()
    metrics, costs, frame = run_sweep(teacher, data.data_shape, score, config, train,
                                      device=torch.device(args.device), progress=True,
                                      min_eval_samples=1000)
    times["sweep"] = time.perf_counter() - start
    print(frame.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    for k in config.nfes if {"boss", "uniform"} <= set(config.methods) else ():
        b, u = metrics["boss"][f"nfe_{k}"], metrics["uniform"][f"nfe_{k}"]
        print(f"K={k}: boss/uniform FID {b['fid'] / u['fid']:.3f}, "
              f"end-point RMSE {b['endpoint_rmse'] / u['endpoint_rmse']:.3f}")
    print("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in times.items()))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "metrics.json").write_text(json.dumps({"metrics": metrics, "times": times,
                                                           "device": args.device}, indent=1))


if __name__ == "__main__":
    main()
