"""Squeeze: 2x2 spatial blocks -> channels (RealNVP; seed 000 sec. 2.2.3.4)."""
from __future__ import annotations

from torch import Tensor

from flows.base import Bijection, Condition, zero_logdet


class Squeeze(Bijection):
    """[B, C, H, W] -> [B, 4C, H/2, W/2]; a permutation, so log-det 0."""

    def forward(self, x: Tensor, cond: Condition = None) -> tuple[Tensor, Tensor]:
        b, c, h, w = x.shape
        if h % 2 or w % 2:
            raise ValueError(
                f"Squeeze needs even height and width, got {h}x{w}; use an image size "
                "divisible by 2**scales")
        x = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
        return x.reshape(b, c * 4, h // 2, w // 2), zero_logdet(x)

    def inverse(self, z: Tensor, cond: Condition = None) -> tuple[Tensor, Tensor]:
        b, c, h, w = z.shape
        z = z.reshape(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
        return z.reshape(b, c // 4, h * 2, w * 2), zero_logdet(z)
