"""A small time-conditioned U-Net velocity v(x, t, y=None) for images (B, C, H, W).

Layout for channel_mults (m_0, .., m_{L-1}) and base channels C0 (r = num_res_blocks):

    conv_in: C -> C0
    down level i: r x ResBlock(-> C0 m_i), keep a skip; then stride-2 conv unless i = L - 1
    middle:       2 x ResBlock at the coarsest resolution
    up level i:   concat skip_i, r x ResBlock(-> C0 m_i); then nearest x2 + conv unless i = 0
    conv_out:     GroupNorm, SiLU, conv C0 -> C (zero-initialised, so v = 0 at init)

Residual block with the conditioning c = ConditionEmbedding(t, y) added after the first conv:

    h = conv1(SiLU(GN(x))) + Linear(SiLU(c))[:, :, None, None]
    out = skip(x) + conv2(SiLU(GN(h)))

Inputs whose H or W is not a multiple of 2^(L - 1) are zero-padded at the bottom/right and the
output is cropped back, so 8x8, 28x28 and 32x32 all work with any mults.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .mlp import ConditionEmbedding


def _groups(channels: int, max_groups: int = 8) -> int:
    """The largest group count <= max_groups that divides ``channels``."""
    return max(g for g in range(1, max_groups + 1) if channels % g == 0)


class ResBlock(nn.Module):
    """Residual conv block with GroupNorm + SiLU and the conditioning added (shapes in forward)."""

    def __init__(self, in_ch: int, out_ch: int, cond_dim: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(in_ch), in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.cond = nn.Linear(cond_dim, out_ch)
        self.norm2 = nn.GroupNorm(_groups(out_ch), out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        """x: (B, in_ch, H, W); c: (B, cond_dim) -> (B, out_ch, H, W)."""
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.cond(F.silu(c))[:, :, None, None]  # broadcast over H, W
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class VelocityUNet(nn.Module):
    """Time- (and optionally class-) conditioned U-Net; x (B, C, H, W) -> velocity (B, C, H, W)."""

    def __init__(
        self,
        in_channels: int,
        base_channels: int = 16,
        channel_mults: tuple[int, ...] = (1, 2),
        num_res_blocks: int = 1,
        time_embed_dim: int = 128,
        num_classes: int | None = None,
    ):
        super().__init__()
        if not channel_mults:
            raise ValueError("channel_mults must name at least one level")
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.n_levels = len(channel_mults)
        cond_dim = 4 * base_channels
        self.embed = ConditionEmbedding(cond_dim, time_embed_dim, num_classes)
        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)

        self.down_blocks = nn.ModuleList()
        self.downsamples = nn.ModuleList()
        skip_channels = []
        ch = base_channels
        for i, mult in enumerate(channel_mults):
            out_ch = base_channels * mult
            blocks = nn.ModuleList()
            for _ in range(num_res_blocks):
                blocks.append(ResBlock(ch, out_ch, cond_dim))
                ch = out_ch
            self.down_blocks.append(blocks)
            skip_channels.append(ch)
            last = i == self.n_levels - 1
            self.downsamples.append(nn.Identity() if last else nn.Conv2d(ch, ch, 3, 2, 1))

        self.mid = nn.ModuleList([ResBlock(ch, ch, cond_dim), ResBlock(ch, ch, cond_dim)])

        self.up_blocks = nn.ModuleList()
        self.upsamples = nn.ModuleList()
        for i in reversed(range(self.n_levels)):
            out_ch = base_channels * channel_mults[i]
            blocks = nn.ModuleList([ResBlock(ch + skip_channels[i], out_ch, cond_dim)])
            blocks.extend(ResBlock(out_ch, out_ch, cond_dim) for _ in range(num_res_blocks - 1))
            ch = out_ch
            self.up_blocks.append(blocks)
            self.upsamples.append(nn.Identity() if i == 0 else nn.Conv2d(ch, ch, 3, padding=1))

        self.norm_out = nn.GroupNorm(_groups(ch), ch)
        self.conv_out = nn.Conv2d(ch, in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """x: (B, C, H, W); t: (B,); y: (B,) labels or None -> (B, C, H, W)."""
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"VelocityUNet expects (B, {self.in_channels}, H, W), got {tuple(x.shape)}"
            )
        height, width = x.shape[-2:]
        factor = 2 ** (self.n_levels - 1)
        pad_h = math.ceil(height / factor) * factor - height
        pad_w = math.ceil(width / factor) * factor - width
        h = F.pad(x, (0, pad_w, 0, pad_h))  # (B, C, H', W'), H' and W' multiples of factor
        c = self.embed(t, y)  # (B, cond_dim)

        h = self.conv_in(h)
        skips = []
        for blocks, down in zip(self.down_blocks, self.downsamples, strict=True):
            for block in blocks:
                h = block(h, c)
            skips.append(h)
            h = down(h)  # halves H, W except at the last level
        for block in self.mid:
            h = block(h, c)
        for blocks, up in zip(self.up_blocks, self.upsamples, strict=True):
            h = torch.cat([h, skips.pop()], dim=1)  # (B, ch + skip_ch, h, w)
            for block in blocks:
                h = block(h, c)
            if not isinstance(up, nn.Identity):
                h = up(F.interpolate(h, scale_factor=2.0, mode="nearest"))  # doubles H, W
        v = self.conv_out(F.silu(self.norm_out(h)))  # (B, C, H', W')
        return v[:, :, :height, :width]  # crop the padding: (B, C, H, W)

