"""Velocity fields with closed-form answers, used as test oracles."""

from __future__ import annotations

import math

import torch


def constant_field(b: torch.Tensor):
    """v = b: every sampler is exact, x_1 = z + b."""
    return lambda x, t: b.expand_as(x).to(x.dtype)


def straight_field(x1: torch.Tensor):
    """v(x, t) = (x1 - x) / (1 - t): straight paths x_t = (1 - t) z + t x1 (linear in t).

    Euler is exact on any grid (it never evaluates at t = 1).
    """
    return lambda x, t: (x1 - x) / (1.0 - t).view(-1, *([1] * (x.dim() - 1)))


def quadratic_path_field(b: torch.Tensor, c: torch.Tensor):
    """v(t) = b + 2 c t: paths x_t = z + b t + c t^2 (quadratic in t).

    Heun (the trapezoid rule) is exact. One Euler step of size h from t_k errs by -c h^2, so
    K Euler steps end at z + b + c - c sum_k h_k^2.
    """
    def v(x, t):
        tt = t.view(-1, *([1] * (x.dim() - 1)))
        return (b + 2.0 * c * tt).expand_as(x).to(x.dtype)
    return v


class GaussianField:
    """Exact marginal velocity of rectified flow from N(0, I) to data N(mu, s^2 I).

    x_t = t mu + sigma(t) z with sigma(t) = sqrt((1 - t)^2 + t^2 s^2), so

        v(x, t) = mu + sigma'(t) / sigma(t) (x - t mu),   sigma' = (t s^2 - (1 - t)) / sigma.

    Paths bend sharply near t = 1 when s is small (sigma'' = s^2 / sigma^3).
    """

    def __init__(self, mu: torch.Tensor, s: float):
        self.mu, self.s = mu, s

    def sigma(self, t):
        return torch.sqrt((1 - t) ** 2 + (t * self.s) ** 2)

    def __call__(self, x, t):
        tt = t.view(-1, *([1] * (x.dim() - 1)))
        sig = self.sigma(tt)
        dsig = (tt * self.s**2 - (1 - tt)) / sig
        return self.mu + dsig / sig * (x - tt * self.mu)

    def exact(self, z, t: float = 1.0):
        return t * self.mu + math.sqrt((1 - t) ** 2 + (t * self.s) ** 2) * z
