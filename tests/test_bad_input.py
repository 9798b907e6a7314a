"""Bad input stops the run before any compute with one clear error naming the key or file,
and nothing is written: each row of RELIABILITY.md is a test here (or in test_params.py).

The data rows run the prepare step (the first stage) in-process on a throwaway workspace:
``tasks.runtime.step.main`` must return 2, its log must name the file / folder / key, and
outputs/prepare must hold exactly the stale file put there before (same bytes, nothing new).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tasks import prepare
from tasks.runtime import step
from tasks.runtime.params import ParamsError, load_params

ROOT = Path(__file__).resolve().parents[1]
STALE = b"a previous run's dataset file"


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory):
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture
def ws(tmp_path, monkeypatch, mlflow_uri, caplog):
    """A workspace: params.yaml, the embedded digits, a stale outputs/prepare; logs captured."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    monkeypatch.setenv("BOSS_PREFECT", "0")
    for key in ("PREFECT_API_URL", "BOSS_PARENT_RUN_ID"):
        monkeypatch.delenv(key, raising=False)
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    from tasks.cli.embed import write_digits

    write_digits(tmp_path / "data")
    (tmp_path / "outputs" / "prepare").mkdir(parents=True)
    (tmp_path / "outputs" / "prepare" / "dataset.safetensors").write_bytes(STALE)
    boss = logging.getLogger("boss")  # it does not propagate: listen on it directly
    boss.addHandler(caplog.handler)
    yield tmp_path
    boss.removeHandler(caplog.handler)


def run_prepare(ws: Path, *overrides: str) -> int:
    argv = ["--params", str(ws / "params.yaml"), "--set", "run.device=cpu",
            "--set", "run.progress=false"]
    for item in overrides:
        argv += ["--set", item]
    return step.main("prepare", prepare.run, prepare.SECTIONS, argv=argv)


def errors(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)


def assert_nothing_written(ws: Path) -> None:
    out = ws / "outputs" / "prepare"
    assert sorted(p.name for p in out.iterdir()) == ["dataset.safetensors"]
    assert (out / "dataset.safetensors").read_bytes() == STALE
    assert sorted(p.name for p in (ws / "outputs").iterdir()) == ["prepare"]


def refused(ws: Path, caplog, *overrides: str) -> str:
    """Run prepare, expect exit 2 and nothing written; returns the error line."""
    assert run_prepare(ws, *overrides) == 2
    assert_nothing_written(ws)
    message = errors(caplog)
    assert message and "\n" not in message.strip(), message  # one line
    return message


def write_pngs(folder: Path, specs: dict[str, list[tuple]], seed: int = 0) -> None:
    """folder/<class>/<i>.png of random pixels: specs {class: [(mode, shape), ...]}."""
    rng = np.random.default_rng(seed)
    for cls, items in specs.items():
        (folder / cls).mkdir(parents=True, exist_ok=True)
        for i, (mode, shape) in enumerate(items):
            pixels = rng.integers(0, 256, size=shape, dtype=np.uint8)
            Image.fromarray(pixels, mode=mode).save(folder / cls / f"{i}.png")


GREY = ("L", (8, 8))


# --- params.yaml ---------------------------------------------------------------------------

@pytest.mark.parametrize(("override", "named"), [
    ({"teacher.itertions": 5}, "teacher.itertions"),  # unknown key
    ({"teacher.iterations": "many"}, "teacher.iterations"),  # wrong type
    ({"teacher.lr": "1e-3"}, "teacher.lr"),  # YAML 1.1 reads 1e-3 as a string
    ({"straighten.lr": -1.0}, "straighten.lr"),  # out of range
    ({"sweep.holdout_fraction": 1.5}, "sweep.holdout_fraction"),
    ({"sweep.nfes": [2, 8], "sweep.n_steps": 4}, "sweep.nfes"),  # NFE > fine-grid steps
    ({"teacher.batch_size": 0}, "teacher.batch_size"),
    ({"features.batch_size": 0}, "features.batch_size"),
    ({"fidelity.batch_size": 0}, "fidelity.batch_size"),
    ({"sweep.batch_size": 0}, "sweep.batch_size"),
    ({"straighten.batch_size": 0}, "straighten.batch_size"),
    ({"sweep.methods": ["boss", "magic"]}, "magic"),  # unknown method
    ({"sweep.lora_rank": 0}, "sweep.lora_rank"),
])
def test_bad_params_value_names_the_key(override, named):
    with pytest.raises(ParamsError) as err:
        load_params(ROOT / "params.yaml", override)
    assert named in str(err.value), str(err.value)
    if named == "sweep.nfes":
        assert "n_steps=4" in str(err.value)
    assert ("write the number with a dot" in str(err.value)) == (named == "teacher.lr")


def test_bad_params_file_stops_the_step_before_any_run(ws, caplog):
    text = (ws / "params.yaml").read_text()
    (ws / "params.yaml").write_text(text.replace("  iterations: 1500", "  itertions: 1500"))
    assert run_prepare(ws) == 2
    assert "teacher.itertions" in errors(caplog)
    assert_nothing_written(ws)


def test_lora_rank_above_every_layer_fails_in_prepare(ws, caplog):
    from boss_core.lora import lora_targets
    from boss_core.models import build_model

    params = load_params(ws / "params.yaml")
    assert "boss_lora" in params.sweep.methods
    largest = max(lora_targets(build_model(params.model, (1, 8, 8))).values())  # 64
    message = refused(ws, caplog, f"sweep.lora_rank={largest + 1}")
    assert f"sweep.lora_rank={largest + 1}" in message and f"is {largest}" in message
    # the largest allowed rank passes, and so does any rank when boss_lora is not run
    assert run_prepare(ws, f"sweep.lora_rank={largest}") == 0
    assert (ws / "outputs/prepare/dataset.safetensors").read_bytes() != STALE
    assert run_prepare(ws, "sweep.lora_rank=1000", "sweep.methods=[teacher, boss]") == 0


def test_model_that_cannot_build_for_the_data_fails_in_prepare(ws, caplog):
    message = refused(ws, caplog, "data.name=moons", "data.root=null", "model.arch=unet")
    assert message.startswith("error: model:") and "needs image data" in message


@pytest.mark.parametrize(("override", "named", "user"), [
    ({"data.image_size": 16}, "data.image_size only applies to datasets ['image_folder']",
     "image_folder"),
    ({"data.channels": 3}, "data.channels only applies", "image_folder"),
    ({"data.train": False}, "data.train only applies to datasets ['mnist', 'cifar10']", "mnist"),
])
def test_data_option_the_dataset_would_ignore_is_refused(override, named, user):
    with pytest.raises(ParamsError) as err:
        load_params(ROOT / "params.yaml", override)  # data.name: npy
    assert named in str(err.value), str(err.value)
    load_params(ROOT / "params.yaml", {**override, "data.name": user})  # where it applies


# --- data ----------------------------------------------------------------------------------

def test_missing_data_folder_is_named(ws, caplog, tmp_path):
    for name in ("image_folder", "npy"):
        caplog.clear()
        message = refused(ws, caplog, f"data.name={name}", f"data.root={tmp_path / 'nowhere'}")
        assert "nowhere" in message and "does not exist" in message


def test_data_root_that_is_a_file_is_named(ws, caplog):
    (ws / "data" / "notes.txt").write_text("not a folder")
    message = refused(ws, caplog, "data.name=image_folder", "data.root=data/notes.txt")
    assert "notes.txt is a file, not a folder" in message


@pytest.mark.parametrize("layout", ["empty", "empty class folder", "files but no class folder"])
def test_empty_image_folder_is_named(ws, caplog, layout):
    root = ws / "data" / "pictures"
    root.mkdir()
    if layout == "empty class folder":
        (root / "cats").mkdir()
    elif layout == "files but no class folder":
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "0.png")
    message = refused(ws, caplog, "data.name=image_folder", "data.root=data/pictures")
    assert str(root) in message and "no class folders" in message


def test_empty_npy_folder_is_named(ws, caplog):
    (ws / "data" / "arrays").mkdir()
    message = refused(ws, caplog, "data.name=npy", "data.root=data/arrays")
    assert "no images.npy" in message and str(ws / "data" / "arrays") in message


def test_mixed_image_sizes_name_both_files(ws, caplog):
    write_pngs(ws / "data/pictures", {"a": [GREY], "b": [("L", (6, 6))]})
    message = refused(ws, caplog, "data.name=image_folder", "data.root=data/pictures")
    assert str(ws / "data/pictures/b/0.png") in message
    assert str(ws / "data/pictures/a/0.png") in message and "image_size" in message
    assert run_prepare(ws, "data.name=image_folder", "data.root=data/pictures",
                       "data.image_size=8") == 0  # resizing is the way out


def test_mixed_channels_name_the_file(ws, caplog):
    write_pngs(ws / "data/pictures", {"a": [GREY], "b": [("RGB", (8, 8, 3))]})
    message = refused(ws, caplog, "data.name=image_folder", "data.root=data/pictures")
    assert str(ws / "data/pictures/b/0.png") in message and "channels" in message


@pytest.mark.parametrize("damage", ["not an image", "truncated"])
def test_corrupt_image_file_is_named(ws, caplog, damage):
    write_pngs(ws / "data/pictures", {"a": [GREY, GREY], "b": [("L", (32, 32))]})
    bad = ws / "data/pictures/b/0.png"
    if damage == "truncated":
        whole = bad.read_bytes()
        bad.write_bytes(whole[:len(whole) // 2])
    else:
        bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    message = refused(ws, caplog, "data.name=image_folder", "data.root=data/pictures",
                      "data.image_size=8")  # the size is not what fails
    assert f"cannot read image file {bad}" in message


def test_truncated_npy_file_is_named(ws, caplog):
    path = ws / "data/digits/images.npy"
    path.write_bytes(path.read_bytes()[:1000])
    message = refused(ws, caplog)
    assert f"cannot read {path}" in message


def test_unlabelled_images_with_the_classifier_extractor_fail_in_prepare(ws, caplog):
    (ws / "data/digits/labels.npy").unlink()
    message = refused(ws, caplog)  # fidelity.extractor: classifier in params.yaml
    assert "fidelity.extractor" in message and "has no labels" in message
    assert "inception" in message and "class folder" in message
    assert str(ws / "data/digits") in message
    inception = ["fidelity.extractor=inception", "fidelity.inception_weights=data/inception.pt"]
    caplog.clear()
    message = refused(ws, caplog, *inception)  # the way out, but its file is missing
    assert "fidelity.inception_weights" in message and str(ws / "data/inception.pt") in message
    (ws / "data/inception.pt").write_bytes(b"weights")  # evaluate checks what is inside
    assert run_prepare(ws, *inception) == 0
    # the features stage keeps the same check for a dataset prepared with other params
    from tasks import features

    caplog.clear()
    argv = ["--params", str(ws / "params.yaml"), "--set", "run.device=cpu"]
    assert step.main("features", features.run, features.SECTIONS, argv=argv) == 2
    assert "fidelity.extractor" in errors(caplog) and "has no labels" in errors(caplog)
    assert not (ws / "outputs/features").exists()


def test_a_single_class_folder_is_no_labels_for_the_classifier(ws, caplog):
    write_pngs(ws / "data/pictures", {"all": [GREY] * 3})
    message = refused(ws, caplog, "data.name=image_folder", "data.root=data/pictures")
    assert "fidelity.extractor" in message and "single class" in message
    write_pngs(ws / "data/pictures", {"other": [GREY] * 2}, seed=1)
    assert run_prepare(ws, "data.name=image_folder", "data.root=data/pictures") == 0


def test_unlabelled_points_need_no_labels(ws):
    (ws / "data/points").mkdir()
    np.save(ws / "data/points/images.npy", np.random.default_rng(0).normal(size=(50, 2)))
    assert run_prepare(ws, "data.root=data/points", "model.arch=mlp") == 0


@pytest.mark.parametrize(("labels", "says"), [
    (np.full(1797, -1, dtype=np.int64), ">= 0"),
    (np.zeros(1796, dtype=np.int64), "expected 1797 integer labels"),
    (np.zeros(1797, dtype=np.float32), "expected 1797 integer labels"),
])
def test_bad_labels_file_is_named(ws, caplog, labels, says):
    np.save(ws / "data/digits/labels.npy", labels)
    message = refused(ws, caplog)
    assert str(ws / "data/digits/labels.npy") in message and says in message


# --- numerics ------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_nan_or_inf_in_the_data_is_named(ws, caplog, value):
    path = ws / "data/digits/images.npy"
    images = np.load(path)
    images[5, 0, 3, 3] = value
    np.save(path, images)
    message = refused(ws, caplog)
    assert f"{path} holds NaN or Inf values" in message


def test_nan_from_a_loader_is_refused_by_prepare(ws):
    """The prepare check itself (whatever the loader lets through) names the data and sample."""
    import torch

    from boss_core.data import TensorData

    x = torch.zeros(4, 2)
    x[2, 1] = float("nan")
    params = load_params(ws / "params.yaml", {"data.name": "moons", "data.root": None,
                                               "model.arch": "mlp"})
    with pytest.raises(ValueError, match=r"data moons \(moons\) holds NaN or Inf values in 1 of "
                                         r"4 samples \(the first is sample 2\)"):
        prepare.check_dataset(params, TensorData(x, None, "moons"), x, "moons")
    prepare.check_dataset(params, TensorData(x[:2], None, "moons"), x[:2], "moons")


# --- how the failure surfaces --------------------------------------------------------------

def test_failed_step_run_is_marked_failed_in_mlflow(ws, caplog, mlflow_uri):
    import mlflow

    (ws / "data/digits/labels.npy").unlink()
    refused(ws, caplog)
    client = mlflow.MlflowClient(mlflow_uri)
    runs = client.search_runs([client.get_experiment_by_name("boss").experiment_id],
                              filter_string="tags.`boss.step` = 'prepare'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    assert runs[0].info.status == "FAILED"


def test_command_line_exits_2_with_one_line_and_no_traceback(ws):
    write_pngs(ws / "data/pictures", {"a": [GREY], "b": [GREY]})
    (ws / "data/pictures/b/0.png").write_bytes(b"GIF89a broken")
    done = subprocess.run(
        [sys.executable, "-m", "tasks.prepare", "--params", str(ws / "params.yaml"),
         "--set", "data.name=image_folder", "--set", "data.root=data/pictures"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
        env={**os.environ, "BOSS_LOG_LEVEL": "INFO"})
    assert done.returncode == 2, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if "ERROR" in line]
    assert len(lines) == 1 and "error: cannot read image file" in lines[0], done.stderr
    assert str(ws / "data/pictures/b/0.png") in lines[0]
    assert "Traceback" not in done.stderr
    assert_nothing_written(ws)


def test_prefect_does_not_retry_bad_input():
    from prefect.states import Failed

    assert prepare.task.retries == 2 and prepare.task.retry_condition_fn is not None
    should_retry = prepare.task.retry_condition_fn
    assert not should_retry(prepare.task, None, Failed(data=ValueError("corrupt file")))
    assert not should_retry(prepare.task, None, Failed(data=FileNotFoundError("no folder")))
    assert should_retry(prepare.task, None, Failed(data=OSError("stale NFS handle")))
