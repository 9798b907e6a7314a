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


class MixtureField:
    """Exact marginal velocity of a path (``boss_core.paths``) from N(0, I) to a Gaussian mixture.

    Data x1 ~ sum_k pi_k N(mu_k, s_k^2 I) in D dimensions, x_t = alpha x1 + sigma z. Given the
    component k, x_t | k ~ N(alpha mu_k, S_k^2 I) with S_k^2 = alpha^2 s_k^2 + sigma^2, and

        E[x1 | x_t, k] = mu_k + alpha s_k^2 / S_k^2 (x_t - alpha mu_k),
        E[z | x_t, k]  = sigma / S_k^2 (x_t - alpha mu_k),
        w_k(x_t) = pi_k N(x_t; alpha mu_k, S_k^2 I) / sum_j pi_j N(x_t; alpha mu_j, S_j^2 I),
        v(x_t, t) = sum_k w_k (alpha' E[x1 | x_t, k] + sigma' E[z | x_t, k]).

    Computed in float64 (weights (K,), means (K, D), stds (K,)); x: (B, D), t: (B,) -> (B, D)
    in x's dtype. Finite wherever sigma' is (t <= t_max for vp).
    """

    def __init__(self, weights, means, stds, path):
        self.pi = torch.as_tensor(weights, dtype=torch.float64)  # (K,)
        self.mu = torch.as_tensor(means, dtype=torch.float64)  # (K, D)
        self.s = torch.as_tensor(stds, dtype=torch.float64)  # (K,)
        self.path = path

    def __call__(self, x, t):
        x64, t64 = x.to(torch.float64), t.to(torch.float64)
        p = self.path
        a, sig = p.alpha(t64)[:, None], p.sigma(t64)[:, None]  # (B, 1)
        da, dsig = p.d_alpha(t64)[:, None], p.d_sigma(t64)[:, None]  # (B, 1)
        var = a**2 * self.s**2 + sig**2  # (B, K): S_k^2
        diff = x64[:, None, :] - a[:, :, None] * self.mu  # (B, K, D): x_t - alpha mu_k
        dim = self.mu.shape[1]
        log_w = (self.pi.log() - 0.5 * dim * var.log()
                 - (diff**2).sum(-1) / (2.0 * var))  # (B, K), up to a constant
        w = torch.softmax(log_w, dim=1)  # (B, K)
        e_x1 = self.mu + (a * self.s**2 / var)[..., None] * diff  # (B, K, D)
        e_z = (sig / var)[..., None] * diff  # (B, K, D)
        v_k = da[..., None] * e_x1 + dsig[..., None] * e_z  # (B, K, D)
        return (w[..., None] * v_k).sum(1).to(x.dtype)  # (B, D)

    def sample(self, n: int, gen: torch.Generator):
        """n data points and their components: (n, D) float64, (n,) int64."""
        k = torch.multinomial(self.pi, n, replacement=True, generator=gen)  # (n,)
        eps = torch.randn(n, self.mu.shape[1], generator=gen, dtype=torch.float64)
        return self.mu[k] + self.s[k, None] * eps, k
