"""Beyond BOSS on digits: rollout straightening, student-aware schedules and learned times
against boss and distill_uniform, in FID and end-point error, at the pipeline's settings.

    OMP_NUM_THREADS=1 .venv/bin/python bench/beyond_boss_digits.py --profile default \
        --equal-calls --json /tmp/bb_default.json      # and --profile curved, side by side

On the embedded digits (``boss_core.data.load_digits_images``, the bytes the pipeline's data
stage writes), with the configs ``tasks.runtime.params.load_params`` builds from params.yaml
(``--profile default``) or params.yaml plus params.curved.yaml's overrides (``--profile
curved``: a class-conditional teacher, 10 classes, cosine path, label drop-out 0.1,
``sweep.guidance`` 1), it

- trains the teacher and the FID feature classifier once, as the teacher and features stages
  do, and caches both in ``--cache`` (file names keyed by a digest of their sections);
- for each straighten seed s in ``--seeds`` (``straighten.seed`` = s; the evaluation noises
  are ``sweep.seed``'s, the same for every s, so the rows are paired) runs
  ``boss_core.sweep.run_sweep`` at the K of ``--nfes`` on teacher, boss, distill_uniform,
  boss_rollout (each (target, backprop) of ``--rollouts``) and boss_student, scored as the
  evaluate step scores (FID / KID in the classifier's features, ``sweep.eval_samples`` =
  1,797 per noise seed); learned_times (a schedule search, no straightening, so independent
  of s) runs once;
- prints per (row, K): FID and end-point RMSE (mean ± std over the straighten seeds), the
  per-seed ratios FID_row(s) / FID_boss(s) and the same against distill_uniform and for the
  RMSE (mean ± std of the ratios), the training calls (a forward 1, a backward 2, teacher
  calls included; learned_times: its search's calls) and their ratio to boss's;
- the two targets of issue 13 (below); with ``--equal-calls``, for every trained row that
  spends more than 10% more training calls than boss at some K, boss and distill_uniform are
  straightened again at that K with ``straighten.iterations`` scaled by the ratio of calls
  (the same seeds), and the ratios are printed again at equal calls.

Targets. (a) "The best 2-step model within 1.1x of the 100-step teacher's FID": r = F_best /
F_teacher with the standard error

    se(r) = r sqrt((se_B / F_best)^2 + (se_T / F_teacher)^2),
    se_T^2 = s_T^2 / n,   se_B^2 = var_s(F_best(s)) / S + mean_s(s_B(s)^2) / n,

s_T, s_B(s): the std over the n noise seeds (sample std, ddof 1), var_s the sample variance
over the S straighten seeds (the noises are shared, so the spread over s holds no noise-seed
variance and the two add). The correlation through the shared noises is left out, which
makes se(r) larger. The target is "not met" when r - 2 se(r) > 1.1; otherwise "unresolved"
when the band 0.1 is narrower than 2 se(r), else met when r <= 1.1. (b) "The winning
method at least 15% below both boss and distill_uniform at K=2, on FID and on end-point
error": the mean per-seed ratio <= 0.85 on all four; the winner is the new row (not boss or
distill_uniform) with the lowest FID at K=2.

``--quick``: tiny settings, a one-to-two-minute smoke run of the script (numbers mean
nothing). ``--threads``: torch threads (default 1). ``--device``: where everything runs
(default cpu; the teacher and classifier caches are shared between devices).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import hardware  # noqa: E402
from boss_core.data import load_digits_images  # noqa: E402
from boss_core.features import (  # noqa: E402
    load_feature_net,
    predict_from_features,
    save_feature_net,
    train_feature_net,
)
from boss_core.fidelity import build_extractor, fid_kid_features  # noqa: E402
from boss_core.methods import MethodOptions  # noqa: E402
from boss_core.models import build_model  # noqa: E402
from boss_core.sweep import run_sweep  # noqa: E402
from boss_core.teacher import train_teacher  # noqa: E402
from tasks.runtime.params import load_params  # noqa: E402

BASELINES = ("boss", "distill_uniform")
ROLLOUTS = ("endpoint,step", "endpoint,full", "chord,step", "chord,full")
BAND, TARGET_BELOW = 1.1, 0.85
# --quick: every stage runs, nothing is meaningful (a smoke test of the script)
QUICK = {"teacher.iterations": 60, "teacher.log_every": 20, "features.iterations": 60,
         "sweep.n_steps": 10, "sweep.eval_samples": 200, "sweep.n_seeds": 2,
         "sweep.batch_size": 200, "sweep.search_samples": 100, "sweep.pair_samples": 200,
         "fidelity.kid_subset_size": 100, "straighten.iterations": 20,
         "straighten.warmup": 5, "straighten.eval_every": 10,
         "methods.learned_times.iterations": 10, "methods.learned_times.samples": 32,
         "methods.learned_times.batch_size": 16, "methods.boss_student.cost_samples": 50}


def profile_overrides(profile: str, quick: bool, device: str = "cpu") -> dict:
    """The ``section.key`` overrides of the profile (params.curved.yaml's for curved)."""
    over = {}
    if profile == "curved":
        over.update(yaml.safe_load((ROOT / "params.curved.yaml").read_text()))
    over.update({"run.device": device, "run.progress": False,
                 "sweep.eval_samples": 1797, **(QUICK if quick else {})})
    return over


def cached_teacher(params, data, cache: Path):
    """The teacher stage's EMA model (trained once per model/teacher digest)."""
    model = build_model(params.model, data.data_shape, seed=params.teacher.seed)
    file = cache / f"teacher_{params.digest(['model', 'teacher'])}.pt"
    if file.is_file():
        model.load_state_dict(torch.load(file, map_location="cpu", weights_only=True))
        print(f"teacher: loaded {file}", flush=True)
        return model.eval()
    result = train_teacher(model, data.x, params.teacher, labels=data.y)
    torch.save(result.ema_model.state_dict(), file)
    print(f"teacher: trained in {result.wall_time_s:.0f} s, final loss "
          f"{float(result.losses[-50:, 1].mean()):.4f}; saved {file}", flush=True)
    return result.ema_model.eval()


def cached_features(params, data, cache: Path):
    """The features stage's classifier (trained once per features digest)."""
    file = cache / f"features_{params.digest(['features'])}.safetensors"
    if not file.is_file():
        start = time.perf_counter()
        result = train_feature_net(data.x, data.y, params.features)
        save_feature_net(result.net, file)
        print(f"feature classifier: held-out accuracy {result.heldout_accuracy:.4f}, "
              f"{time.perf_counter() - start:.0f} s; saved {file}", flush=True)
    else:
        print(f"feature classifier: loaded {file}", flush=True)
    return load_feature_net(file)


def record(rows: dict, name: str, metrics: dict, costs: dict, method: str, nfes, train) -> None:
    """Append one straighten seed's FID, its noise-seed std, RMSE and training calls."""
    for k in nfes:
        m, c = metrics[method][f"nfe_{k}"], costs[method][f"nfe_{k}"]
        if method == "learned_times":
            calls = c.get("search_evaluations", 0)
        else:
            calls = c.get("train_evaluations", 3 * c["iterations"] * train.batch_size)
        row = rows.setdefault(name, {}).setdefault(
            k, {"fid": [], "fid_std": [], "rmse": [], "calls": [], "iterations": []})
        row["fid"].append(m["fid"])
        row["fid_std"].append(m["fid_std"])
        row["rmse"].append(m["endpoint_rmse"])
        row["calls"].append(calls)
        row["iterations"].append(c.get("iterations", 0))


def per_seed(values, base) -> np.ndarray:
    """values / base per seed (a single value, learned_times's, divides every seed's base)."""
    values, base = np.asarray(values, float), np.asarray(base, float)
    return (values if len(values) == len(base) else np.full(len(base), values.mean())) / base


def pm(values, digits: int = 3, fmt: str = "f") -> str:
    v = np.asarray(values, float)
    return f"{v.mean():.{digits}{fmt}} ± {v.std():.{digits}{fmt}}"


def results_table(rows: dict) -> str:
    lines = ["| row | K | FID | end-point RMSE | FID / boss | FID / distill | RMSE / boss | "
             "RMSE / distill | train calls (1e6) | calls / boss |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, by_k in rows.items():
        for k, r in by_k.items():
            b, d = rows["boss"][k], rows["distill_uniform"][k]
            calls = np.mean(r["calls"])
            lines.append(
                f"| {name} | {k} | {pm(r['fid'], 4)} | {pm(r['rmse'], 4)} | "
                f"{pm(per_seed(r['fid'], b['fid']))} | {pm(per_seed(r['fid'], d['fid']))} | "
                f"{pm(per_seed(r['rmse'], b['rmse']))} | "
                f"{pm(per_seed(r['rmse'], d['rmse']))} | {calls / 1e6:.3f}"
                f"{' (search)' if name == 'learned_times' else ''} | "
                f"{calls / np.mean(b['calls']):.2f} |")
    return "\n".join(lines)


def band_check(rows: dict, teacher: dict, n_noise: int) -> dict:
    """Target (a) at the smallest K: the best row's FID over the teacher's, with its s.e."""
    k = min(next(iter(rows.values())))
    name = min((n for n in rows if k in rows[n]), key=lambda n: np.mean(rows[n][k]["fid"]))
    r = rows[name][k]
    fids = np.asarray(r["fid"], float)
    sample = math.sqrt(n_noise / (n_noise - 1))  # population std -> sample std
    var_s = fids.var(ddof=1) if len(fids) > 1 else 0.0
    se_b = math.sqrt(var_s / len(fids)
                     + np.mean((np.asarray(r["fid_std"]) * sample) ** 2) / n_noise)
    se_t = teacher["fid_std"] * sample / math.sqrt(n_noise)
    ratio = fids.mean() / teacher["fid"]
    se = ratio * math.sqrt((se_b / fids.mean()) ** 2 + (se_t / teacher["fid"]) ** 2)
    if ratio - 2 * se > BAND:
        verdict = "not met"  # above the band by more than two standard errors
    elif BAND - 1 < 2 * se:
        verdict = "unresolved"  # the band is narrower than two standard errors
    else:
        verdict = "met" if ratio <= BAND else "not met"
    return {"k": k, "row": name, "fid": float(fids.mean()), "se_fid": se_b,
            "teacher_fid": teacher["fid"], "se_teacher": se_t, "ratio": float(ratio),
            "se_ratio": se, "verdict": verdict}


def below_check(rows: dict) -> dict:
    """Target (b) at the smallest K: the best new row's per-seed ratios to both baselines."""
    k = min(next(iter(rows.values())))
    new = [n for n in rows if n not in BASELINES and k in rows[n]]
    if not new:
        return {}
    name = min(new, key=lambda n: np.mean(rows[n][k]["fid"]))
    ratios = {f"{key}/{base}": float(per_seed(rows[name][k][key], rows[base][k][key]).mean())
              for key in ("fid", "rmse") for base in BASELINES}
    return {"k": k, "row": name, "ratios": ratios,
            "verdict": "met" if max(ratios.values()) <= TARGET_BELOW else "not met"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=["default", "curved"], default="default")
    parser.add_argument("--params", default=str(ROOT / "params.yaml"), help="the base params")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="straighten seeds (straighten.seed)")
    parser.add_argument("--nfes", type=int, nargs="+", default=[2], help="the K")
    parser.add_argument("--rollouts", nargs="+", default=["endpoint,step"],
                        metavar="TARGET,BACKPROP", help=f"boss_rollout variants, of {ROLLOUTS}")
    parser.add_argument("--skip", nargs="*", default=[],
                        choices=["boss_rollout", "boss_student", "learned_times"],
                        help="rows to leave out (to fit a time budget)")
    parser.add_argument("--equal-calls", action="store_true",
                        help="retrain boss and distill_uniform at the calls of costlier rows")
    parser.add_argument("--equal-rows", nargs="+", metavar="ROW",
                        help="only these rows get the equal-calls comparison (default: all)")
    parser.add_argument("--resume", type=Path, metavar="JSON",
                        help="take the rows from an earlier --json of this profile and seeds "
                             "(skips their sweeps; e.g. to run --equal-calls alone)")
    parser.add_argument("--cache", type=Path, help="teacher / classifier cache "
                        "(default /tmp/boss_bench_cache/<profile>)")
    parser.add_argument("--json", type=Path, help="write every number to this file")
    parser.add_argument("--extra-rows", nargs="*", default=[], metavar="ROW",
                        help="registry rows to run too, at each straighten seed (e.g. "
                             "learned_times_ft, with params.yaml's methods options); with "
                             "--resume they are added to the earlier rows")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--device", default="cpu", help="run.device: cpu, cuda, cuda:<i>")
    parser.add_argument("--quick", action="store_true", help="a smoke run, tiny settings")
    args = parser.parse_args(argv)
    bad = [v for v in args.rollouts if v not in ROLLOUTS]
    if bad:
        parser.error(f"--rollouts: unknown {bad}; known {list(ROLLOUTS)}")
    torch.set_num_threads(args.threads)
    overrides = profile_overrides(args.profile, args.quick, args.device)
    params = load_params(args.params, overrides)  # checks every value before compute
    nfes = tuple(args.nfes)
    s, t = params.sweep, params.straighten
    sweep = replace(s, nfes=nfes, methods=("teacher", *BASELINES)
                    + (() if "boss_student" in args.skip else ("boss_student",)))
    hw = hardware()
    print(f"hardware: {hw}")
    print(f"profile {args.profile}{' (QUICK smoke run)' if args.quick else ''}: {args.params} "
          f"+ {overrides}")
    print(f"model {params.model.arch} num_classes={params.model.num_classes}; teacher path "
          f"{params.teacher.path}, {params.teacher.iterations} it, label_dropout "
          f"{params.teacher.label_dropout}; sweep N={s.n_steps}, K={nfes}, guidance "
          f"{s.guidance}, {s.n_seeds} noise seeds x {s.eval_samples} samples, pairs "
          f"{s.pair_samples}, search {s.search_samples}; straighten {t.iterations} it x batch "
          f"{t.batch_size}, lr {t.lr}; seeds {args.seeds}; rollouts {args.rollouts}; "
          f"methods options {params.methods.to_dict()}", flush=True)

    cache = args.cache or Path("/tmp/boss_bench_cache") / args.profile
    cache.mkdir(parents=True, exist_ok=True)
    data = load_digits_images()  # x (1797, 1, 8, 8) in [-1, 1], y (1797,)
    started = time.perf_counter()
    teacher = cached_teacher(params, data, cache)
    net = cached_features(params, data, cache)
    extractor = build_extractor(params.fidelity, net)
    reference = extractor.reference(data.x)
    conditional = params.model.num_classes is not None

    def score(features):
        out = fid_kid_features(features, reference, params.fidelity)
        return {"fid": out["fid"], "kid": out["kid"]}

    def classify(features):
        return predict_from_features(net, features)

    def sweep_of(config, train, options=None):
        return run_sweep(teacher, data.data_shape, score, config, train, options=options,
                         progress=False, min_eval_samples=params.fidelity.kid_subset_size,
                         featurize=extractor.features,
                         num_classes=params.model.num_classes if conditional else None,
                         label_dropout=params.teacher.label_dropout if conditional else None,
                         classify=classify if conditional else None)

    out = {"hardware": hw, "profile": args.profile, "quick": args.quick,
           "overrides": overrides, "argv": sys.argv[1:], "rows": {}, "equal_calls": {}}

    def save():
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(out, indent=1, default=str))

    rows: dict = {}
    teacher_row = None
    if args.resume:
        earlier = json.loads(args.resume.read_text())
        if earlier["profile"] != args.profile or earlier["quick"] != args.quick:
            parser.error(f"--resume: {args.resume} is profile {earlier['profile']} "
                         f"(quick {earlier['quick']})")
        rows = {name: {int(k): r for k, r in by_k.items()}
                for name, by_k in earlier["rows"].items()}
        teacher_row = out["teacher"] = earlier["teacher"]
        print(f"rows from {args.resume}: {list(rows)}", flush=True)
    for seed in [] if args.resume else args.seeds:
        train = replace(t, seed=seed)
        for variant in [None] + ([] if "boss_rollout" in args.skip else args.rollouts):
            if variant is None:
                config, options = sweep, params.methods
            else:
                target, backprop = variant.split(",")
                config = replace(sweep, methods=("teacher", "boss_rollout"))
                options = MethodOptions({**params.methods.to_dict(), "boss_rollout": {
                    "target": target, "backprop": backprop}})
            t0 = time.perf_counter()
            metrics, costs, _ = sweep_of(config, train, options)
            for method in config.methods:
                if method != "teacher":
                    name = f"boss_rollout[{variant}]" if variant else method
                    record(rows, name, metrics, costs, method, nfes, train)
            teacher_row = metrics["teacher"][f"nfe_{s.n_steps}"]
            print(f"seed {seed} {variant or 'baselines + boss_student'}: "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)
            out["rows"], out["teacher"] = rows, teacher_row
            save()
    for row in args.extra_rows:  # each straighten seed, also after --resume
        if row in rows:
            continue
        for seed in args.seeds:
            train, t0 = replace(t, seed=seed), time.perf_counter()
            config = replace(sweep, methods=("teacher", row))
            metrics, costs, _ = sweep_of(config, train, params.methods)
            record(rows, row, metrics, costs, row, nfes, train)
            teacher_row = metrics["teacher"][f"nfe_{s.n_steps}"]
            print(f"seed {seed} {row}: {time.perf_counter() - t0:.0f} s", flush=True)
            out["rows"], out["teacher"] = rows, teacher_row
            save()
    if "learned_times" not in args.skip and "learned_times" not in rows:  # no straighten seed
        t0 = time.perf_counter()
        metrics, costs, _ = sweep_of(replace(sweep, methods=("teacher", "learned_times")), t,
                                     params.methods)
        record(rows, "learned_times", metrics, costs, "learned_times", nfes, t)
        print(f"learned_times: {time.perf_counter() - t0:.0f} s", flush=True)
    out["rows"] = rows
    save()

    print(f"\n== {args.profile}: teacher ({s.n_steps} steps) FID "
          f"{teacher_row['fid']:.4f} ± {teacher_row['fid_std']:.4f} (std over {s.n_seeds} "
          f"noise seeds); rows over straighten seeds {args.seeds}, ratios per seed")
    print(results_table(rows))
    band = band_check(rows, teacher_row, s.n_seeds)
    below = below_check(rows)
    out["targets"] = {"band": band, "below": below}
    print(f"target 1.1x: best K={band['k']} row {band['row']} FID {band['fid']:.4f} "
          f"(se {band['se_fid']:.4f}) / teacher {band['teacher_fid']:.4f} (se "
          f"{band['se_teacher']:.4f}) = {band['ratio']:.2f} ± {band['se_ratio']:.2f} (se); "
          f"band 0.1 vs 2 se {2 * band['se_ratio']:.2f}: {band['verdict']}")
    if below:
        ratios = ", ".join(f"{k} {v:.3f}" for k, v in below["ratios"].items())
        print(f"target 15% below: winner at K={below['k']} {below['row']}: {ratios}: "
              f"{below['verdict']}")
    save()
    if args.equal_calls:
        equal_calls(rows, sweep, t, args.seeds, sweep_of, out, save, args.equal_rows)
    print(f"total wall time {time.perf_counter() - started:.0f} s")
    save()
    return 0


def equal_calls(rows, sweep, t, seeds, sweep_of, out, save, only=None) -> None:
    """boss and distill_uniform straightened again at each costlier row's calls (per K);
    ``only``: the rows to do it for (None: every trained row)."""
    print("\n== equal calls: boss and distill_uniform retrained with the row's training calls")
    lines = ["| row | K | calls / boss | steps | boss FID | distill FID | FID / boss | "
             "FID / distill | RMSE / boss | RMSE / distill |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    done: dict = {}
    for name, by_k in rows.items():
        if name in BASELINES or name == "learned_times" or (only and name not in only):
            continue
        for k, r in by_k.items():
            ratio = np.mean(r["calls"]) / np.mean(rows["boss"][k]["calls"])
            if ratio <= 1.1:
                print(f"{name} K={k}: {ratio:.2f}x boss's calls, within 10%: the table stands")
                continue
            iterations = int(round(t.iterations * ratio))
            if (k, iterations) not in done:
                base: dict = {}
                for seed in seeds:
                    t0 = time.perf_counter()
                    metrics, _, _ = sweep_of(
                        replace(sweep, nfes=(k,), methods=("teacher", *BASELINES)),
                        replace(t, iterations=iterations, seed=seed))
                    for m in BASELINES:
                        cell = base.setdefault(m, {"fid": [], "rmse": []})
                        cell["fid"].append(metrics[m][f"nfe_{k}"]["fid"])
                        cell["rmse"].append(metrics[m][f"nfe_{k}"]["endpoint_rmse"])
                    print(f"  K={k} {iterations} steps seed {seed}: "
                          f"{time.perf_counter() - t0:.0f} s", flush=True)
                done[(k, iterations)] = base
                out["equal_calls"][f"{k}_{iterations}"] = base
                save()
            base = done[(k, iterations)]
            b, d = base["boss"], base["distill_uniform"]
            lines.append(
                f"| {name} | {k} | {ratio:.2f} | {iterations} | {pm(b['fid'], 4)} | "
                f"{pm(d['fid'], 4)} | {pm(per_seed(r['fid'], b['fid']))} | "
                f"{pm(per_seed(r['fid'], d['fid']))} | {pm(per_seed(r['rmse'], b['rmse']))} | "
                f"{pm(per_seed(r['rmse'], d['rmse']))} |")
    print("\n".join(lines))
    out["equal_calls_table"] = lines


if __name__ == "__main__":
    sys.exit(main())
