"""Figures and plot tables for the pipeline (matplotlib Agg; no MLflow or Prefect here).

Every plotting function returns a ``matplotlib.figure.Figure`` and, when ``path`` is given, also
writes it as a PNG atomically (``tasks.runtime.io.atomic_path``: a temporary in the same folder,
then
``os.replace``).
Figures are built with ``Figure()`` directly, not ``pyplot``, so nothing is registered in pyplot's
global figure list: there is nothing to close, and the functions are safe to call from threads.

Metrics format used below: ``{method: {"nfe_K": {"fid": float, "fid_std": float, ...}}}``; the
method ``"teacher"`` has one row at its fine-grid size N (e.g. ``"nfe_100"``).
"""
from __future__ import annotations

import csv
import os
from collections.abc import Iterator
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

TEACHER = "teacher"
DPI = 110


def _atomic(path: str | os.PathLike, suffix: str, write) -> Path:
    """Run ``write(tmp)`` then move tmp onto ``path``; on error drop tmp and keep the old file."""
    from .io import atomic_path

    path = Path(path)
    with atomic_path(path, suffix) as tmp:
        write(tmp)
    return path


def save_figure(fig: Figure, path: str | os.PathLike | None) -> Figure:
    """Write ``fig`` as a PNG to ``path`` atomically (no-op when ``path`` is None); return it."""
    if path is not None:
        _atomic(path, ".png", lambda tmp: fig.savefig(tmp, format="png", dpi=DPI))
    return fig


def write_csv_atomic(rows: list[dict], path: str | os.PathLike,
                     header: list[str] | None = None) -> Path:
    """Write ``rows`` as a CSV atomically (a temporary beside ``path``, then ``os.replace``).

    The header is ``header`` followed by the first row's keys and any keys first seen in later
    rows (missing cells are left empty), so a teacher row without e.g. ``kid`` does not break
    the file. With no rows, ``header`` alone is written (a plot line with no points: DVC's
    plot definitions name a file for every registered method, selected or not).
    """
    if not rows and not header:
        raise ValueError("write_csv_atomic: no rows and no header to write")
    fields = list(dict.fromkeys([*(header or []), *(k for row in rows for k in row)]))

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)

    return _atomic(path, "", write)


def _nfe(key: str) -> int:
    """``"nfe_8"`` -> 8."""
    return int(key.split("_", 1)[1])


def _iter_rows(metrics: dict) -> Iterator[tuple[str, int, dict]]:
    """Yield ``(method, K, row)`` sorted by method then K."""
    for method in sorted(metrics):
        for key in sorted(metrics[method], key=_nfe):
            yield method, _nfe(key), metrics[method][key]


def _is_number(v) -> bool:
    return isinstance(v, (int, float, np.number)) and not isinstance(v, bool)


def metrics_long_rows(metrics: dict) -> list[dict]:
    """Long-format rows ``{"method", "nfe", <every numeric key of the row>}`` for each method and K.

    Sorted by method then nfe; the teacher row is included with ``nfe`` = its N.
    """
    return [
        {"method": m, "nfe": k, **{name: v for name, v in row.items() if _is_number(v)}}
        for m, k, row in _iter_rows(metrics)
    ]


def _new_axes(figsize=(6, 4)):
    fig = Figure(figsize=figsize, dpi=DPI)
    return fig, fig.add_subplot()


def fid_vs_nfe(metrics: dict, key: str = "fid", path=None) -> Figure:
    """Metric ``key`` (mean +- ``<key>_std`` over seeds) against the number of steps K, per method.

    ``key`` is one of "fid", "kid", "swd", "mmd" (2-D data use swd/mmd). The teacher's single row
    is drawn as a horizontal dashed line labelled "teacher (N=<N> steps)" (with its std band).
    The y axis is log-scale when every plotted mean is positive; x ticks sit at the K values.
    """
    fig, ax = _new_axes()
    ks, means = set(), []
    for method in sorted(metrics):
        rows = [(k, r) for m, k, r in _iter_rows({method: metrics[method]}) if key in r]
        if not rows:
            continue
        x = np.array([k for k, _ in rows])
        y = np.array([float(r[key]) for _, r in rows])
        err = np.array([float(r.get(f"{key}_std", 0.0)) for _, r in rows])
        means.extend(y.tolist())
        if method == TEACHER:
            k, m, s = x[-1], y[-1], err[-1]
            ax.axhline(m, ls="--", color="k", lw=1, label=f"teacher (N={k} steps)")
            if s > 0:
                ax.axhspan(m - s, m + s, color="k", alpha=0.08, lw=0)
        else:
            ks.update(x.tolist())
            ax.errorbar(x, y, yerr=err, marker="o", ms=4, capsize=3, label=method)
    if means and min(means) > 0:
        ax.set_yscale("log")
    if ks:
        ax.set_xticks(sorted(ks))
    ax.set_xlabel("NFE (Euler steps K)")
    ax.set_ylabel(key.upper())
    ax.set_title(f"{key.upper()} vs NFE")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def endpoint_vs_nfe(metrics: dict, path=None) -> Figure:
    """Endpoint RMSE to the teacher's endpoint against K, per method (teacher skipped: it is 0)."""
    fig, ax = _new_axes()
    ks, ys = set(), []
    for method in sorted(metrics):
        if method == TEACHER:
            continue
        rows = [(k, r) for _, k, r in _iter_rows({method: metrics[method]}) if "endpoint_rmse" in r]
        if not rows:
            continue
        x = [k for k, _ in rows]
        y = [float(r["endpoint_rmse"]) for _, r in rows]
        ks.update(x)
        ys.extend(y)
        ax.plot(x, y, marker="o", ms=4, label=method)
    if ys and min(ys) > 0:
        ax.set_yscale("log")
    if ks:
        ax.set_xticks(sorted(ks))
    ax.set_xlabel("NFE (Euler steps K)")
    ax.set_ylabel("endpoint RMSE vs teacher")
    ax.set_title("Endpoint error vs NFE")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def schedule_cells(indices) -> list[tuple[int, int]]:
    """Grid-index schedule ``[i_0, ..., i_K]`` -> the K (from, to) cells ``(i_k, i_{k+1})``."""
    idx = [int(i) for i in indices]
    return list(zip(idx[:-1], idx[1:], strict=False))


def cost_heatmap(cost: np.ndarray, schedules: dict, times: np.ndarray | None = None,
                 path=None) -> Figure:
    """Heatmap of log10 c(i, j) (row i = from, column j = to) with the chosen schedules on top.

    ``cost`` is (N+1, N+1); only the strict upper triangle j > i is used. Non-positive and
    non-finite entries are masked too (c(i, i+1) = 0 exactly, whose log is -inf).
    ``schedules`` maps K -> grid indices ``[0, ..., N]``; each is drawn as the path of its step
    cells ``(i_k, i_{k+1})`` (x = to, y = from). ``times`` (N+1,) optionally labels the axes in t.
    """
    cost = np.asarray(cost, dtype=float)
    n1 = cost.shape[0]
    upper = np.triu(np.ones_like(cost, dtype=bool), k=1)
    valid = upper & np.isfinite(cost) & (cost > 0)
    logc = np.ma.masked_array(np.log10(np.where(valid, cost, 1.0)), mask=~valid)

    fig, ax = _new_axes((6, 5))
    im = ax.imshow(logc, origin="upper", cmap="viridis", interpolation="nearest")
    fig.colorbar(im, ax=ax, label="log10 cost c(i, j)")
    colors = matplotlib.colormaps["tab10"]
    for n, k in enumerate(sorted(schedules)):
        cells = schedule_cells(schedules[k])
        ax.plot([j for _, j in cells], [i for i, _ in cells], "-o", ms=3, lw=1,
                color=colors(n % 10), label=f"K={k}")
    if times is not None:
        ticks = np.unique(np.linspace(0, n1 - 1, 6).round().astype(int))
        labels = [f"{float(times[t]):.2f}" for t in ticks]
        ax.set_xticks(ticks, labels)
        ax.set_yticks(ticks, labels)
        ax.set_xlabel("to: t_j")
        ax.set_ylabel("from: t_i")
    else:
        ax.set_xlabel("to: grid index j")
        ax.set_ylabel("from: grid index i")
    ax.set_xlim(-0.5, n1 - 0.5)
    ax.set_ylim(n1 - 0.5, -0.5)
    ax.set_title("Jump cost and Bellman schedules")
    if schedules:
        ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    return save_figure(fig, path)


def step_sizes(schedules: dict, path=None) -> Figure:
    """Where the steps fall and how large they are, for each K.

    ``schedules`` maps K -> K+1 increasing times in [0, 1] (0 = noise, 1 = data). Left: a timeline
    per K with a tick at every t_k. Right: step size t_{k+1} - t_k against the step's midpoint
    time, with the uniform size 1/K dotted for reference.
    """
    fig = Figure(figsize=(10, 4), dpi=DPI)
    ax_t, ax_s = fig.subplots(1, 2)
    colors = matplotlib.colormaps["tab10"]
    ks = sorted(schedules)
    for n, k in enumerate(ks):
        t = np.asarray(schedules[k], dtype=float)
        c = colors(n % 10)
        ax_t.hlines(n, 0, 1, color="0.8", lw=1)
        ax_t.plot(t, np.full_like(t, n), "|", ms=12, mew=2, color=c)
        ax_s.plot((t[:-1] + t[1:]) / 2, np.diff(t), "-o", ms=4, color=c, label=f"K={k}")
        ax_s.axhline(1.0 / k, ls=":", lw=0.8, color=c)
    ax_t.set_yticks(range(len(ks)), [f"K={k}" for k in ks])
    ax_t.set_xlim(-0.02, 1.02)
    ax_t.set_ylim(-0.7, max(len(ks), 1) - 0.3)
    ax_t.set_xlabel("t (0 = noise, 1 = data)")
    ax_t.set_title("Schedule timeline")
    ax_s.set_xlabel("step midpoint t")
    ax_s.set_ylabel("step size t_{k+1} - t_k")
    ax_s.set_title("Step sizes (dotted: uniform 1/K)")
    ax_s.grid(alpha=0.3)
    if ks:
        ax_s.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def step_sizes_table(schedules_by_method: dict) -> list[dict]:
    """Long rows ``{"method", "nfe", "step", "t_start", "t_end", "step_size"}``, one per step.

    ``schedules_by_method`` maps method -> {K: K+1 times}. Sorted by method, K, step.
    """
    rows = []
    for method in sorted(schedules_by_method):
        for k in sorted(schedules_by_method[method]):
            t = [float(x) for x in schedules_by_method[method][k]]
            rows.extend(
                {"method": method, "nfe": int(k), "step": s, "t_start": a, "t_end": b,
                 "step_size": b - a}
                for s, (a, b) in enumerate(zip(t[:-1], t[1:], strict=False))
            )
    return rows


def _to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch here
        x = x.detach().float().cpu().numpy()
    return np.asarray(x)


def _tile(images: np.ndarray, nrow: int, pad: int = 2) -> np.ndarray:
    """(S, C, H, W) in [0, 1] -> one (H', W', C) image, ``nrow`` tiles per row, white padding."""
    s, c, h, w = images.shape
    cols = max(1, min(nrow, s))
    rows = -(-s // cols)
    grid = np.ones((rows * (h + pad) + pad, cols * (w + pad) + pad, c))
    for n, img in enumerate(images):
        r, q = divmod(n, cols)
        y, x = pad + r * (h + pad), pad + q * (w + pad)
        grid[y:y + h, x:x + w] = img.transpose(1, 2, 0)
    return grid


def sample_grid(samples, path=None, nrow: int = 8, title: str | None = None) -> Figure:
    """Image grid of samples (S, C, H, W) in [-1, 1] (C = 1 grey, C = 3 RGB), ``nrow`` per row.

    2-D data, samples (S, 2), are drawn as a scatter plot instead. Accepts numpy or torch.
    """
    x = _to_numpy(samples).astype(float)
    if x.ndim == 2 and x.shape[1] == 2:
        fig, ax = _new_axes((5, 5))
        ax.scatter(x[:, 0], x[:, 1], s=3, alpha=0.5, lw=0)
        ax.set_aspect("equal", adjustable="datalim")
        ax.grid(alpha=0.3)
    elif x.ndim == 4 and x.shape[1] in (1, 3):
        grid = _tile(np.clip((x + 1) / 2, 0, 1), nrow)
        h, w = grid.shape[:2]
        scale = 8 / max(h, w)
        fig, ax = _new_axes((max(2.0, w * scale), max(2.0, h * scale + (0.4 if title else 0))))
        if grid.shape[2] == 1:
            ax.imshow(grid[..., 0], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        else:
            ax.imshow(grid, interpolation="nearest")
        ax.axis("off")
    else:
        raise ValueError(f"sample_grid: expected (S, C, H, W) with C in (1, 3) or (S, 2), "
                         f"got {x.shape}")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return save_figure(fig, path)


def loss_curves(curves: dict, path=None, title: str | None = None) -> Figure:
    """Loss against step, one line per name; ``curves[name]`` is an (S, 2) array of (step, loss).

    Log-scale y when every loss is positive.
    """
    fig, ax = _new_axes()
    losses = []
    for name in sorted(curves):
        arr = np.asarray(curves[name], dtype=float).reshape(-1, 2)
        if len(arr) == 0:
            continue
        losses.extend(arr[:, 1].tolist())
        ax.plot(arr[:, 0], arr[:, 1], lw=1, label=name)
    if losses and min(losses) > 0:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title or "Training loss")
    ax.grid(alpha=0.3)
    if losses:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)
