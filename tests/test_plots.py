import csv

import matplotlib.image as mpimg
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from tasks.runtime import plots

PNG_SIG = b"\x89PNG\r\n\x1a\n"

METRICS = {
    "bellman": {
        "nfe_4": {"fid": 30.0, "fid_std": 1.0, "kid": 0.02, "kid_std": 0.001,
                  "endpoint_rmse": 0.3, "n_samples": 500, "n_seeds": 2},
        "nfe_2": {"fid": 80.0, "fid_std": 2.5, "kid": 0.05, "kid_std": 0.002,
                  "endpoint_rmse": 0.6, "n_samples": 500, "n_seeds": 2},
    },
    "uniform": {
        "nfe_2": {"fid": 120.0, "fid_std": 3.0, "kid": 0.09, "kid_std": 0.003,
                  "endpoint_rmse": 0.9, "n_samples": 500, "n_seeds": 2},
        "nfe_4": {"fid": 50.0, "fid_std": 1.5, "kid": 0.04, "kid_std": 0.002,
                  "endpoint_rmse": 0.5, "n_samples": 500, "n_seeds": 2},
    },
    "teacher": {"nfe_100": {"fid": 10.0, "fid_std": 0.5, "endpoint_rmse": 0.0,
                            "n_samples": 500, "n_seeds": 2}},
}


def assert_png(path):
    assert path.read_bytes()[:8] == PNG_SIG
    img = mpimg.imread(path)
    assert img.ndim == 3 and img[..., :3].var() > 0
    assert not list(path.parent.glob("*.tmp*"))


def legend_labels(fig):
    return fig.axes[0].get_legend_handles_labels()[1]


def test_fid_vs_nfe(tmp_path):
    path = tmp_path / "sub" / "fid.png"
    fig = plots.fid_vs_nfe(METRICS, path=path)
    assert_png(path)
    ax = fig.axes[0]
    assert ax.get_yscale() == "log"
    assert list(ax.get_xticks()) == [2, 4]
    assert legend_labels(fig) == ["teacher (N=100 steps)", "bellman", "uniform"]
    teacher = next(ln for ln in ax.lines if ln.get_label() == "teacher (N=100 steps)")
    assert set(teacher.get_ydata()) == {10.0} and teacher.get_linestyle() == "--"
    data = {c.get_label(): c.lines[0] for c in ax.containers}
    assert list(data["bellman"].get_xdata()) == [2, 4]
    assert list(data["bellman"].get_ydata()) == [80.0, 30.0]
    assert plt.get_fignums() == []  # nothing registered with pyplot, so nothing leaks


def test_fid_vs_nfe_other_key_and_linear_scale():
    m = {"a": {"nfe_2": {"swd": -1.0, "swd_std": 0.1}, "nfe_3": {"swd": 2.0, "swd_std": 0.1}}}
    ax = plots.fid_vs_nfe(m, key="swd").axes[0]
    assert ax.get_yscale() == "linear"
    assert ax.get_ylabel() == "SWD"
    kid = plots.fid_vs_nfe(METRICS, key="kid").axes[0]
    assert "teacher (N=100 steps)" not in kid.get_legend_handles_labels()[1]  # teacher has no kid


def test_endpoint_vs_nfe_skips_teacher(tmp_path):
    path = tmp_path / "ep.png"
    fig = plots.endpoint_vs_nfe(METRICS, path=path)
    assert_png(path)
    assert legend_labels(fig) == ["bellman", "uniform"]
    line = fig.axes[0].lines[1]
    assert list(line.get_ydata()) == [0.9, 0.5]


def test_schedule_cells():
    assert plots.schedule_cells([0, 3, 7, 10]) == [(0, 3), (3, 7), (7, 10)]
    assert plots.schedule_cells(np.array([0, 10])) == [(0, 10)]


def test_cost_heatmap(tmp_path):
    n = 10
    i, j = np.meshgrid(np.arange(n + 1), np.arange(n + 1), indexing="ij")
    cost = np.where(j > i, (j - i - 1.0) ** 2 * 1e-3, np.nan)  # c(i, i+1) = 0
    schedules = {2: [0, 4, 10], 3: [0, 2, 6, 10]}
    path = tmp_path / "cost.png"
    fig = plots.cost_heatmap(cost, schedules, times=np.linspace(0, 1, n + 1), path=path)
    assert_png(path)
    ax = fig.axes[0]
    img = ax.images[0].get_array()
    assert img.mask[0, 0] and img.mask[5, 2] and img.mask[3, 4]  # diagonal, lower, log(0)
    assert not img.mask[0, 4] and img[0, 4] == pytest.approx(np.log10(cost[0, 4]))
    lines = {ln.get_label(): ln for ln in ax.lines}
    for k, idx in schedules.items():
        ln = lines[f"K={k}"]
        cells = list(zip(ln.get_ydata(), ln.get_xdata(), strict=True))  # (from=y, to=x)
        assert cells == plots.schedule_cells(idx)


SCHEDULES = {2: [0.0, 0.3, 1.0], 4: [0.0, 0.1, 0.25, 0.6, 1.0]}


def test_step_sizes_plot(tmp_path):
    path = tmp_path / "steps.png"
    fig = plots.step_sizes(SCHEDULES, path=path)
    assert_png(path)
    sizes = {ln.get_label(): ln.get_ydata() for ln in fig.axes[1].lines}
    np.testing.assert_allclose(sizes["K=4"], [0.1, 0.15, 0.35, 0.4])


def test_step_sizes_table():
    rows = plots.step_sizes_table({"bellman": SCHEDULES, "uniform": {3: [0, 1 / 3, 2 / 3, 1]}})
    groups = {}
    for r in rows:
        groups.setdefault((r["method"], r["nfe"]), []).append(r)
    assert sorted(groups) == [("bellman", 2), ("bellman", 4), ("uniform", 3)]
    for (_, k), g in groups.items():
        assert len(g) == k
        assert [r["step"] for r in g] == list(range(k))
        assert sum(r["step_size"] for r in g) == pytest.approx(1.0)
        assert g[0]["t_start"] == 0.0 and g[-1]["t_end"] == 1.0
        assert all(a["t_end"] == b["t_start"] for a, b in zip(g, g[1:], strict=False))
    assert groups[("bellman", 2)][0]["step_size"] == pytest.approx(0.3)


def test_metrics_long_rows_round_trip(tmp_path):
    rows = plots.metrics_long_rows(METRICS)
    assert [(r["method"], r["nfe"]) for r in rows] == [
        ("bellman", 2), ("bellman", 4), ("teacher", 100), ("uniform", 2), ("uniform", 4)]
    for r in rows:
        src = METRICS[r["method"]][f"nfe_{r['nfe']}"]
        assert {k: v for k, v in r.items() if k not in ("method", "nfe")} == src
    path = tmp_path / "plots" / "metrics.csv"
    plots.write_csv_atomic(rows, path)
    with open(path, newline="") as f:
        back = list(csv.DictReader(f))
    assert not list(path.parent.glob("*.tmp*"))
    assert len(back) == len(rows)
    for r, b in zip(rows, back, strict=True):
        for k, v in r.items():
            assert (b[k] == v) if isinstance(v, str) else float(b[k]) == v
    teacher = back[2]
    assert teacher["kid"] == ""  # key missing in the teacher row: empty cell, header still has it


def test_write_csv_atomic_keeps_old_file_on_error(tmp_path, monkeypatch):
    path = tmp_path / "t.csv"
    plots.write_csv_atomic([{"a": 1}], path)
    old = path.read_bytes()

    def boom(self, rows):
        raise RuntimeError("disk full")

    monkeypatch.setattr(csv.DictWriter, "writerows", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        plots.write_csv_atomic([{"a": 2}], path)
    assert path.read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.csv"]
    with pytest.raises(ValueError):
        plots.write_csv_atomic([], path)


def test_png_save_keeps_old_file_on_error(tmp_path, monkeypatch):
    path = tmp_path / "fid.png"
    plots.fid_vs_nfe(METRICS, path=path)
    old = path.read_bytes()

    def boom(self, fname, **kwargs):
        open(fname, "wb").write(b"partial")  # a half-written tmp file must be cleaned up
        raise OSError("savefig failed")

    monkeypatch.setattr(Figure, "savefig", boom)
    with pytest.raises(OSError, match="savefig failed"):
        plots.endpoint_vs_nfe(METRICS, path=path)
    assert path.read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fid.png"]


def test_sample_grid_gray_rgb_torch(tmp_path):
    x = -np.ones((5, 1, 4, 4))
    x[:, :, :2] = 1.0  # top half white, bottom half black
    path = tmp_path / "gray.png"
    fig = plots.sample_grid(x, path=path, nrow=3, title="samples")
    assert_png(path)
    grid = fig.axes[0].images[0].get_array()
    assert grid.shape == (2 * 6 + 2, 3 * 6 + 2)  # 2 rows x 3 cols of 4x4, 2px padding
    assert grid[2, 2] == 1.0 and grid[5, 2] == 0.0 and grid[2 + 6, 2 + 6] == 1.0
    assert fig.axes[0].get_title() == "samples"

    rgb = torch.rand(4, 3, 8, 8) * 2 - 1
    path = tmp_path / "rgb.png"
    fig = plots.sample_grid(rgb, path=path, nrow=2)
    assert_png(path)
    grid = fig.axes[0].images[0].get_array()
    np.testing.assert_allclose(grid[2:10, 2:10], (rgb[0].permute(1, 2, 0).numpy() + 1) / 2,
                               atol=1e-6)
    with pytest.raises(ValueError):
        plots.sample_grid(np.zeros((3, 4)))


def test_sample_grid_points_scatter(tmp_path):
    pts = np.random.default_rng(0).normal(size=(200, 2))
    path = tmp_path / "pts.png"
    fig = plots.sample_grid(pts, path=path)
    assert_png(path)
    np.testing.assert_allclose(fig.axes[0].collections[0].get_offsets(), pts)


def test_loss_curves(tmp_path):
    steps = np.arange(1, 51)
    curves = {"bellman K=4": np.stack([steps, 1.0 / steps], 1),
              "reflow": np.stack([steps, 2.0 / steps], 1)}
    path = tmp_path / "loss.png"
    fig = plots.loss_curves(curves, path=path, title="fine-tuning")
    assert_png(path)
    ax = fig.axes[0]
    assert ax.get_yscale() == "log" and ax.get_title() == "fine-tuning"
    lines = {ln.get_label(): ln for ln in ax.lines}
    np.testing.assert_allclose(lines["reflow"].get_ydata(), 2.0 / steps)
