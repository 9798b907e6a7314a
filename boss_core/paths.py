"""Interpolation paths between noise and data: the teacher's training target.

A path is an interpolant with t in [0, 1], t = 0 noise, t = 1 data:

    x_t = alpha(t) x1 + sigma(t) z,          x1 ~ data, z ~ N(0, I),
    u_t = d x_t / d t = alpha'(t) x1 + sigma'(t) z      (the regression target).

A teacher trained on a path predicts d x_t / d t in the path's own t, so the samplers, the
search and the straightening (which only integrate ``v(x, t)`` from t = 0 to 1) need nothing
else. The registry ``PATHS``:

- ``linear`` (rectified flow, the default): alpha = t, sigma = 1 - t; u = x1 - z.
- ``cosine``: alpha = sin(pi t / 2), sigma = cos(pi t / 2) (= sin(pi (1 - t) / 2), which is
  exactly 0 at t = 1 in floating point); u = pi / 2 (sigma x1 - alpha z).
- ``vp``: the continuous variance-preserving diffusion (beta_min = 0.1, beta_max = 20) with
  diffusion time s = 1 - t:

      log alpha = -(beta_max - beta_min) s^2 / 4 - beta_min s / 2,   sigma = sqrt(1 - alpha^2),
      alpha' = alpha beta(s) / 2,   beta(s) = beta_min + s (beta_max - beta_min),
      sigma' = -alpha alpha' / sigma = -alpha^2 beta(s) / (2 sigma).

  alpha(0) = exp(-5.025) ~ 0.00657, not 0: the t = 0 marginal is alpha(0) x1 + sigma(0) z
  (sigma(0) = 0.99998), while the samplers start from pure noise z, off by
  alpha(0) x1 + (sigma(0) - 1) z, i.e. about 0.0066 |x1|; the flow carries that offset to the
  end point (on the 3-mode 2-D mixture of tests/test_paths.py: median 0.0017, rms 0.045 from
  the rare noises near a mode boundary).

  Near t = 1, 1 - alpha^2 ~ beta_min s, so sigma ~ sqrt(beta_min s) and
  sigma' ~ -sqrt(beta_min) / (2 sqrt(s)): the target is singular at t = 1. The teacher
  therefore trains on t in [0, t_max], t_max = 1 - VP_EPS with VP_EPS = 1e-3 (the usual
  sampling cut-off of score SDEs; there |sigma'| ~ 5.7, against 50 at 1e-5). The samplers
  stay plain Euler and never evaluate v at t = 1: the last step is

      x_1 = x_t + (1 - t) v(x_t, t),    t = t_{K-1} <= t_max,

  which is finite because (1 - t) sigma'(t) ~ -sqrt(beta_min s) / 2 -> 0. On a path from
  one data point (the worst case: there the marginal velocity equals u_t) the step ends at
  (alpha + s alpha') x1 + (sigma + s sigma') z = x1 + O(s^2) x1 + ~(sigma(t) / 2) z: it
  leaves up to half the remaining noise, sigma(t_{K-1}) / 2 ~ sqrt(beta_min s) / 2 as s -> 0
  (exactly 0.011 z + 5e-4 x1 from the fine grid's last point t = 0.99, where sigma = 0.045;
  0.0048 z from t = t_max). For a smooth data density the marginal velocity
  alpha' (E[x1 | x_t] + alpha grad log p_t(x_t)) stays finite at t = 1 (as
  sigma sigma' = -alpha alpha'), and the last step errs by O(s^2) like any other.

Fine grids that evaluate the teacher beyond t_max are refused by ``check_grid``. Heun's
corrector (``cost_matrix(solver="heun")``, ``global_schedules(solver="heun")``) does evaluate
the network at t = 1: its output is finite there, but untrained past t_max.

Only the time along the paths differs, not where they end: with y = x / sigma and
rho = alpha / sigma, the exact marginal flow obeys dy / drho = E[x1 | rho x1 + z = y] whatever
the path, so paths with alpha(0) = 0, sigma(0) = 1 and alpha(1) = 1 (linear, cosine) carry each
noise to the same end point (tests/test_paths.py). Their velocities, the curvature of their
trajectories in t, and so the few-step errors that BOSS searches over, differ.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

Coefficient = Callable[[Tensor], Tensor]

VP_BETA_MIN = 0.1
VP_BETA_MAX = 20.0
VP_EPS = 1e-3  # the vp teacher trains on t in [0, 1 - VP_EPS]


@dataclass(frozen=True)
class FlowPath:
    """x_t = alpha(t) x1 + sigma(t) z and its t-derivative (module doc for each path).

    alpha, sigma, d_alpha, d_sigma: elementwise functions of a float tensor t of any shape.
    t_max: the largest t the teacher trains on and may be evaluated at (1: no singularity).
    """

    name: str
    alpha: Coefficient
    sigma: Coefficient
    d_alpha: Coefficient
    d_sigma: Coefficient
    t_max: float = 1.0

    def interpolate(self, x1: Tensor, z: Tensor, t: Tensor) -> Tensor:
        """x_t = alpha(t) x1 + sigma(t) z. x1, z: (B, *D); t: (B,) -> (B, *D) in x1's dtype."""
        a, s = _per_sample(self.alpha, t, x1), _per_sample(self.sigma, t, x1)
        return a * x1 + s * z

    def target(self, x1: Tensor, z: Tensor, t: Tensor) -> Tensor:
        """u_t = alpha'(t) x1 + sigma'(t) z. x1, z: (B, *D); t: (B,) -> (B, *D)."""
        da, ds = _per_sample(self.d_alpha, t, x1), _per_sample(self.d_sigma, t, x1)
        return da * x1 + ds * z

    def check_grid(self, times, *, name: str = "times") -> None:
        """Raise ValueError if a grid's last interior point (where the last Euler step
        evaluates v) lies beyond t_max. times: (K + 1,) from 0 to 1."""
        grid = np.asarray(times, dtype=np.float64)
        if grid.shape[0] >= 2 and grid[-2] > self.t_max:
            last = float(grid[-2])
            raise ValueError(
                f"{name}: the last Euler step evaluates the teacher at t = {last!r}, past the "
                f"{self.name} path's t_max = {self.t_max!r} (its velocity is singular at t = 1); "
                "use a coarser grid (fewer steps)")


def _per_sample(coefficient: Coefficient, t: Tensor, x: Tensor) -> Tensor:
    """coefficient(t) computed in float64, cast to x's dtype, shaped (B, 1, ..., 1)."""
    wide = torch.float32 if x.device.type == "mps" else torch.float64  # mps has no float64
    value = coefficient(t.detach().to(device=x.device, dtype=wide))  # (B,)
    return value.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))  # (B, 1, ..., 1)


def _vp_log_alpha(t: Tensor) -> Tensor:
    s = 1.0 - t  # diffusion time
    return -(VP_BETA_MAX - VP_BETA_MIN) * s * s / 4.0 - VP_BETA_MIN * s / 2.0


def _vp_beta(t: Tensor) -> Tensor:
    return VP_BETA_MIN + (1.0 - t) * (VP_BETA_MAX - VP_BETA_MIN)


def _vp_sigma(t: Tensor) -> Tensor:
    return (-(2.0 * _vp_log_alpha(t)).expm1()).sqrt()  # sqrt(1 - alpha^2), accurate near t = 1


def _vp_d_alpha(t: Tensor) -> Tensor:
    return _vp_log_alpha(t).exp() * _vp_beta(t) / 2.0


def _vp_d_sigma(t: Tensor) -> Tensor:
    return -(2.0 * _vp_log_alpha(t)).exp() * _vp_beta(t) / (2.0 * _vp_sigma(t))


_HALF_PI = math.pi / 2.0

LINEAR = FlowPath(
    name="linear",
    alpha=lambda t: t,
    sigma=lambda t: 1.0 - t,
    d_alpha=lambda t: t * 0.0 + 1.0,
    d_sigma=lambda t: t * 0.0 - 1.0,
)
COSINE = FlowPath(
    name="cosine",
    alpha=lambda t: (_HALF_PI * t).sin(),
    sigma=lambda t: (_HALF_PI * (1.0 - t)).sin(),
    d_alpha=lambda t: _HALF_PI * (_HALF_PI * (1.0 - t)).sin(),
    d_sigma=lambda t: -_HALF_PI * (_HALF_PI * t).sin(),
)
VP = FlowPath(
    name="vp",
    alpha=lambda t: _vp_log_alpha(t).exp(),
    sigma=_vp_sigma,
    d_alpha=_vp_d_alpha,
    d_sigma=_vp_d_sigma,
    t_max=1.0 - VP_EPS,
)

PATHS: dict[str, FlowPath] = {p.name: p for p in (LINEAR, COSINE, VP)}


def get_path(name: str) -> FlowPath:
    """The registered path ``name``; an unknown name raises ValueError listing the choices."""
    if not isinstance(name, str) or name not in PATHS:
        raise ValueError(f"path must be one of {sorted(PATHS)}, got {name!r}")
    return PATHS[name]
