"""The invertible-layer contract shared by every model family.

``forward`` is the normalizing direction (data -> latent), ``inverse`` the generative
one. Both return ``(output, logdet)`` with ``logdet`` of shape ``[batch]``:
log|det d out / d in| of the direction that was run, so that the forward and inverse
log-dets of the same point sum to zero. ``cond`` (a tensor, a dict of tensors, or
None) is handed through containers untouched so conditional layers need no special
path.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

Condition = Any  # Tensor | dict[str, Tensor] | None


def zero_logdet(x: Tensor) -> Tensor:
    """A ``[batch]`` log-det accumulator. Kept in float32 or wider even when ``x`` is
    half precision, because log-dets of deep flows are large sums."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    return torch.zeros(x.shape[0], device=x.device, dtype=dtype)


def sum_except_batch(x: Tensor) -> Tensor:
    return x.flatten(1).sum(dim=1)


class Bijection(nn.Module):
    """Base class of every invertible layer. Subclasses implement both directions."""

    def forward(self, x: Tensor, cond: Condition = None) -> tuple[Tensor, Tensor]:
        raise NotImplementedError(f"{type(self).__name__} must implement forward")

    def inverse(self, z: Tensor, cond: Condition = None) -> tuple[Tensor, Tensor]:
        raise NotImplementedError(f"{type(self).__name__} must implement inverse")


class FlowSequential(Bijection):
    """Composition of bijections; the condition is passed to every layer."""

    def __init__(self, *layers: Bijection) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: Tensor, cond: Condition = None) -> tuple[Tensor, Tensor]:
        logdet = zero_logdet(x)
        for layer in self.layers:
            x, step_logdet = layer(x, cond)
            logdet = logdet + step_logdet
        return x, logdet

    def inverse(self, z: Tensor, cond: Condition = None) -> tuple[Tensor, Tensor]:
        logdet = zero_logdet(z)
        for layer in reversed(self.layers):
            z, step_logdet = layer.inverse(z, cond)
            logdet = logdet + step_logdet
        return z, logdet

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self):
        return iter(self.layers)


def at_least_float32(x: Tensor) -> Tensor:
    """Upcast half precision to float32 and leave float32/float64 alone: the fragile
    numerics (scales, log-dets, priors) never run in bf16/fp16."""
    return x.to(torch.promote_types(x.dtype, torch.float32))
