"""Shared by the end-to-end tests: a throwaway copy of the repository on the tiny profile."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import closing, contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def env(**extra: str) -> dict[str, str]:
    """The venv first on PATH (dvc.yaml calls `python -m tasks.<step>`), one thread each,
    no telemetry."""
    out = dict(os.environ)
    out.update(PATH=f"{BIN}{os.pathsep}{out.get('PATH', '')}", OMP_NUM_THREADS="1",
               MKL_NUM_THREADS="1", DVC_NO_ANALYTICS="1", MLFLOW_DISABLE_TELEMETRY="true",
               PREFECT_SERVER_ANALYTICS_ENABLED="false", BOSS_LOG_LEVEL="WARNING")
    for key in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "BOSS_PARENT_RUN_ID"):
        out.pop(key, None)
    out.update(extra)
    return out


def run(cmd: list[str], cwd: Path, timeout: float = 600, check: bool = True,
        **extra: str) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=cwd, env=env(**extra), capture_output=True, text=True,
                          timeout=timeout, check=False)
    if check and done.returncode != 0:
        raise AssertionError(f"{cmd} failed ({done.returncode}):\n{done.stdout[-3000:]}\n"
                             f"{done.stderr[-5000:]}")
    return done


class Background:
    """``cmd`` started now in ``cwd`` (its own process group, output to ``log``), waited for
    with ``wait``: a long subprocess chain (``dvc repro``) that runs while the tests go on."""

    def __init__(self, cmd: list[str], cwd: Path, log: Path, **extra: str):
        self.cmd, self.log = cmd, log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(cmd, cwd=cwd, env=env(**extra), stdout=out,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)

    def wait(self, timeout: float) -> None:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise AssertionError(f"{self.cmd} still running after {timeout:.0f} s") from None
        if code != 0:
            raise AssertionError(f"{self.cmd} failed ({code}):\n"
                                 f"{self.log.read_text(errors='replace')[-6000:]}")

    def stop(self) -> None:
        """Kill what is left of it (its process group)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def copy_repo(dest: Path, profile: str | None = "tests/profiles/tiny.yaml",
              embed_and_commit: bool = True) -> Path:
    """The tracked and untracked-not-ignored files (the working tree as it is) less the
    committed baseline (dvc.lock, results/), with the profile merged into params.yaml; then,
    unless ``embed_and_commit`` is False, the embedded data written and everything committed in
    a fresh git repo. The profile and the data are written by the CLIs' own functions in this
    process (two fewer interpreter starts)."""
    from tasks.cli import profile as profile_cli
    from tasks.cli.embed import write_digits

    files = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, files):
        src = ROOT / name
        if name == "dvc.lock" or name.startswith("results/"):
            continue  # the committed baseline of the default profile, not this copy's
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    if profile:
        params = str(dest / "params.yaml")
        code = profile_cli.main([str(dest / profile), "--params", params, "--write", params])
        assert code == 0, f"profile {profile} does not load on params.yaml"
    if not embed_and_commit:
        return dest
    write_digits(dest / "data")
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "copy"]):
        run(cmd, dest)
    return dest


def clone_repo(src: Path, dest: Path) -> Path:
    """A copy of a repository that has run (e.g. the shared ``tiny_repro``) to change: its git
    history, DVC cache and lock, outputs and MLflow store. The store's absolute paths (the
    artifact locations under ``src``) are moved to ``dest``, so runs logged in the copy never
    write into ``src``."""
    shutil.copytree(src, dest, symlinks=True)
    if (dest / "mlflow.db").is_file():
        move_store_paths(dest / "mlflow.db", src, dest)
    return dest


def move_store_paths(store: Path, old: Path, new: Path) -> None:
    """Rewrite ``old`` as ``new`` in every text value of the SQLite MLflow ``store`` (artifact
    locations, run artifact URIs, model version sources)."""
    with closing(sqlite3.connect(store)) as db, db:
        tables = [row[0] for row in db.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'")]
        for table in tables:
            for column in [row[1] for row in db.execute(f'PRAGMA table_info("{table}")')]:
                db.execute(f'UPDATE "{table}" SET "{column}" = replace("{column}", ?, ?) '
                           f'WHERE typeof("{column}") = \'text\' AND instr("{column}", ?)',
                           (str(old), str(new), str(old)))


@contextmanager
def mlflow_server(folder: Path, serve_artifacts: bool = False):
    """``mlflow server`` on 127.0.0.1 (a free port) with its store in ``folder``; yields its
    URI and stops it by PID. ``serve_artifacts``: clients upload artifacts through the server
    (``mlflow-artifacts:/``, as with a remote artifact store) instead of writing the folder."""
    import httpx

    from flows.local_server import free_port, stop_process
    from tasks.runtime.servers import MLFLOW_SERVER_ENV

    port = free_port()
    server = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{folder / 'server.db'}",
         *(["--serve-artifacts", "--artifacts-destination", str(folder / "artifacts")]
           if serve_artifacts else ["--default-artifact-root", str(folder / "artifacts")])],
        env=env(**MLFLOW_SERVER_ENV), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                if httpx.get(f"{uri}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline and server.poll() is None, "mlflow server did not start"
            time.sleep(0.5)
        yield uri
    finally:
        stop_process(server, timeout=3)  # its store is thrown away: no need for a slow drain
    assert server.poll() is not None


def run_steps_in_process(repo: Path, steps, monkeypatch, *sets: str) -> None:
    """``python -m tasks.<step>`` for each of ``steps`` ("prepare", ..., or "straighten
    --method boss"), in this process (no interpreter start per step), on ``repo``'s
    params.yaml with ``--set`` ``sets``, logging to ``repo``'s own MLflow store, without
    Prefect. Fails naming the first step that does not exit 0."""
    import importlib

    from tasks.runtime.step import main

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{repo / 'mlflow.db'}")
    monkeypatch.setenv("BOSS_PREFECT", "0")
    monkeypatch.delenv("BOSS_PARENT_RUN_ID", raising=False)
    for step in steps:
        name, *args = step.split()
        argv = ["--params", str(repo / "params.yaml"), *args,
                *(a for kv in ("run.progress=false", *sets) for a in ("--set", kv))]
        module = importlib.import_module(f"tasks.{name}")
        if hasattr(module, "main_cli"):
            code = module.main_cli(argv)
        else:
            code = main(module.NAME, module.run, module.SECTIONS, module.__doc__, argv=argv)
        assert code == 0, f"step {step} exited {code}"
