"""The ``Schedule`` type every schedule builder returns, and its exports."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import torch

from .config import check_number
from .grids import as_grid, check_n_steps


@dataclass(frozen=True, eq=False)
class Schedule:
    """K Euler steps on a strictly increasing float64 grid 0 = t_0 < ... < t_K = 1.

    times: (K + 1,) float64, read-only.
    indices: fine-grid indices (length K + 1, from 0 to N) the times came from, or None for
        presets off the grid.
    cost: the objective the builder minimised (mean cost, or mean squared end-point error for
        the global search), or None for presets.
    name: the builder ("uniform", "bellman", ...), for logs and exports.
    n_steps: N, the fine grid the indices refer to, or None.
    """

    times: np.ndarray
    indices: tuple[int, ...] | None = None
    cost: float | None = None
    name: str = ""
    n_steps: int | None = None

    def __post_init__(self):
        grid = as_grid(self.times, name=f"{self.name or 'schedule'} times")
        object.__setattr__(self, "times", grid)
        if self.indices is not None:
            idx = tuple(map(int, self.indices))
            if len(idx) != grid.shape[0]:
                raise ValueError(f"indices has {len(idx)} entries for {grid.shape[0]} times")
            object.__setattr__(self, "indices", idx)
        if self.cost is not None:
            object.__setattr__(self, "cost", float(self.cost))

    @classmethod
    def from_indices(cls, indices, n_steps: int, *, cost: float | None = None,
                     name: str = "") -> Schedule:
        """A schedule on the uniform fine grid: t_k = indices[k] / N."""
        n = check_n_steps(n_steps)
        idx = tuple(map(int, indices))
        if not idx or idx[0] != 0 or idx[-1] != n:
            raise ValueError(f"indices must run from 0 to N={n}, got {idx}")
        times = np.array(idx, dtype=np.float64) / n
        return cls(times=times, indices=idx, cost=cost, name=name, n_steps=n)

    @property
    def nfe(self) -> int:
        """K, the number of Euler steps (network calls)."""
        return self.times.shape[0] - 1

    @property
    def step_sizes(self) -> np.ndarray:
        """(K,) float64 step sizes t_{k+1} - t_k."""
        return np.diff(self.times)

    def time_grid(self, device: torch.device | str | None = None) -> torch.Tensor:
        """(K + 1,) float64 tensor for the samplers."""
        return torch.tensor(self.times, dtype=torch.float64, device=device)

    def to_diffusers_sigmas(self) -> np.ndarray:
        """(K,) float64 sigmas 1 - t_k for k = 0..K-1, for ``scheduler.set_timesteps(sigmas=...)``.

        diffusers' FlowMatchEulerDiscreteScheduler appends the final sigma 0 itself. Build the
        scheduler with ``shift=1.0`` (and no dynamic shifting), or it re-warps these sigmas.
        The same values as ``to_flow_match_sigmas()[:-1]``.
        """
        return 1.0 - self.times[:-1]

    def to_flow_match_sigmas(self) -> np.ndarray:
        """(K + 1,) float64 flow-match sigmas sigma_k = 1 - t_k, k = 0..K: 1 (noise) to 0.

        diffusers' flow matching writes x = (1 - sigma) x_data + sigma noise, which is our
        linear path at sigma = 1 - t. K steps have K + 1 sigmas, the last exactly 0 (t_K = 1).
        They equal ``FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)``'s
        ``scheduler.sigmas`` (float32) after ``set_timesteps(sigmas=sigmas[:-1])``: diffusers
        takes the K sigmas without the final 0 (``to_diffusers_sigmas``) and appends it.
        """
        return 1.0 - self.times

    def to_flow_match_timesteps(self, num_train_timesteps: float = 1000) -> np.ndarray:
        """(K,) float64 timesteps sigma_k * T, k = 0..K-1, T = ``num_train_timesteps``.

        The time input of a diffusers flow-match network at each of the K calls (diffusers'
        ``scheduler.timesteps``); the final sigma 0 (t_K = 1) is never evaluated, so it has no
        timestep.
        """
        check_number("num_train_timesteps", num_train_timesteps, lambda v: v > 0, "> 0")
        return self.to_diffusers_sigmas() * float(num_train_timesteps)

    def to_denoiser_sigmas(self, sigma_max: float) -> np.ndarray:
        """(K + 1,) float64 sigmas for a diffusion model's ``EulerDiscreteScheduler``.

        A denoiser on the linear path (``boss_core.denoisers``) sits at t = alpha / (alpha +
        sigma), so its scheduler sigma is sigma / alpha = (1 - t_k) / t_k, and the list ends
        with the final 0 (t_K = 1, the denoised sample): pass it whole to
        ``scheduler.set_timesteps(sigmas=...)``. t_0 = 0 (pure noise) has no finite sigma; it
        gets ``sigma_max``, the scheduler's largest (the noise schedule's ``sigma_ratio_max``),
        where the adapter evaluates the network too. diffusers' Euler steps then equal boss's
        Euler steps on this schedule after the first one (whose start differs by O(t_1)
        of the noise; see docs/diffusers.md).
        """
        if not 0 < sigma_max < np.inf:
            raise ValueError(f"sigma_max must be a finite number > 0, got {sigma_max!r}")
        inner = self.times[1:-1]
        return np.concatenate([[float(sigma_max)], (1.0 - inner) / inner, [0.0]])

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "nfe": self.nfe,
            "times": self.times.tolist(),
            "indices": list(self.indices) if self.indices is not None else None,
            "n_steps": self.n_steps,
            "cost": self.cost,
        }

    @classmethod
    def from_dict(cls, data: dict) -> Schedule:
        unknown = set(data) - {"name", "nfe", "times", "indices", "n_steps", "cost"}
        if unknown:
            raise ValueError(f"unknown schedule keys: {sorted(unknown)}")
        if "times" not in data:
            raise ValueError("schedule dict has no 'times'")
        sched = cls(times=data["times"], indices=data.get("indices"), cost=data.get("cost"),
                    name=data.get("name", ""), n_steps=data.get("n_steps"))
        if data.get("nfe") is not None and data["nfe"] != sched.nfe:
            raise ValueError(f"schedule says nfe={data['nfe']} but has {sched.nfe} steps")
        return sched

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> Schedule:
        return cls.from_dict(json.loads(text))

    def __repr__(self) -> str:
        times = np.array2string(self.times, precision=4, separator=", ")
        return f"Schedule(name={self.name!r}, nfe={self.nfe}, times={times}, cost={self.cost})"


def schedules_to_json(schedules: dict[int, Schedule]) -> str:
    """JSON object keyed by NFE (as strings), each value a ``Schedule.to_dict()``."""
    return json.dumps({str(k): s.to_dict() for k, s in sorted(schedules.items())}, indent=2)


def schedules_from_json(text: str) -> dict[int, Schedule]:
    return {int(k): Schedule.from_dict(v) for k, v in json.loads(text).items()}
