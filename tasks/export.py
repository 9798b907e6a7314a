"""Export the finished steps: every method's K-step schedule, for use outside boss.

    python -m tasks.export [--params params.yaml] [--run-dir DIR] [--out-dir DIR]
                           [--methods NAME ...] [--num-train-timesteps 1000]

For every method of ``sweep.methods`` (or --methods) and every K it has, the schedule it
samples on (``boss_core.protocol.schedule_name``): the reference row ``teacher`` gets its
N-step uniform grid; a method whose student finds its own schedule while training
(``Training.own_schedule``: boss_student, learned_times_ft) the one its straighten stage
wrote, outputs/students/<method>/nfe_K/schedule.json; every other method the table of the
schedules stage, outputs/schedules/schedules.json. K steps have K + 1 time points. Each schedule has

    times       K + 1 float64 times 0 = t_0 < ... < t_K = 1 (t = 0 noise, t = 1 data)
    indices     their fine-grid indices i (t_k = i / N), or null for a schedule not chosen
                on the fine grid (the presets uniform, shift, edm, and learned times)
    sigmas      K + 1 diffusers flow-match sigmas 1 - t_k, from 1 down to exactly 0
    timesteps   K diffusers timesteps sigma_k * T (T = --num-train-timesteps): the final
                sigma 0 is never evaluated, so it has no timestep
    model       who samples it: "teacher" (the reference row and every untrained method) or
                the method's own name (its straightened student, outputs/students/<method>/
                nfe_K, registered in MLflow as <experiment>-<method>-nfe<K>)

Writes, atomically, <out-dir>/schedules.json (default out-dir: <run-dir>/results)

    {"format": "boss-schedules", "version": 1, "n_steps": N, "num_train_timesteps": T,
     "methods": {method: {"summary", "schedule", "model", "trained",
                          "schedules": {"nfe_K": {"nfe", "times", "indices", "sigmas",
                                                   "timesteps", "cost"}}}}}

("schedule": the schedules-stage table it comes from, or the method's own name when its
student found it) and <out-dir>/schedules.csv, one row per (method, K, step k = 0..K) with
the columns method, schedule, model, nfe, k, t, grid_index, sigma, timestep (grid_index
empty off the grid, timestep empty at k = K; floats round-trip float64 exactly):

    df = pd.read_csv("results/schedules.csv", dtype={"grid_index": "Int64"})
    df[(df.method == "boss") & (df.nfe == 4)].sigma.to_numpy()       # the K + 1 sigmas

With diffusers (docs/diffusers.md, "Using a schedule"):
``FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)`` with
``set_timesteps(sigmas=sigmas[:-1])`` (the K sigmas; it appends the 0) has these sigmas and
timesteps, and its step with ``model_output = -v(x, t_k)`` is boss's Euler step
x + (t_{k+1} - t_k) v(x, t_k).

--run-dir reads another checkout or a Prefect run's folder (runs/<name>/, which holds its
params.yaml); --params then defaults to <run-dir>/params.yaml. A missing schedules artifact,
or one that does not match the params (another N or other K: stale), stops with exit code 2
and says to run `dvc repro schedules`.
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from boss_core.methods import get
from boss_core.protocol import schedule_name
from boss_core.schedule import Schedule

from .runtime.artifacts import load_schedules, schedules_file, student_dir
from .runtime.io import read_json, write_json, write_text
from .runtime.params import Params, ParamsError, load_params, parse_override
from .runtime.step import setup_logging
from .runtime.workspace import Workspace

log = logging.getLogger("boss")
FORMAT, VERSION = "boss-schedules", 1
TEACHER = "teacher"  # the model of every untrained row
CSV_COLUMNS = ("method", "schedule", "model", "nfe", "k", "t", "grid_index", "sigma",
               "timestep")
REPRO_SCHEDULES = "run `dvc repro schedules` first"


@dataclass(frozen=True)
class Exported:
    """One method's schedules: ``by_k`` {K: Schedule} it samples on, from the table
    ``schedule``, sampled by ``model`` ("teacher" or the method's student)."""

    method: str
    schedule: str
    model: str
    by_k: dict[int, Schedule]


def collect(params: Params, ws: Workspace, methods: Iterable[str] | None = None
            ) -> list[Exported]:
    """The schedules of ``methods`` (default ``sweep.methods``) in the run ``ws``.

    Raises FileNotFoundError for a missing artifact and ValueError for an unknown method, a
    trained method the run did not train, or artifacts that do not match ``params`` (stale).
    """
    s = params.sweep
    names = list(dict.fromkeys(s.methods if methods is None else methods))
    for name in names:
        get(name)  # ValueError listing the known methods
    path = schedules_file(ws)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {REPRO_SCHEDULES} (or give --run-dir, "
                                "the folder of a run that has outputs/schedules)")
    found_n = read_json(path).get("n_steps")
    if found_n != s.n_steps:
        raise ValueError(f"{path} has N={found_n} but sweep.n_steps={s.n_steps}: it is stale, "
                         f"{REPRO_SCHEDULES}")
    table = load_schedules(ws)
    out = []
    for name in names:
        m = get(name)
        if m.reference:  # the N-step uniform grid, sampled by the teacher
            grid = Schedule.from_indices(range(s.n_steps + 1), s.n_steps, name=name)
            out.append(Exported(name, name, TEACHER, {s.n_steps: grid}))
            continue
        if m.trained and name not in s.methods:
            raise ValueError(f"{name} is trained but not in sweep.methods={list(s.methods)}: "
                             "this run has no student of it")
        source = schedule_name(m, s)
        if sorted(table.get(source, {})) != sorted(s.nfes):
            raise ValueError(f"{path} has K={sorted(table.get(source, {}))} of {source} but "
                             f"sweep.nfes={list(s.nfes)}: it is stale, {REPRO_SCHEDULES}")
        by_k = {k: table[source][k] for k in sorted(s.nfes)}
        if m.trained and m.training.own_schedule:
            out.append(Exported(name, name, name,
                                {k: _student_schedule(ws, name, k, own=True) for k in by_k}))
            continue
        if m.trained:
            for k, schedule in by_k.items():
                _check_trained_on(ws, name, k, schedule)
        out.append(Exported(name, source, name if m.trained else TEACHER, by_k))
    return out


def _student_schedule(ws: Workspace, method: str, k: int, own: bool) -> Schedule | None:
    """The schedule the straighten stage wrote beside the student (None if absent and not
    ``own``; FileNotFoundError if absent and ``own``)."""
    path = student_dir(ws, method, k) / "schedule.json"
    if not path.is_file():
        if not own:
            return None
        raise FileNotFoundError(f"{path} is missing: {method}'s student finds its schedule "
                                f"while training; run `dvc repro straighten@{method}` first")
    schedule = Schedule.from_dict(read_json(path))
    if schedule.nfe != k:
        raise ValueError(f"{path} has {schedule.nfe} steps, not K={k}: it is stale")
    return schedule


def _check_trained_on(ws: Workspace, method: str, k: int, schedule: Schedule) -> None:
    """A student written beside other times than the table's was trained on a stale table."""
    written = _student_schedule(ws, method, k, own=False)
    if written is not None and not np.array_equal(written.times, schedule.times):
        raise ValueError(f"{student_dir(ws, method, k)} was trained on times "
                         f"{written.times.tolist()}, the schedules table now has "
                         f"{schedule.times.tolist()}: rerun `dvc repro straighten@{method}`")


def schedule_record(schedule: Schedule, num_train_timesteps: float) -> dict:
    """One schedule's JSON: times (K + 1), indices (K + 1 or None), sigmas (K + 1),
    timesteps (K), cost."""
    return {"nfe": schedule.nfe, "times": schedule.times.tolist(),
            "indices": None if schedule.indices is None else list(schedule.indices),
            "sigmas": schedule.to_flow_match_sigmas().tolist(),
            "timesteps": schedule.to_flow_match_timesteps(num_train_timesteps).tolist(),
            "cost": schedule.cost}


def to_json(exported: list[Exported], n_steps: int, num_train_timesteps: float) -> dict:
    """The schedules.json mapping (module doc)."""
    methods = {}
    for e in exported:
        m = get(e.method)
        methods[e.method] = {
            "summary": m.summary, "schedule": e.schedule, "model": e.model,
            "trained": m.trained,
            "schedules": {f"nfe_{k}": schedule_record(sched, num_train_timesteps)
                          for k, sched in sorted(e.by_k.items())}}
    return {"format": FORMAT, "version": VERSION, "n_steps": n_steps,
            "num_train_timesteps": num_train_timesteps, "methods": methods}


def to_csv(exported: list[Exported], num_train_timesteps: float) -> str:
    """The schedules.csv text: one row per (method, K, k) (module doc)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for e in exported:
        for k, sched in sorted(e.by_k.items()):
            sigmas = sched.to_flow_match_sigmas()  # (K + 1,)
            steps = sched.to_flow_match_timesteps(num_train_timesteps)  # (K,)
            for i in range(sched.nfe + 1):
                writer.writerow([
                    e.method, e.schedule, e.model, k, i, repr(float(sched.times[i])),
                    "" if sched.indices is None else sched.indices[i],
                    repr(float(sigmas[i])), repr(float(steps[i])) if i < sched.nfe else ""])
    return buffer.getvalue()


def export(params: Params, ws: Workspace, out_dir: str | Path,
           methods: Iterable[str] | None = None, num_train_timesteps: float = 1000
           ) -> tuple[Path, Path]:
    """Write <out_dir>/schedules.json and schedules.csv atomically; return their paths."""
    exported = collect(params, ws, methods)
    out_dir = Path(out_dir)
    json_path, csv_path = out_dir / "schedules.json", out_dir / "schedules.csv"
    document = to_json(exported, params.sweep.n_steps, num_train_timesteps)
    text = to_csv(exported, num_train_timesteps)  # both built before either is written
    write_json(json_path, document)
    write_text(csv_path, text)
    return json_path, csv_path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tasks.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default=None,
                   help="params file (default <run-dir>/params.yaml, else params.yaml)")
    p.add_argument("--run-dir", default=None,
                   help="the run whose outputs/ to read: a checkout or runs/<name>/ "
                        "(default: the folder of --params)")
    p.add_argument("--out-dir", default=None,
                   help="folder for schedules.json and schedules.csv "
                        "(default <run-dir>/results)")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="SECTION.KEY=VALUE", help="override one params key (repeatable)")
    p.add_argument("--methods", nargs="+", default=None, metavar="NAME",
                   help="the methods to export (default: sweep.methods)")
    p.add_argument("--num-train-timesteps", type=int, default=1000, metavar="T",
                   help="diffusers' num_train_timesteps: timestep = sigma * T (default 1000)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    params_path = Path(args.params if args.params is not None else
                       Path(args.run_dir or ".") / "params.yaml")
    run_dir = Path(args.run_dir) if args.run_dir is not None else params_path.resolve().parent
    try:
        params = load_params(params_path, dict(parse_override(o) for o in args.overrides))
        ws = Workspace.at(params_path.resolve().parent, run_dir)
        paths = export(params, ws, args.out_dir or ws.results, args.methods,
                       args.num_train_timesteps)
    except (ParamsError, ValueError, FileNotFoundError) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    log.info("export: %s", ", ".join(args.methods or params.sweep.methods))
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
