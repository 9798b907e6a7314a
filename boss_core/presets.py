"""Fixed schedule presets that a learned schedule must beat.

- uniform: t_k = k / K.
- shift: time shift on sigma = 1 - t (SD3), sigma' = s sigma / (1 + (s - 1) sigma), s = 3.
  s > 1 spends more steps near the noise end (t near 0).
- edm: Karras et al.'s rho-polynomial in sigma, mapped to flow time by t = 1 / (1 + sigma):

      sigma_k = (smax^(1/rho) + k/(K-1) (smin^(1/rho) - smax^(1/rho)))^rho, k = 0..K-1,
      sigma_K = 0,  t_k = 1 / (1 + sigma_k),  then t_0 set to 0.
"""

from __future__ import annotations

import numpy as np

from .schedule import Schedule


def _check_k(nfe: int) -> int:
    if isinstance(nfe, bool) or not isinstance(nfe, (int, np.integer)) or nfe < 1:
        raise ValueError(f"nfe (K) must be an integer >= 1, got {nfe!r}")
    return int(nfe)


def uniform_schedule(nfe: int) -> Schedule:
    k = _check_k(nfe)
    return Schedule(times=np.arange(k + 1, dtype=np.float64) / k, name="uniform")


def shift_schedule(nfe: int, shift: float = 3.0) -> Schedule:
    k = _check_k(nfe)
    if not shift > 0:
        raise ValueError(f"shift must be > 0, got {shift!r}")
    sigma = 1.0 - np.arange(k + 1, dtype=np.float64) / k
    shifted = shift * sigma / (1.0 + (shift - 1.0) * sigma)
    times = 1.0 - shifted
    times[0], times[-1] = 0.0, 1.0  # exact endpoints whatever the rounding
    return Schedule(times=times, name="shift")


def edm_schedule(nfe: int, rho: float = 7.0, sigma_min: float = 0.002,
                 sigma_max: float = 80.0) -> Schedule:
    k = _check_k(nfe)
    if not (0 < sigma_min < sigma_max) or not rho > 0:
        raise ValueError(
            f"edm needs 0 < sigma_min < sigma_max and rho > 0, got {sigma_min}, {sigma_max}, {rho}"
        )
    frac = np.arange(k, dtype=np.float64) / max(k - 1, 1)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    sigma = np.append((hi + frac * (lo - hi)) ** rho, 0.0)  # (K + 1,), sigma_K = 0
    times = 1.0 / (1.0 + sigma)
    times[0] = 0.0
    return Schedule(times=times, name="edm")


PRESETS = {"uniform": uniform_schedule, "shift": shift_schedule, "edm": edm_schedule}


def preset_schedule(name: str, nfe: int, **kwargs) -> Schedule:
    """Build a preset by name; unknown names raise ValueError listing the known ones."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known presets: {sorted(PRESETS)}")
    return PRESETS[name](nfe, **kwargs)
