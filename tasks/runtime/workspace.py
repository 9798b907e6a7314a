"""Where each step reads and writes.

The DVC workspace is the repository root: ``outputs/`` (intermediate, DVC outs), ``results/``
(metrics, plots), ``checkpoints/`` (resumable training state, not tracked). A Prefect
deployment run gets its own folder ``runs/<run name>/`` with the same layout, so runs never
overwrite each other or the DVC workspace. Data paths in params.yaml are relative to ``repo``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


def repo_root(start: str | os.PathLike | None = None) -> Path:
    """The repository root that owns ``start`` (default: the working directory).

    ``dvc exp run --queue`` runs stages in a copy under ``<root>/.dvc/tmp/exps/...``; that copy
    maps back to ``<root>``, so every experiment logs to the same MLflow store.
    """
    path = Path(start or os.getcwd()).resolve()
    parts = path.parts
    for i in range(len(parts) - 2):
        if parts[i:i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    for candidate in (path, *path.parents):
        if (candidate / "params.yaml").is_file() or (candidate / ".git").exists():
            return candidate
    return path


@dataclass(frozen=True)
class Workspace:
    repo: Path  # params, data and the MLflow store are found from here
    out: Path  # outputs/, results/ and checkpoints/ go under here

    @classmethod
    def at(cls, repo: str | os.PathLike, out: str | os.PathLike | None = None) -> Workspace:
        repo = Path(repo).resolve()
        return cls(repo, Path(out).resolve() if out is not None else repo)

    def data_path(self, relative: str) -> Path:
        path = Path(relative)
        return path if path.is_absolute() else self.repo / path

    def step(self, name: str) -> Path:
        """``outputs/<name>``: one step's outputs."""
        return self.out / "outputs" / name

    @property
    def results(self) -> Path:
        return self.out / "results"

    def checkpoints(self, name: str) -> Path:
        return self.out / "checkpoints" / name
