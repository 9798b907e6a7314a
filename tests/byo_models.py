"""Small "bring your own model" networks, importable as ``byo_models:<Name>`` in the tests."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import Tensor, nn


class TinyVelocity(nn.Module):
    """v(x, t) for x of shape (B, *shape) with prod(shape) == dim; t of shape (B,)."""

    def __init__(self, dim: int = 2, hidden: int = 16):
        super().__init__()
        self.dim = dim
        self.body = nn.Sequential(nn.Linear(dim + 1, hidden), nn.SiLU(), nn.Linear(hidden, dim))
        self.register_buffer("scale", torch.ones(dim))

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        flat = x.reshape(x.shape[0], -1)
        out = self.body(torch.cat([flat, t[:, None].to(flat.dtype)], dim=1)) * self.scale
        return out.reshape(x.shape)


class TinyDiffusersNet(nn.Module):
    """diffusers-style ``net(x, timestep)`` with timestep in [0, 1000] (1000 = noise).

    Returns an object with ``.sample`` (like diffusers' output classes), or a 1-tuple when
    ``return_tuple`` is set.
    """

    def __init__(self, dim: int = 2, hidden: int = 16, return_tuple: bool = False):
        super().__init__()
        self.return_tuple = return_tuple
        self.body = nn.Sequential(nn.Linear(dim + 1, hidden), nn.SiLU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor, timestep: Tensor):
        flat = x.reshape(x.shape[0], -1)
        out = self.body(torch.cat([flat, timestep[:, None] / 1000.0], dim=1)).reshape(x.shape)
        return (out,) if self.return_tuple else SimpleNamespace(sample=out)


class TimeProbe(nn.Module):
    """Returns the time argument it receives, broadcast to x's shape (x itself is ignored)."""

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return t.view(-1, *([1] * (x.dim() - 1))).expand_as(x) + self.dummy


def make_not_a_module(**kwargs):
    """A factory that returns something other than an nn.Module."""
    return "not a module"


NOT_CALLABLE = 42


UNPICKLED: list[str] = []  # Opaque.__setstate__ records every unpickling here


class Opaque:
    """A plain object: pickled into a .pt file, weights_only loading must refuse it.

    Unpickling runs ``__setstate__`` (code from the file's classes), which records itself in
    ``UNPICKLED``: a safe loader never gets that far.
    """

    def __init__(self, payload: str = "x"):
        self.payload = payload

    def __setstate__(self, state):
        UNPICKLED.append(state.get("payload", ""))
        self.__dict__.update(state)
