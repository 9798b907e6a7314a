"""Prefect retries flaky I/O (the prepare step's read) and never deterministic math, also when
the flow submits the step through its graph runner (flows/graph.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tasks import cost, evaluate, features, pairs, prepare, report, schedules, straighten, teacher

ROOT = Path(__file__).resolve().parents[1]


def test_only_the_reading_step_retries(tmp_path):
    from flows.pipeline import pipeline_steps, prepare_run

    assert prepare.task.retries == 2
    for module in (teacher, features, cost, schedules, pairs, evaluate, report):
        assert module.task.retries == 0, module.__name__
    assert straighten.make_task("boss").retries == 0
    plan = prepare_run(None, ROOT / "params.yaml", run_dir=tmp_path / "run")  # writes nothing
    retries = {step.name: step.task.retries for step in pipeline_steps(plan)}
    assert retries.pop("prepare") == 2
    assert set(retries.values()) == {0}, retries


@pytest.mark.slow
def test_a_flaky_read_is_retried_and_bad_input_is_not(tmp_path, monkeypatch,
                                                       prefect_server_api):
    """Against the session's real Prefect server (a temporary one may miss its 20 s start-up
    limit on two busy cores)."""
    from prefect import flow
    from prefect.logging.handlers import APILogHandler
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from boss_core.data import DataConfig
    from flows.graph import Step, run_graph
    from tasks.cli.embed import write_digits
    from tasks.runtime.params import load_params
    from tasks.runtime.workspace import Workspace

    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    write_digits(tmp_path / "data")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv("BOSS_PARENT_RUN_ID", raising=False)
    params = load_params(tmp_path / "params.yaml", {"run.progress": False})
    ws = Workspace.at(tmp_path)
    real_load, calls = DataConfig.load, []

    def flaky(self, error):
        calls.append(error)
        if len(calls) == 1:
            raise error
        return real_load(self)

    @flow(name="retry-check")
    def one_step():  # as flows.pipeline submits it
        return run_graph([Step("prepare", prepare.task, (params, ws))])["prepare"]

    with temporary_settings({PREFECT_API_URL: str(prefect_server_api)}):
        monkeypatch.setattr(DataConfig, "load",
                            lambda self: flaky(self, OSError("stale handle")))
        assert one_step()["n"] == 1797
        assert len(calls) == 2  # failed once, retried, succeeded
        assert (tmp_path / "outputs/prepare/dataset.safetensors").is_file()

        calls.clear()
        monkeypatch.setattr(DataConfig, "load",
                            lambda self: flaky(self, ValueError("cannot read image file x.png")))
        with pytest.raises(ValueError, match="x.png"):
            one_step()
        assert len(calls) == 1  # the same error every time: not retried
        APILogHandler().flush()  # before the server goes
