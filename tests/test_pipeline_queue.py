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
    Both set fidelity.kid_subsets (read by evaluate only); q11 also sets
    straighten.iterations, so it reruns the straighten stages but not the teacher. Applied,
    `dvc metrics diff` shows boss's FID changed against the committed baseline and uniform's
    not, and `dvc plots show` renders the run's plots."""
    import time

    import mlflow
    from pipeline_helpers import mlflow_server

    key = "fidelity.kid_subsets"
    run(["git", "add", "-A"], repo)  # queued experiments start from a commit
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "queue base"],
        repo, check=False)
    before = json.loads((repo / "results" / "metrics.json").read_text())
    sets = {11: ["-S", f"{key}=11", "-S", "straighten.iterations=20"], 12: ["-S", f"{key}=12"]}
    with mlflow_server(tmp_path) as uri:
        try:
            for n, overrides in sets.items():
                run([str(_dvc()), "exp", "run", "--queue", *overrides, "-n", f"q{n}"],
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
                assert {"evaluate", "report"} <= names, names
                assert ("straighten_boss" in names) == (n == "11"), names
                for child in children:  # every step logged under its own experiment's parent
                    assert child.data.params.get(key, n) == n
                    assert child.info.status == "FINISHED"
        finally:
            run([str(_dvc()), "queue", "stop", "--kill"], repo, check=False)
    log = run([str(_dvc()), "queue", "logs", "q11"], repo).stdout
    assert "Running stage 'straighten@boss'" in log and "Running stage 'teacher'" not in log
    run([str(_dvc()), "exp", "apply", "q11"], repo)
    after = json.loads((repo / "results" / "metrics.json").read_text())
    for k in ("nfe_2", "nfe_4"):  # untouched rows keep their FID; KID's subsets changed
        assert after["uniform"][k]["fid"] == before["uniform"][k]["fid"]
    assert after["boss"]["nfe_2"]["fid"] != before["boss"]["nfe_2"]["fid"]
    diff = run([str(_dvc()), "metrics", "diff", "--json"], repo)
    changed = json.loads(diff.stdout)["results/metrics.json"]
    assert "boss.nfe_2.fid" in changed and "uniform.nfe_2.fid" not in changed
    shown = run([str(_dvc()), "plots", "show", "-o", "plots_html"], repo)
    html = (repo / "plots_html" / "index.html").read_text()
    assert "fid_vs_nfe" in html and "endpoint_vs_nfe" in html, shown.stdout[-500:]
