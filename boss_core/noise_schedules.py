"""Diffusion noise schedules and their place on the linear path x~ = t x0 + (1 - t) eps.

A diffusion model sees x = alpha x0 + sigma eps. Dividing by alpha + sigma puts that state on
boss's linear path (t = 0 noise, t = 1 data):

    x~ = x / (alpha + sigma) = t x0 + (1 - t) eps,   t = alpha / (alpha + sigma),

so a schedule only has to say, for a time t, which (alpha, sigma) have sigma / alpha =
(1 - t) / t and what the network takes as its time input. Two families:

- ``VPNoise`` (DDPM / DDIM / Stable Diffusion): a table ``alphas_cumprod`` of T values,
  alpha_i = sqrt(acp_i), sigma_i = sqrt(1 - acp_i), timestep input i = 0 .. T - 1 (0 is the
  least noise). Between table points the timestep is interpolated linearly in the log-SNR
  lambda = log(alpha^2 / sigma^2) = 2 log(t / (1 - t)), as diffusers' EulerDiscreteScheduler
  does in log(sigma / alpha); at the table points it is exact.
- ``VENoise`` (EDM / score SDE): alpha = 1, sigma in [sigma_min, sigma_max], t = 1 / (1 + sigma);
  the time input is sigma itself or EDM's c_noise = log(sigma) / 4.

Each covers the times [t_min, t_max] = [t(largest noise), t(least noise)] only; the adapter in
``boss_core.denoisers`` says what happens outside.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
VE_TIMESTEPS = ("sigma", "c_noise")


def vp_alphas_cumprod(num_train_timesteps: int = 1000, beta_start: float = 1e-4,
                      beta_end: float = 0.02, beta_schedule: str = "linear",
                      rescale_zero_snr: bool = False) -> np.ndarray:
    """The (T,) float64 table acp_i = prod_{j <= i} (1 - beta_j) of a DDPM config.

    The betas are built the way diffusers' DDPM/DDIM schedulers build them, in float32, so the
    table equals ``scheduler.alphas_cumprod`` bit for bit:

    - linear: beta_i evenly spaced from beta_start to beta_end;
    - scaled_linear: sqrt(beta_i) evenly spaced from sqrt(beta_start) to sqrt(beta_end);
    - squaredcos_cap_v2: beta_i = min(1 - abar((i + 1) / T) / abar(i / T), 0.999) with
      abar(s) = cos((s + 0.008) / 1.008 * pi / 2)^2 (the cosine schedule).

    rescale_zero_snr: shift and scale sqrt(acp) so that acp_{T-1} = 0 exactly and acp_0 is
    kept (zero terminal SNR, Lin et al. 2023), as diffusers' ``rescale_betas_zero_snr``.
    """
    n = int(num_train_timesteps)
    if beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, n, dtype=torch.float32)
    elif beta_schedule == "scaled_linear":
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float32) ** 2
    elif beta_schedule == "squaredcos_cap_v2":
        def abar(s: float) -> float:
            return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = torch.tensor([min(1 - abar((i + 1) / n) / abar(i / n), 0.999) for i in range(n)],
                             dtype=torch.float32)
    else:
        raise ValueError(f"beta_schedule must be one of {', '.join(BETA_SCHEDULES)}, "
                         f"got {beta_schedule!r}")
    if rescale_zero_snr:
        root = torch.cumprod(1.0 - betas, dim=0).sqrt()  # (T,) sqrt(acp_i)
        first, last = root[0].clone(), root[-1].clone()
        root = (root - last) * (first / (first - last))  # root_0 kept, root_{T-1} = 0
        abar = root**2
        betas = 1.0 - torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return torch.cumprod(1.0 - betas, dim=0).double().numpy()


class VPNoise:
    """Variance-preserving noise from a DDPM table: x = sqrt(acp_i) x0 + sqrt(1 - acp_i) eps.

    alphas_cumprod: (T,) values in [0, 1], strictly decreasing (acp_{T-1} = 0 is zero terminal
    SNR, where t_min = 0). ``times[i]`` = t_i = alpha_i / (alpha_i + sigma_i) in float64,
    decreasing in i; t_min = t_{T-1}, t_max = t_0.
    """

    def __init__(self, alphas_cumprod):
        acp = np.array(alphas_cumprod, dtype=np.float64)
        if acp.ndim != 1 or acp.shape[0] < 2:
            raise ValueError(f"alphas_cumprod must be a 1-D table of at least 2 values, got "
                             f"shape {acp.shape}")
        if not np.isfinite(acp).all() or (acp < 0).any() or (acp > 1).any():
            raise ValueError("alphas_cumprod values must lie in [0, 1]")
        if not (np.diff(acp) < 0).all():
            raise ValueError("alphas_cumprod must be strictly decreasing (timestep 0 is the "
                             "least noise)")
        self.alphas_cumprod = acp
        self.alphas = np.sqrt(acp)          # (T,)
        self.sigmas = np.sqrt(1.0 - acp)    # (T,)
        self.times = self.alphas / (self.alphas + self.sigmas)  # (T,) decreasing
        with np.errstate(divide="ignore"):
            self.log_snr = 2.0 * (np.log(self.alphas) - np.log(self.sigmas))  # (T,), -inf at SNR 0
        self.t_min, self.t_max = float(self.times[-1]), float(self.times[0])

    @property
    def num_train_timesteps(self) -> int:
        return self.alphas_cumprod.shape[0]

    @property
    def sigma_ratio_max(self) -> float:
        """sigma / alpha at the largest timestep (diffusers' largest Euler sigma; inf at SNR 0)."""
        return float(self.sigmas[-1] / self.alphas[-1]) if self.alphas[-1] > 0 else math.inf

    def times_of(self, timesteps) -> np.ndarray:
        """t_i of integer timesteps i (float64), e.g. a DDIM scheduler's ``timesteps``."""
        idx = np.asarray(timesteps, dtype=np.int64)
        if (idx < 0).any() or (idx >= self.num_train_timesteps).any():
            raise ValueError(f"timesteps must lie in 0 .. {self.num_train_timesteps - 1}")
        return self.times[idx]

    def at(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(alpha, sigma, timestep) of times t in [t_min, t_max] (clamped), each (B,) float64.

        t: (B,) in any float dtype. A time that equals a table time t_i in t's dtype (as a
        float64 grid point does after the samplers cast it to x's dtype) gets exactly
        (alpha_i, sigma_i, i). Between t_{i+1} < t < t_i: alpha = t / n, sigma = (1 - t) / n with
        n = sqrt(t^2 + (1 - t)^2), and timestep = i + w, w = (lambda_i - lambda(t)) /
        (lambda_i - lambda_{i+1}) (linear in t where lambda_{i+1} = -inf).
        """
        device = t.device
        times = torch.as_tensor(self.times, device=device)          # (T,) decreasing
        t64 = t.to(torch.float64).clamp(self.t_min, self.t_max)     # (B,)
        # a table time in t's dtype, or an end of the range after clamping
        hit = (t[:, None] == times.to(t.dtype)[None, :]) | (t64[:, None] == times[None, :])
        ascending = times.flip(0)                                    # (T,) increasing
        j = torch.searchsorted(ascending, t64).clamp(1, times.shape[0] - 1)
        i = times.shape[0] - 1 - j                                   # (B,) t_{i+1} <= t <= t_i
        lam = torch.as_tensor(self.log_snr, device=device)
        lam_t = 2.0 * (torch.log(t64) - torch.log1p(-t64))           # (B,)
        lam_hi, lam_lo = lam[i], lam[i + 1]
        w = (lam_hi - lam_t) / (lam_hi - lam_lo)
        w_lin = (times[i] - t64) / (times[i] - times[i + 1])
        w = torch.where(torch.isfinite(lam_lo), w, w_lin).clamp(0.0, 1.0)
        norm = torch.sqrt(t64**2 + (1.0 - t64) ** 2)
        alpha, sigma, timestep = t64 / norm, (1.0 - t64) / norm, i.to(torch.float64) + w
        exact = hit.any(dim=1)
        k = hit.to(torch.int64).argmax(dim=1)                        # (B,) the hit, if any
        alpha = torch.where(exact, torch.as_tensor(self.alphas, device=device)[k], alpha)
        sigma = torch.where(exact, torch.as_tensor(self.sigmas, device=device)[k], sigma)
        timestep = torch.where(exact, k.to(torch.float64), timestep)
        return alpha, sigma, timestep


class VENoise:
    """Variance-exploding noise: x = x0 + sigma eps, sigma in [sigma_min, sigma_max].

    t = 1 / (1 + sigma), so t_min = 1 / (1 + sigma_max) and t_max = 1 / (1 + sigma_min).
    timestep: the network's time input, "sigma" (sigma itself) or "c_noise" (EDM's
    log(sigma) / 4).
    """

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0,
                 timestep: str = "sigma"):
        if not 0 < sigma_min < sigma_max < math.inf:
            raise ValueError(f"need 0 < sigma_min < sigma_max < inf, got {sigma_min!r}, "
                             f"{sigma_max!r}")
        if timestep not in VE_TIMESTEPS:
            raise ValueError(f"timestep must be one of {', '.join(VE_TIMESTEPS)}, "
                             f"got {timestep!r}")
        self.sigma_min, self.sigma_max, self.timestep = float(sigma_min), float(sigma_max), timestep
        self.t_min, self.t_max = 1.0 / (1.0 + self.sigma_max), 1.0 / (1.0 + self.sigma_min)

    @property
    def sigma_ratio_max(self) -> float:
        """sigma / alpha at the largest noise: sigma_max."""
        return self.sigma_max

    def at(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(alpha = 1, sigma = (1 - t) / t, time input) at t in [t_min, t_max]: (B,) float64."""
        t64 = t.to(torch.float64).clamp(self.t_min, self.t_max)
        sigma = (1.0 - t64) / t64
        timestep = sigma if self.timestep == "sigma" else 0.25 * torch.log(sigma)
        return torch.ones_like(sigma), sigma, timestep
