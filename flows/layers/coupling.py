"""Affine and additive coupling (seed 000 sec. 2.2.3.3, eq. 2.11-2.17), their
conditional form (eq. 2.18), and the scale functions that bound the affine scale.

Scale functions map the raw network output ``h`` to a positive scale:

* ``"glow"``: ``sigmoid(h + 2)`` as in Glow's code. Seed 000 prints eq. 2.13 as
  ``sigmoid(exp(h) + 2)``; that is a typo (it would bound the scale to (0.88, 1)), so
  we follow the code it describes.
* ``"squish"``: sigmoid squishing ``(1 - a) * sigmoid(h) + a`` (seed 000 eq. 3.15,
  a = 0.5), which bounds the scale to ``[a, 1]`` so the inverse never divides by a
  tiny number.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flows.base import Bijection, Condition, at_least_float32, sum_except_batch, zero_logdet
from flows.nets import CouplingNet, resize_features

ScaleFunction = Literal["glow", "squish"]


class ScaleMap(nn.Module):
    """Raw output -> (scale, log scale); computed in float32 for stable log-dets."""

    def __init__(self, kind: ScaleFunction = "glow", squish_alpha: float = 0.5) -> None:
        super().__init__()
        if kind not in ("glow", "squish"):
            raise ValueError(f"scale function must be 'glow' or 'squish', got {kind!r}")
        if kind == "squish" and not 0.0 < squish_alpha < 1.0:
            raise ValueError(f"squish_alpha must lie in (0, 1), got {squish_alpha}")
        self.kind = kind
        self.squish_alpha = squish_alpha

    def forward(self, raw: Tensor) -> tuple[Tensor, Tensor]:
        raw = at_least_float32(raw)
        if self.kind == "glow":
            log_scale = F.logsigmoid(raw + 2.0)
            return torch.exp(log_scale), log_scale
        a = self.squish_alpha
        scale = (1.0 - a) * torch.sigmoid(raw) + a
        return scale, torch.log(scale)

    def extra_repr(self) -> str:
        return f"kind={self.kind}, squish_alpha={self.squish_alpha}"


def condition_features(cond: Condition, size: tuple[int, int]) -> Tensor | None:
    """The feature map a conditional layer uses: ``cond`` itself, or ``cond['features']``
    when a dict is passed, resized to the layer's spatial size."""
    if cond is None:
        return None
    features = cond["features"] if isinstance(cond, dict) else cond
    return resize_features(features, size)


class AffineCoupling(Bijection):
    """``y_b = scale(h) * x_b + shift`` with ``(h, shift) = NN(x_a [, c])``.

    With ``cond_channels > 0`` the network also sees the condition features
    (conditional affine coupling, seed 000 eq. 2.18).
    """

    def __init__(self, num_channels: int, hidden_channels: int, cond_channels: int = 0,
                 scale_fn: ScaleFunction = "glow", squish_alpha: float = 0.5,
                 additive: bool = False) -> None:
        super().__init__()
        if num_channels < 2:
            raise ValueError("coupling needs at least 2 channels; squeeze the input first")
        self.passive_channels = num_channels // 2
        self.active_channels = num_channels - self.passive_channels
        self.cond_channels = cond_channels
        self.additive = additive
        out_channels = self.active_channels * (1 if additive else 2)
        self.net = CouplingNet(self.passive_channels + cond_channels, out_channels, hidden_channels)
        self.scale_map = ScaleMap(scale_fn, squish_alpha)

    def _shift_and_log_scale(self, x_passive: Tensor, cond: Condition):
        net_input = x_passive
        if self.cond_channels:
            features = condition_features(cond, x_passive.shape[-2:])
            if features is None:
                raise ValueError("this coupling is conditional: pass cond (feature map)")
            net_input = torch.cat([x_passive, features.to(x_passive.dtype)], dim=1)
        out = self.net(net_input)
        if self.additive:
            return out, None, None
        raw, shift = out[:, 0::2], out[:, 1::2]
        scale, log_scale = self.scale_map(raw)
        return at_least_float32(shift), scale, log_scale

    def forward(self, x: Tensor, cond: Condition = None) -> tuple[Tensor, Tensor]:
        x_passive, x_active = x.split([self.passive_channels, self.active_channels], dim=1)
        shift, scale, log_scale = self._shift_and_log_scale(x_passive, cond)
        if self.additive:
            return torch.cat([x_passive, x_active + shift], dim=1), zero_logdet(x)
        y_active = (at_least_float32(x_active) * scale + shift).to(x.dtype)
        return torch.cat([x_passive, y_active], dim=1), sum_except_batch(log_scale)

    def inverse(self, z: Tensor, cond: Condition = None) -> tuple[Tensor, Tensor]:
        z_passive, z_active = z.split([self.passive_channels, self.active_channels], dim=1)
        shift, scale, log_scale = self._shift_and_log_scale(z_passive, cond)
        if self.additive:
            return torch.cat([z_passive, z_active - shift], dim=1), zero_logdet(z)
        x_active = ((at_least_float32(z_active) - shift) / scale).to(z.dtype)
        return torch.cat([z_passive, x_active], dim=1), -sum_except_batch(log_scale)


class AffineInjector(Bijection):
    """``z = scale(h(c)) * x + shift(c)`` on all channels, from condition features only
    (seed 000 eq. 2.19-2.20). Its Jacobian is diagonal, like ActNorm's."""

    def __init__(self, num_channels: int, cond_channels: int, hidden_channels: int,
                 scale_fn: ScaleFunction = "glow", squish_alpha: float = 0.5) -> None:
        super().__init__()
        self.net = CouplingNet(cond_channels, 2 * num_channels, hidden_channels)
        self.scale_map = ScaleMap(scale_fn, squish_alpha)

    def _shift_and_log_scale(self, like: Tensor, cond: Condition):
        features = condition_features(cond, like.shape[-2:])
        if features is None:
            raise ValueError("AffineInjector is conditional: pass cond (feature map)")
        out = self.net(features.to(like.dtype))
        scale, log_scale = self.scale_map(out[:, 0::2])
        return at_least_float32(out[:, 1::2]), scale, log_scale

    def forward(self, x: Tensor, cond: Condition = None) -> tuple[Tensor, Tensor]:
        shift, scale, log_scale = self._shift_and_log_scale(x, cond)
        return (at_least_float32(x) * scale + shift).to(x.dtype), sum_except_batch(log_scale)

    def inverse(self, z: Tensor, cond: Condition = None) -> tuple[Tensor, Tensor]:
        shift, scale, log_scale = self._shift_and_log_scale(z, cond)
        return ((at_least_float32(z) - shift) / scale).to(z.dtype), -sum_except_batch(log_scale)
