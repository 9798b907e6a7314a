"""Prefect retries flaky I/O (the prepare step's read) and never deterministic math."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tasks import cost, evaluate, features, pairs, prepare, report, schedules, straighten, teacher

ROOT = Path(__file__).resolve().parents[1]


def test_only_the_reading_step_retries():
    assert prepare.task.retries == 2
    for module in (teacher, features, cost, schedules, pairs, evaluate, report):
        assert module.task.retries == 0, module.__name__
    assert straighten.make_task("boss").retries == 0


@pytest.mark.slow
def test_a_flaky_read_is_retried_and_bad_input_is_not(tmp_path, monkeypatch):
    from prefect import flow

    from boss_core.data import DataConfig
    from tasks.cli.embed import write_digits
    from tasks.runtime.params import load_params
    from tasks.runtime.workspace import Workspace

    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    write_digits(tmp_path / "data")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
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
    def one_step():
        return prepare.task(params, ws)

    monkeypatch.setattr(DataConfig, "load", lambda self: flaky(self, OSError("stale handle")))
    assert one_step()["n"] == 1797
    assert len(calls) == 2  # failed once, retried, succeeded
    assert (tmp_path / "outputs/prepare/dataset.safetensors").is_file()

    calls.clear()
    monkeypatch.setattr(DataConfig, "load",
                        lambda self: flaky(self, ValueError("cannot read image file x.png")))
    with pytest.raises(ValueError, match="x.png"):
        one_step()
    assert len(calls) == 1  # the same error every time: not retried
