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
    the passive part and (with ``cond_channels > 0``) the condition's feature map.

    Subclasses give :meth:`_network_params` (the network's output, as what
    :meth:`_couple` needs) and :meth:`_couple` (the elementwise map of the active part
    and its log-det, either direction); forward, inverse and :meth:`replay` are built
    from them here."""

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

    def _network_params(self, passive: Tensor, cond: Condition):
        raise NotImplementedError

    def _couple(self, active: Tensor, params, inverse: bool) -> tuple[Tensor, Tensor]:
        """(new active part in the input's dtype, log-det of this direction [B])."""
        raise NotImplementedError

    def forward(self, x: Tensor, cond: Condition = None) -> tuple[Tensor, Tensor]:
        passive, active = self.mask.split(x)
        new_active, logdet = self._couple(active, self._network_params(passive, cond), inverse=False)
        return self.mask.merge(x, new_active), logdet

    def inverse(self, z: Tensor, cond: Condition = None) -> tuple[Tensor, Tensor]:
        passive, active = self.mask.split(z)
        new_active, logdet = self._couple(active, self._network_params(passive, cond), inverse=True)
        return self.mask.merge(z, new_active), logdet

    def replay(self, y: Tensor, cond: Condition = None):
        """One network evaluation serves both the reconstruction and the graph: the
        passive part of the input is that of the output, so the network's output (with a
        graph) gives the input's active part (without one) and the forward map again."""
        y_leaf = y.detach().requires_grad_(True)
        passive, active = self.mask.split(y_leaf)
        params = self._network_params(passive, cond)
        with torch.no_grad():
            x_active = self._couple(active, params, inverse=True)[0]
        x_active_leaf = x_active.detach().requires_grad_(True)
        new_active, logdet = self._couple(x_active_leaf, params, inverse=False)
        x = self.mask.merge(y.detach(), x_active)

        def input_gradient(grads: list[Tensor | None]) -> Tensor:
            passive_grad = grads[0] if grads[0] is not None else torch.zeros_like(y_leaf)
            active_grad = grads[1] if grads[1] is not None else torch.zeros_like(x_active_leaf)
            return self.mask.merge(passive_grad, active_grad)
        return x, [y_leaf, x_active_leaf], (self.mask.merge(y_leaf, new_active), logdet), input_gradient


class AffineCoupling(_Coupling):
    """``y_b = scale(h) * x_b + shift`` with ``(h, shift) = NN(x_a [, c])``."""

    params_per_entry = 2

    def __init__(self, num_channels: int, hidden_channels: int = 512, cond_channels: int = 0,
                 scale_fn: ScaleFunction = "glow", squish_alpha: float = 0.5, *,
                 mask: CouplingMask | None = None, net: NetFactory = CouplingNet) -> None:
        super().__init__(num_channels, hidden_channels, cond_channels, mask, net)
        self.scale_map = ScaleMap(scale_fn, squish_alpha)

    def _network_params(self, passive: Tensor, cond: Condition):
        out = self._net_output(passive, cond)
        raw, shift = out[:, 0::2], out[:, 1::2]
        scale, log_scale = self.scale_map(raw)
        return at_least_float32(shift), scale, log_scale

    def _couple(self, active: Tensor, params, inverse: bool) -> tuple[Tensor, Tensor]:
        shift, scale, log_scale = params
        if inverse:
            return ((at_least_float32(active) - shift) / scale).to(active.dtype), -self.mask.sum_active(log_scale)
        return (at_least_float32(active) * scale + shift).to(active.dtype), self.mask.sum_active(log_scale)


class AdditiveCoupling(_Coupling):
    """``y_b = x_b + NN(x_a [, c])``: volume preserving (NICE; seed 004's additive option)."""

    def __init__(self, num_channels: int, hidden_channels: int = 512, cond_channels: int = 0, *,
                 mask: CouplingMask | None = None, net: NetFactory = CouplingNet) -> None:
        super().__init__(num_channels, hidden_channels, cond_channels, mask, net)

    def _network_params(self, passive: Tensor, cond: Condition):
        return self._net_output(passive, cond)

    def _couple(self, active: Tensor, params, inverse: bool) -> tuple[Tensor, Tensor]:
        shift = params.to(active.dtype)
        return (active - shift if inverse else active + shift), zero_logdet(active)


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

    def replay(self, y: Tensor, cond: Condition = None):
        """The network sees only the condition: one evaluation (with a graph) gives both
        the input and the forward map again."""
        shift, scale, log_scale = self._shift_and_log_scale(y, cond)
        with torch.no_grad():
            x = ((at_least_float32(y) - shift) / scale).to(y.dtype)
        x_leaf = x.detach().requires_grad_(True)
        y_again = (at_least_float32(x_leaf) * scale + shift).to(y.dtype)
        return x, [x_leaf], (y_again, sum_except_batch(log_scale)), lambda grads: grads[0]
