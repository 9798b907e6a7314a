"""Step 9, report: plots and tables from the metrics, logged to MLflow and DVC.

    python -m tasks.report [--params params.yaml]

results/figures/: fid_vs_nfe.png (FID +- std per method), endpoint_vs_nfe.png, cost_matrix.png
(the cost matrix with the chosen Bellman paths), step_sizes.png, samples_<method>.png (one
row of digits per NFE) and straighten_loss.png. results/plots/*.csv: the same data in long
format for ``dvc plots``. results/metrics.md: the table.
"""

from __future__ import annotations

import sys

import numpy as np

from boss_core.methods import get, grid_search_names, row_names
from boss_core.protocol import metrics_frame

from .runtime import plots
from .runtime.artifacts import load_cost, load_schedules
from .runtime.io import load_tensors, read_json, write_text
from .runtime.step import StepContext, main, prefect_task

NAME, SECTIONS = ("report", ("sweep", "run"))
METHOD_COLUMNS = ["method", "nfe", "fid", "endpoint_rmse"]
STEP_COLUMNS = ["method", "nfe", "step", "t_start", "t_end", "step_size"]


def run(ctx: StepContext) -> dict:
    s, ws = ctx.params.sweep, ctx.ws
    metrics = read_json(ws.results / "metrics.json")
    figures, tables = ws.results / "figures", ws.results / "plots"
    key = "fid" if any("fid" in row for t in metrics.values() for row in t.values()) else "swd"
    plots.fid_vs_nfe(metrics, key, figures / f"{key}_vs_nfe.png")
    plots.endpoint_vs_nfe(metrics, figures / "endpoint_vs_nfe.png")
    rows = plots.metrics_long_rows(metrics)
    for method in row_names():  # one file per method: DVC plots draw one line per file
        plots.write_csv_atomic([r for r in rows if r["method"] == method],
                               tables / "methods" / f"{method}.csv", header=METHOD_COLUMNS)
    schedules = load_schedules(ws)
    cost, _ = load_cost(ws)
    searched = {k: list(sch.indices) for k, sch in schedules["bellman"].items()}
    plots.cost_heatmap(cost.values, searched, cost.times, figures / "cost_matrix.png")
    # step sizes of the searched schedules: BOSS's, and every selected method's own search
    shown = ["bellman"] + [m for m in s.methods if m != "bellman" and m in grid_search_names()]
    times = {name: {k: list(schedules[name][k].times) for k in s.nfes} for name in shown}
    plots.step_sizes(times["bellman"], figures / "step_sizes.png")
    steps = plots.step_sizes_table(times)
    for name in grid_search_names():  # every K of a schedule in one file (a scatter in DVC)
        plots.write_csv_atomic([r for r in steps if r["method"] == name],
                               tables / "steps" / f"{name}.csv", header=STEP_COLUMNS)
    samples, _ = load_tensors(ws.step("evaluate") / "samples.safetensors")
    for name, grid in samples.items():
        plots.sample_grid(grid, figures / "samples" / f"{name}.png", title=name)
    curves = {}
    for method in (m for m in s.methods if get(m).trained):
        shared = get(method).training.shared  # one student: its curve once
        for k in ([min(s.nfes)] if shared else s.nfes):
            path = ws.step("students") / method / f"nfe_{k}" / "losses.csv"
            if path.is_file():
                label = method if shared else f"{method} K={k}"
                curves[label] = np.loadtxt(path, delimiter=",", skiprows=1, ndmin=2)
    if curves:
        plots.loss_curves(curves, figures / "straighten_loss.png",
                          title="straightening loss")
    frame = metrics_frame(metrics)
    write_text(ws.results / "metrics.md", frame.to_markdown(index=False, floatfmt=".4g") + "\n")
    for target in (ctx.run_id, ctx.parent_id):
        ctx.client.log_artifacts(target, str(figures), "figures")
        ctx.client.log_artifact(target, str(ws.results / "metrics.md"))
        ctx.client.log_artifact(target, str(ws.results / "metrics.json"))
        ctx.client.log_artifact(target, str(ws.step("schedules") / "schedules.json"))
    return {"figures": len(list(figures.rglob("*.png")))}


task = prefect_task(NAME, run, SECTIONS)

if __name__ == "__main__":
    sys.exit(main(NAME, run, SECTIONS, __doc__))
