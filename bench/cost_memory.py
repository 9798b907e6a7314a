"""Peak memory of the cost computation: flat in the number of samples M.

Each M runs in its own process (so ru_maxrss is that run's peak): a digits-shaped velocity
MLP (random weights; memory does not depend on them), N = 100 fine steps, a fixed batch of
100, noise streamed batch by batch with per-sample seeds. Prints the peak RSS after imports
and after the cost, the increase, and the ratio of increases between the largest and the
smallest M. Run: ``python bench/cost_memory.py``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import hardware  # noqa: E402


def child(m: int, batch: int, n_steps: int) -> None:
    import torch
    from torch import nn

    from boss_core.cost import cost_matrix
    from boss_core.seeds import sample_noise

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(65, 256), nn.SiLU(), nn.Linear(256, 256), nn.SiLU(),
                        nn.Linear(256, 64))

    def velocity(x, t):  # x: (B, 1, 8, 8)
        flat = torch.cat([x.reshape(x.shape[0], -1), t[:, None]], dim=1)
        return net(flat).reshape(x.shape)

    def batches():
        for start in range(0, m, batch):
            yield sample_noise((1, 8, 8), seed=0, start=start, count=min(batch, m - start))

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    cost = cost_matrix(velocity, batches(), n_steps, batch_size=batch)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"m": m, "before_kib": before, "after_kib": after, "seconds": seconds,
                      "n_samples": cost.n_samples}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 10_000],
                        help="numbers of samples M, one process each (default 100 10000)")
    parser.add_argument("--batch", type=int, default=100, help="fixed batch size (default 100)")
    parser.add_argument("--n-steps", type=int, default=100, help="fine grid N (default 100)")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.child, args.batch, args.n_steps)
        return
    print(f"hardware: {hardware()}")
    print(f"{'M':>7} {'batch':>6} {'RSS before MiB':>15} {'peak MiB':>9} {'increase MiB':>13} "
          f"{'seconds':>8}")
    rows = []
    for m in args.sizes:
        out = subprocess.run([sys.executable, __file__, "--child", str(m), "--batch",
                              str(args.batch), "--n-steps", str(args.n_steps)],
                             check=True, capture_output=True, text=True).stdout
        row = json.loads(out.strip().splitlines()[-1])
        rows.append(row)
        inc = (row["after_kib"] - row["before_kib"]) / 1024
        print(f"{m:>7} {args.batch:>6} {row['before_kib'] / 1024:>15.1f} "
              f"{row['after_kib'] / 1024:>9.1f} {inc:>13.1f} {row['seconds']:>8.2f}")
    small, large = rows[0], rows[-1]
    ratio = (large["after_kib"] - large["before_kib"]) / max(
        small["after_kib"] - small["before_kib"], 1)
    held = large["m"] * (args.n_steps + 1) * 64 * 4 * 2 / 2**20  # states + velocities, fp32
    print(f"for scale: holding all {large['m']} trajectories at once would take {held:.0f} MiB")
    print(f"peak increase M={large['m']} / M={small['m']}: {ratio:.2f}x "
          f"(samples ratio {large['m'] / small['m']:.0f}x); peak RSS ratio "
          f"{large['after_kib'] / small['after_kib']:.3f}x")


if __name__ == "__main__":
    main()
