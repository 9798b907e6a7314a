"""A finished flow run's outcome as Prefect artifacts, so the UI shows it beside the run.

Two artifacts per run, keyed by the MLflow experiment (``run.experiment``), so the UI's
Artifacts page keeps one series per experiment with every run's version:

- ``<experiment>-results`` (table): one row per method and NFE from results/metrics.json
  (method order, then NFE): FID (SWD for 2-D data) with its std over seeds, and the end-point
  RMSE against the N-step teacher;
- ``<experiment>-fid-vs-nfe`` (markdown; ``-swd-vs-nfe`` for 2-D data): the report's figure
  results/figures/<fid|swd>_vs_nfe.png embedded as a base64 data URI (no file server needed).

Keys hold only lowercase letters, digits and dashes (Prefect's rule).
"""

from __future__ import annotations

import base64
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flows.runs import RunPlan
from tasks.runtime.io import read_json

log = logging.getLogger("boss")


def artifact_key(experiment: str, what: str) -> str:
    """``<experiment>-<what>`` in lowercase letters, digits and dashes."""
    slug = re.sub(r"[^a-z0-9]+", "-", f"{experiment}-{what}".lower()).strip("-")
    return slug or "boss"


def score_name(metrics: Mapping[str, Any]) -> str:
    """"fid" for images, "swd" for 2-D sets (the report's figure is named after it)."""
    rows = [row for table in metrics.values() for row in table.values()]
    return "fid" if any("fid" in row for row in rows) else "swd"


def results_table(metrics: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> list[dict]:
    """``[{method, nfe, <score>, <score>_std, endpoint_rmse}]`` in metrics.json's method order,
    then by NFE; a column a row lacks is None."""
    score = score_name(metrics)
    columns = (score, f"{score}_std", "endpoint_rmse")
    rows = []
    for method, table in metrics.items():
        for key in sorted(table, key=lambda k: int(k.split("_")[1])):  # "nfe_K"
            row = table[key]
            rows.append({"method": method, "nfe": int(key.split("_")[1]),
                         **{c: row.get(c) for c in columns}})
    return rows


def figure_markdown(png: Path, title: str, caption: str) -> str:
    data = base64.b64encode(png.read_bytes()).decode("ascii")
    return f"## {title}\n\n![{title}](data:image/png;base64,{data})\n\n{caption}\n"


def publish_results(plan: RunPlan) -> dict[str, str]:
    """Create the run's artifacts (inside its flow run); returns {what: key} of those made.

    A missing figure or an API error is logged, not raised: the run's results are already on
    disk and in MLflow.
    """
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    experiment = plan.params.run.experiment
    metrics = read_json(plan.ws.results / "metrics.json")
    score = score_name(metrics)
    label = score.upper()
    seeds = plan.params.sweep.n_seeds
    made: dict[str, str] = {}
    key = artifact_key(experiment, "results")
    try:
        create_table_artifact(
            results_table(metrics), key=key,
            description=(f"{plan.name}: {label} (mean and std over {seeds} seeds) and end-point "
                         f"RMSE against the N-step teacher, per method and NFE; "
                         f"{plan.run_dir}/results/metrics.json"))
        made["results"] = key
    except Exception as err:  # noqa: BLE001 - bookkeeping after the run: never fail it
        log.warning("could not publish the results table %s: %s", key, err)
    png = plan.ws.results / "figures" / f"{score}_vs_nfe.png"
    key = artifact_key(experiment, f"{score}-vs-nfe")
    if not png.is_file():
        log.warning("no figure to publish: %s is missing", png)
        return made
    try:
        create_markdown_artifact(
            figure_markdown(png, f"{label} against NFE",
                            f"Run `{plan.name}`, mean over {seeds} seeds; `{png}`."),
            key=key, description=f"{plan.name}: {label} against NFE per method")
        made["figure"] = key
    except Exception as err:  # noqa: BLE001
        log.warning("could not publish the figure %s: %s", key, err)
    return made
