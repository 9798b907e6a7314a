"""tasks.cli.sample: sampling a straightened model from a folder, the MLflow registry, the CLI."""

import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from boss_core.models import ModelConfig, build_model
from boss_core.presets import uniform_schedule
from boss_core.sampling import euler_sample
from boss_core.schedule import Schedule
from boss_core.seeds import sample_noise
from tasks.cli import sample as S
from tasks.runtime.io import MODEL_FORMAT, save_model, save_tensors, write_json

PNG_SIG = b"\x89PNG\r\n\x1a\n"
CONFIG = ModelConfig(arch="mlp", hidden=32, depth=1)
# not uniform, so a sampler that ignored the schedule's times would be caught
BELLMAN = Schedule(times=np.array([0.0, 0.7, 1.0]), name="bellman")


def make_folder(folder: Path, shape=(1, 8, 8), seed=0, schedule=BELLMAN):
    model = build_model(CONFIG, shape, seed=seed).eval()
    save_model(folder / "model.safetensors", model, CONFIG.to_dict(), shape,
               {"method": "boss", "nfe": schedule.nfe})
    write_json(folder / "schedule.json", schedule.to_dict())
    return model


def expected(model, shape, n, seed, schedule=BELLMAN):
    return euler_sample(model, sample_noise(shape, seed, 0, n), schedule.time_grid())


# ----------------------------------------------------------------------------- the folder


@pytest.mark.parametrize("shape", [(1, 8, 8), (2,)])
def test_sample_from_folder_is_euler_on_the_schedule(tmp_path, shape):
    model = make_folder(tmp_path, shape)
    samples, schedule = S.sample_from_folder(tmp_path, 12, seed=3)
    assert schedule.nfe == 2 and schedule.times.tolist() == [0.0, 0.7, 1.0]
    assert samples.dtype == torch.float32
    assert torch.equal(samples, expected(model, shape, 12, 3))
    # the times matter: uniform steps give other samples
    assert not torch.equal(samples, expected(model, shape, 12, 3, uniform_schedule(2)))


def test_same_seed_is_identical_other_seed_differs(tmp_path):
    make_folder(tmp_path)
    a, _ = S.sample_from_folder(tmp_path, 8, seed=0)
    b, _ = S.sample_from_folder(tmp_path, 8, seed=0)
    c, _ = S.sample_from_folder(tmp_path, 8, seed=1)
    assert torch.equal(a, b)
    assert not torch.isclose(a, c).all(dim=(1, 2, 3)).any()  # every sample differs


def test_batches_keep_each_sample_s_noise(tmp_path):
    model = make_folder(tmp_path, (2,))
    batched, _ = S.sample_from_folder(tmp_path, 7, seed=2, batch_size=3)
    noise = sample_noise((2,), 2, 0, 7)
    parts = [euler_sample(model, noise[i:i + 3], BELLMAN.time_grid()) for i in (0, 3, 6)]
    assert torch.equal(batched, torch.cat(parts))
    whole, _ = S.sample_from_folder(tmp_path, 7, seed=2)
    torch.testing.assert_close(batched, whole, rtol=1e-5, atol=1e-6)


def test_missing_and_corrupt_files_name_what_is_wrong(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        S.sample_from_folder(tmp_path / "nowhere", 2, 0)
    make_folder(tmp_path)
    (tmp_path / "schedule.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"schedule\.json is missing"):
        S.sample_from_folder(tmp_path, 2, 0)
    write_json(tmp_path / "schedule.json", BELLMAN.to_dict())
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        S.sample_from_folder(tmp_path, 2, 0)


class _Trap:
    """Unpickling this runs os.mkdir(path): proof that a loader unpickled the file."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.mkdir, (self.path,)


def write_pickle_model(folder: Path, marker: Path):
    state = build_model(CONFIG, (1, 8, 8), seed=0).state_dict()
    torch.save({**state, "trap": _Trap(marker)}, folder / "model.safetensors")


def test_a_pickle_named_model_safetensors_is_refused_unread(tmp_path):
    make_folder(tmp_path)
    marker = tmp_path / "unpickled"
    write_pickle_model(tmp_path, marker)
    with pytest.raises(ValueError, match="pickle / torch.save file"):
        S.sample_from_folder(tmp_path, 2, 0)
    assert not marker.exists()
    # the trap works: an unpickling loader would have run it (torch.load treats a
    # ".safetensors" name as safetensors, so the same bytes go under a .pt name)
    pt = tmp_path / "same_bytes.pt"
    pt.write_bytes((tmp_path / "model.safetensors").read_bytes())
    torch.load(pt, weights_only=False)
    assert marker.is_dir()


def write_import_model(folder: Path, import_path: str, init_kwargs: dict, state=None):
    config = {"arch": "import", "import_path": import_path, "init_kwargs": init_kwargs}
    save_tensors(folder / "model.safetensors", state or {"w": torch.zeros(1)},
                 {"format": MODEL_FORMAT, "model_config": config, "data_shape": [2]})
    write_json(folder / "schedule.json", BELLMAN.to_dict())


def test_arch_import_in_a_file_is_refused_unless_allowed(tmp_path):
    marker = tmp_path / "imported_and_called"
    write_import_model(tmp_path, "os:mkdir", {"path": str(marker)})
    with pytest.raises(ValueError, match="arch 'import'.*refused"):
        S.sample_from_folder(tmp_path, 2, 0)
    assert not marker.exists()
    # the danger is real: with the opt-in the file's callable runs (then fails the type check)
    with pytest.raises(ValueError, match="not a torch.nn.Module"):
        S.sample_from_folder(tmp_path, 2, 0, allow_import=True)
    assert marker.is_dir()


def test_a_trusted_import_model_samples_with_the_opt_in(tmp_path):
    from byo_models import TinyVelocity

    net = build_model(ModelConfig(arch="import", import_path="byo_models:TinyVelocity",
                                  init_kwargs={"dim": 2}), (2,), seed=0)
    assert isinstance(net, TinyVelocity)
    write_import_model(tmp_path, "byo_models:TinyVelocity", {"dim": 2}, net.state_dict())
    samples, _ = S.sample_from_folder(tmp_path, 5, 1, allow_import=True)
    assert torch.equal(samples, expected(net.eval(), (2,), 5, 1))


# --------------------------------------------------------------------------- the registry


@pytest.fixture(scope="module")
def registry(tmp_path_factory, new_mlflow_store):
    """A sqlite store with t-boss-nfe2 v1 (seed 0), v2 (seed 1, alias champion) and
    t-evil-nfe2 v1 (a torch.save pickle as model.safetensors) and t-sneaky-nfe2 v1 (a
    safetensors file whose config imports and calls os.mkdir)."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow

    from tasks.runtime.tracking import register_model

    root = tmp_path_factory.mktemp("mlflow")
    uri = new_mlflow_store(root)
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("t", artifact_location=(root / "artifacts").as_uri())
    run_id = client.create_run(exp).info.run_id
    folders, models = {}, {}
    for seed in (0, 1):
        folders[seed] = root / f"model{seed}"
        models[seed] = make_folder(folders[seed], seed=seed)
        client.log_artifacts(run_id, str(folders[seed]), f"models/boss/nfe_2/seed{seed}")
        register_model(client, run_id, "t-boss-nfe2", f"models/boss/nfe_2/seed{seed}",
                       {"method": "boss", "nfe": "2", "schedule": BELLMAN.to_json()})
    client.set_registered_model_alias("t-boss-nfe2", "champion", "2")
    evil = root / "evil"
    make_folder(evil)
    marker = root / "unpickled"
    write_pickle_model(evil, marker)
    client.log_artifacts(run_id, str(evil), "models/evil/nfe_2")
    register_model(client, run_id, "t-evil-nfe2", "models/evil/nfe_2", {"method": "evil"})
    sneaky = root / "sneaky"
    sneaky.mkdir()
    import_marker = root / "imported"
    write_import_model(sneaky, "os:mkdir", {"path": str(import_marker)})
    client.log_artifacts(run_id, str(sneaky), "models/sneaky/nfe_2")
    register_model(client, run_id, "t-sneaky-nfe2", "models/sneaky/nfe_2", {"method": "x"})
    client.set_terminated(run_id)
    return SimpleNamespace(uri=uri, root=root, folders=folders, models=models, marker=marker,
                           import_marker=import_marker)


@pytest.fixture
def store(registry, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry.uri)
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    return registry


@pytest.mark.parametrize("spec, seed", [
    ("t-boss-nfe2", 1),  # latest
    ("t-boss-nfe2/1", 0),
    ("models:/t-boss-nfe2/2", 1),
    ("t-boss-nfe2@champion", 1),
    ("t-boss-nfe2/latest", 1),
])
def test_fetch_registered_gives_the_registered_files(store, spec, seed):
    folder = S.fetch_registered(spec)
    assert sorted(p.name for p in folder.iterdir()) == ["model.safetensors", "schedule.json"]
    got, schedule = S.sample_from_folder(folder, 6, seed=4)
    want, _ = S.sample_from_folder(store.folders[seed], 6, seed=4)
    assert torch.equal(got, want)
    assert torch.equal(got, expected(store.models[seed], (1, 8, 8), 6, 4))
    other, _ = S.sample_from_folder(store.folders[1 - seed], 6, seed=4)
    assert not torch.equal(got, other)
    assert schedule.times.tolist() == BELLMAN.times.tolist()


def test_fetch_registered_takes_an_explicit_uri(registry, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    folder = S.fetch_registered("t-boss-nfe2/1", tracking_uri=registry.uri)
    assert (folder / "model.safetensors").read_bytes() == (
        registry.folders[0] / "model.safetensors").read_bytes()


@pytest.mark.parametrize("spec, message", [
    ("nope-nfe2", "registered model 'nope-nfe2' not found"),
    ("t-boss-nfe2/9", r"version 9 of registered model 't-boss-nfe2' not found \(versions: 1, 2"),
    ("t-boss-nfe2@gone", "has no alias 'gone'"),
])
def test_unknown_name_version_or_alias(store, spec, message):
    with pytest.raises(S.SampleError, match=message):
        S.fetch_registered(spec)


def test_a_registered_pickle_is_not_loaded(store):
    folder = S.fetch_registered("t-evil-nfe2")
    with pytest.raises(ValueError, match="pickle / torch.save file"):
        S.load_folder(folder)
    assert not store.marker.exists()


def test_parse_registry_spec():
    assert S.parse_registry_spec("a-b-nfe2") == ("a-b-nfe2", None, None)
    assert S.parse_registry_spec("a-b-nfe2/12") == ("a-b-nfe2", "12", None)
    assert S.parse_registry_spec("models:/a-b-nfe2@prod") == ("a-b-nfe2", None, "prod")
    assert S.parse_registry_spec("a-b-nfe2/latest") == ("a-b-nfe2", None, None)
    with pytest.raises(S.SampleError):
        S.parse_registry_spec("models:/")


# -------------------------------------------------------------------------------- the CLI


def test_cli_method_writes_npy_and_png(tmp_path, capsys):
    outputs = tmp_path / "run" / "outputs"
    make_folder(outputs / "students" / "boss" / "nfe_2")
    out = tmp_path / "samples"
    argv = ["--method", "boss", "--nfe", "2", "--outputs", str(outputs), "--n", "10",
            "--seed", "5", "--out", str(out), "--device", "cpu"]
    assert S.main(argv) == 0
    npy, png = out / "boss_nfe2_seed5.npy", out / "boss_nfe2_seed5.png"
    assert capsys.readouterr().out.split() == [str(npy), str(png)]
    want, _ = S.sample_from_folder(outputs / "students" / "boss" / "nfe_2", 10, 5)
    got = np.load(npy)
    assert got.dtype == np.float32 and np.array_equal(got, want.numpy())
    assert png.read_bytes()[:8] == PNG_SIG
    first = npy.read_bytes()
    assert S.main(argv) == 0
    assert npy.read_bytes() == first  # the same seed: the same bytes
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left


def test_cli_registry_writes_the_version_s_samples(store, tmp_path, capsys):
    out = tmp_path / "samples"
    assert S.main(["--registry", "t-boss-nfe2/1", "--n", "9", "--out", str(out),
                   "--device", "cpu", "--batch-size", "4"]) == 0
    npy = out / "t-boss-nfe2-v1_nfe2_seed0.npy"
    assert capsys.readouterr().out.split()[0] == str(npy)
    want, _ = S.sample_from_folder(store.folders[0], 9, 0, batch_size=4)
    assert np.array_equal(np.load(npy), want.numpy())
    assert (out / "t-boss-nfe2-v1_nfe2_seed0.png").read_bytes()[:8] == PNG_SIG


def test_cli_errors_exit_2_with_one_line(store, tmp_path, capsys):
    assert S.main(["--registry", "nope-nfe2", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "registered model 'nope-nfe2' not found" in err and err.count("\n") == 1
    assert S.main(["--registry", "t-evil-nfe2", "--out", str(tmp_path)]) == 2
    assert "pickle / torch.save file" in capsys.readouterr().err
    assert not store.marker.exists()
    assert S.main(["--registry", "t-sneaky-nfe2", "--out", str(tmp_path)]) == 2
    assert "--allow-import" in capsys.readouterr().err
    assert not store.import_marker.exists()
    assert S.main(["--method", "boss", "--nfe", "4", "--outputs", str(tmp_path / "none"),
                   "--out", str(tmp_path)]) == 2
    assert "no student folder" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.npy"))


def test_cli_without_a_store_does_not_create_one(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("{}\n")  # makes tmp_path the repo root
    assert S.main(["--registry", "boss-boss-nfe2"]) == 2
    assert "no MLflow store at" in capsys.readouterr().err
    assert not (tmp_path / "mlflow.db").exists()


def test_help_shows_both_usages(capsys):
    with pytest.raises(SystemExit) as exit_info:
        S.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "--method boss --nfe 2" in text and "--registry boss-boss-nfe2" in text
