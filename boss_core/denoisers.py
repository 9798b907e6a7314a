"""A diffusion model's denoiser as a velocity model v(x~, t) on the linear path.

The network sees x = alpha x0 + sigma eps and predicts eps ("epsilon"), x0 ("sample") or
v = alpha eps - sigma x0 ("v_prediction"). On boss's linear path (t = 0 noise, t = 1 data)

    t = alpha / (alpha + sigma),   x~ = x / (alpha + sigma) = t x0 + (1 - t) eps,
    v(x~, t) = x0_hat - eps_hat,

(``boss_core.noise_schedules`` turns t into (alpha, sigma) and the network's time input).
One Euler step from t to t' is then one DDIM (eta = 0) step, because x~ = t x0_hat +
(1 - t) eps_hat holds for the converted predictions:

    x~ + (t' - t)(x0_hat - eps_hat) = t' x0_hat + (1 - t') eps_hat
                                    = (alpha' x0_hat + sigma' eps_hat) / (alpha' + sigma').

Outside the schedule's range [t_min, t_max] the network is evaluated at the nearest end
t_c = clamp(t) on x = x~ (alpha_c + sigma_c), its x0_hat is kept and the noise is the one x~
holds at the true t: eps_hat = (x~ - t x0_hat) / (1 - t). Inside the range that is the
network's own eps_hat (the identity above), so one rule covers every t < 1:

- the first step starts from pure noise: at t = 0, x~ = eps exactly, so eps_hat = x~ and
  v = x0_hat - x~ with x0_hat from the network at t_min. The step to t_1 gives
  t_1 x0_hat + (1 - t_1) x~: DDIM's first step with its eps_hat replaced by the noise itself.
  With a zero-terminal-SNR table t_min = 0 and nothing is clamped.
- the last step reaches t = 1: from any t < 1, x~ + (1 - t) v = x~ + (1 - t) x0_hat -
  (x~ - t x0_hat) = x0_hat: Euler's last jump lands exactly on the denoised sample (DDIM's
  last step with alpha' = 1), whether t is inside the range or above t_max.

Checkpoint quirks stay here: outputs with ``.sample`` or tuples are unwrapped, a learned
variance (2C output channels) is dropped, class labels ``y`` go in under ``label_key``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .config import ConfigMixin, check_bool, check_int, check_number
from .noise_schedules import BETA_SCHEDULES, VE_TIMESTEPS, VENoise, VPNoise, vp_alphas_cumprod

PREDICTIONS = ("epsilon", "sample", "v_prediction")
NOISE_SCHEDULES = ("vp", "ve")


@dataclass(frozen=True)
class DenoiserConfig(ConfigMixin):
    """The ``model.denoiser`` keys: how a diffusion network maps to v(x, t) (adapter "denoiser").

    prediction: "epsilon", "sample" (x0) or "v_prediction" (alpha eps - sigma x0).
    noise_schedule: "vp" (x = alpha x0 + sigma eps, alpha^2 = acp; timestep input 0 .. T - 1)
        or "ve" (x = x0 + sigma eps; time input sigma or c_noise = log(sigma) / 4).
    vp: num_train_timesteps, beta_schedule ("linear", "scaled_linear", "squaredcos_cap_v2"),
        beta_start, beta_end and rescale_betas_zero_snr build the table as diffusers does;
        alphas_cumprod (T values, strictly decreasing) replaces them when set.
    ve: sigma_min, sigma_max, ve_timestep ("sigma" or "c_noise").
    learned_variance: the network outputs 2C channels (prediction, variance); keep the first C.
    label_key: the keyword the network takes class labels under (boss passes ``y``; diffusers'
        UNet2DModel takes ``class_labels``).
    Error messages start with ``denoiser.<key>``.
    """

    prediction: str = "epsilon"
    noise_schedule: str = "vp"
    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"
    beta_start: float = 0.0001
    beta_end: float = 0.02
    rescale_betas_zero_snr: bool = False
    alphas_cumprod: tuple[float, ...] | None = None
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    ve_timestep: str = "sigma"
    learned_variance: bool = False
    label_key: str = "y"

    def __post_init__(self):
        _choice("prediction", self.prediction, PREDICTIONS)
        _choice("noise_schedule", self.noise_schedule, NOISE_SCHEDULES)
        _choice("beta_schedule", self.beta_schedule, BETA_SCHEDULES)
        _choice("ve_timestep", self.ve_timestep, VE_TIMESTEPS)
        _prefixed(check_int, "num_train_timesteps", self.num_train_timesteps, 2)
        for name in ("beta_start", "beta_end"):
            _prefixed(check_number, name, getattr(self, name), lambda v: 0 < v < 1, "in (0, 1)")
        if not self.beta_start < self.beta_end:
            raise ValueError(f"denoiser.beta_end must exceed beta_start, got {self.beta_end!r} "
                             f"<= {self.beta_start!r}")
        for name in ("sigma_min", "sigma_max"):
            _prefixed(check_number, name, getattr(self, name), lambda v: v > 0, "> 0")
        if not self.sigma_min < self.sigma_max:
            raise ValueError(f"denoiser.sigma_max must exceed sigma_min, got {self.sigma_max!r} "
                             f"<= {self.sigma_min!r}")
        for name in ("rescale_betas_zero_snr", "learned_variance"):
            _prefixed(check_bool, name, getattr(self, name))
        if not isinstance(self.label_key, str) or not self.label_key.isidentifier():
            raise ValueError(f"denoiser.label_key must be a keyword-argument name, "
                             f"got {self.label_key!r}")
        if self.alphas_cumprod is not None:
            try:
                table = tuple(float(v) for v in self.alphas_cumprod)
                VPNoise(table)
            except (TypeError, ValueError) as err:
                raise ValueError(f"denoiser.alphas_cumprod: {err}") from None
            object.__setattr__(self, "alphas_cumprod", table)
        zero_snr = self.rescale_betas_zero_snr if self.alphas_cumprod is None else (
            self.alphas_cumprod[-1] == 0)
        if self.noise_schedule == "vp" and self.prediction == "epsilon" and zero_snr:
            raise ValueError("denoiser.prediction epsilon cannot give x0 where alphas_cumprod is "
                             "0 (zero terminal SNR): use v_prediction or sample")

    @classmethod
    def from_dict(cls, values) -> DenoiserConfig:
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"denoiser.{unknown[0]} is not a key; denoiser keys: {known}")
        return cls(**dict(values))

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        if self.alphas_cumprod is not None:
            out["alphas_cumprod"] = list(self.alphas_cumprod)
        return out

    def vp_table(self) -> np.ndarray:
        """(T,) float64 alphas_cumprod: the explicit table, or the one the betas build."""
        if self.alphas_cumprod is not None:
            return np.array(self.alphas_cumprod, dtype=np.float64)
        return vp_alphas_cumprod(self.num_train_timesteps, self.beta_start, self.beta_end,
                                 self.beta_schedule, self.rescale_betas_zero_snr)

    def noise(self) -> VPNoise | VENoise:
        """The noise schedule these keys describe."""
        if self.noise_schedule == "vp":
            return VPNoise(self.vp_table())
        return VENoise(self.sigma_min, self.sigma_max, self.ve_timestep)


def _choice(name: str, value: Any, options: tuple[str, ...]) -> None:
    if value not in options:
        raise ValueError(f"denoiser.{name} must be one of {', '.join(options)}, got {value!r}")


def _prefixed(check, name: str, *args) -> None:
    try:
        check(name, *args)
    except ValueError as err:
        raise ValueError(f"denoiser.{err}") from None


def _column(values: Tensor, like: Tensor) -> Tensor:
    """(B,) float64 -> (B, 1, ..., 1) in like's dtype, to broadcast over a (B, ...) state."""
    return values.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))


def predictions_to_x0_eps(prediction: str, out: Tensor, x: Tensor, alpha: Tensor,
                          sigma: Tensor) -> tuple[Tensor, Tensor]:
    """(x0_hat, eps_hat) from a network output on x = alpha x0 + sigma eps.

    out, x: (B, ...); alpha, sigma: (B,) float64. With n = alpha^2 + sigma^2 (1 for VP):
    epsilon: x0 = (x - sigma eps) / alpha; sample: eps = (x - alpha x0) / sigma;
    v_prediction: x0 = (alpha x - sigma v) / n, eps = (sigma x + alpha v) / n.
    """
    if prediction == "epsilon":
        return _column(1.0 / alpha, x) * x - _column(sigma / alpha, x) * out, out
    if prediction == "sample":
        return out, _column(1.0 / sigma, x) * x - _column(alpha / sigma, x) * out
    n = alpha**2 + sigma**2
    x0 = _column(alpha / n, x) * x - _column(sigma / n, x) * out
    eps = _column(sigma / n, x) * x + _column(alpha / n, x) * out
    return x0, eps


class DenoiserAdapter(nn.Module):
    """v(x~, t) = x0_hat - eps_hat of a diffusion network ``net(x, timestep, **extras)``.

    See the module docstring for the map and the ends of the range. Shapes: x~ (B, ...),
    t (B,) in [0, 1); returns (B, ...) in x~'s dtype. The network's time input is a (B,) tensor
    in x~'s dtype (a VP table index, fractional between table points; sigma; or c_noise).
    The adapter has no state_dict entries of its own beyond ``net.``.
    """

    def __init__(self, net: nn.Module, config: DenoiserConfig | None = None):
        super().__init__()
        self.net = net
        self.config = config or DenoiserConfig()
        self.noise = self.config.noise()

    def forward(self, x: Tensor, t: Tensor, **extras: Any) -> Tensor:
        alpha, sigma, timestep = self.noise.at(t)              # (B,) float64 each, at clamp(t)
        x_net = x * _column(alpha + sigma, x)                 # x = x~ (alpha + sigma)
        if "y" in extras and self.config.label_key != "y":
            extras = dict(extras)
            extras[self.config.label_key] = extras.pop("y")
        out = self._unwrap(self.net(x_net, timestep.to(x.dtype), **extras), x)
        x0, eps = predictions_to_x0_eps(self.config.prediction, out, x_net, alpha, sigma)
        t64 = t.to(torch.float64)
        # the ends in t's dtype, so that an end handed over in float32 counts as inside
        ends = torch.tensor([self.noise.t_min, self.noise.t_max], dtype=t.dtype, device=t.device)
        outside = (t < ends[0]) | (t > ends[1])  # (B,)
        if bool(outside.any()):  # eps_hat = (x~ - t x0_hat) / (1 - t), the noise x~ holds at t
            held = _column(1.0 / (1.0 - t64), x) * x - _column(t64 / (1.0 - t64), x) * x0
            eps = torch.where(_column(outside, x).bool(), held, eps)
        return x0 - eps

    def _unwrap(self, out: Any, x: Tensor) -> Tensor:
        if hasattr(out, "sample"):
            out = out.sample
        elif isinstance(out, (tuple, list)):
            out = out[0]
        channels = x.shape[1] if x.dim() > 1 else None
        if self.config.learned_variance:
            out = out[:, :channels]
        elif channels is not None and out.dim() == x.dim() and out.shape[1] == 2 * channels:
            raise ValueError(
                f"the denoiser returned {out.shape[1]} channels for {channels}: if it also "
                f"predicts a variance, set model.denoiser.learned_variance: true")
        return out

    def extra_repr(self) -> str:
        noise = self.noise
        return (f"prediction={self.config.prediction}, noise={type(noise).__name__}, "
                f"t in [{noise.t_min:.4g}, {noise.t_max:.4g}]")

