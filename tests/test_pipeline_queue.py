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
    q_kid sets fidelity.kid_subsets, read by evaluate alone, so it reruns evaluate and report
    only; q_train sets straighten.iterations, so it reruns the straighten stages but not the
    teacher. q_train applied: untouched rows are identical, and `dvc metrics diff` against the
    committed baseline shows boss's FID changed and uniform's not; `dvc plots show` renders
    the run's plots."""
    import time

    import mlflow
    from pipeline_helpers import mlflow_server

    sets = {"q_train": ("straighten.iterations", "20"), "q_kid": ("fidelity.kid_subsets", "12")}
    steps = {"q_train": {"straighten_boss", "evaluate", "report"}, "q_kid": {"evaluate", "report"}}
    run(["git", "add", "-A"], repo)  # queued experiments start from a commit
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "queue base"],
        repo, check=False)
    before = json.loads((repo / "results" / "metrics.json").read_text())
    with mlflow_server(tmp_path) as uri:
        try:
            for name, (key, value) in sets.items():
                run([str(_dvc()), "exp", "run", "--queue", "-S", f"{key}={value}", "-n", name],
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
            assert len(parents) == 2
            for name, (key, value) in sets.items():
                parent, = [p for p in parents if p.data.params[key] == value]
                assert parent.info.status == "FINISHED"
                children = client.search_runs(
                    [experiment.experiment_id],
                    filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
                names = {c.info.run_name for c in children}
                assert steps[name] <= names and "teacher" not in names, (name, names)
                if name == "q_kid":
                    assert names == steps[name], names
                for child in children:  # every step logged under its own experiment's parent
                    assert child.data.params.get(key, value) == value
                    assert child.info.status == "FINISHED"
        finally:
            run([str(_dvc()), "queue", "stop", "--kill"], repo, check=False)
    log = run([str(_dvc()), "queue", "logs", "q_train"], repo).stdout
    assert "Running stage 'straighten@boss'" in log and "Running stage 'teacher'" not in log
    run([str(_dvc()), "exp", "apply", "q_train"], repo)
    after = json.loads((repo / "results" / "metrics.json").read_text())
    assert after["uniform"] == before["uniform"]  # untouched rows are identical
    assert after["boss"]["nfe_2"]["fid"] != before["boss"]["nfe_2"]["fid"]
    diff = run([str(_dvc()), "metrics", "diff", "--json"], repo)
    changed = json.loads(diff.stdout)["results/metrics.json"]
    assert "boss.nfe_2.fid" in changed and "uniform.nfe_2.fid" not in changed
    shown = run([str(_dvc()), "plots", "show", "-o", "plots_html"], repo)
    html = (repo / "plots_html" / "index.html").read_text()
    assert "fid_vs_nfe" in html and "endpoint_vs_nfe" in html, shown.stdout[-500:]
