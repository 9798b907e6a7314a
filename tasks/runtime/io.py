"""Atomic artifact I/O: every file is written to a temporary name in its folder, then renamed.

A reader (DVC, a later step) therefore sees either the previous complete file or the new
complete file, never half of one. Tensors go to safetensors and models to safetensors plus a
JSON config in the file's metadata; nothing here pickles or unpickles.

Temporary files are named ``.<name>.<pid>.<random>[suffix].tmp`` beside the target. A process
killed mid-write (SIGKILL, power loss) cannot remove its own, so the first ``atomic_path`` of a
process in a folder removes the temporaries there whose writer is gone (its pid is not alive
on this host and the file is older than this process): a rerun of the step clears the litter
before DVC hashes the folder. Nothing reads a temporary file by name. (``dvc repro`` also
deletes a stage's outs before running it.) One writer per folder at a time is assumed; DVC's
repository lock and the per-run folders of Prefect runs give that.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from collections.abc import Callable, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .faults import fault_point

MODEL_FORMAT = "boss-velocity-model"
# .<name>.<pid>.<8 random chars from mkstemp>[.<ext>].tmp
_TEMP = re.compile(r"^\..+\.(?P<pid>\d+)\.[a-z0-9_]{8}(?:\.[A-Za-z0-9]+)?\.tmp$")
_STARTED = time.time()  # when this process imported the module
_swept: set[Path] = set()
_UMASK = os.umask(0o022)  # read once (os.umask can only be read by setting it) ...
os.umask(_UMASK)  # ... and restored at once


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def sweep_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Remove the ``atomic_path`` temporaries in ``folder`` left by dead writers; return them.

    A temporary is stale when the pid in its name is not a live process and it was last
    written before this process started (so a live writer is never touched).
    """
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        match = _TEMP.match(entry.name)
        if match is None or _alive(int(match["pid"])):
            continue
        try:
            if entry.is_file() and entry.stat().st_mtime < _STARTED:
                entry.unlink()
                removed.append(entry)
        except FileNotFoundError:  # another sweeper got there first
            pass
    return removed


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ""):
    """Yield a temporary path beside ``path``; rename it onto ``path`` if the block succeeds.

    ``suffix`` keeps an extension some writers insist on (e.g. ".png"). The first call of a
    process in a folder sweeps stale temporaries there (module doc). The fault point
    ``artifact.write`` (tasks/runtime/faults.py) sits between the finished temporary and the rename.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = path.parent.resolve()
    if folder not in _swept:
        sweep_stale_temps(folder)
        _swept.add(folder)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=suffix + ".tmp",
                               dir=path.parent)
    os.close(fd)
    with suppress(OSError):  # mkstemp's 0600 would make every artifact owner-only
        os.chmod(tmp, 0o666 & ~_UMASK)
    try:
        yield Path(tmp)
        fault_point("artifact.write", path.name)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, value: Any) -> None:
    write_text(path, json.dumps(value, indent=2, sort_keys=False, allow_nan=False) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run the step that writes it first")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err


def save_tensors(path: str | os.PathLike, tensors: Mapping[str, Tensor],
                 metadata: Mapping[str, Any] | None = None) -> None:
    """Tensors (any dtype) to safetensors; ``metadata`` values are JSON-encoded."""
    from safetensors.torch import save_file

    flat = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = {k: json.dumps(v) for k, v in (metadata or {}).items()}
    with atomic_path(path) as tmp:
        save_file(flat, str(tmp), metadata=meta)
        _sort_metadata(tmp)


def _sort_metadata(path: Path) -> None:
    """Rewrite a safetensors header in place with ``__metadata__`` in sorted key order.

    safetensors keeps the metadata in a Rust HashMap, whose order changes from process to
    process, so the same tensors and metadata gave different bytes (and DVC hashes) on every
    run. Same keys and values reordered: same length, so the data offsets stand.
    """
    with open(path, "r+b") as handle:
        size = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(size))
        if "__metadata__" not in header:
            return
        ordered = {"__metadata__": dict(sorted(header.pop("__metadata__").items())), **header}
        text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) > size:  # a serializer difference: keep the valid original
            return
        handle.seek(8)
        handle.write(text.ljust(size, b" "))


def load_tensors(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(tensors, metadata) from a ``save_tensors`` file; ValueError naming a bad file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run the step that writes it first")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            meta = {k: json.loads(v) for k, v in sorted((handle.metadata() or {}).items())}
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    except Exception as err:  # safetensors raises several types for a bad header or body
        raise ValueError(f"{path} is not a readable safetensors file: {err}") from err
    return tensors, meta


def save_model(path: str | os.PathLike, model: nn.Module, model_config: Mapping[str, Any],
               data_shape, extra: Mapping[str, Any] | None = None) -> None:
    """A velocity model: its state_dict plus the config that rebuilds it (no pickle)."""
    meta = {"format": MODEL_FORMAT, "model_config": dict(model_config),
            "data_shape": list(data_shape), **(extra or {})}
    save_tensors(path, model.state_dict(), meta)


def load_model(path: str | os.PathLike, build: Callable[[dict, tuple], nn.Module],
               device: torch.device | str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild with ``build(model_config, data_shape)`` and load the weights strictly.

    Returns (eval-mode model on ``device``, metadata). ValueError names a file that is not a
    boss model or does not match its own config.
    """
    tensors, meta = load_tensors(path)
    if meta.get("format") != MODEL_FORMAT:
        raise ValueError(f"{path} is not a boss model file (format tag {meta.get('format')!r})")
    model = build(meta["model_config"], tuple(meta["data_shape"]))
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{path} does not match its model config: {err}") from err
    return model.to(device).eval(), meta
