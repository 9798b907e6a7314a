"""python -m tasks.export: every method's schedule as times, grid indices, flow-match sigmas
and timesteps, checked against the Schedule objects of a small fake run and against diffusers'
FlowMatchEulerDiscreteScheduler (its sigmas, timesteps and Euler step)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from boss_core.presets import uniform_schedule
from boss_core.sampling import euler_sample
from boss_core.schedule import Schedule
from tasks import export
from tasks.runtime.artifacts import schedules_file, schedules_to_dict, student_dir
from tasks.runtime.io import write_json
from tasks.runtime.workspace import Workspace

N, NFES, T = 12, (2, 3), 1000
METHODS = ["teacher", "uniform", "bellman", "learned_times", "boss", "boss_student",
           "learned_times_ft"]
TABLE = {  # what the schedules stage would have written for these methods
    "uniform": {k: uniform_schedule(k) for k in NFES},
    "bellman": {2: Schedule.from_indices([0, 7, 12], N, cost=0.5, name="bellman"),
                3: Schedule.from_indices([0, 5, 9, 12], N, cost=0.25, name="bellman")},
    "learned_times": {2: Schedule(times=[0.0, 0.6180339887, 1.0], cost=0.1,
                                  name="learned_times"),
                      3: Schedule(times=[0.0, 0.3137, 0.7071, 1.0], name="learned_times")},
}
OWN = {"boss_student": {2: Schedule.from_indices([0, 6, 12], N, name="bellman"),
                        3: Schedule.from_indices([0, 4, 10, 12], N, name="bellman")},
       "learned_times_ft": {2: Schedule(times=[0.0, 0.45, 1.0]),  # off the fine grid
                            3: Schedule(times=[0.0, 0.2, 0.61, 1.0])}}


def fake_run(root, methods=METHODS, own=True):
    """params.yaml and the artifacts export reads, written with the stages' own writers."""
    root.mkdir(parents=True, exist_ok=True)
    params = {"sweep": {"methods": methods, "nfes": list(NFES), "n_steps": N}}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    ws = Workspace.at(root)
    write_json(schedules_file(ws), {"n_steps": N, "schedules": schedules_to_dict(TABLE),
                                    "search": {}})
    for k in NFES:
        write_json(student_dir(ws, "boss", k) / "schedule.json", TABLE["bellman"][k].to_dict())
        for method, by_k in OWN.items():
            if own:
                write_json(student_dir(ws, method, k) / "schedule.json", by_k[k].to_dict())
    return root


def expected():
    """{method: (schedule, model, {K: Schedule})} for METHODS."""
    return {"teacher": ("teacher", "teacher", {N: Schedule.from_indices(range(N + 1), N)}),
            "uniform": ("uniform", "teacher", TABLE["uniform"]),
            "bellman": ("bellman", "teacher", TABLE["bellman"]),
            "learned_times": ("learned_times", "teacher", TABLE["learned_times"]),
            "boss": ("bellman", "boss", TABLE["bellman"]),
            "boss_student": ("boss_student", "boss_student", OWN["boss_student"]),
            "learned_times_ft": ("learned_times_ft", "learned_times_ft",
                                 OWN["learned_times_ft"])}


@pytest.fixture
def exported(tmp_path):
    run = fake_run(tmp_path / "run")
    out = tmp_path / "out"
    assert export.main(["--run-dir", str(run), "--out-dir", str(out)]) == 0
    return json.loads((out / "schedules.json").read_text()), out / "schedules.csv"


def test_json_holds_every_methods_schedules(exported):
    doc, _ = exported
    assert (doc["format"], doc["n_steps"], doc["num_train_timesteps"]) == ("boss-schedules", N, T)
    assert list(doc["methods"]) == METHODS
    for method, (source, model, by_k) in expected().items():
        entry = doc["methods"][method]
        assert (entry["schedule"], entry["model"]) == (source, model), method
        assert entry["trained"] == (method in ("boss", "boss_student", "learned_times_ft"))
        assert list(entry["schedules"]) == [f"nfe_{k}" for k in sorted(by_k)]
        for k, sched in by_k.items():
            row = entry["schedules"][f"nfe_{k}"]
            times = np.array(row["times"])
            assert row["nfe"] == k and times.shape == (k + 1,)
            np.testing.assert_array_equal(times, sched.times)
            assert row["indices"] == (None if sched.indices is None else list(sched.indices))
            assert row["cost"] == sched.cost
            # sigma = 1 - t exactly (float64), K + 1 of them from 1 to 0; K timesteps
            np.testing.assert_array_equal(row["sigmas"], 1.0 - sched.times)
            assert row["sigmas"][0] == 1.0 and row["sigmas"][-1] == 0.0
            np.testing.assert_array_equal(row["timesteps"], (1.0 - sched.times[:-1]) * T)
    # boss_student samples on what its students found, not on the table it started from
    assert doc["methods"]["boss_student"]["schedules"]["nfe_2"]["indices"] == [0, 6, 12]
    assert doc["methods"]["learned_times"]["schedules"]["nfe_3"]["indices"] is None
    assert doc["methods"]["learned_times_ft"]["schedules"]["nfe_3"]["times"][1] == 0.2


def test_csv_has_one_row_per_method_k_and_step(exported):
    doc, csv_path = exported
    df = pd.read_csv(csv_path, dtype={"grid_index": "Int64"})
    assert list(df.columns) == list(export.CSV_COLUMNS)
    assert len(df) == sum(k + 1 for _, _, by_k in expected().values() for k in by_k)
    for method, (source, model, by_k) in expected().items():
        for k, sched in by_k.items():
            rows = df[(df.method == method) & (df.nfe == k)]
            assert list(rows.k) == list(range(k + 1))
            assert set(rows.schedule) == {source} and set(rows.model) == {model}
            np.testing.assert_array_equal(rows.t.to_numpy(), sched.times)  # round-trips
            np.testing.assert_array_equal(rows.sigma.to_numpy(), 1.0 - sched.times)
            json_row = doc["methods"][method]["schedules"][f"nfe_{k}"]
            np.testing.assert_array_equal(rows.timestep.to_numpy()[:-1], json_row["timesteps"])
            assert np.isnan(rows.timestep.to_numpy()[-1])  # the final sigma 0 has none
            if sched.indices is None:
                assert rows.grid_index.isna().all()
            else:
                assert list(rows.grid_index) == list(sched.indices)


@pytest.mark.parametrize("method,k", [("bellman", 3), ("learned_times", 2), ("teacher", N)])
def test_diffusers_flow_match_scheduler_takes_the_exported_sigmas(exported, method, k):
    from diffusers import FlowMatchEulerDiscreteScheduler

    row = exported[0]["methods"][method]["schedules"][f"nfe_{k}"]
    sigmas, times = np.array(row["sigmas"]), np.array(row["times"])
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    scheduler.set_timesteps(sigmas=row["sigmas"][:-1])  # the K sigmas: it appends the 0
    assert scheduler.sigmas.shape == (k + 1,) and scheduler.timesteps.shape == (k,)
    np.testing.assert_allclose(scheduler.sigmas.numpy(), sigmas, rtol=0, atol=1e-7)
    assert scheduler.sigmas[-1].item() == 0.0
    np.testing.assert_allclose(scheduler.timesteps.numpy(), row["timesteps"], rtol=1e-6)

    # Euler with a velocity field of closed form: diffusers' step is x + (sigma' - sigma)
    # * model_output, so model_output = -v(x, t_k) gives x + (t_{k+1} - t_k) v(x, t_k)
    def velocity(x, t):
        return torch.cos(3 * t).view(-1, 1) * x + t.view(-1, 1) ** 2

    x0 = torch.randn(4, 5, dtype=torch.float32, generator=torch.Generator().manual_seed(0))
    ours = euler_sample(velocity, x0, torch.tensor(times))
    x = x0.clone()
    for i, timestep in enumerate(scheduler.timesteps):
        t_cur = torch.full((x.shape[0],), times[i], dtype=x.dtype)
        x = scheduler.step(-velocity(x, t_cur), timestep, x).prev_sample
    np.testing.assert_allclose(x.numpy(), ours.numpy(), rtol=0, atol=1e-5)  # float32 rounding


def test_one_diffusers_step_of_a_constant_velocity_is_our_euler_step():
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = TABLE["bellman"][3]
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    scheduler.set_timesteps(sigmas=sched.to_flow_match_sigmas()[:-1].tolist())
    x, v = torch.ones(2, 3), torch.tensor([[0.5, -1.0, 2.0]]).expand(2, 3)
    step = scheduler.step(-v, scheduler.timesteps[0], x).prev_sample
    dt = sched.times[1] - sched.times[0]  # 5 / 12
    torch.testing.assert_close(step, x + dt * v, rtol=0, atol=1e-6)
    wrong = scheduler.step(v, scheduler.timesteps[1], step).prev_sample  # +v: the wrong sign
    dt2 = sched.times[2] - sched.times[1]
    assert torch.linalg.norm(wrong - (step + dt2 * v)) > 1.0


def test_diffusers_given_the_final_zero_too_takes_one_step_too_many(exported):
    from diffusers import FlowMatchEulerDiscreteScheduler

    row = exported[0]["methods"]["bellman"]["schedules"]["nfe_3"]
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    scheduler.set_timesteps(sigmas=row["sigmas"])  # K + 1 values: why the docs say [:-1]
    assert scheduler.timesteps.shape == (4,) and scheduler.sigmas[-2:].tolist() == [0.0, 0.0]


def test_flow_match_sigmas_and_timesteps_of_a_schedule():
    sched = Schedule.from_indices([0, 3, 10, 24], 24)
    np.testing.assert_array_equal(sched.to_flow_match_sigmas(), 1.0 - sched.times)
    np.testing.assert_array_equal(sched.to_flow_match_sigmas()[:-1], sched.to_diffusers_sigmas())
    np.testing.assert_array_equal(sched.to_flow_match_timesteps(),
                                  [1000.0, 1000.0 * (1 - 3 / 24), 1000.0 * (1 - 10 / 24)])
    np.testing.assert_array_equal(sched.to_flow_match_timesteps(1), 1.0 - sched.times[:-1])
    for bad in (0, -5, float("nan"), "1000"):
        with pytest.raises(ValueError, match="num_train_timesteps"):
            sched.to_flow_match_timesteps(bad)


def test_a_missing_schedules_artifact_says_which_stage_to_run(tmp_path, capsys):
    fake_run(tmp_path)
    schedules_file(Workspace.at(tmp_path)).unlink()
    assert export.main(["--run-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "schedules.json is missing" in err and "dvc repro schedules" in err
    assert not (tmp_path / "results").exists()  # nothing written


def test_a_missing_own_schedule_and_a_stale_table_are_refused(tmp_path, capsys):
    fake_run(tmp_path, own=False)
    assert export.main(["--run-dir", str(tmp_path)]) == 2
    assert "dvc repro straighten@boss_student" in capsys.readouterr().err
    assert export.main(["--run-dir", str(tmp_path), "--methods", "learned_times_ft"]) == 2
    assert "dvc repro straighten@learned_times_ft" in capsys.readouterr().err
    # without boss_student it exports; another sweep.nfes than the table's is stale
    assert export.main(["--run-dir", str(tmp_path), "--methods", "teacher", "boss"]) == 0
    doc = json.loads((tmp_path / "results" / "schedules.json").read_text())
    assert list(doc["methods"]) == ["teacher", "boss"]
    assert export.main(["--run-dir", str(tmp_path), "--set", "sweep.nfes=[2, 4]"]) == 2
    assert "stale" in capsys.readouterr().err


def test_a_student_trained_on_other_times_is_refused(tmp_path, capsys):
    fake_run(tmp_path)
    # boss's student at K = 3 learned other times than the table's
    write_json(student_dir(Workspace.at(tmp_path), "boss", 3) / "schedule.json",
               OWN["boss_student"][3].to_dict())
    assert export.main(["--run-dir", str(tmp_path), "--methods", "boss"]) == 2
    assert "straighten@boss" in capsys.readouterr().err


def test_help_explains_the_outputs(capsys):
    with pytest.raises(SystemExit) as exit_info:
        export.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for needle in ("K + 1 time points", "sigmas", "timesteps", "--run-dir", "--out-dir",
                   "dvc repro schedules", "FlowMatchEulerDiscreteScheduler"):
        assert needle in text, needle
