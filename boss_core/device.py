"""Device names -> ``torch.device``, with errors that say what went wrong.

Accepted names: ``"cpu"``, ``"cuda"``, ``"cuda:<index>"`` and ``"auto"`` (CUDA device 0 when
CUDA is available, else the CPU). A ``torch.device`` is accepted too and checked the same way.
"""

from __future__ import annotations

import re

import torch

KNOWN_DEVICES = ("cpu", "cuda", "cuda:<index>", "auto")
_CUDA_INDEX = re.compile(r"^cuda:(\d+)$")


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """Turn a device name into a ``torch.device`` that exists on this machine.

    Raises:
        ValueError: an unknown name, a CUDA device when CUDA is unavailable, or a CUDA index
            beyond the visible device count.
    """
    if isinstance(name, torch.device):
        name = str(name)
    if not isinstance(name, str):
        raise ValueError(f"device must be a string such as {KNOWN_DEVICES}, got {name!r}")
    key = name.strip().lower()
    if key == "cpu":
        return torch.device("cpu")
    if key == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    match = _CUDA_INDEX.match(key)
    if key == "cuda" or match:
        index = int(match.group(1)) if match else 0
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {name!r} requested but CUDA is not available on this machine "
                f"(torch {torch.__version__}); use 'cpu' or 'auto'"
            )
        count = torch.cuda.device_count()
        if index >= count:
            raise ValueError(f"device {name!r}: only {count} CUDA device(s) visible")
        return torch.device("cuda", index)
    raise ValueError(f"unknown device {name!r}; known: {', '.join(KNOWN_DEVICES)}")
