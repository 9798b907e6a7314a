"""DVC experiments on a copy of the session's tiny run: two queued at once against one MLflow
tracking server, then one applied, diffed against the baseline and plotted (its own file, so
that pytest-xdist runs it beside test_pipeline_dvc)."""

from __future__ import annotations

import json

import pytest
from pipeline_helpers import clone_repo, run
from test_pipeline_dvc import _dvc

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture
def repo(tiny_repro, tmp_path_factory):
    """A copy of the shared run to queue experiments on."""
    return clone_repo(tiny_repro, tmp_path_factory.mktemp("queued") / "repo")


def test_queued_experiments_log_apart_then_diff_and_plot(repo, tmp_path):
    """`dvc exp run --queue` twice, `dvc queue start -j 2`: both run at once against one
    MLflow tracking server (not a shared SQLite file), and neither's runs mix with the other's.
    Both set fidelity.kid_subsets, read by evaluate alone, so each reruns evaluate and report
    only. Applied, `dvc metrics diff` against the committed baseline shows the KIDs changed
    and no FID (the same samples), and `dvc plots show` renders the run's plots."""
    import time

    import mlflow
    from pipeline_helpers import mlflow_server

    key = "fidelity.kid_subsets"
    run(["git", "add", "-A"], repo)  # queued experiments start from a commit
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "queue base"],
        repo, check=False)
    before = json.loads((repo / "results" / "metrics.json").read_text())
    with mlflow_server(tmp_path) as uri:
        try:
            for n in (11, 12):
                run([str(_dvc()), "exp", "run", "--queue", "-S", f"{key}={n}", "-n", f"q{n}"],
                    repo, MLFLOW_TRACKING_URI=uri)
            run([str(_dvc()), "queue", "start", "-j", "2"], repo, MLFLOW_TRACKING_URI=uri)
            deadline = time.time() + 900
            while True:
                status = run([str(_dvc()), "queue", "status"], repo).stdout
                if "Queued" not in status and "Running" not in status:
                    break
                assert time.time() < deadline, status
                time.sleep(3)
            assert status.count("Success") >= 2, status
            client = mlflow.MlflowClient(uri)
            experiment = client.get_experiment_by_name("boss-tiny")
            parents = client.search_runs([experiment.experiment_id],
                                         filter_string="tags.`boss.kind` = 'pipeline'")
            by_n = {p.data.params[key]: p for p in parents}
            assert sorted(by_n) == ["11", "12"]
            for n, parent in by_n.items():
                assert parent.info.status == "FINISHED"
                children = client.search_runs(
                    [experiment.experiment_id],
                    filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
                names = {c.info.run_name for c in children}
                assert names == {"evaluate", "report"}, names
                for child in children:  # every step logged under its own experiment's parent
                    assert child.data.params.get(key, n) == n
                    assert child.info.status == "FINISHED"
        finally:
            run([str(_dvc()), "queue", "stop", "--kill"], repo, check=False)
    log = run([str(_dvc()), "queue", "logs", "q11"], repo).stdout
    assert "Running stage 'evaluate'" in log and "Running stage 'teacher'" not in log
    run([str(_dvc()), "exp", "apply", "q11"], repo)
    after = json.loads((repo / "results" / "metrics.json").read_text())
    for method, rows in before.items():  # the same samples: FIDs as they were, KIDs not
        for k, row in rows.items():
            assert after[method][k]["fid"] == row["fid"], (method, k)
    diff = run([str(_dvc()), "metrics", "diff", "--json"], repo)
    changed = json.loads(diff.stdout)["results/metrics.json"]
    assert "boss.nfe_2.kid" in changed and not any(key.endswith(".fid") for key in changed)
    shown = run([str(_dvc()), "plots", "show", "-o", "plots_html"], repo)
    html = (repo / "plots_html" / "index.html").read_text()
    assert "fid_vs_nfe" in html and "endpoint_vs_nfe" in html, shown.stdout[-500:]
