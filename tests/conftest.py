"""Shared set-up of the tests: the seed, one torch thread, marks, and the session fixtures.

Session fixtures are built once, the first time a test asks for one, and then shared by every
test of the session (``make test-fast`` asks for none of the slow ones):

- ``tiny_repro``: a copy of the repository on the tiny profile after one ``dvc repro``. Read
  only: a test that changes a repository works on ``clone_repo(tiny_repro, ...)`` or builds its
  own with ``copy_repo``. The session checks at its end that the outputs are unchanged.
  The run starts before the first test, in the background, when a collected test asks for it
  (test_determinism reruns its random steps in a copy).
- ``mixture_teacher``: the 2-D teacher on the 8-mode Gaussian mixture (EMA weights, frozen).
- ``digits_feature_net``: the FID feature classifier trained on the embedded digits.
- ``prefect_server_api``: one real Prefect server for the session's flows and deployments,
  and for the Dask clusters' shard sub-flows (one per xdist worker).

``mlflow_store`` (per test) is an empty SQLite MLflow store at ``tmp_path / "mlflow.db"``, a
copy of one made once per session by ``new_mlflow_store``: creating a store runs MLflow's
migrations (3-7 s here), copying one takes 0.1 s.

Trained models are seeded, built with their own RNG (``torch.random.fork_rng``), and their
parameters are frozen, so training one in place fails; ``copy.deepcopy`` or
``boss_core.straighten.trainable_copy`` gives a copy to change. The session checks that
their weights are unchanged at its end too.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from pipeline_helpers import (  # noqa: E402
    BIN,
    Background,
    copy_repo,
    move_store_paths,
    run,
)

# Under pytest-xdist (``make test`` runs two workers) each worker is its own process: its own
# Prefect home, so temporary Prefect servers of two workers never share one SQLite file.
WORKER = os.environ.get("PYTEST_XDIST_WORKER")  # "gw0", "gw1", ... under ``pytest -n``
if WORKER is not None and "BOSS_TEST_PREFECT_HOME" not in os.environ:
    os.environ["BOSS_TEST_PREFECT_HOME"] = os.environ["PREFECT_HOME"] = tempfile.mkdtemp(
        prefix=f"prefect-{WORKER}-")

# One torch thread, as the pipeline's stage processes run in the tests (pipeline_helpers.env).
# Two threads on the 2 shared cores spin against each other and against the subprocesses:
# training the digits feature net took 28.7 s of CPU with 2 threads, 3.9 s with 1.
torch.set_num_threads(1)

# Marks for slow tests in files that others own, until their owners put the marks in the
# files themselves: {file: {test function: marks}}. ``make test-fast`` leaves them out.
MARKS_ELSEWHERE = {
    "test_flow.py": dict.fromkeys((
        "test_parent_run_finished_or_failed_and_env_restored",
        "test_graph_runs_ready_steps_n_at_a_time_and_stops_at_a_failure",
        "test_concurrent_steps_equal_the_sequential_run_and_publish_artifacts",
        "test_served_deployment_runs_tiny_pipeline_in_its_own_folder",
        "test_a_burst_of_three_runs_two_at_a_time_all_complete_apart"), ("e2e", "slow")),
    "test_retries.py": {"test_a_flaky_read_is_retried_and_bad_input_is_not": ("e2e", "slow")},
    "test_sweep.py": dict.fromkeys(("test_mixture_sweep_rows_and_oracles",
                                    "test_digits_sweep_fid"), ("slow",)),
    "test_fidelity.py": {"test_inception_option_loads_local_weights": ("slow",)},
    "test_tracking_agent.py": {
        "test_the_agent_exits_when_idle_and_when_its_store_folder_is_removed": ("slow",)},
}


# session fixtures that are ``dvc repro`` runs of the tiny profile, started before the first test
TINY_RUNS = ("tiny_repro",)
# The order the xdist workers take whole modules in (``make test`` passes
# ``--no-loadscope-reorder``, so xdist keeps it rather than sorting modules by their number of
# tests): longest first (``--durations``), so that the two workers finish together. The tiny
# run takes about 160 s beside the first two modules; the modules that wait for it
# (test_pipeline_queue, test_determinism, ...) come after those two, so no worker sits idle
# waiting for it. The modules not named here follow in collection order.
ORDER = ("test_scale_pipeline.py", "test_flow.py", "test_pipeline_queue.py", "test_faults.py",
         "test_ddp.py", "test_dask.py", "test_determinism.py", "test_sweep.py",
         "test_tracking_agent.py", "test_fidelity.py", "test_bad_input.py", "test_protocol.py",
         "test_retries.py", "test_models.py", "test_paths.py", "test_pipeline_dvc.py")


@pytest.hookimpl(tryfirst=True)  # before -m deselects by mark
def pytest_collection_modifyitems(config, items):
    for item in items:
        wanted = MARKS_ELSEWHERE.get(item.path.name, {}).get(item.originalname, ())
        for name in wanted:
            if item.get_closest_marker(name) is None:
                item.add_marker(name)
    items.sort(key=lambda item: ORDER.index(item.path.name) if item.path.name in ORDER
               else len(ORDER))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _digest(paths) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(paths)
            if p.is_file()}


def _repro_fingerprint(repo: Path) -> dict[str, str]:
    """Hashes of everything ``dvc repro`` wrote that a reading test could look at."""
    files = [repo / "dvc.lock", repo / "params.yaml"]
    for folder in ("outputs", "results"):
        files += (repo / folder).rglob("*")
    return _digest(files)


def _shared_dir(tmp_path_factory, name: str) -> Path:
    """A folder every xdist worker of this session shares (``pytest -n``), or the plain
    session's own."""
    if WORKER is None:
        return tmp_path_factory.mktemp(name)
    path = tmp_path_factory.getbasetemp().parent / name
    path.mkdir(exist_ok=True)
    return path


class SharedRun:
    """``dvc repro`` in ``repo``, started by one process of the session (its output in
    ``<repo>.log``, its exit code written to ``<repo>.rc`` when it ends) and waited for by
    any: the xdist workers share one run instead of each making its own."""

    def __init__(self, repo: Path):
        self.repo, self.log, self.rc = repo, repo.with_suffix(".log"), repo.with_suffix(".rc")
        self.job = None

    def start(self) -> SharedRun:
        temp = self.rc.with_suffix(".rc.tmp")
        script = f'"{BIN / "dvc"}" repro; echo $? > "{temp}"; mv "{temp}" "{self.rc}"'
        self.job = Background(["sh", "-c", script], self.repo, self.log)
        return self

    def wait(self, timeout: float) -> Path:
        deadline = time.monotonic() + timeout
        while not self.rc.exists():
            if time.monotonic() > deadline:
                raise AssertionError(f"dvc repro in {self.repo} still running after "
                                     f"{timeout:.0f} s")
            time.sleep(0.5)
        code = int(self.rc.read_text().strip() or -1)
        if code != 0:
            raise AssertionError(f"dvc repro in {self.repo} failed ({code}):\n"
                                 f"{self.log.read_text(errors='replace')[-6000:]}")
        return self.repo

    def finish(self) -> None:
        """The starter's session end: let a run that another worker may still wait for end
        (bounded), then kill what is left."""
        if self.job is not None:
            try:
                self.job.proc.wait(timeout=1800 if WORKER is not None else 0.1)
            except subprocess.TimeoutExpired:
                pass
            self.job.stop()


@pytest.fixture(scope="session", autouse=True)
def _tiny_runs(request, tmp_path_factory):
    """{fixture name: SharedRun}: the tiny ``dvc repro`` runs this session's tests ask for,
    started together before the first test (by the first xdist worker to get here; the
    others wait on the same runs). Each runs its stages one at a time in one process, so on
    two cores they run beside each other and beside the tests that come first (the modules
    that use them run last, see ``pytest_collection_modifyitems``)."""
    from filelock import FileLock

    runs = {}
    wanted = [name for name in TINY_RUNS if any(
        name in getattr(item, "fixturenames", ()) for item in request.session.items)]
    if wanted:
        root = _shared_dir(tmp_path_factory, "tiny")
        with FileLock(root / ".lock"):
            for name in wanted:
                runs[name] = SharedRun(root / name)
                if not (root / name).exists():
                    copy_repo(root / name)
                    runs[name].start()
    yield runs
    for shared in runs.values():
        shared.finish()


def _finished(runs, name: str, tmp_path_factory) -> Path:
    if name not in runs:  # a test that was not collected at the start asks for it
        repo = copy_repo(tmp_path_factory.mktemp(name) / "repo")
        run([str(BIN / "dvc"), "repro"], repo, timeout=1800)
        return repo
    return runs[name].wait(timeout=1800)


@pytest.fixture(scope="session")
def tiny_repro(_tiny_runs, tmp_path_factory) -> Path:
    """The repository on the tiny profile after ``dvc repro`` (committed before the run)."""
    repo = _finished(_tiny_runs, "tiny_repro", tmp_path_factory)
    before = _repro_fingerprint(repo)
    yield repo
    assert _repro_fingerprint(repo) == before, (
        "a test changed the shared tiny repro: copy it first (pipeline_helpers.clone_repo)")


@pytest.fixture(scope="session")
def prefect_server_api(tmp_path_factory):
    """The API URL of one real Prefect server (``prefect server start`` on 127.0.0.1, its own
    PREFECT_HOME), started the first time a test asks for it and stopped by its PID at the end
    of the session: a start costs 12-25 s on two busy cores. Tests keep apart by their own
    flow, deployment and run names; the URL is not put into Prefect's settings here (a test's
    module does that for its in-process flows)."""
    from tasks.runtime.servers import prefect_server

    home = tmp_path_factory.mktemp("prefect")
    with prefect_server(home=home, log_file=home / "server.log") as api:
        yield api
    assert api.proc.poll() is not None  # stopped by its PID


@pytest.fixture(scope="session")
def new_mlflow_store(tmp_path_factory):
    """``make(folder) -> URI``: an empty SQLite MLflow store at ``folder / "mlflow.db"``, a
    copy of one migrated once per session (its Default experiment's artifacts in
    ``folder / "mlruns"``)."""
    import mlflow

    template = tmp_path_factory.mktemp("mlflow-template")
    cwd = os.getcwd()
    os.chdir(template)  # the Default experiment's artifact location: <template>/mlruns
    try:
        mlflow.MlflowClient(f"sqlite:///{template / 'mlflow.db'}").search_experiments()
    finally:
        os.chdir(cwd)

    def make(folder: Path) -> str:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(template / "mlflow.db", folder / "mlflow.db")
        move_store_paths(folder / "mlflow.db", template, folder)
        return f"sqlite:///{folder / 'mlflow.db'}"

    return make


@pytest.fixture
def mlflow_store(new_mlflow_store, tmp_path) -> str:
    """The URI of an empty SQLite MLflow store at ``tmp_path / "mlflow.db"``."""
    return new_mlflow_store(tmp_path)


def _state_digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, value in model.state_dict().items():
        h.update(name.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _freeze(model: torch.nn.Module) -> str:
    """Eval mode, no gradients (an optimiser step on it fails); returns its weights' digest."""
    model.eval().requires_grad_(False)
    return _state_digest(model)


def _check_kept(model: torch.nn.Module, digest: str) -> None:
    assert _state_digest(model) == digest, (
        f"a test changed the shared {type(model).__name__}: change a copy "
        f"(copy.deepcopy or trainable_copy)")


@pytest.fixture(scope="session")
def mixture_teacher():
    """A small 2-D MLP teacher (EMA weights) on an 8-mode Gaussian mixture: curved paths, so
    schedules and straightening matter. 600 Adam steps of 256 points, seed 0."""
    from boss_core.data import make_gaussian_mixture
    from boss_core.models import ModelConfig, build_model
    from boss_core.teacher import TeacherConfig, train_teacher

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        data = make_gaussian_mixture(2000, seed=0)
        model = build_model(ModelConfig(arch="mlp", hidden=64, depth=2, time_embed_dim=16),
                            (2,), seed=0)
        teacher = train_teacher(model, data.x, TeacherConfig(
            iterations=600, batch_size=256, lr=3e-3, device="cpu", progress=False)).ema_model
    digest = _freeze(teacher)
    yield teacher
    _check_kept(teacher, digest)


@pytest.fixture(scope="session")
def digits_feature_net():
    """(digits, FeatureNetResult): the FID classifier on the embedded digits, 200 Adam steps
    of 64 images, seed 0 (held-out accuracy about 0.95)."""
    from boss_core.data import load_digits_images
    from boss_core.features import FeatureNetConfig, train_feature_net

    digits = load_digits_images()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        result = train_feature_net(digits.x, digits.y, FeatureNetConfig(
            iterations=200, batch_size=64, device="cpu", progress=False))
    digest = _freeze(result.net)
    yield digits, result
    _check_kept(result.net, digest)
