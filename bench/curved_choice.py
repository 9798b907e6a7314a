"""Choose the curved profile's path and guidance weight by the 100-step teacher's FID.

On the embedded digits (``boss_core.data.load_digits_images``, the bytes the pipeline's data
stage writes), with params.yaml's model / teacher / features / fidelity / sweep settings read
through ``tasks.runtime.params.load_params`` (so the numbers are the pipeline's), it trains

- one class-conditional teacher per interpolation path (``model.num_classes: 10``,
  ``teacher.label_dropout``, default 0.1: each step drops a tenth of the labels to the
  "no label" token C, which trains the unconditional mode guidance mixes in while 90% of the
  steps still train the conditional one; Ho & Salimans (2022) found 0.1 to 0.2 best),
- the FID feature classifier, as the features stage does (``train_feature_net``),

then, for each guidance weight w, samples the N-step (``sweep.n_steps`` = 100) uniform Euler
teacher with classifier-free guidance

    v_w(x, t, y) = v(x, t, C) + w (v(x, t, y) - v(x, t, C))

at the class-balanced labels y_i = i mod 10, over the pipeline's evaluation seeds and sample
counts (``sweep.n_seeds`` x ``sweep.eval_samples``), and scores them with the evaluate step's
own code: ``boss_core.shards.sample_shard`` (features extracted per seed) and
``boss_core.protocol.score_rows`` (FID / KID in the classifier's features, and
``class_accuracy``: the share of samples the classifier puts in the class they were drawn at).
Each teacher is trained once and reused for every w.

The rule (fixed before any schedule is looked at): among the non-linear paths (cosine, vp)
and w in [1, 4], take the lowest mean FID; every row within one std (over seeds) of it ties,
and the tie goes to the smaller w (then the lower FID). The linear rows are the reference.

Usage (the run behind params.curved.yaml; paths in separate processes run side by side):
    OMP_NUM_THREADS=1 .venv/bin/python bench/curved_choice.py --paths cosine --json /tmp/c.json
    OMP_NUM_THREADS=1 .venv/bin/python bench/curved_choice.py --paths vp --json /tmp/v.json
    OMP_NUM_THREADS=1 .venv/bin/python bench/curved_choice.py --paths linear --json /tmp/l.json
    .venv/bin/python bench/curved_choice.py --merge /tmp/c.json /tmp/v.json /tmp/l.json
or all paths in one process (no --paths). ``--quick``: a smoke run of a minute or two.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import hardware  # noqa: E402
from boss_core.data import load_digits_images  # noqa: E402
from boss_core.features import predict_from_features, train_feature_net  # noqa: E402
from boss_core.fidelity import build_extractor, fid_kid_features  # noqa: E402
from boss_core.grids import uniform_grid  # noqa: E402
from boss_core.guidance import Conditioning  # noqa: E402
from boss_core.models import build_model  # noqa: E402
from boss_core.protocol import evaluation_seeds, score_rows  # noqa: E402
from boss_core.shards import sample_shard  # noqa: E402
from boss_core.teacher import train_teacher  # noqa: E402
from tasks.runtime.params import load_params  # noqa: E402

PATHS = ("cosine", "vp", "linear")  # the non-linear candidates first, linear the reference
NON_LINEAR = ("cosine", "vp")
WEIGHTS = (1.0, 1.5, 2.0, 2.5, 3.0, 4.0)
NUM_CLASSES = 10
# --quick: every stage runs, nothing is meaningful (a smoke test of the script)
QUICK = {"teacher.iterations": 60, "teacher.log_every": 20, "features.iterations": 60,
         "sweep.n_steps": 10, "sweep.eval_samples": 200, "sweep.n_seeds": 2,
         "sweep.batch_size": 200, "fidelity.kid_subset_size": 100}


def parse_floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def choose(rows: list[dict]) -> dict | None:
    """The rule: among non-linear rows with 1 <= w <= 4, the lowest FID; rows whose FID is
    within that row's std of it tie, and the tie goes to the smaller w, then the lower FID."""
    candidates = [r for r in rows if r["path"] in NON_LINEAR and 1.0 <= r["w"] <= 4.0]
    if not candidates:
        return None
    best = min(candidates, key=lambda r: r["fid"])
    tied = [r for r in candidates if r["fid"] <= best["fid"] + best["fid_std"]]
    return min(tied, key=lambda r: (r["w"], r["fid"]))


def table(rows: list[dict]) -> str:
    """A markdown table of the rows, in path then w order."""
    order = {p: i for i, p in enumerate(PATHS)}
    lines = ["| path | w | FID (N steps) | KID | class accuracy | sampling s |",
             "|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (order.get(r["path"], 9), r["w"])):
        lines.append(f"| {r['path']} | {r['w']:g} | {r['fid']:.4f} ± {r['fid_std']:.4f} | "
                     f"{r['kid']:.5f} | {r['class_accuracy']:.3f} ± "
                     f"{r['class_accuracy_std']:.3f} | {r['sample_s']:.0f} |")
    return "\n".join(lines)


def report(rows: list[dict], teachers: dict) -> None:
    for path, info in teachers.items():
        print(f"teacher {path}: {info['iterations']} it, final loss {info['final_loss']:.4f}, "
              f"{info['train_s']:.0f} s")
    print(table(rows))
    pick = choose(rows)
    if pick is None:
        print("choice: none (no cosine / vp rows with w in [1, 4])")
        return
    print(f"choice: teacher.path={pick['path']} sweep.guidance={pick['w']:g} "
          f"(FID {pick['fid']:.4f} ± {pick['fid_std']:.4f}; lowest FID among non-linear paths "
          f"and w in [1, 4], ties within one std to the smaller w)")


def evaluate_teacher(teacher, extractor, reference, classify, params, weights, data_shape,
                     path: str) -> list[dict]:
    """One row per w: the evaluate step's reference row of the guided teacher."""
    s, f = params.sweep, params.fidelity
    grid = uniform_grid(s.n_steps)
    rows = []
    for w in tqdm(weights, desc=f"{path}: guidance weights"):
        cond = Conditioning(NUM_CLASSES, w)
        velocity = cond.teacher(teacher)  # guided: 2 network calls per step (w != 1)
        started = time.perf_counter()
        drawn = sample_shard({}, velocity, data_shape, evaluation_seeds(s), s.n_steps, 0,
                             s.eval_samples, s.batch_size, device="cpu",
                             featurize=extractor.features, progress=True,
                             num_classes=NUM_CLASSES)

        def score(features):
            out = fid_kid_features(features, reference, f)
            return {"fid": out["fid"], "kid": out["kid"]}

        metrics = score_rows({"teacher": {s.n_steps: (velocity, grid)}}, drawn, score, s,
                             cond=cond, classify=classify)
        m = metrics["teacher"][f"nfe_{s.n_steps}"]
        rows.append({"path": path, "w": float(w), "fid": m["fid"], "fid_std": m["fid_std"],
                     "kid": m["kid"], "kid_std": m["kid_std"],
                     "class_accuracy": m["class_accuracy"],
                     "class_accuracy_std": m["class_accuracy_std"],
                     "n_samples": s.eval_samples, "n_seeds": s.n_seeds, "n_steps": s.n_steps,
                     "sample_s": time.perf_counter() - started})
        tqdm.write(f"{path} w={w:g}: FID {m['fid']:.4f} ± {m['fid_std']:.4f}, class accuracy "
                   f"{m['class_accuracy']:.3f}")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] + "\n\n" + "\n\n".join(
        __doc__.split("\n\n")[1:]), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default=str(ROOT / "params.yaml"), help="the base params")
    parser.add_argument("--paths", default=",".join(PATHS),
                        help=f"comma-separated teacher paths, of {list(PATHS)}")
    parser.add_argument("--weights", default=",".join(f"{w:g}" for w in WEIGHTS),
                        help="comma-separated guidance weights w")
    parser.add_argument("--label-dropout", type=float, default=0.1,
                        help="teacher.label_dropout of the conditional teachers")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: tiny training, 10 steps, 2 x 200 samples")
    parser.add_argument("--json", type=Path, help="write the rows and teachers to this file")
    parser.add_argument("--merge", type=Path, nargs="+", metavar="JSON",
                        help="print the table and the choice of earlier --json files; no compute")
    args = parser.parse_args(argv)

    if args.merge:
        rows, teachers, hw = [], {}, set()
        for file in args.merge:
            part = json.loads(file.read_text())
            rows += part["rows"]
            teachers.update(part["teachers"])
            hw.add(part["hardware"])
        print("hardware: " + " | ".join(sorted(hw)))
        report(rows, teachers)
        return 0

    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    unknown = [p for p in paths if p not in PATHS]
    if unknown:
        parser.error(f"--paths: unknown {unknown}; known {list(PATHS)}")
    weights = parse_floats(args.weights)
    overrides = {"model.num_classes": NUM_CLASSES, "teacher.label_dropout": args.label_dropout,
                 "run.device": "cpu", **(QUICK if args.quick else {})}
    params = load_params(args.params, overrides)  # checks every value before compute
    for w in weights:
        Conditioning(NUM_CLASSES, w)  # ValueError on a bad weight, before compute
    hw = hardware()
    print(f"hardware: {hw}")
    print(f"params: {args.params} + {overrides}")

    data = load_digits_images()  # x (1797, 1, 8, 8) in [-1, 1], y (1797,)
    started = time.perf_counter()
    feature = train_feature_net(data.x, data.y, params.features)
    print(f"feature classifier: held-out accuracy {feature.heldout_accuracy:.4f}, "
          f"{time.perf_counter() - started:.0f} s")
    extractor = build_extractor(params.fidelity, feature.net)
    reference = extractor.reference(data.x)

    def classify(features):
        return predict_from_features(feature.net, features)

    rows, teachers = [], {}
    for path in paths:
        model = build_model(params.model, data.data_shape, seed=params.teacher.seed)
        result = train_teacher(model, data.x, replace(params.teacher, path=path), labels=data.y)
        teacher = result.ema_model.eval()
        teachers[path] = {"iterations": result.step, "train_s": result.wall_time_s,
                          "final_loss": float(result.losses[-50:, 1].mean())}
        print(f"teacher {path}: trained in {result.wall_time_s:.0f} s")
        rows += evaluate_teacher(teacher, extractor, reference, classify, params, weights,
                                 data.data_shape, path)
        if args.json:  # after every path, so a long run leaves its finished rows
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"hardware": hw, "quick": args.quick,
                                             "overrides": overrides, "rows": rows,
                                             "teachers": teachers}, indent=1))
    print(f"\n{'QUICK (smoke) run: ' if args.quick else ''}the {params.sweep.n_steps}-step "
          f"Euler teacher, {params.sweep.n_seeds} seeds x {params.sweep.eval_samples} samples, "
          f"label dropout {args.label_dropout}")
    report(rows, teachers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
