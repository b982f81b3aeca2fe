"""Affine and additive coupling (seed 000 sec. 2.2.3.3, eq. 2.11-2.17), their
conditional form (eq. 2.18), the affine injector (eq. 2.19-2.20), and the scale
functions that bound the affine scale.

A coupling is built from a mask (which entries pass, see ``masks.py``) and a network
factory ``net(in_channels, out_channels, hidden_channels) -> nn.Module`` (Glow's
conv-ReLU-conv by default), so new split types and networks need no new coupling.

Scale functions map the raw network output ``h`` to a positive scale:

* ``"glow"``: ``sigmoid(h + 2)`` as in Glow's code. Seed 000 prints eq. 2.13 as
  ``sigmoid(exp(h) + 2)``; that is a typo (it would bound the scale to (0.88, 1)), so
  we follow the code it describes.
* ``"squish"``: sigmoid squishing ``(1 - a) * sigmoid(h) + a`` (seed 000 eq. 3.15,
  a = 0.5), which bounds the scale to ``[a, 1]`` so the inverse never divides by a
  tiny number.
* ``"exp"``: ``exp(3 tanh(h / 3))``, a log-scale bounded to (-3, 3). Seed 001's
  official code uses ``exp`` of a hard-clipped log-scale (+-3); the tanh is the smooth
  version of that clip (a hard clip has no gradient outside it). A zero network output
  is the identity, so the hierarchical flow's couplings start as identities.
"""
from __future__ import annotations

from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flows.base import (Bijection, Condition, at_least_float32, concat_features, condition_features,
                        sum_except_batch, zero_logdet)
from flows.layers.masks import ChannelMask, CouplingMask
from flows.nets import CouplingNet

ScaleFunction = Literal["glow", "squish", "exp"]
EXP_LOG_SCALE_BOUND = 3.0
NetFactory = Callable[[int, int, int], nn.Module]  # (in_channels, out_channels, hidden_channels)


class ScaleMap(nn.Module):
    """Raw output -> (scale, log scale); computed in float32 for stable log-dets."""

    def __init__(self, kind: ScaleFunction = "glow", squish_alpha: float = 0.5) -> None:
        super().__init__()
        if kind not in ("glow", "squish", "exp"):
            raise ValueError(f"scale function must be 'glow', 'squish' or 'exp', got {kind!r}")
        if kind == "squish" and not 0.0 < squish_alpha < 1.0:
            raise ValueError(f"squish_alpha must lie in (0, 1), got {squish_alpha}")
        self.kind = kind
        self.squish_alpha = squish_alpha

    def forward(self, raw: Tensor) -> tuple[Tensor, Tensor]:
        raw = at_least_float32(raw)
        if self.kind == "glow":
            log_scale = F.logsigmoid(raw + 2.0)
            return torch.exp(log_scale), log_scale
        if self.kind == "exp":
            log_scale = EXP_LOG_SCALE_BOUND * torch.tanh(raw / EXP_LOG_SCALE_BOUND)
            return torch.exp(log_scale), log_scale
        a = self.squish_alpha
        scale = (1.0 - a) * torch.sigmoid(raw) + a
        return scale, torch.log(scale)

    def extra_repr(self) -> str:
        return f"kind={self.kind}, squish_alpha={self.squish_alpha}"


class _Coupling(Bijection):
    """Mask + network: ``params_per_entry`` network outputs per transformed entry, from
    the passive part and (with ``cond_channels > 0``) the condition's feature map."""

    params_per_entry = 1

    def __init__(self, num_channels: int, hidden_channels: int, cond_channels: int,
                 mask: CouplingMask | None, net: NetFactory) -> None:
        super().__init__()
        self.mask = mask if mask is not None else ChannelMask()
        passive, active = self.mask.channels(num_channels)
        self.cond_channels = cond_channels
        self.net = net(passive + cond_channels, self.params_per_entry * active, hidden_channels)

    def _net_output(self, passive: Tensor, cond: Condition) -> Tensor:
        net_input = concat_features(passive, cond, type(self).__name__) if self.cond_channels else passive
        return self.net(net_input)


class AffineCoupling(_Coupling):
    """``y_b = scale(h) * x_b + shift`` with ``(h, shift) = NN(x_a [, c])``."""

    params_per_entry = 2

    def __init__(self, num_channels: int, hidden_channels: int = 512, cond_channels: int = 0,
                 scale_fn: ScaleFunction = "glow", squish_alpha: float = 0.5, *,
                 mask: CouplingMask | None = None, net: NetFactory = CouplingNet) -> None:
        super().__init__(num_channels, hidden_channels, cond_channels, mask, net)
        self.scale_map = ScaleMap(scale_fn, squish_alpha)

    def _shift_and_log_scale(self, passive: Tensor, cond: Condition):
        out = self._net_output(passive, cond)
        raw, shift = out[:, 0::2], out[:, 1::2]
        scale, log_scale = self.scale_map(raw)
        return at_least_float32(shift), scale, log_scale

    def forward(self, x: Tensor, cond: Condition = None) -> tuple[Tensor, Tensor]:
        passive, active = self.mask.split(x)
        shift, scale, log_scale = self._shift_and_log_scale(passive, cond)
        new_active = (at_least_float32(active) * scale + shift).to(x.dtype)
        return self.mask.merge(x, new_active), self.mask.sum_active(log_scale)

    def inverse(self, z: Tensor, cond: Condition = None) -> tuple[Tensor, Tensor]:
        passive, active = self.mask.split(z)
        shift, scale, log_scale = self._shift_and_log_scale(passive, cond)
        new_active = ((at_least_float32(active) - shift) / scale).to(z.dtype)
        return self.mask.merge(z, new_active), -self.mask.sum_active(log_scale)


class AdditiveCoupling(_Coupling):
    """``y_b = x_b + NN(x_a [, c])``: volume preserving (NICE; seed 004's additive option)."""

    def __init__(self, num_channels: int, hidden_channels: int = 512, cond_channels: int = 0, *,
                 mask: CouplingMask | None = None, net: NetFactory = CouplingNet) -> None:
        super().__init__(num_channels, hidden_channels, cond_channels, mask, net)

    def forward(self, x: Tensor, cond: Condition = None) -> tuple[Tensor, Tensor]:
        passive, active = self.mask.split(x)
        return self.mask.merge(x, active + self._net_output(passive, cond)), zero_logdet(x)

    def inverse(self, z: Tensor, cond: Condition = None) -> tuple[Tensor, Tensor]:
        passive, active = self.mask.split(z)
        return self.mask.merge(z, active - self._net_output(passive, cond)), zero_logdet(z)


class AffineInjector(Bijection):
    """``z = scale(h(c)) * x + shift(c)`` on all channels, from condition features only
    (seed 000 eq. 2.19-2.20). Its Jacobian is diagonal, like ActNorm's."""

    def __init__(self, num_channels: int, cond_channels: int, hidden_channels: int,
                 scale_fn: ScaleFunction = "glow", squish_alpha: float = 0.5, *,
                 net: NetFactory = CouplingNet) -> None:
        super().__init__()
        self.net = net(cond_channels, 2 * num_channels, hidden_channels)
        self.scale_map = ScaleMap(scale_fn, squish_alpha)

    def _shift_and_log_scale(self, like: Tensor, cond: Condition):
        features = condition_features(cond, like.shape[-2:], "AffineInjector")
        out = self.net(features.to(like.dtype))
        scale, log_scale = self.scale_map(out[:, 0::2])
        return at_least_float32(out[:, 1::2]), scale, log_scale

    def forward(self, x: Tensor, cond: Condition = None) -> tuple[Tensor, Tensor]:
        shift, scale, log_scale = self._shift_and_log_scale(x, cond)
        return (at_least_float32(x) * scale + shift).to(x.dtype), sum_except_batch(log_scale)

    def inverse(self, z: Tensor, cond: Condition = None) -> tuple[Tensor, Tensor]:
        shift, scale, log_scale = self._shift_and_log_scale(z, cond)
        return ((at_least_float32(z) - shift) / scale).to(z.dtype), -sum_except_batch(log_scale)
