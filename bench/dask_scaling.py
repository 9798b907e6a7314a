"""Scale-out of the sharded work: in-process against Dask with 1 and 2 workers (issue 6).

    python bench/dask_scaling.py [--samples 1024] [--shard 128] [--batch 64] [--repeats 2]

Everything is measured in ONE run, on the digits teacher architecture (U-Net, base 16,
channel mults (1, 2), on (1, 8, 8)), seeded with perturbed weights (a fresh U-Net outputs 0;
timings do not depend on the weights):

1. Trajectory throughput of the cost step (``cost_shard``: N teacher Euler steps + float64
   Gram cost sums; trajectories per second) over M samples in seed-range shards:
   in-process with 2 torch threads and with 1 (``map_shards`` with runner "local"), and on a
   real Dask cluster (``dask scheduler`` + 1, then 2, ``dask worker`` processes of one thread
   on 127.0.0.1, reporting to one Prefect server) through ``tasks.runtime.shards.map_shards`` with
   ``ScaleConfig(runner="dask", dask_address=...)``, exactly as the pipeline maps them.
   Cluster start-up is excluded: a warm-up map runs before each timed one. Times are the best
   of R runs (all runs are printed). The CPU seconds of the scheduler, the workers, the Prefect
   server and this client process during the 2-worker runs are printed: on a 2-core machine
   they share the cores the workers compute on.
   The Dask runs are made twice: with workers as ``dask worker`` starts them (its nanny sets
   ``MALLOC_TRIM_THRESHOLD_=65536`` in the worker's environment, Dask's default
   ``distributed.nanny.pre-spawn-environ``), and with ``MALLOC_MMAP_THRESHOLD_=33554432`` added
   to the workers' environment. Setting either variable switches off glibc's dynamic mmap
   threshold, so every tensor over 128 KiB is a fresh mmap + page faults + munmap; the second
   variable raises the static threshold to 32 MiB, which restores heap reuse.
2. Moving and merging against computing, per shard: compute time (1 thread), the pickled size
   of the result, a pickle round trip, the measured Dask transfer (a result scattered to a
   worker and returned by an identity task, minus a no-op task's round trip), and the merge of
   all shards' results, for ``cost_shard``/``merge_costs``, ``pairs_shard``/``merge_pairs``
   (the pairs step: boss and distill chords for K = 2, 4, 8, plus reflow pairs) and
   ``sample_shard``/``merge_samples`` (the evaluation). Also the overhead of a Prefect task
   on Dask: ``map_shards`` of no-op shards that carry the model like a real shard, with 1 and
   with max(16, S) shards: F = fixed cost of one map (sub-flow, task runner, Dask client), t_task =
   the extra seconds per shard.
3. Estimated speed-up of the cost step on N one-thread workers (one per machine or core), from
   the measured numbers, for the benchmark's M and for M = 50,000, shards of the same size:

       T(N) = F + ceil(S / N) * (t_c + t_o) + t_m,      S(N) = T_c / T(N)

   T_c = the whole job's compute on one thread (in-process, 1 thread, no Dask: what a worker
   computes once its malloc is fixed, see 1.), S = shards,
   t_c = T_c / S, t_o = t_task + the measured transfer of one result, t_m = merge of S cost
   results (measured directly, also for S of the 50k job). With S divisible by N this is the
   model T_c / N + (S / N) t_o + t_m (+ F) in which the per-task overhead runs in parallel on
   the workers. A pessimistic column charges all S * t_o to the client serially (the Prefect
   task submission and state reports do run in the flow's process):
   T(N) = F + ceil(S / N) * t_c + S * t_o + t_m.
"""

from __future__ import annotations

import argparse
import math
import os
import pickle
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")  # no per-task-run log lines
os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402
from common import hardware  # noqa: E402

from boss_core.config import ScaleConfig  # noqa: E402
from boss_core.models import ModelConfig, build_model  # noqa: E402
from boss_core.schedule import Schedule  # noqa: E402
from boss_core.shards import (  # noqa: E402
    cost_shard,
    merge_costs,
    merge_pairs,
    merge_samples,
    pairs_shard,
    sample_shard,
    shard_ranges,
)
from flows.local_server import free_port, prefect_server, stop_process  # noqa: E402
from tasks.runtime.shards import map_shards  # noqa: E402

SHAPE = (1, 8, 8)
NFES = (2, 4, 8)


def _noop_shard(**kwargs):
    """A shard that computes nothing: receives the job (model included), returns None."""
    return None


def _identity(x):
    return x


def _noop():
    return None


def teacher() -> torch.nn.Module:
    config = ModelConfig(arch="unet", base_channels=16, channel_mults=(1, 2))
    model = build_model(config, SHAPE, seed=3).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
    return model


def timed(fn: Callable, repeats: int, pick: Callable = min):
    """(best, by default, wall seconds, list of seconds, last result) of ``repeats`` calls."""
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return pick(times), times, out


def _malloc_env() -> dict:
    return {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}


def tree_cpu(pid: int) -> float:
    """User + system CPU seconds of a process and its live descendants."""
    try:
        procs = [psutil.Process(pid)]
        procs += procs[0].children(recursive=True)
    except psutil.Error:
        return 0.0
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


class Cluster:
    """``dask scheduler`` + one-thread ``dask worker`` processes on 127.0.0.1 and a Prefect
    server (as tests/dask_helpers.py), with workers added one at a time."""

    def __init__(self, stack: ExitStack, home: Path):
        self.stack, self.home = stack, home
        self.api = stack.enter_context(prefect_server(home=home / "prefect"))
        port = free_port()
        self.address = f"tcp://127.0.0.1:{port}"
        self.env = {**os.environ, "PREFECT_API_URL": str(self.api), "OMP_NUM_THREADS": "1",
                    "PYTHONPATH": str(ROOT), "DASK_LOGGING__DISTRIBUTED": "warning",
                    "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
        self.log = stack.enter_context(open(home / "dask.log", "ab"))
        self.scheduler = self._start(["scheduler", "--host", "127.0.0.1", "--port", str(port),
                                      "--dashboard-address", ":0", "--no-show"])
        self.workers: list[subprocess.Popen] = []

    def _start(self, args: list[str], extra_env: dict | None = None) -> subprocess.Popen:
        dask = str(Path(sys.executable).with_name("dask"))
        proc = subprocess.Popen([dask, *args], cwd=ROOT, env={**self.env, **(extra_env or {})},
                                stdout=self.log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        self.stack.callback(stop_process, proc)
        return proc

    def add_worker(self, extra_env: dict | None = None, timeout: float = 120.0) -> dict:
        """Start one more worker; returns the MALLOC_* environment its worker process sees."""
        from distributed import Client

        self.workers.append(self._start(
            ["worker", self.address, "--nthreads", "1", "--nworkers", "1", "--host",
             "127.0.0.1", "--dashboard-address", ":0", "--local-directory",
             str(self.home / "workers")], extra_env))
        with Client(self.address, timeout=timeout) as client:
            client.wait_for_workers(len(self.workers), timeout=timeout)
            return next(iter(client.run(_malloc_env).values()))

    def stop_workers(self, timeout: float = 60.0) -> None:
        from distributed import Client

        for proc in self.workers:
            stop_process(proc)
        self.workers = []
        with Client(self.address, timeout=timeout) as client:
            deadline = time.monotonic() + timeout
            while client.scheduler_info()["workers"] and time.monotonic() < deadline:
                time.sleep(0.2)

    def cpu(self) -> dict[str, float]:
        me = psutil.Process().cpu_times()  # this process alone: its children are the cluster
        return {"scheduler": tree_cpu(self.scheduler.pid),
                "workers": sum(tree_cpu(w.pid) for w in self.workers),
                "prefect server": tree_cpu(self.api.pid),
                "client (this process)": me.user + me.system}


@contextmanager
def cluster(home: Path) -> Iterator[Cluster]:
    with ExitStack() as stack:
        c = Cluster(stack, home)
        os.environ["PREFECT_API_URL"] = str(c.api)  # map_shards reports to this server
        try:
            yield c
        finally:
            os.environ.pop("PREFECT_API_URL", None)


def size(obj) -> int:
    return len(pickle.dumps(obj, protocol=5))


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=1024, help="M (default 1024)")
    parser.add_argument("--shard", type=int, default=128, help="samples per shard (default 128)")
    parser.add_argument("--batch", type=int, default=64, help="batch size (default 64)")
    parser.add_argument("--n-steps", type=int, default=100, help="N (default 100)")
    parser.add_argument("--repeats", type=int, default=2,
                        help="best of R timed runs of each throughput (default 2)")
    parser.add_argument("--eval-methods", type=int, default=4,
                        help="evaluation methods in the sample_shard job, each at K = 2, 4, 8 "
                             "(default 4; the default sweep has 10)")
    parser.add_argument("--big-job", type=int, default=50_000,
                        help="second job size of the speed-up estimate (default 50000)")
    args = parser.parse_args()
    if args.shard % args.batch:
        parser.error("--shard must be a multiple of --batch (aligned shards)")

    torch.set_num_threads(2)
    print(f"hardware: {hardware()}")
    load = os.getloadavg()
    print(f"load average before: {' '.join(f'{x:.2f}' for x in load)}"
          + ("  (busy: timings share the cores with other processes)" if load[0] > 0.5 else ""))
    n, m, reps = args.n_steps, args.samples, args.repeats
    model = teacher()
    shards = shard_ranges(m, args.shard, args.batch)
    n_shards = len(shards)
    print(f"cost step: M = {m} samples, N = {n}, batch {args.batch}, {n_shards} shards of "
          f"{args.shard}; model {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"{fmt_bytes(size(model))} pickled (travels with every task)")
    job = {"velocity": model, "data_shape": SHAPE, "seed": 0, "n_steps": n,
           "batch_size": args.batch, "device": "cpu"}
    small = [(0, args.batch)]  # warm-up shard: one batch

    # ---- 1. throughput: in-process --------------------------------------------------------
    local = ScaleConfig(runner="local")
    thru: dict[str, tuple[float, list[float]]] = {}
    for threads in (2, 1):
        torch.set_num_threads(threads)
        map_shards("cost", cost_shard, small, local, job, progress=False)  # warm-up
        best, runs, local_parts = timed(
            lambda: map_shards("cost", cost_shard, shards, local, job, progress=False), reps)
        thru[f"in-process, {threads} torch thread{'s' * (threads > 1)}"] = (best, runs)
    torch.set_num_threads(1)  # as on a worker; the client only submits and merges
    reference = merge_costs(local_parts)

    # per-shard pieces, in-process with 1 thread (as on a worker)
    start, count = shards[0]
    t_cost, cost_part = thru["in-process, 1 torch thread"][0] / n_shards, local_parts[0]
    schedules = {(group, k): Schedule.from_indices(np.round(np.linspace(0, n, k + 1)), n)
                 for group in ("boss", "distill_uniform") for k in NFES}
    pairs_job = {"velocity": model, "schedules": schedules, "n_steps": n, "data_shape": SHAPE,
                 "seed": 2, "batch_size": args.batch, "device": "cpu", "reflow": True}
    t_pairs, _, pairs_part = timed(lambda: pairs_shard(start=start, count=count, **pairs_job), 1)
    rows = {(f"method{i}", k): (model, np.linspace(0.0, 1.0, k + 1))
            for i in range(args.eval_methods) for k in NFES}
    sample_job = {"rows": rows, "teacher": model, "data_shape": SHAPE, "seeds": [0, 1, 2],
                  "n_steps": n, "batch_size": args.batch, "device": "cpu"}
    t_sample, _, sample_part = timed(lambda: sample_shard(start=start, count=count,
                                                          **sample_job), 1)
    pieces = {"cost": (t_cost, cost_part, merge_costs),
              "pairs": (t_pairs, pairs_part, merge_pairs),
              "samples": (t_sample, sample_part, merge_samples)}

    # ---- 1. throughput: Dask; 2. overheads ------------------------------------------------
    variants = {"nanny default": {},
                "MMAP 32 MiB": {"MALLOC_MMAP_THRESHOLD_": str(32 << 20)}}
    seen_env: dict[str, dict] = {}
    cpu_2w: dict[str, dict[str, float]] = {}
    wall_2w: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="boss-dask-bench-") as tmp, \
            cluster(Path(tmp)) as c:
        scale = ScaleConfig(runner="dask", dask_address=c.address, shard_samples=args.shard)

        def dask_map(fn=cost_shard, todo=shards, kwargs=job):
            return map_shards("cost", fn, todo, scale, kwargs, progress=False)

        for label, extra in variants.items():
            c.stop_workers()
            for workers in (1, 2):
                seen_env[label] = c.add_worker(extra)
                dask_map(todo=small * workers)  # warm-up: imports on the new worker
                before = c.cpu()
                best, runs, parts = timed(dask_map, reps)
                after = c.cpu()
                thru[f"Dask {workers} worker{'s' * (workers > 1)}, {label}"] = (best, runs)
                merged = merge_costs(parts)
                rel = np.abs(merged.sum - reference.sum).max() / np.abs(reference.sum).max()
                assert merged.n_samples == m and rel < 1e-12, rel
                if workers == 2:
                    cpu_2w[label] = {k: after[k] - before[k] for k in after}
                    wall_2w[label] = sum(runs)

        # Prefect-task overhead on Dask: no-op shards carrying the model, 1 and 16+ per map
        noop_job = {"velocity": model, "data_shape": SHAPE}
        noop_1, _, _ = timed(lambda: dask_map(_noop_shard, [(0, 1)], noop_job), 3)
        many = [(i, 1) for i in range(max(16, n_shards))]
        noop_s, _, _ = timed(lambda: dask_map(_noop_shard, many, noop_job), 3)
        t_task = (noop_s - noop_1) / (len(many) - 1)
        fixed = noop_1 - t_task

        # measured Dask transfer of one result: an identity task on the result scattered to a
        # worker, minus a no-op task's round trip
        from distributed import Client

        with Client(c.address) as client:
            def round_trip(fn, *a):
                return timed(lambda: client.submit(fn, *a, pure=False).result(), 5,
                             statistics.median)[0]

            round_trip(_noop)
            t_noop_task = round_trip(_noop)
            transfer = {}
            for name, (_, part, _) in pieces.items():
                future = client.scatter([part])[0]  # one key for the whole result
                round_trip(_identity, future)
                transfer[name] = max(0.0, round_trip(_identity, future) - t_noop_task)
                del future
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")

    print(f"\n1. cost-step throughput (teacher trajectories + float64 cost sums), best of {reps}:")
    for label, env in seen_env.items():
        print(f"  workers '{label}': worker process sees {env}")
    rate = {k: m / best for k, (best, _) in thru.items()}
    for name, (best, runs) in thru.items():
        print(f"  {name:<38} {best:6.2f} s  {rate[name]:6.1f} traj/s   runs "
              f"{[round(r, 2) for r in runs]}")
    ip1, ip2 = rate["in-process, 1 torch thread"], rate["in-process, 2 torch threads"]
    print(f"  in-process 2 threads / 1 thread: {ip2 / ip1:.2f}x")
    for label in variants:
        r1 = rate[f"Dask 1 worker, {label}"]
        r2 = rate[f"Dask 2 workers, {label}"]
        print(f"  [{label}] 2 workers / 1 worker {r2 / r1:.2f}x; 2 workers / in-process "
              f"2 threads {r2 / ip2:.2f}x, / 1 thread {r2 / ip1:.2f}x; 1 worker / in-process "
              f"1 thread {r1 / ip1:.2f}x")
    for label, cpu in cpu_2w.items():
        total = sum(cpu.values())
        per_job = cpu["workers"] / reps / thru["in-process, 1 torch thread"][0]
        print(f"  [{label}] CPU seconds in the 2-worker runs ({wall_2w[label]:.1f} s wall x 2 "
              f"cores = {2 * wall_2w[label]:.1f} core-s): "
              + ", ".join(f"{k} {v:.1f}" for k, v in cpu.items())
              + f"; total {total:.1f} ({total / (2 * wall_2w[label]):.0%} of the cores); "
              f"workers' CPU per job {per_job:.2f}x the in-process 1-thread wall")
    print("  What limits the 2-worker ratio on this machine: (a) workers as `dask worker` starts "
          "them\n  run torch ~2x slower than the same thread in-process (the nanny's "
          "MALLOC_TRIM_THRESHOLD_\n  turns every >128 KiB tensor into mmap + page faults; "
          "MALLOC_MMAP_THRESHOLD_ restores it);\n  (b) two workers computing at once each run "
          "slower than one alone (their CPU per job above):\n  the two vCPUs share memory "
          "bandwidth and caches (or a host core), which also caps 2 torch\n  threads; "
          "(c) the scheduler, the Prefect server and the flow's client take CPU from the\n  "
          "same 2 cores, and each map pays F + S t_task of Prefect/Dask overhead (see 2.);\n  "
          "(d) the in-process baseline with 2 torch threads already uses the second core "
          "(2 threads\n  / 1 thread above), so against it 2 workers can win at most 2 / that "
          "ratio.")

    print(f"\n2. per shard of {count} samples: computing, moving and merging "
          f"(1 thread; merge of {n_shards} shards):")
    print(f"  {'result':<8} {'compute':>9} {'size':>9} {'pickle rt':>10} {'Dask xfer':>10} "
          f"{'merge all':>10} {'(xfer + merge/S) / compute':>27}")
    for name, (t, part, merge) in pieces.items():
        rt, _, _ = timed(lambda part=part: pickle.loads(pickle.dumps(part, protocol=5)), 5,
                         statistics.median)
        t_merge, _, _ = timed(lambda part=part, merge=merge: merge([part] * n_shards), 3,
                              statistics.median)
        share = (transfer[name] + t_merge / n_shards) / t
        print(f"  {name:<8} {t:8.3f}s {fmt_bytes(size(part)):>9} {1e3 * rt:8.2f}ms "
              f"{1e3 * transfer[name]:8.2f}ms {1e3 * t_merge:8.2f}ms {share:26.2%}")
    print(f"  (cost: N = {n}; pairs: boss and distill chords at K = 2, 4, 8 + reflow pairs; "
          f"samples: {len(rows)} rows + the\n  reference, 3 seeds; their size grows with the "
          f"rows)")
    print(f"  Dask no-op task round trip (client.submit): {1e3 * t_noop_task:.1f} ms")
    print(f"  Prefect task on Dask (map_shards of no-op shards carrying the model): 1 shard "
          f"{noop_1:.2f} s, {len(many)} shards {noop_s:.2f} s\n"
          f"    -> per task t_task = {1e3 * t_task:.0f} ms, fixed per map F = {fixed:.2f} s")

    # ---- 3. estimate ------------------------------------------------------------------------
    t_c = t_cost
    t_o = t_task + transfer["cost"]
    print(f"\n3. estimated cost-step speed-up on N one-thread workers (model in --help): "
          f"t_c = {t_c:.2f} s per shard\n   (in-process, 1 thread), t_o = {1e3 * t_o:.0f} ms "
          f"per shard (Prefect task + transfer), F = {fixed:.2f} s per map,\n   t_m = measured "
          f"merge of S results")
    print("   S(N) = T_c / (F + ceil(S/N) (t_c + t_o) + t_m)")
    print("   serial: T_c / (F + ceil(S/N) t_c + S t_o + t_m)  (all task overhead in the client)")
    ns = (1, 2, 4, 8, 16, 64)
    for total in (m, args.big_job):
        s = math.ceil(total / args.shard)
        t_m, _, _ = timed(lambda s=s: merge_costs([cost_part] * s), 3, statistics.median)
        t_whole = t_c * total / args.shard
        print(f"   M = {total:,}: S = {s} shards, T_c = {t_whole:.1f} s, t_m = "
              f"{1e3 * t_m:.1f} ms")
        print("     N      " + "".join(f"{k:>8}" for k in ns))
        par = [t_whole / (fixed + math.ceil(s / k) * (t_c + t_o) + t_m) for k in ns]
        ser = [t_whole / (fixed + math.ceil(s / k) * t_c + s * t_o + t_m) for k in ns]
        print("     S(N)   " + "".join(f"{v:8.2f}" for v in par))
        print("     serial " + "".join(f"{v:8.2f}" for v in ser))


if __name__ == "__main__":
    main()
