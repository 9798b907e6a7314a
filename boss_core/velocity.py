"""The velocity-model interface, an NFE counter and adapters for checkpoint conventions.

A velocity model is any callable ``v(x, t, **extras) -> Tensor``:

- ``x``: state of shape (B, ...);
- ``t``: time of shape (B,), with x's dtype and device; t = 0 is noise, t = 1 is data;
- ``extras``: optional conditioning (e.g. class labels), passed through untouched;
- returns the velocity dx/dt, same shape as x.

A checkpoint's private conventions (time scaling, sign, sigma parametrisation) live in one
adapter here, never in the samplers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

VelocityFn = Callable[..., Tensor]


class VelocityError(ValueError):
    """A velocity model returned something unusable (wrong shape, NaN or Inf)."""


def evaluate_velocity(
    velocity: VelocityFn,
    x: Tensor,
    t: float,
    *,
    step: int | str,
    extras: Mapping[str, Any] | None = None,
) -> Tensor:
    """Evaluate ``velocity(x, t * ones(B))`` and check the result.

    Args:
        x: (B, ...) state.
        t: scalar time, broadcast to a (B,) tensor with x's dtype and device.
        step: sampler step index or label, named in any error.
    Returns:
        (B, ...) velocity in x's dtype.
    Raises:
        VelocityError naming the step if the output has the wrong shape or NaN/Inf.
    """
    t_batch = torch.full((x.shape[0],), float(t), dtype=x.dtype, device=x.device)
    out = velocity(x, t_batch, **(extras or {}))
    if not isinstance(out, Tensor):
        raise VelocityError(f"velocity at step {step} (t={t:.6g}) returned {type(out).__name__}")
    if out.shape != x.shape:
        raise VelocityError(
            f"velocity at step {step} (t={t:.6g}) returned shape {tuple(out.shape)}, "
            f"expected {tuple(x.shape)}"
        )
    if not bool(torch.isfinite(out).all()):
        raise VelocityError(f"velocity at step {step} (t={t:.6g}) returned NaN or Inf")
    return out.to(x.dtype)


class NFECounter:
    """Wraps a velocity model and counts its calls.

    ``nfe`` counts network calls (one per batched call); ``n_evaluations`` counts
    per-sample evaluations (the sum of batch sizes). A backward pass through a call's output
    (a search that trains through the solver, ``boss_core.learned_times``) counts as
    ``BACKWARD_CALLS`` = 2 more of each, when the gradient reaches that output.
    """

    BACKWARD_CALLS = 2

    def __init__(self, velocity: VelocityFn):
        self.velocity = velocity
        self.nfe = 0
        self.n_evaluations = 0

    def __call__(self, x: Tensor, t: Tensor, **extras: Any) -> Tensor:
        self.nfe += 1
        self.n_evaluations += int(x.shape[0])
        out = self.velocity(x, t, **extras)
        if isinstance(out, Tensor) and out.requires_grad:
            out.register_hook(self._backward_counter(int(x.shape[0])))
        return out

    def _backward_counter(self, batch: int):
        def count(grad: Tensor) -> None:
            self.nfe += self.BACKWARD_CALLS
            self.n_evaluations += self.BACKWARD_CALLS * batch
        return count

    def reset(self) -> None:
        self.nfe = 0
        self.n_evaluations = 0


class RectifiedFlowAdapter(nn.Module):
    """Adapter for RectifiedFlow-style networks ``net(x, label, **extras)``.

    Those networks were trained on t in [eps, 1] and take the label
    ``(eps + (1 - eps) t) * 999`` with eps = 1e-3; their output is already dx/dt.
    """

    def __init__(self, net: nn.Module, eps: float = 1e-3, scale: float = 999.0):
        super().__init__()
        self.net = net
        self.eps = eps
        self.scale = scale

    def forward(self, x: Tensor, t: Tensor, **extras: Any) -> Tensor:
        label = (self.eps + (1.0 - self.eps) * t) * self.scale
        return self.net(x, label, **extras)


class DiffusersFlowAdapter(nn.Module):
    """Adapter for diffusers-style flow-matching networks ``net(x, timestep, **extras)``.

    diffusers uses sigma = 1 - t (sigma = 1 is noise), feeds ``timestep = sigma * 1000`` and
    predicts ``noise - data``, which is -dx/dt in our convention, so v = -output.
    Outputs with a ``.sample`` attribute or tuples are unwrapped.
    """

    def __init__(self, net: nn.Module, timestep_scale: float = 1000.0):
        super().__init__()
        self.net = net
        self.timestep_scale = timestep_scale

    def forward(self, x: Tensor, t: Tensor, **extras: Any) -> Tensor:
        sigma = 1.0 - t
        out = self.net(x, sigma * self.timestep_scale, **extras)
        if hasattr(out, "sample"):
            out = out.sample
        elif isinstance(out, (tuple, list)):
            out = out[0]
        return -out
