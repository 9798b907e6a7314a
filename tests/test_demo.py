"""The demo end to end on a tiny profile (the README's run command uses the full defaults)."""

import re

from boss_core.demo import main


def test_demo_runs_and_full_grid_schedules_reproduce_the_teacher(capsys):
    # With K = N every schedule is the whole fine grid, so Bellman, global and uniform all
    # reproduce the N-step teacher exactly: RMSE 0. Smaller K must be worse than that.
    # An MLP teacher: the oracles hold for any teacher, and 30 U-Net steps took 8 s, these 1 s.
    main(["--arch", "mlp", "--iterations", "30", "--n-steps", "4", "--max-nfe", "4",
          "--search-samples", "16", "--eval-samples", "24", "--batch-size", "8",
          "--device", "cpu"])
    out = capsys.readouterr().out
    rows = {int(m.group(1)): m.group(2) for m in re.finditer(r"^\s+(\d+) (.*)$", out, re.M)}
    assert sorted(rows) == [1, 2, 3, 4]
    values = {k: [float(v) for v in re.findall(r"([0-9.]+) \(", row)] for k, row in rows.items()}
    # columns: bellman, bellman_global, uniform, shift, edm
    assert values[4][:3] == [0.0, 0.0, 0.0]
    assert min(values[1]) > 0.0
    assert "K= 4: [0, 1, 2, 3, 4]" in out
