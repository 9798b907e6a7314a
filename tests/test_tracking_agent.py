"""The tracking agent: a stage that does not import MLflow logs the same runs through it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

from tasks.runtime import tracking, tracking_agent

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A SQLite store whose calls go to an agent (idle exit after 2 s); stopped at the end."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv(tracking.AGENT_ENV, "1")
    monkeypatch.setenv(tracking_agent.IDLE_ENV, "2")
    monkeypatch.delenv(tracking.PARENT_ENV, raising=False)
    yield tmp_path
    path = tracking_agent.socket_path(uri)
    client = tracking_agent._hello(path)
    if client is not None:  # still up: stop the agent this test started, by its pid
        pid = client._request({"op": "hello"})["pid"]
        client.close()
        os.kill(pid, signal.SIGTERM)


def local_client() -> mlflow.MlflowClient:
    """MLflow in this process on the test's store (``setup`` in an earlier test set the
    process-wide URI to another one)."""
    return mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"])


def wait_until(condition, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


def test_step_runs_through_the_agent_are_nested_logged_and_marked(store, monkeypatch):
    experiment = tracking.setup(store, "t")
    parent = tracking.start_parent(experiment, store, "p", {"a.b": 1})
    monkeypatch.setenv(tracking.PARENT_ENV, parent)
    (store / "note.txt").write_text("hello")
    with tracking.step_run("good", store, "t", {"s.k": 3}, {}) as (client, good, got_parent):
        assert isinstance(client, tracking_agent.AgentClient)
        assert got_parent == parent
        tracking.log_metrics(client, good, {"x": 1.0, "bad": float("nan")}, step=4)
        client.log_artifact(good, str(store / "note.txt"), "notes")
        client.set_tag(good, "k", "v")
    with pytest.raises(RuntimeError, match="boom"), \
            tracking.step_run("bad", store, "t", {}, {}) as (_, bad, _):
        raise RuntimeError("boom")
    local = local_client()
    run = local.get_run(good)
    assert run.info.status == "FINISHED" and run.data.params == {"s.k": "3"}
    assert run.data.metrics == {"x": 1.0}  # NaN never reaches MLflow
    assert [(m.step, m.value) for m in local.get_metric_history(good, "x")] == [(4, 1.0)]
    assert run.data.tags["mlflow.parentRunId"] == parent and run.data.tags["k"] == "v"
    assert run.data.tags["boss.step"] == "good"
    assert run.data.tags[tracking.OWNER_TAG] == tracking.process_owner()  # this process, not
    # the agent's: a killed stage's run is found by the next one
    assert [a.path for a in local.list_artifacts(good, "notes")] == ["notes/note.txt"]
    assert local.get_run(bad).info.status == "FAILED"
    assert local.get_run(parent).info.status == "FAILED"


def test_the_agent_marks_runs_of_dead_processes_killed(store):
    client = tracking.connect(store)
    assert isinstance(client, tracking_agent.AgentClient)
    experiment = tracking.ensure_experiment(client, store, "t")
    parent = tracking.start_parent(experiment, store, "p", {}, client=client)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        dead = client.create_run(experiment, run_name="killed step", tags={
            "mlflow.parentRunId": parent,
            tracking.OWNER_TAG: tracking.process_owner(child.pid)}).info.run_id
        assert tracking.mark_dead_runs_killed(client, experiment) == []
    finally:
        child.kill()
        child.wait()
    assert tracking.mark_dead_runs_killed(client, experiment) == [dead]
    assert client.get_run(dead).info.status == "KILLED"
    assert client.get_run(parent).info.status == "KILLED"


def test_errors_come_back_with_their_type_and_code(store):
    client = tracking.connect(store)
    with pytest.raises(tracking_agent.AgentError) as err:
        client.get_run("f" * 32)
    assert err.value.error_code == "RESOURCE_DOES_NOT_EXIST"
    experiment = tracking.ensure_experiment(client, store, "t")
    run = client.create_run(experiment).info.run_id
    with pytest.raises(FileNotFoundError):
        client.log_artifact(run, str(store / "missing.txt"))
    with pytest.raises(AttributeError, match="no method"):
        client.no_such_method()


def test_register_model_twice_through_the_agent(store):
    client = tracking.connect(store)
    experiment = tracking.ensure_experiment(client, store, "t")
    run = client.create_run(experiment).info.run_id
    folder = store / "model"
    folder.mkdir()
    (folder / "schedule.json").write_text("{}")
    client.log_artifacts(run, str(folder), "models/m")
    versions = [tracking.register_model(client, run, "t-m", "models/m", {"method": "m"})
                for _ in range(2)]  # the second finds the registered model already there
    assert [int(v) for v in versions] == [1, 2]
    assert local_client().get_model_version("t-m", "2").tags == {"method": "m"}


def test_a_stage_process_logs_without_importing_mlflow(store):
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from tasks.runtime import tracking\n"
        "with tracking.step_run('s', Path(sys.argv[1]), 't', {'a.b': 1}, {'a.b': 1}) as "
        "(client, run, parent):\n"
        "    tracking.log_metrics(client, run, {'x': 2.0}, step=3)\n"
        "heavy = [m for m in ('mlflow', 'sqlalchemy', 'alembic') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "print(run, parent)\n")
    env = {**os.environ, tracking.AGENT_ENV: "auto"}
    done = subprocess.run([sys.executable, "-c", code, str(store)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    run, parent = done.stdout.split()
    local = local_client()
    assert local.get_run(run).info.status == "FINISHED"
    assert local.get_run(run).data.tags["mlflow.parentRunId"] == parent
    assert local.get_run(parent).info.status == "FINISHED"
    assert local.get_run(run).data.params == {"a.b": "1"}
    assert [(m.step, m.value) for m in local.get_metric_history(run, "x")] == [(3, 2.0)]


def test_the_agent_exits_when_idle_and_when_its_store_folder_is_removed(tmp_path, store):
    path = tracking_agent.socket_path(os.environ["MLFLOW_TRACKING_URI"])
    client = tracking.connect(store)
    pid = client._request({"op": "hello"})["pid"]
    time.sleep(3)
    assert path.exists()  # a connected stage keeps it up past the idle time
    client.close()
    assert wait_until(lambda: not path.exists())  # idle for 2 s: gone
    assert wait_until(lambda: not _alive(pid))

    other = tmp_path / "other"
    other.mkdir()
    uri = f"sqlite:///{other / 'mlflow.db'}"
    os.environ[tracking_agent.IDLE_ENV] = "600"
    try:
        client = tracking_agent.connect(uri)
    finally:
        os.environ[tracking_agent.IDLE_ENV] = "2"
    pid = client._request({"op": "hello"})["pid"]
    client.close()
    for file in other.iterdir():
        file.unlink()
    other.rmdir()
    assert wait_until(lambda: not _alive(pid))


def test_a_stage_uses_mlflow_in_process_when_the_agent_cannot_start(store, monkeypatch):
    monkeypatch.setattr(sys, "executable", "/bin/false")  # the agent exits at once
    client = tracking.connect(store)
    assert isinstance(client, mlflow.MlflowClient)


def test_the_mode_is_checked(monkeypatch):
    monkeypatch.setenv(tracking.AGENT_ENV, "yes")
    with pytest.raises(ValueError, match="BOSS_TRACKING_AGENT must be 0, 1 or auto"):
        tracking.use_agent("sqlite:///x.db")
    monkeypatch.setenv(tracking.AGENT_ENV, "auto")
    assert not tracking.use_agent("sqlite:///x.db")  # this process has imported mlflow
    assert not tracking.use_agent("http://127.0.0.1:5000")
    monkeypatch.setenv(tracking.AGENT_ENV, "0")
    assert not tracking.use_agent("sqlite:///x.db")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie child of this process (the agent it started) counts as gone
    try:
        return os.waitpid(pid, os.WNOHANG) == (0, 0)
    except ChildProcessError:
        return True
