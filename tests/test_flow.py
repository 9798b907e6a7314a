"""The Prefect flow: params checked before compute, its own run folder, one MLflow parent run,
and (slow) the served deployment triggered end to end on a copy of the repo."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml
from pipeline_helpers import copy_repo, mlflow_server

from flows.local_server import (
    prefect_executable,
    prefect_server,
    start_serve,
    stop_process,
    wait_for_deployment,
)
from flows.pipeline import (
    FLOW_NAME,
    boss_pipeline,
    parent_run,
    prepare_run,
    straighten_command,
)
from tasks.runtime.params import ParamsError, parse_override

REPO = Path(__file__).resolve().parents[1]
QUIET = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_DISABLE_TELEMETRY": "true",
         "DVC_NO_ANALYTICS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture
def params_copy(tmp_path, monkeypatch):
    """params.yaml alone in a fresh folder, MLflow pointed at a store in tmp_path."""
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(REPO / "params.yaml", repo / "params.yaml")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv("BOSS_PARENT_RUN_ID", raising=False)
    return repo


def test_flow_name_and_parameters():
    assert boss_pipeline.name == FLOW_NAME == "boss-pipeline"
    assert set(boss_pipeline.parameters.properties) == {"overrides", "params_file", "run_dir"}


def test_bad_override_fails_before_anything_is_written(params_copy, tmp_path):
    run_dir = tmp_path / "run"
    with pytest.raises(ParamsError, match=r"straighten\.iterationz"):
        boss_pipeline.fn(overrides={"straighten.iterationz": 5},
                         params_file=str(params_copy / "params.yaml"), run_dir=str(run_dir))
    assert not run_dir.exists()
    assert sorted(p.name for p in params_copy.iterdir()) == ["params.yaml"]
    assert not (tmp_path / "mlflow.db").exists()  # no MLflow run was started


def test_bad_override_value_names_the_key(params_copy):
    with pytest.raises(ParamsError, match=r"sweep\.nfes"):
        prepare_run({"sweep.nfes": "many"}, params_copy / "params.yaml")
    with pytest.raises(ParamsError, match="mapping"):
        prepare_run(["straighten.iterations=3"], params_copy / "params.yaml")


def test_run_folders_never_collide_or_hit_the_workspace(params_copy, tmp_path):
    first = prepare_run({"straighten.iterations": 7}, params_copy / "params.yaml")
    assert first.run_dir.parent == params_copy / "runs"
    assert first.ws.repo == params_copy
    assert first.params.straighten.iterations == 7
    assert first.params.raw["straighten"]["iterations"] == 7
    first.run_dir.mkdir(parents=True)
    second = prepare_run(None, params_copy / "params.yaml")
    assert second.run_dir != first.run_dir
    assert second.run_dir.parent == params_copy / "runs"
    relative = prepare_run(None, params_copy / "params.yaml", run_dir="elsewhere/r1")
    assert relative.run_dir == params_copy / "elsewhere" / "r1"
    with pytest.raises(ParamsError, match="repo root"):
        prepare_run(None, params_copy / "params.yaml", run_dir=str(params_copy))


def test_ddp_world_runs_straighten_through_the_launcher(params_copy):
    """With scale.nproc_per_node = 2 the flow's straighten step is torchrun on the same params
    file, overrides and run folder; the overrides reach torchrun's ranks as --set."""
    plan = prepare_run({"scale.nproc_per_node": 2, "sweep.nfes": [1, 2],
                        "scale.rdzv_endpoint": "127.0.0.1:29555"}, params_copy / "params.yaml")
    cmd = straighten_command(plan, "boss")
    assert Path(cmd[0]).name == "torchrun"
    assert cmd[cmd.index("--nproc_per_node") + 1] == "2"
    assert cmd[cmd.index("--rdzv_endpoint") + 1] == "127.0.0.1:29555"
    assert cmd[cmd.index("-m") + 1] == "tasks.straighten"
    step = cmd[cmd.index("-m") + 2:]
    assert step[:2] == ["--method", "boss"]
    assert step[step.index("--params") + 1] == str(params_copy / "params.yaml")
    assert step[step.index("--out") + 1] == str(plan.run_dir)
    sets = dict(parse_override(step[i + 1]) for i, a in enumerate(step) if a == "--set")
    assert sets == {"scale.nproc_per_node": 2, "sweep.nfes": [1, 2],
                    "scale.rdzv_endpoint": "127.0.0.1:29555"}
    single = prepare_run({"sweep.nfes": [1, 2]}, params_copy / "params.yaml")
    assert straighten_command(single, "boss")[1:3] == ["-m", "tasks.straighten"]


def test_parent_run_finished_or_failed_and_env_restored(params_copy, monkeypatch):
    import mlflow

    plan = prepare_run({"run.experiment": "flow-test"}, params_copy / "params.yaml")
    monkeypatch.setenv("BOSS_PARENT_RUN_ID", "outer")
    with parent_run(plan) as ok_id:
        assert os.environ["BOSS_PARENT_RUN_ID"] == ok_id
    assert os.environ["BOSS_PARENT_RUN_ID"] == "outer"
    with pytest.raises(RuntimeError, match="boom"), parent_run(plan) as bad_id:
        raise RuntimeError("boom")
    assert os.environ["BOSS_PARENT_RUN_ID"] == "outer"
    client = mlflow.MlflowClient()
    assert client.get_run(ok_id).info.status == "FINISHED"
    assert client.get_run(bad_id).info.status == "FAILED"
    assert client.get_run(ok_id).data.params["straighten.iterations"] == str(
        plan.params.straighten.iterations)
    assert client.get_run(ok_id).data.tags["boss.run_dir"] == str(plan.run_dir)


# --- the served deployment, end to end ------------------------------------------------------


def _tiny_copy(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """The working tree copied to ``tmp_path/repo`` on the tiny profile (no git repo, no data:
    the flow writes the embedded digits itself), and the environment for commands there."""
    copy = copy_repo(tmp_path / "repo", embed_and_commit=False)
    env = {**os.environ, **QUIET}
    env.pop("PREFECT_API_URL", None)
    return copy, env


def _flow_runs(api: str, deployment: str) -> list[dict]:
    return _post_retrying(f"{api}/flow_runs/filter",
                          {"deployments": {"id": {"any_": [deployment]}},
                           "sort": "EXPECTED_START_TIME_ASC"}).json()


def _post_retrying(url: str, body: dict, attempts: int = 20) -> httpx.Response:
    """POST, retrying what a busy server answers with 503 (its SQLite store under load on
    2 cores); any other error fails at once."""
    for attempt in range(attempts):
        reply = httpx.post(url, json=body, timeout=30)
        if reply.status_code != 503 or attempt == attempts - 1:
            reply.raise_for_status()
            return reply
        time.sleep(1 + attempt)
    raise AssertionError("unreachable")


def _wait_terminal(api: str, run_id: str, timeout: float) -> dict:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        reply = httpx.get(f"{api}/flow_runs/{run_id}", timeout=30)
        if reply.status_code == 503:  # busy server: ask again
            time.sleep(2)
            continue
        run = reply.json()
        if run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            return run
        time.sleep(1)
    raise TimeoutError(f"flow run {run_id} not finished after {timeout:.0f} s")


@pytest.mark.slow
def test_served_deployment_runs_tiny_pipeline_in_its_own_folder(tmp_path):
    import mlflow
    import psutil

    copy, env = _tiny_copy(tmp_path)
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    extra = {**QUIET, "PREFECT_HOME": str(tmp_path / "prefect"), "MLFLOW_TRACKING_URI": store}
    name = "boss-test"
    timings = {}
    serve = None
    t0 = time.monotonic()
    with prefect_server(home=tmp_path / "prefect", log_file=tmp_path / "server.log") as api:
        timings["server"] = time.monotonic() - t0
        server = api.proc
        try:
            serve = start_serve(api, name, "params.yaml", cwd=copy, env=extra,
                                log_file=tmp_path / "serve.log")
            t1 = time.monotonic()
            deployment = wait_for_deployment(api, f"{FLOW_NAME}/{name}", serve, timeout=90)
            timings["deployment"] = time.monotonic() - t1

            t2 = time.monotonic()
            cli = subprocess.run(
                [prefect_executable(), "deployment", "run", f"{FLOW_NAME}/{name}",
                 "--param", 'overrides={"straighten.iterations": 30}',
                 "--watch", "--watch-timeout", "210"],
                cwd=copy, env={**env, **extra, "PREFECT_API_URL": api},
                capture_output=True, text=True, timeout=240)
            timings["flow_run"] = time.monotonic() - t2
            runs = _flow_runs(api, deployment)
            assert len(runs) == 1, runs
            run = runs[0]
            logs = (tmp_path / "serve.log").read_text(errors="replace")[-4000:]
            assert cli.returncode == 0, cli.stdout[-2000:] + cli.stderr[-2000:] + logs
            assert run["state"]["type"] == "COMPLETED", run["state"]
            assert run["parameters"]["overrides"] == {"straighten.iterations": 30}

            # a bad key: the run fails at once, naming it, and writes no folder
            t3 = time.monotonic()
            bad = _post_retrying(f"{api}/deployments/{deployment}/create_flow_run",
                                 {"parameters": {"overrides": {"straighten.iterationz": 1}}})
            bad_run = _wait_terminal(api, bad.json()["id"], timeout=60)
            timings["bad_run"] = time.monotonic() - t3
            assert bad_run["state"]["type"] == "FAILED", bad_run["state"]
            assert "straighten.iterationz" in (bad_run["state"]["message"] or ""), bad_run["state"]
        finally:
            serve_children = []
            if serve is not None:
                try:
                    serve_children = psutil.Process(serve.pid).children(recursive=True)
                except psutil.Error:
                    serve_children = []
                stop_process(serve)
        assert serve.poll() is not None
        assert not [c.pid for c in serve_children if _alive(c)]
    assert server.poll() is not None  # the server was stopped by its PID
    timings["total"] = time.monotonic() - t0
    print("timings (s):", {k: round(v, 1) for k, v in timings.items()})

    # the run's own folder, the DVC workspace untouched
    run_dir = copy / "runs" / run["name"]
    assert run_dir.is_dir(), sorted(p.name for p in (copy / "runs").iterdir())
    assert sorted(p.name for p in (copy / "runs").iterdir()) == [run["name"]]
    assert not (copy / "outputs").exists()
    assert not (copy / "results").exists()
    assert not (copy / "checkpoints").exists()
    metrics = json.loads((run_dir / "results" / "metrics.json").read_text())
    tiny = yaml.safe_load((copy / "params.yaml").read_text())
    methods = tiny["sweep"]["methods"]
    assert sorted(metrics) == sorted(methods)
    for method in set(methods) - {"teacher"}:  # the teacher row is its N-step reference
        assert sorted(metrics[method]) == sorted(f"nfe_{k}" for k in tiny["sweep"]["nfes"])
    assert (run_dir / "results" / "metrics.md").is_file()
    effective = yaml.safe_load((run_dir / "params.yaml").read_text())
    assert effective["straighten"]["iterations"] == 30
    assert tiny["straighten"]["iterations"] != 30  # so the override is what set it
    costs = json.loads((run_dir / "outputs" / "students" / "boss" / "costs.json").read_text())
    assert {c["iterations"] for c in costs.values()} == {30}

    # one MLflow parent run for the flow run, FINISHED, with the steps under it
    mlflow.set_tracking_uri(store)
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name(tiny["run"]["experiment"])
    parents = client.search_runs([experiment.experiment_id],
                                 f"tags.`prefect.flow_run_id` = '{run['id']}'")
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.params["straighten.iterations"] == "30"
    steps = client.search_runs([experiment.experiment_id],
                               f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    by_name = {r.info.run_name: r for r in steps}
    assert set(by_name) == {"prepare", "teacher", "features", "cost", "schedules", "pairs",
                            "straighten_boss", "straighten_boss_lora",
                            "straighten_reflow_uniform", "straighten_distill_uniform",
                            "evaluate", "report"}
    assert {r.info.status for r in steps} == {"FINISHED"}
    assert by_name["straighten_boss"].data.params["straighten.iterations"] == "30"
    # the bad run failed before MLflow: no parent run for it
    bad_parents = client.search_runs([experiment.experiment_id],
                                     f"tags.`prefect.flow_run_id` = '{bad_run['id']}'")
    assert bad_parents == []


def _alive(proc) -> bool:
    import psutil

    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False



@pytest.mark.slow
def test_a_burst_of_four_runs_two_at_a_time_all_complete_apart(tmp_path):
    """4 runs triggered at once on a deployment served with limit 2, logging to one MLflow
    tracking server: every run ends COMPLETED (nothing hangs), in its own folder, with its own
    parent run holding its own steps and override."""
    import mlflow

    copy, _ = _tiny_copy(tmp_path)
    name, serve = "burst", None
    with mlflow_server(tmp_path) as uri, \
            prefect_server(home=tmp_path / "prefect", log_file=tmp_path / "server.log") as api:
        extra = {**QUIET, "PREFECT_HOME": str(tmp_path / "prefect"), "MLFLOW_TRACKING_URI": uri,
                 "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        try:
            serve = start_serve(api, name, "params.yaml", cwd=copy, env=extra,
                                log_file=tmp_path / "serve.log", limit=2)
            deployment = wait_for_deployment(api, f"{FLOW_NAME}/{name}", serve, timeout=90)
            ids = {}
            for n in (21, 22, 23, 24):
                reply = _post_retrying(
                    f"{api}/deployments/{deployment}/create_flow_run",
                    {"parameters": {"overrides": {"straighten.iterations": n,
                                                  "teacher.iterations": 100}}})
                ids[n] = reply.json()["id"]
            done = {n: _wait_terminal(api, run_id, timeout=600) for n, run_id in ids.items()}
        finally:
            if serve is not None:
                stop_process(serve)
        logs = (tmp_path / "serve.log").read_text(errors="replace")[-3000:]
        assert {r["state"]["type"] for r in done.values()} == {"COMPLETED"}, logs
        client = mlflow.MlflowClient(uri)
        experiment = client.get_experiment_by_name("boss-tiny")
        folders = set()
        for n, flow_run in done.items():
            run_dir = copy / "runs" / flow_run["name"]
            folders.add(run_dir)
            params = yaml.safe_load((run_dir / "params.yaml").read_text())
            assert params["straighten"]["iterations"] == n
            costs = json.loads((run_dir / "outputs/students/boss/costs.json").read_text())
            assert {c["iterations"] for c in costs.values()} == {n}
            parents = client.search_runs([experiment.experiment_id],
                                         f"tags.`prefect.flow_run_id` = '{flow_run['id']}'")
            assert len(parents) == 1 and parents[0].info.status == "FINISHED"
            steps = client.search_runs(
                [experiment.experiment_id],
                f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'")
            assert len(steps) == 12
            boss = [s for s in steps if s.info.run_name == "straighten_boss"][0]
            assert boss.data.params["straighten.iterations"] == str(n)
        assert len(folders) == 4
    assert serve.poll() is not None
