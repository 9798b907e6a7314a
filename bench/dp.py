"""Bellman DP speed: the vectorised table against a straightforward triple-loop DP.

Prints, for N = 100 and N = 1000 and every K <= 20 from one pass, the time of
``bellman_schedules`` and of a plain Python triple loop over (k, j, l), their ratio, and
whether both found the same schedules. Run: ``python bench/dp.py`` (add --skip-slow-1000 to
skip the pure-Python run at N = 1000). Times are medians (7 runs of ours, 3 of the loops at
N = 100, 1 at N = 1000).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import best_of, hardware  # noqa: E402

from boss_core.bellman import bellman_schedules  # noqa: E402


def triple_loop_dp(cost, max_nfe: int) -> dict[int, tuple[int, ...]]:
    """The textbook DP: V_k(j) = min_{l > j} c(j, l) + V_{k-1}(l), one scalar at a time.

    ``cost`` is either the numpy matrix (the straightforward port of the formula) or the same
    matrix as nested Python lists (a tuned pure-Python loop, about 10x faster).
    """
    n = len(cost) - 1
    if isinstance(cost, np.ndarray):
        value = np.full((max_nfe + 1, n + 1), math.inf)
        choice = np.zeros((max_nfe + 1, n + 1), dtype=np.int64)
    else:
        value = [[math.inf] * (n + 1) for _ in range(max_nfe + 1)]
        choice = [[0] * (n + 1) for _ in range(max_nfe + 1)]
    value[0][n] = 0.0
    for k in range(1, max_nfe + 1):
        for j in range(n + 1):
            for l in range(j + 1, n + 1):
                total = cost[j][l] + value[k - 1][l]
                if total < value[k][j]:
                    value[k][j], choice[k][j] = total, l
    paths = {}
    for k in range(1, max_nfe + 1):
        path = [0]
        for left in range(k, 0, -1):
            path.append(choice[left][path[-1]])
        paths[k] = tuple(int(i) for i in path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-nfe", type=int, default=20, help="K_max (default 20)")
    parser.add_argument("--skip-slow-1000", action="store_true",
                        help="skip the pure-Python triple loop at N = 1000")
    args = parser.parse_args()
    print(f"hardware: {hardware()}")
    print(f"{'N':>5} {'K_max':>5} {'vectorised s':>13} {'baseline':>14} {'baseline s':>11} "
          f"{'ratio':>7} same schedules")
    rng = np.random.default_rng(0)
    for n in (100, 1000):
        cost = np.triu(rng.random((n + 1, n + 1)), k=1)
        fast = best_of(lambda c=cost: bellman_schedules(c, args.max_nfe), repeats=7)
        ours = {k: s.indices for k, s in bellman_schedules(cost, args.max_nfe).items()}
        for label, matrix in (("numpy loop", cost), ("list loop", cost.tolist())):
            if n == 1000 and (args.skip_slow_1000 or label == "numpy loop"):
                continue  # the numpy-indexed loop at N = 1000 takes minutes
            slow_paths = triple_loop_dp(matrix, args.max_nfe)
            slow = best_of(lambda m=matrix: triple_loop_dp(m, args.max_nfe),
                           repeats=3 if n == 100 else 1)
            print(f"{n:>5} {args.max_nfe:>5} {fast:>13.4f} {label:>14} {slow:>11.3f} "
                  f"{slow / fast:>6.0f}x {slow_paths == ours}")


if __name__ == "__main__":
    main()
