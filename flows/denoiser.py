"""The time-conditioned U-Net a DDPM denoises with (Ho et al. 2020; improved-diffusion's
``UNetModel``; seed 003 sec. 3.3.3 and Table 5.1, whose "dpm" column gives the ResNet
blocks per resolution: 2).

Per resolution level: ``num_res_blocks`` ResNet blocks (GroupNorm - SiLU - conv, plus
a projection of the time embedding, GroupNorm - SiLU - dropout - zero-init conv, and a
skip), self-attention where the resolution is in ``attention_resolutions``, then a
strided-conv downsample; a middle of ResNet - attention - ResNet; an upward path with
``num_res_blocks + 1`` blocks per level over the concatenated skips and nearest-neighbour
upsampling. The time step enters as a sinusoidal embedding through a 2-layer MLP.

The output convolution starts at zero, so an untrained denoiser predicts eps = 0 and,
with a learned variance, v = 0 (the log-variance halfway between beta_t and the
posterior's beta-tilde_t).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of (possibly fractional) time steps ``t`` [B] -> [B, dim]."""
    half = dim // 2
    frequencies = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * frequencies[None]
    embedding = torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)
    return F.pad(embedding, (0, dim % 2))


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    """GroupNorm with the largest group count <= ``groups`` that divides ``channels``."""
    return nn.GroupNorm(math.gcd(channels, groups), channels)


def zero_module(module: nn.Module) -> nn.Module:
    for parameter in module.parameters():
        nn.init.zeros_(parameter)
    return module


class ResBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, time_channels: int, dropout: float,
                 groups: int) -> None:
        super().__init__()
        self.in_layers = nn.Sequential(group_norm(in_channels, groups), nn.SiLU(),
                                       nn.Conv2d(in_channels, out_channels, 3, padding=1))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(time_channels, out_channels))
        self.out_layers = nn.Sequential(group_norm(out_channels, groups), nn.SiLU(), nn.Dropout(dropout),
                                        zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1)))
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor, time: Tensor) -> Tensor:
        h = self.in_layers(x) + self.time_projection(time)[:, :, None, None]
        return self.skip(x) + self.out_layers(h)


class SelfAttention(nn.Module):
    """Multi-head self-attention over the spatial positions, with a residual."""

    def __init__(self, channels: int, num_heads: int, groups: int) -> None:
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"attention channels {channels} are not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.norm = group_norm(channels, groups)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.out = zero_module(nn.Conv1d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x).reshape(b, c, h * w))
        q, k, v = qkv.reshape(b, 3, self.num_heads, c // self.num_heads, h * w).permute(1, 0, 2, 4, 3)
        attended = F.scaled_dot_product_attention(q, k, v)  # [b, heads, hw, c/heads]
        attended = attended.permute(0, 1, 3, 2).reshape(b, c, h * w)
        return x + self.out(attended).reshape(b, c, h, w)


class TimeConditionedUNet(nn.Module):
    """eps_theta(z_t, t) (and the variance interpolation v when ``out_channels`` is twice
    the input's).

    Args:
        in_channels, out_channels: channels of z_t and of the prediction.
        image_size: the spatial size of z_t (must be divisible by 2**(levels - 1)).
        base_channels: channels of the first level; level i has base * channel_mults[i].
        channel_mults: one entry per resolution level.
        num_res_blocks: ResNet blocks per level on the way down (seed 003 Table 5.1
            "dpm": 2 for MNIST, CIFAR-10 and CelebA).
        attention_resolutions: resolutions with self-attention (DDPM: 16).
        dropout: in the ResNet blocks (DDPM: 0.1 on CIFAR-10).
        num_heads: attention heads. norm_groups: GroupNorm groups (32 in DDPM; fewer where
            a width does not divide).
    """

    def __init__(self, in_channels: int, out_channels: int, image_size: int, base_channels: int = 64,
                 channel_mults: Sequence[int] = (1, 2, 2, 2), num_res_blocks: int = 2,
                 attention_resolutions: Sequence[int] = (16,), dropout: float = 0.1, num_heads: int = 4,
                 norm_groups: int = 32) -> None:
        super().__init__()
        levels = len(channel_mults)
        if levels < 1 or num_res_blocks < 1:
            raise ValueError("the U-Net needs at least one level and one ResNet block per level")
        if image_size % 2 ** (levels - 1):
            raise ValueError(f"image_size {image_size} is not divisible by 2**{levels - 1} (one halving per "
                             "level after the first); use fewer channel_mults")
        self.in_channels = in_channels
        self.base_channels = base_channels
        time_channels = 4 * base_channels
        self.time_mlp = nn.Sequential(nn.Linear(base_channels, time_channels), nn.SiLU(),
                                      nn.Linear(time_channels, time_channels))
        self.input_conv = nn.Conv2d(in_channels, base_channels, 3, padding=1)

        def block(c_in: int, c_out: int, resolution: int) -> nn.ModuleList:
            layers = [ResBlock(c_in, c_out, time_channels, dropout, norm_groups)]
            if resolution in attention_resolutions:
                layers.append(SelfAttention(c_out, num_heads, norm_groups))
            return nn.ModuleList(layers)

        self.down = nn.ModuleList()
        self.downsamplers = nn.ModuleList()
        skip_channels = [base_channels]
        channels, resolution = base_channels, image_size
        for level, mult in enumerate(channel_mults):
            blocks = nn.ModuleList()
            for _ in range(num_res_blocks):
                blocks.append(block(channels, base_channels * mult, resolution))
                channels = base_channels * mult
                skip_channels.append(channels)
            self.down.append(blocks)
            if level < levels - 1:
                self.downsamplers.append(nn.Conv2d(channels, channels, 3, stride=2, padding=1))
                skip_channels.append(channels)
                resolution //= 2
        self.middle = nn.ModuleList([ResBlock(channels, channels, time_channels, dropout, norm_groups),
                                     SelfAttention(channels, num_heads, norm_groups),
                                     ResBlock(channels, channels, time_channels, dropout, norm_groups)])
        self.up = nn.ModuleList()
        self.upsamplers = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mults))):
            blocks = nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                blocks.append(block(channels + skip_channels.pop(), base_channels * mult, resolution))
                channels = base_channels * mult
            self.up.append(blocks)
            if level > 0:
                self.upsamplers.append(nn.Conv2d(channels, channels, 3, padding=1))
                resolution *= 2
        self.output = nn.Sequential(group_norm(channels, norm_groups), nn.SiLU(),
                                    zero_module(nn.Conv2d(channels, out_channels, 3, padding=1)))

    @staticmethod
    def _run(layers: nn.ModuleList, h: Tensor, time: Tensor) -> Tensor:
        for layer in layers:
            h = layer(h, time) if isinstance(layer, ResBlock) else layer(h)
        return h

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        time = self.time_mlp(timestep_embedding(t, self.base_channels).to(x.dtype))
        h = self.input_conv(x)
        skips = [h]
        for level, blocks in enumerate(self.down):
            for layers in blocks:
                h = self._run(layers, h, time)
                skips.append(h)
            if level < len(self.downsamplers):
                h = self.downsamplers[level](h)
                skips.append(h)
        h = self._run(self.middle, h, time)
        for level, blocks in enumerate(self.up):
            for layers in blocks:
                h = self._run(layers, torch.cat([h, skips.pop()], dim=1), time)
            if level < len(self.upsamplers):
                h = self.upsamplers[level](F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.output(h)
