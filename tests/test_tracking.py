"""MLflow runs: a failing step never stays RUNNING, and unreachable services fail at once."""

from __future__ import annotations

import socket
import time

import mlflow
import pytest

from tasks.runtime import tracking


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv(tracking.PARENT_ENV, raising=False)
    return tmp_path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_failing_step_marks_its_run_and_the_parent_failed(store, monkeypatch):
    experiment = tracking.setup(store, "t")
    parent = tracking.start_parent(experiment, store, "p", {"a.b": 1})
    monkeypatch.setenv(tracking.PARENT_ENV, parent)
    client = mlflow.MlflowClient()
    tracking.log_metrics(client, parent, {"earlier": 1.5}, step=2)
    with tracking.step_run("good", store, "t", {}, {}) as (_, good, _):
        tracking.log_metrics(client, good, {"x": 1.0, "bad": float("nan")})
    with pytest.raises(RuntimeError, match="boom"), \
            tracking.step_run("bad", store, "t", {}, {}) as (_, bad, _):
        raise RuntimeError("boom")
    assert client.get_run(good).info.status == "FINISHED"
    assert "bad" not in client.get_run(good).data.metrics  # NaN never reaches MLflow
    assert client.get_run(bad).info.status == "FAILED"
    assert client.get_run(parent).info.status == "FAILED"
    assert client.get_run(parent).data.metrics == {"earlier": 1.5}


def test_an_unreachable_tracking_server_fails_before_any_step(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{_free_port()}")
    ran = []
    start = time.perf_counter()
    with pytest.raises(ConnectionError, match="MLflow tracking server"), \
            tracking.step_run("s", tmp_path, "t", {}, {}):
        ran.append(True)
    assert not ran
    assert time.perf_counter() - start < 10


def test_an_unreachable_prefect_api_is_reported(monkeypatch):
    monkeypatch.setenv("PREFECT_API_URL", f"http://127.0.0.1:{_free_port()}/api")
    with pytest.raises(ConnectionError, match="PREFECT_API_URL"):
        tracking.check_prefect_api()
    monkeypatch.delenv("PREFECT_API_URL")
    tracking.check_prefect_api()  # unset: nothing to check


def test_runs_left_running_by_a_dead_process_are_marked_killed(store, monkeypatch):
    import subprocess
    import sys

    experiment = tracking.setup(store, "t")
    parent = tracking.start_parent(experiment, store, "p", {})
    monkeypatch.setenv(tracking.PARENT_ENV, parent)
    client = mlflow.MlflowClient()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        owner = tracking.process_owner(child.pid)
        dead = client.create_run(experiment, run_name="killed step", tags={
            "mlflow.parentRunId": parent, tracking.OWNER_TAG: owner}).info.run_id
        alive = client.create_run(experiment, run_name="live step", tags={
            "mlflow.parentRunId": parent,
            tracking.OWNER_TAG: tracking.process_owner()}).info.run_id
        assert tracking.mark_dead_runs_killed(client, experiment) == []  # child still alive
    finally:
        child.kill()
        child.wait()
    assert tracking.mark_dead_runs_killed(client, experiment) == [dead]
    assert client.get_run(dead).info.status == "KILLED"
    assert client.get_run(parent).info.status == "KILLED"
    assert client.get_run(alive).info.status == "RUNNING"


def test_retry_retries_io_errors_with_backoff_then_gives_up(monkeypatch):
    slept = []
    monkeypatch.setattr(tracking.time, "sleep", slept.append)
    calls = iter([ConnectionError("reset"), TimeoutError("slow"), "ok"])

    def flaky():
        outcome = next(calls)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    assert tracking.retry(flaky, attempts=3, delay=1.0) == "ok"
    assert slept == [1.0, 2.0]
    slept.clear()
    failures = []

    def broken():
        failures.append(1)
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        tracking.retry(broken, attempts=3, delay=0.5)
    assert len(failures) == 3 and slept == [0.5, 1.0]


def test_retry_raises_other_errors_at_once(monkeypatch):
    from mlflow.exceptions import MlflowException

    monkeypatch.setattr(tracking.time, "sleep", lambda _: pytest.fail("must not wait"))
    calls = []

    def refused():
        calls.append(1)
        raise MlflowException("RESOURCE_DOES_NOT_EXIST: no such run")

    with pytest.raises(MlflowException):
        tracking.retry(refused)
    assert calls == [1]


def test_a_series_is_logged_by_step_thinned_and_without_nan(store):
    import numpy as np

    experiment = tracking.setup(store, "t")
    run = tracking.start_parent(experiment, store, "p", {})
    client = mlflow.MlflowClient()
    rows = np.array([[s, 1.0 / (s + 1)] for s in range(1203)])
    rows[4, 1] = np.nan
    tracking.log_series(client, run, "loss", rows, every=2)  # 602 points: two batches
    history = {m.step: m.value for m in client.get_metric_history(run, "loss")}
    want = {int(s): v for s, v in rows[::2] if np.isfinite(v)}
    assert history == pytest.approx(want) and 4 not in history and len(history) == 601
