"""The Prefect flow: params checked before compute, its own run folder, one MLflow parent run,
the step graph (dvc.yaml's, run ``scale.flow_concurrency`` steps at once), the results published
as Prefect artifacts, and (slow) the served deployment triggered end to end on a copy of the
repo."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml
from pipeline_helpers import copy_repo, mlflow_server
from test_pipeline_dvc import STEPS

from flows.graph import Step, check_graph, run_graph
from flows.local_server import (
    prefect_executable,
    start_serve,
    stop_process,
    wait_for_deployment,
)
from flows.pipeline import (
    FLOW_NAME,
    boss_pipeline,
    parent_run,
    pipeline_steps,
    prepare_run,
    straighten_command,
    straighten_methods,
)
from flows.publish import artifact_key, results_table
from tasks.runtime.params import (
    ParamsError,
    apply_overrides,
    build_params,
    parse_override,
    read_yaml,
)

REPO = Path(__file__).resolve().parents[1]
QUIET = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_DISABLE_TELEMETRY": "true",
         "DVC_NO_ANALYTICS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
# The smallest run that still trains and scores every kind of step: two NFEs, one full and one
# distilled student beside the uniform baseline, a few iterations each.
SMALL = {"sweep.methods": ["uniform", "boss", "distill_uniform"], "sweep.nfes": [1, 2],
         "sweep.n_steps": 10, "sweep.search_samples": 32, "sweep.pair_samples": 64,
         "sweep.eval_samples": 100, "sweep.batch_size": 100, "teacher.iterations": 50,
         "teacher.log_every": 25, "features.iterations": 30, "straighten.iterations": 10,
         "straighten.warmup": 2, "straighten.eval_every": 5, "straighten.checkpoint_every": 0,
         "run.register_models": False}
# A class-conditional teacher on the cosine path, sampled with guidance: the curved flows of
# issue 12 through every step (the concurrency test runs it, and the in-memory sweep on its
# teacher must give its numbers bit for bit).
GUIDED = {"model.num_classes": 10, "teacher.label_dropout": 0.1, "teacher.path": "cosine",
          "sweep.guidance": 2.0}


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


def test_flow_concurrency_is_checked_naming_the_key(params_copy):
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ParamsError, match=r"scale\.flow_concurrency"):
            prepare_run({"scale.flow_concurrency": bad}, params_copy / "params.yaml")
    plan = prepare_run({"scale.flow_concurrency": 3}, params_copy / "params.yaml")
    assert plan.params.scale.flow_concurrency == 3


# dvc.yaml's stages that the flow does before its steps (ensure_data writes the embedded digits)
FLOW_PRELUDE = {"data"}


def _dvc_upstream() -> dict[str, set[str]]:
    """{stage: the stages whose outs it lists among its deps} from dvc.yaml, foreach stages
    expanded as ``<stage>_<item>``, the prelude left out."""
    stages, outs = {}, {}
    for name, stage in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"].items():
        for item in stage.get("foreach", [None]):
            body = json.loads(json.dumps(stage.get("do", stage)).replace("${item}", str(item)))
            full = name if item is None else f"{name}_{item}"
            stages[full] = body.get("deps", [])
            for out in body.get("outs", []) + body.get("metrics", []):
                outs[next(iter(out)) if isinstance(out, dict) else out] = full
    return {name: {stage for dep in deps for out, stage in outs.items()
                   if (dep == out or dep.startswith(out + "/") or out.startswith(dep + "/"))
                   and stage not in FLOW_PRELUDE}
            for name, deps in stages.items() if name not in FLOW_PRELUDE}


def _ancestors(upstream: dict[str, set[str]]) -> dict[str, set[str]]:
    def up(name: str) -> set[str]:
        return set().union(*({u} | up(u) for u in upstream[name])) if upstream[name] else set()

    return {name: up(name) for name in upstream}


def test_flow_steps_are_dvc_yaml_graph(params_copy):
    """Each step runs after every stage whose outputs dvc.yaml has it read, directly or
    through another stage, and after nothing else (which would cost concurrency), in
    dvc.yaml's order; with torchrun the straighten steps run alone."""
    plan = prepare_run(None, params_copy / "params.yaml")
    steps = pipeline_steps(plan)
    check_graph(steps)
    assert _ancestors({s.name: set(s.after) for s in steps}) == _ancestors(_dvc_upstream())
    stages = [n for n in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
              if n not in FLOW_PRELUDE]
    order = [s.name.partition("_")[0] if s.name.startswith("straighten_") else s.name
             for s in steps]
    assert list(dict.fromkeys(order)) == stages
    assert [s.name for s in steps if s.name.startswith("straighten_")] == [
        f"straighten_{m}" for m in straighten_methods(plan.params)]
    assert not any(s.exclusive for s in steps)
    ddp = pipeline_steps(prepare_run({"scale.nproc_per_node": 2}, params_copy / "params.yaml"))
    assert [s.name for s in ddp if s.exclusive] == [
        f"straighten_{m}" for m in straighten_methods(plan.params)]


def test_a_graph_naming_a_later_or_unknown_step_is_refused():
    with pytest.raises(ValueError, match="'b' runs after"):
        check_graph([Step("b", None, (), ("a",)), Step("a", None)])
    with pytest.raises(ValueError, match="listed twice"):
        check_graph([Step("a", None), Step("a", None)])
    with pytest.raises(ValueError, match="concurrency"):
        run_graph([Step("a", None)], 0)


@pytest.fixture(scope="module")
def prefect_api(prefect_server_api):
    """The session's Prefect server (tests/conftest.py) for this module's in-process flows
    (PREFECT_API_URL set in Prefect's settings for the duration)."""
    from prefect.logging.handlers import APILogHandler
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: str(prefect_server_api)}):
        yield prefect_server_api
        APILogHandler().flush()  # before the server goes


def _intervals(events: list[tuple[str, str, float]]) -> dict[str, tuple[float, float]]:
    start = {name: t for kind, name, t in events if kind == "start"}
    return {name: (start[name], t) for kind, name, t in events if kind == "end"}


def _most_at_once(intervals) -> int:
    edges = sorted([(a, 1) for a, _ in intervals] + [(b, -1) for _, b in intervals],
                   key=lambda e: (e[0], e[1]))  # an end before a start at the same instant
    most = now = 0
    for _, change in edges:
        now += change
        most = max(most, now)
    return most


def test_graph_runs_ready_steps_n_at_a_time_and_stops_at_a_failure(prefect_api):
    from prefect import flow, task
    from prefect.cache_policies import NO_CACHE

    events, lock = [], threading.Lock()

    def work(name: str, seconds: float = 0.3, fail: bool = False) -> str:
        with lock:
            events.append(("start", name, time.monotonic()))
        time.sleep(seconds)
        with lock:
            events.append(("end", name, time.monotonic()))
        if fail:
            raise RuntimeError(f"{name} broke")
        return name

    job = task(work, name="job", cache_policy=NO_CACHE)

    def run(steps, concurrency):
        events.clear()

        @flow(name="graph-check", validate_parameters=False)
        def graph_check():
            return run_graph(steps, concurrency)

        return graph_check()

    def step(name, after=(), seconds=0.3, fail=False, exclusive=False):
        return Step(name, job, (name, seconds, fail), after, exclusive)

    # a fan-out of three after one, joined by one: two at a time, inputs always done first
    fan = [step("a"), step("b", ("a",)), step("c", ("a",)), step("d", ("a",)),
           step("e", ("b", "c", "d"))]
    assert run(fan, 2) == {n: n for n in "abcde"}
    spans = _intervals(events)
    assert _most_at_once(spans.values()) == 2
    for s in fan:
        assert all(spans[up][1] <= spans[s.name][0] for up in s.after), s.name
    assert run(fan, 1) == {n: n for n in "abcde"}
    assert _most_at_once(_intervals(events).values()) == 1
    assert [name for kind, name, _ in events if kind == "start"] == list("abcde")

    # an exclusive step runs alone, and nothing listed after it overtakes it
    alone = [step("a"), step("b", ("a",), exclusive=True), step("c", ("a",)),
             step("d", ("a",))]
    run(alone, 3)
    spans = _intervals(events)
    assert all(spans[n][1] <= spans["b"][0] or spans["b"][1] <= spans[n][0] for n in "cd")
    assert spans["b"][1] <= spans["c"][0]

    # a failure: the running step finishes, nothing else starts, the flow raises it
    broken = [step("a"), step("b", ("a",), 0.1, fail=True), step("c", ("a",), 1.0),
              step("d", ("b", "c")), step("e", ("a",))]
    with pytest.raises(RuntimeError, match="b broke"):
        run(broken, 2)
    assert sorted(_intervals(events)) == ["a", "b", "c"]


def _small_copy(tmp_path: Path, **settings) -> Path:
    """The working tree on the tiny profile, then SMALL (and ``settings``) in its
    params.yaml."""
    copy = copy_repo(tmp_path / "repo", embed_and_commit=False)
    raw = apply_overrides(read_yaml(copy / "params.yaml"), {**SMALL, **settings})
    build_params(raw)  # the settings load
    (copy / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return copy


def _task_runs(api: str, flow_run_id: str) -> dict[str, dict]:
    runs = _post_retrying(f"{api}/task_runs/filter",
                          {"flow_runs": {"id": {"any_": [flow_run_id]}}}).json()
    return {r["name"].rsplit("-", 1)[0]: r for r in runs}


def _artifacts(api: str, flow_run_id: str) -> dict[str, dict]:
    found = _post_retrying(f"{api}/artifacts/filter",
                           {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}}).json()
    return {a["key"]: a for a in found}


def _students(run_dir: Path) -> dict[str, tuple[dict, dict[str, bytes]]]:
    """{model file: (metadata, {tensor: its bytes})} (a file's own bytes may differ: safetensors
    writes its metadata in hash order)."""
    from safetensors import safe_open

    out = {}
    for path in sorted((run_dir / "outputs" / "students").rglob("model.safetensors")):
        with safe_open(path, "pt") as f:
            out[str(path.relative_to(run_dir))] = (
                f.metadata(), {k: f.get_tensor(k).numpy().tobytes() for k in f.keys()})
    return out


def _check_artifacts(found: dict[str, dict], run_dir: Path) -> None:
    """The run's artifacts: the results table holds metrics.json's rows, the markdown embeds
    the figure's bytes."""
    metrics = json.loads((run_dir / "results" / "metrics.json").read_text())
    table_key, figure_key = artifact_key("boss-tiny", "results"), "boss-tiny-fid-vs-nfe"
    assert sorted(found) == sorted([table_key, figure_key])
    table = found[table_key]
    assert table["type"] == "table"
    rows = json.loads(table["data"])
    assert rows == json.loads(json.dumps(results_table(metrics)))
    assert {(r["method"], r["nfe"]) for r in rows} == {
        (m, int(k.split("_")[1])) for m, by_k in metrics.items() for k in by_k}
    for r in rows:
        expected = metrics[r["method"]][f"nfe_{r['nfe']}"]
        assert (r["fid"], r["fid_std"], r["endpoint_rmse"]) == (
            expected["fid"], expected["fid_std"], expected["endpoint_rmse"])
    figure = found[figure_key]
    assert figure["type"] == "markdown"
    embedded = re.search(r"\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", figure["data"])
    assert embedded, figure["data"][:200]
    assert base64.b64decode(embedded.group(1)) == (
        run_dir / "results" / "figures" / "fid_vs_nfe.png").read_bytes()


CALLS = ("iterations", "trainable_params", "search_nfe", "search_evaluations", "sample_nfe",
         "budget_evaluations")


def _in_memory_sweep(run_dir: Path) -> tuple[dict, dict]:
    """(metrics, {method: {nfe_K: the CALLS of costs.json}}) of ``run_sweep`` on the run's
    teacher, feature net and params, at one torch and one BLAS thread (as its steps ran)."""
    from threadpoolctl import threadpool_limits

    from boss_core.features import load_feature_net, predict_from_features
    from boss_core.fidelity import build_extractor, fid_kid_features
    from boss_core.sweep import run_sweep
    from tasks.runtime.artifacts import load_prepared, load_teacher
    from tasks.runtime.params import load_params
    from tasks.runtime.workspace import Workspace

    params = load_params(run_dir / "params.yaml")
    ws = Workspace.at(run_dir)
    data, teacher = load_prepared(ws), load_teacher(ws, "cpu")
    net_file = ws.step("features") / "feature_net.safetensors"
    extractor, net = build_extractor(params.fidelity, net_file), load_feature_net(net_file)
    reference = extractor.reference(data.x)

    def score(features):
        out = fid_kid_features(features, reference, params.fidelity)
        return {"fid": out["fid"], "kid": out["kid"]}

    with threadpool_limits(1):
        metrics, costs, _ = run_sweep(
            teacher, data.data_shape, score, params.sweep, params.straighten,
            options=params.methods, device="cpu", progress=False, featurize=extractor.features,
            label_dropout=params.teacher.label_dropout,
            classify=lambda x: predict_from_features(net, x))
    return metrics, {m: {k: {n: r[n] for n in CALLS} for k, r in rows.items()}
                     for m, rows in costs.items()}


@pytest.mark.slow
def test_concurrent_steps_equal_the_sequential_run_and_publish_artifacts(
        tmp_path, monkeypatch, prefect_api):
    """Two steps at a time (teacher beside features, the students beside each other) give
    results/metrics.json and the students' weights bit for bit as one at a time, at one torch
    thread per step; each run publishes its results table and figure as Prefect artifacts.
    The run is GUIDED (a class-conditional cosine-path teacher, w = 2), and the in-memory sweep
    (``boss_core.sweep.run_sweep``) on its teacher gives the steps' metrics bit for bit."""
    import torch

    copy = _small_copy(tmp_path, **GUIDED)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv("BOSS_PARENT_RUN_ID", raising=False)
    from threadpoolctl import threadpool_limits

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    runs, took = {}, {}
    limits = threadpool_limits(1)  # and one BLAS thread (KID's numpy products), as the sweep
    try:
        for concurrency in (1, 2):
            t0 = time.monotonic()
            state = boss_pipeline(overrides={"scale.flow_concurrency": concurrency},
                                  params_file=str(copy / "params.yaml"),
                                  run_dir=str(tmp_path / f"c{concurrency}"), return_state=True)
            took[concurrency] = time.monotonic() - t0
            assert state.is_completed(), state
            runs[concurrency] = str(state.state_details.flow_run_id)
            assert torch.get_num_threads() == 1  # restored after the run
        in_memory = _in_memory_sweep(tmp_path / "c1")
    finally:
        torch.set_num_threads(threads)
        limits.restore_original_limits()
    print("flow seconds by concurrency:", {c: round(t, 1) for c, t in took.items()})

    one, two = tmp_path / "c1", tmp_path / "c2"
    assert (one / "results/metrics.json").read_bytes() == (
        two / "results/metrics.json").read_bytes()
    metrics = json.loads((one / "results/metrics.json").read_text())
    costs = json.loads((one / "results/costs.json").read_text())
    assert in_memory == (metrics, {m: {k: {n: r[n] for n in CALLS} for k, r in rows.items()}
                                   for m, rows in costs.items()})
    for k in (1, 2):  # a guided teacher step is 2 network calls, a student step 1
        assert costs["uniform"][f"nfe_{k}"]["sample_nfe"] == 2 * k
        assert costs["boss"][f"nfe_{k}"]["sample_nfe"] == k
    assert all(0 <= row["class_accuracy"] <= 1 for rows in metrics.values()
               for row in rows.values())
    students = _students(one)
    assert len(students) == 4  # boss and distill_uniform at K = 1, 2
    assert students == _students(two)
    for method in ("boss", "distill_uniform"):
        for k in (1, 2):
            schedule = f"outputs/students/{method}/nfe_{k}/schedule.json"
            assert (one / schedule).read_bytes() == (two / schedule).read_bytes()

    # the task runs: one at a time, or up to two with teacher beside features
    spans = {}
    for concurrency, flow_run_id in runs.items():
        task_runs = _task_runs(prefect_api, flow_run_id)
        assert {r["state"]["type"] for r in task_runs.values()} == {"COMPLETED"}
        assert sorted(task_runs) == sorted(STEPS)
        spans[concurrency] = {name: (r["start_time"], r["end_time"])
                              for name, r in task_runs.items()}
        evaluate_after = {i["id"] for i in task_runs["evaluate"]["task_inputs"]["wait_for"]}
        assert task_runs["features"]["id"] in evaluate_after  # the UI draws the graph
    assert _most_at_once(spans[1].values()) == 1
    assert _most_at_once(spans[2].values()) == 2
    teacher, features = spans[2]["teacher"], spans[2]["features"]
    assert teacher[0] < features[1] and features[0] < teacher[1]

    for concurrency, flow_run_id in runs.items():
        _check_artifacts(_artifacts(prefect_api, flow_run_id), tmp_path / f"c{concurrency}")


# --- the served deployment, end to end ------------------------------------------------------


def _command_env() -> dict[str, str]:
    """The environment for commands in a copy: quiet, and no inherited Prefect API."""
    env = {**os.environ, **QUIET}
    env.pop("PREFECT_API_URL", None)
    return env


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
def test_served_deployment_runs_tiny_pipeline_in_its_own_folder(tmp_path, prefect_server_api):
    import mlflow
    import psutil

    # the smallest run that still has every kind of step (SMALL): what is tested is the serving
    copy, env = _small_copy(tmp_path), _command_env()
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    extra = {**QUIET, "PREFECT_HOME": str(tmp_path / "prefect"), "MLFLOW_TRACKING_URI": store}
    name = "boss-test"
    timings = {}
    serve = None
    t0 = time.monotonic()
    api = prefect_server_api  # the session's server (tests/conftest.py)
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
        published = _artifacts(api, run["id"])

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
    _check_artifacts(published, run_dir)  # the served run's outcome, in the Prefect UI
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
    assert sorted(by_name) == sorted(STEPS)
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
def test_a_burst_of_three_runs_two_at_a_time_all_complete_apart(tmp_path, prefect_server_api):
    """3 runs triggered at once on a deployment served with limit 2 (so one waits), logging to
    one MLflow tracking server: every run ends COMPLETED (nothing hangs), in its own folder,
    with its own parent run holding its own steps and override. The runs themselves are as
    small as a run gets (SMALL, boss the only student, one NFE, ten teacher and feature
    steps): what is tested is the serving."""
    import mlflow

    t0 = time.monotonic()
    copy = _small_copy(tmp_path, **{"sweep.methods": ["uniform", "boss"], "sweep.nfes": [1],
                                    "teacher.iterations": 10, "teacher.log_every": 5,
                                    "features.iterations": 10})
    timings = {"copy": time.monotonic() - t0}
    name, serve = "burst", None
    api = prefect_server_api  # the session's server (tests/conftest.py)
    with mlflow_server(tmp_path) as uri:
        timings["servers"] = time.monotonic() - t0 - timings["copy"]
        extra = {**QUIET, "PREFECT_HOME": str(tmp_path / "prefect"), "MLFLOW_TRACKING_URI": uri,
                 "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        try:
            serve = start_serve(api, name, "params.yaml", cwd=copy, env=extra,
                                log_file=tmp_path / "serve.log", limit=2)
            deployment = wait_for_deployment(api, f"{FLOW_NAME}/{name}", serve, timeout=90)
            t1 = time.monotonic()
            ids = {}
            for n in (5, 6, 7):
                reply = _post_retrying(
                    f"{api}/deployments/{deployment}/create_flow_run",
                    {"parameters": {"overrides": {"straighten.iterations": n}}})
                ids[n] = reply.json()["id"]
            done = {n: _wait_terminal(api, run_id, timeout=600) for n, run_id in ids.items()}
            timings["runs"] = time.monotonic() - t1
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
            assert sorted(s.info.run_name for s in steps) == sorted(STEPS)
            boss = [s for s in steps if s.info.run_name == "straighten_boss"][0]
            assert boss.data.params["straighten.iterations"] == str(n)
        assert len(folders) == 3
    assert serve.poll() is not None
    timings["total"] = time.monotonic() - t0
    print("timings (s):", {k: round(v, 1) for k, v in timings.items()})
