"""Exponential moving average (EMA) of a model's weights.

After each optimiser step s (0-based) every floating parameter and buffer is updated as

    theta_ema <- d_s theta_ema + (1 - d_s) theta,    d_s = min(decay, (1 + s) / (10 + s))

The warm-up d_s keeps early EMA weights close to the live ones (a short run is not dominated by
the random initialisation). d_s depends only on the step, so a resumed run matches an
uninterrupted one. Integer buffers are copied.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def ema_decay_at(decay: float, step: int) -> float:
    """The effective decay d_s at optimiser step ``step`` (see module doc)."""
    return min(decay, (1.0 + step) / (10.0 + step))


class EMA:
    """Holds a frozen copy of a model and averages the live model's weights into it."""

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Average ``model`` (same architecture) into the EMA copy after optimiser step ``step``."""
        d = ema_decay_at(self.decay, step)
        ema_state = self.model.state_dict()
        for name, value in model.state_dict().items():
            target = ema_state[name]
            if target.is_floating_point():
                target.lerp_(value.detach(), 1.0 - d)  # target = d target + (1 - d) value
            else:
                target.copy_(value)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state)
