"""Which part of the input a coupling passes through unchanged (and feeds to its
network) and which part it transforms.

A mask has four operations the couplings use, so a new split type is one class:

* ``channels(C) -> (network input channels, transformed channels)``;
* ``split(x) -> (passive, active)``: what the network sees, and what is transformed;
* ``merge(x, new_active)``: the output, with the passive part of ``x`` unchanged;
* ``sum_active(log_scale)``: the log-det, summed over the transformed entries only.

:class:`ChannelMask` is Glow's channel split (seed 004 sec. 2.1). :class:`CheckerboardMask`
is RealNVP's spatial checkerboard, with square blocks of ``block`` pixels (the
hierarchical flow's S2/S4/S8 splits, seed 001 Table 4, alternate 2x2, 4x4, 8x8).
"""
from __future__ import annotations

import torch
from torch import Tensor

from flows.base import sum_except_batch


class CouplingMask:
    def channels(self, num_channels: int) -> tuple[int, int]:
        raise NotImplementedError

    def split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def merge(self, x: Tensor, new_active: Tensor) -> Tensor:
        raise NotImplementedError

    def sum_active(self, log_scale: Tensor) -> Tensor:
        raise NotImplementedError


class ChannelMask(CouplingMask):
    """The first ``C // 2`` channels pass (the network input), the rest are transformed;
    ``parity=1`` swaps the roles: the last ``C // 2`` pass and the first ``C - C // 2``
    are transformed (RealNVP alternates the two between couplings)."""

    def __init__(self, parity: int = 0) -> None:
        if parity not in (0, 1):
            raise ValueError(f"a channel mask's parity is 0 or 1, got {parity}")
        self.parity = parity

    def channels(self, num_channels: int) -> tuple[int, int]:
        if num_channels < 2:
            raise ValueError("a channel coupling needs at least 2 channels; squeeze the input first")
        passive = num_channels // 2
        return passive, num_channels - passive

    def _boundary(self, x: Tensor) -> int:
        """Index of the first channel of the second group."""
        return x.shape[1] // 2 if self.parity == 0 else x.shape[1] - x.shape[1] // 2

    def split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        first, second = x[:, :self._boundary(x)], x[:, self._boundary(x):]
        return (first, second) if self.parity == 0 else (second, first)

    def merge(self, x: Tensor, new_active: Tensor) -> Tensor:
        boundary, new_active = self._boundary(x), new_active.to(x.dtype)
        if self.parity == 0:
            return torch.cat([x[:, :boundary], new_active], dim=1)
        return torch.cat([new_active, x[:, boundary:]], dim=1)

    def sum_active(self, log_scale: Tensor) -> Tensor:
        return sum_except_batch(log_scale)

    def __repr__(self) -> str:
        return f"ChannelMask(parity={self.parity})"


class CheckerboardMask(CouplingMask):
    """Pixels where ``(row // block + col // block) % 2 == parity`` pass; the others are
    transformed. The network sees the whole image with the transformed pixels zeroed."""

    def __init__(self, block: int = 1, parity: int = 0) -> None:
        if block < 1 or parity not in (0, 1):
            raise ValueError(f"checkerboard needs block >= 1 and parity 0 or 1, got {block}, {parity}")
        self.block = block
        self.parity = parity

    def passive_mask(self, x: Tensor) -> Tensor:
        height, width = x.shape[-2:]
        if height % self.block or width % self.block:
            raise ValueError(f"a {self.block}x{self.block} checkerboard needs sizes divisible by "
                             f"{self.block}, got {height}x{width}")
        rows = torch.arange(height, device=x.device) // self.block
        cols = torch.arange(width, device=x.device) // self.block
        mask = ((rows[:, None] + cols[None, :]) % 2 == self.parity).to(x.dtype)
        return mask[None, None]

    def channels(self, num_channels: int) -> tuple[int, int]:
        return num_channels, num_channels

    def split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x * self.passive_mask(x), x

    def merge(self, x: Tensor, new_active: Tensor) -> Tensor:
        mask = self.passive_mask(x)
        return x * mask + new_active.to(x.dtype) * (1 - mask)

    def sum_active(self, log_scale: Tensor) -> Tensor:
        return sum_except_batch(log_scale * (1 - self.passive_mask(log_scale)))

    def __repr__(self) -> str:
        return f"CheckerboardMask(block={self.block}, parity={self.parity})"
