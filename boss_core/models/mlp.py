"""Time/class conditioning shared by the velocity networks, and the residual MLP.

Time embedding (Fourier features of t in [0, 1], t = 0 noise, t = 1 data):

    e(t) = [sin(w_1 t), .., sin(w_h t), cos(w_1 t), .., cos(w_h t)],   w_k = W^((k - 1) / (h - 1))

with h = time_embed_dim / 2 and W = ``max_freq`` (1000): the slowest feature changes once over the
unit interval, the fastest resolves steps of about 1e-3. The conditioning vector is

    c = MLP(e(t)) + E[y]    (c of shape (B, dim))

where E is a learned table with num_classes + 1 rows; row num_classes is the "no label" token used
when y is None, so one class-conditional network also has an unconditional mode.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def fourier_time_features(t: Tensor, dim: int, max_freq: float = 1000.0) -> Tensor:
    """Fourier features e(t) of shape (B, dim) for t of shape (B,) (formula in the module doc)."""
    if dim < 2 or dim % 2:
        raise ValueError(f"time embedding dim must be an even integer >= 2, got {dim}")
    half = dim // 2
    exponents = torch.arange(half, device=t.device, dtype=torch.float32) / max(half - 1, 1)
    freqs = torch.exp(exponents * math.log(max_freq))  # (half,) from 1 to max_freq
    angles = t.float()[:, None] * freqs[None, :]  # (B, half)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)  # (B, dim)


class ConditionEmbedding(nn.Module):
    """c = MLP(e(t)) + E[y]: time (and optional class) conditioning, output (B, dim)."""

    def __init__(self, dim: int, time_embed_dim: int, num_classes: int | None = None):
        super().__init__()
        self.time_embed_dim = time_embed_dim
        self.num_classes = num_classes
        self.time_mlp = nn.Sequential(
            nn.Linear(time_embed_dim, dim), nn.SiLU(), nn.Linear(dim, dim)
        )
        self.class_embed = nn.Embedding(num_classes + 1, dim) if num_classes else None

    def forward(self, t: Tensor, y: Tensor | None = None) -> Tensor:
        """t: (B,) times in [0, 1]; y: (B,) int64 labels in [0, num_classes) or None."""
        if t.dim() == 0:
            t = t.reshape(1)
        e = fourier_time_features(t, self.time_embed_dim)  # (B, time_embed_dim) float32
        c = self.time_mlp(e.to(self.time_mlp[0].weight.dtype))  # (B, dim)
        if self.class_embed is None:
            if y is not None:
                raise ValueError("class labels y were given but the model has no num_classes")
            return c
        if y is None:
            y = torch.full((t.shape[0],), self.num_classes, dtype=torch.long, device=t.device)
        return c + self.class_embed(y.long())  # (B, dim)


class MLPBlock(nn.Module):
    """Pre-norm residual block: h + W2 SiLU(W1 SiLU(LN(h)) + U c)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, hidden)
        self.cond = nn.Linear(hidden, hidden)
        self.fc2 = nn.Linear(hidden, hidden)

    def forward(self, h: Tensor, c: Tensor) -> Tensor:
        """h, c: (B, hidden) -> (B, hidden)."""
        a = self.fc1(F.silu(self.norm(h))) + self.cond(F.silu(c))
        return h + self.fc2(F.silu(a))


class VelocityMLP(nn.Module):
    """Residual MLP velocity v(x, t, y=None) for vectors and flattened images.

    x of shape (B, *data_shape) is flattened to (B, D), D = prod(data_shape):

        h_0 = W_in x + c,   h_{l+1} = MLPBlock(h_l, c),   v = W_out SiLU(LN(h_depth))

    and reshaped back to (B, *data_shape). c is the ``ConditionEmbedding`` of (t, y).
    """

    def __init__(
        self,
        data_shape: tuple[int, ...],
        hidden: int = 256,
        depth: int = 3,
        time_embed_dim: int = 128,
        num_classes: int | None = None,
    ):
        super().__init__()
        self.data_shape = tuple(int(s) for s in data_shape)
        self.num_classes = num_classes
        dim = math.prod(self.data_shape)
        self.embed = ConditionEmbedding(hidden, time_embed_dim, num_classes)
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(MLPBlock(hidden) for _ in range(depth))
        self.out_norm = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, dim)

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """x: (B, *data_shape); t: (B,); y: (B,) labels or None -> (B, *data_shape)."""
        if tuple(x.shape[1:]) != self.data_shape:
            raise ValueError(
                f"VelocityMLP built for data shape {self.data_shape}, "
                f"got x of shape {tuple(x.shape)}"
            )
        c = self.embed(t, y)  # (B, hidden)
        h = self.inp(x.reshape(x.shape[0], -1)) + c  # (B, D) -> (B, hidden)
        for block in self.blocks:
            h = block(h, c)
        v = self.out(F.silu(self.out_norm(h)))  # (B, D)
        return v.reshape(x.shape)  # (B, *data_shape)
