"""Atomic artifact I/O: every file is written to a temporary name in its folder, then renamed.

A reader (DVC, a later step) therefore sees either the previous complete file or the new
complete file, never half of one. Tensors go to safetensors and models to safetensors plus a
JSON config in the file's metadata; nothing here pickles or unpickles.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

MODEL_FORMAT = "boss-velocity-model"


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ""):
    """Yield a temporary path beside ``path``; rename it onto ``path`` if the block succeeds.

    ``suffix`` keeps an extension some writers insist on (e.g. ".png").
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix + ".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
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


def load_tensors(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(tensors, metadata) from a ``save_tensors`` file; ValueError naming a bad file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run the step that writes it first")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            meta = {k: json.loads(v) for k, v in (handle.metadata() or {}).items()}
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
