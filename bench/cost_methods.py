"""The two forms of the cost matrix side by side: ``method="gram"`` against ``method="direct"``.

    python bench/cost_methods.py [--samples 500] [--batch 500] [--n-steps 100] [--repeats 5]

For each teacher shape (the default digits U-Net, ``build_model(ModelConfig(), (1, 8, 8))``,
and a 2-D MLP, ``ModelConfig(arch="mlp")`` on (2,)), with untrained weights perturbed by a
seeded N(0, 0.05^2) so the velocity is not zero (the U-Net's output conv starts at zero), it
times, in the same process and interleaved repeat by repeat (gram, direct, gram, ...):

- ``cost_matrix(model, noise, N, batch, method=...)``: the whole call a user makes, i.e. the
  N teacher network calls per batch plus the cost sum;
- ``trajectory_cost_sum(traj, method=...)`` on one stored trajectory batch: the cost sum
  alone, without the network calls.

Prints the hardware, the median of ``--repeats`` runs (after one warm-up each), the ratio
direct / gram, and the largest difference between the two matrices relative to the largest
entry. Set OMP_NUM_THREADS (e.g. 1) for a stable figure on a shared machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import hardware  # noqa: E402

from boss_core.cost import cost_matrix, trajectory_cost_sum  # noqa: E402
from boss_core.grids import uniform_grid  # noqa: E402
from boss_core.models import ModelConfig, build_model  # noqa: E402
from boss_core.sampling import euler_trajectory  # noqa: E402
from boss_core.seeds import sample_noise  # noqa: E402

METHODS = ("gram", "direct")
SHAPES = {"unet": (1, 8, 8), "mlp": (2,)}
LABELS = {"unet": "digits U-Net (default ModelConfig), (1, 8, 8)", "mlp": "MLP 256x3, (2,)"}


def perturbed_model(arch: str, device: str, scale: float = 0.05) -> torch.nn.Module:
    """The untrained network of ``arch`` with every weight moved by scale * N(0, 1) (seeded)."""
    model = build_model(ModelConfig(arch=arch), SHAPES[arch], seed=0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model.to(device).eval()


def medians(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median wall seconds per function, calls interleaved, after one warm-up call each."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def bench(arch: str, args) -> None:
    model = perturbed_model(arch, args.device)
    noise = sample_noise(SHAPES[arch], 0, 0, args.samples).to(args.device)

    def whole(method):
        return lambda: cost_matrix(model, noise, args.n_steps, batch_size=args.batch,
                                   method=method)

    with torch.inference_mode():
        sums = {m: cost_matrix(model, noise, args.n_steps, batch_size=args.batch,
                               method=m).sum for m in METHODS}
        full = medians({m: whole(m) for m in METHODS}, args.repeats)
        traj = euler_trajectory(model, noise[:args.batch], uniform_grid(args.n_steps))
        alone = medians({m: (lambda m=m: trajectory_cost_sum(traj, method=m))
                         for m in METHODS}, args.repeats)
    diff = np.abs(sums["gram"] - sums["direct"]).max() / np.abs(sums["direct"]).max()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"\n{LABELS[arch]}: {n_params:,} parameters, M = {args.samples}, "
          f"batch {args.batch}, N = {args.n_steps}; median of {args.repeats}")
    print(f"  {'what':<42} {'gram s':>8} {'direct s':>9} {'direct/gram':>12}")
    for label, t in (("cost_matrix (teacher calls + cost)", full),
                     (f"cost sum alone (one batch of {min(args.batch, args.samples)})", alone)):
        print(f"  {label:<42} {t['gram']:>8.3f} {t['direct']:>9.3f} "
              f"{t['direct'] / t['gram']:>11.2f}x")
    print(f"  max |gram - direct| / max entry: {diff:.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=500, help="M noises (default 500)")
    parser.add_argument("--batch", type=int, default=500, help="batch size (default 500)")
    parser.add_argument("--n-steps", type=int, default=100, help="N (default 100)")
    parser.add_argument("--repeats", type=int, default=5, help="median of R runs (default 5)")
    parser.add_argument("--arch", choices=[*SHAPES, "both"], default="both")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    args = parser.parse_args()
    print(f"hardware: {hardware()}")
    for arch in (SHAPES if args.arch == "both" else [args.arch]):
        bench(arch, args)


if __name__ == "__main__":
    main()
