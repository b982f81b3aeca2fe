"""Rational-quadratic (RQ) spline coupling: the Neural Spline Flow baseline (Durkan,
Bekasov, Murray and Papamakarios, "Neural Spline Flows", NeurIPS 2019; seed 003 sec.
3.2.2.b and Tables 5.1, 5.3, 5.4).

Each transformed entry goes through its own monotonic rational-quadratic spline on
``[-B, B]`` (B = ``tail_bound``), whose ``K`` bin widths, ``K`` bin heights and ``K - 1``
inner knot derivatives the coupling network computes from the passive part (and the
condition). Outside ``[-B, B]`` the map is the identity ("linear tails"), and the
derivatives at the two outer knots are fixed to 1, so the whole map is C1.

Seed 003 prints the spline coupling (eq. 3.11) as ``y = r(x_a) * x_b + s(x_a)``, an
affine map of ``x_b``. That is a typo: an RQ spline is not affine in ``x_b`` (in each bin
it is a ratio of two quadratics in ``x_b``, eq. 4 of Durkan et al.). We implement the
spline the seed cites.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from flows.base import Condition, at_least_float32
from flows.layers.coupling import NetFactory, _Coupling
from flows.layers.masks import CouplingMask
from flows.nets import CouplingNet


def _identity_shift(min_derivative: float) -> float:
    """``c`` with ``min_derivative + softplus(c) == 1``: a zero raw derivative is slope 1."""
    return math.log(math.expm1(1.0 - min_derivative))


def _knots(unnormalized: Tensor, bound: float, min_size: float) -> tuple[Tensor, Tensor]:
    """Softmax bin sizes (each >= ``min_size`` of the interval) -> (knot positions
    ``[..., K + 1]`` from ``-bound`` to ``bound`` exactly, bin sizes ``[..., K]``)."""
    num_bins = unnormalized.shape[-1]
    fractions = min_size + (1.0 - min_size * num_bins) * torch.softmax(unnormalized, dim=-1)
    knots = F.pad(torch.cumsum(fractions, dim=-1), (1, 0)) * (2.0 * bound) - bound
    # Pin the ends: the cumulative sum's rounding must not leave a gap at +-bound.
    knots = torch.cat([torch.full_like(knots[..., :1], -bound), knots[..., 1:-1],
                       torch.full_like(knots[..., :1], bound)], dim=-1)
    return knots, knots[..., 1:] - knots[..., :-1]


def _gather(values: Tensor, index: Tensor) -> Tensor:
    return values.gather(-1, index)[..., 0]


def rational_quadratic_spline(inputs: Tensor, unnormalized_widths: Tensor, unnormalized_heights: Tensor,
                              unnormalized_derivatives: Tensor, *, inverse: bool, tail_bound: float,
                              min_bin_width: float = 1e-3, min_bin_height: float = 1e-3,
                              min_derivative: float = 1e-3) -> tuple[Tensor, Tensor]:
    """Elementwise monotonic RQ spline with linear tails (Durkan et al. 2019, sec. 3).

    Args:
        inputs: ``[...]``; x (``inverse=False``) or y (``inverse=True``).
        unnormalized_widths, unnormalized_heights: ``[..., K]`` raw bin sizes (softmax).
        unnormalized_derivatives: ``[..., K - 1]`` raw derivatives at the inner knots;
            a derivative is ``min_derivative + softplus(raw + c)`` with ``c`` chosen so
            that raw 0 gives slope 1 (so all-zero raw parameters give the identity).
        inverse: run y -> x.
        tail_bound: B; the spline maps ``[-B, B]`` onto itself, the identity elsewhere.

    Returns ``(outputs, logabsdet)``, both shaped like ``inputs``: the elementwise
    log|d out / d in| of the direction that was run. Computed in float32 or wider (the
    wider of the inputs' and the parameters' types), and returned in that type.
    """
    num_bins = unnormalized_widths.shape[-1]
    if unnormalized_heights.shape[-1] != num_bins or unnormalized_derivatives.shape[-1] != num_bins - 1:
        raise ValueError(f"an RQ spline of K bins needs K widths, K heights and K - 1 derivatives, got "
                         f"{unnormalized_widths.shape[-1]}, {unnormalized_heights.shape[-1]}, "
                         f"{unnormalized_derivatives.shape[-1]}")
    if min_bin_width * num_bins >= 1.0 or min_bin_height * num_bins >= 1.0:
        raise ValueError(f"min_bin_width / min_bin_height too large for {num_bins} bins")
    if not tail_bound > 0:
        raise ValueError(f"tail_bound must be positive, got {tail_bound}")
    dtype = torch.promote_types(torch.promote_types(inputs.dtype, torch.float32), unnormalized_widths.dtype)
    inputs = inputs.to(dtype)
    knots_x, widths = _knots(unnormalized_widths.to(dtype), tail_bound, min_bin_width)
    knots_y, heights = _knots(unnormalized_heights.to(dtype), tail_bound, min_bin_height)
    inner = min_derivative + F.softplus(unnormalized_derivatives.to(dtype) + _identity_shift(min_derivative))
    one = torch.ones_like(inner[..., :1])
    derivatives = torch.cat([one, inner, one], dim=-1)  # [..., K + 1]; slope 1 at +-B: C1 tails

    # Evaluate the spline everywhere on the input clamped into [-B, B] (no boolean
    # indexing, so shapes stay static), then keep the identity outside.
    inside = (inputs >= -tail_bound) & (inputs <= tail_bound)
    clamped = inputs.clamp(-tail_bound, tail_bound)
    searched = knots_y if inverse else knots_x
    # Bin k holds knots[k] <= v < knots[k + 1]: count the inner knots <= v.
    index = torch.searchsorted(searched[..., 1:-1].contiguous(), clamped[..., None].contiguous(), right=True)
    x_k, w_k = _gather(knots_x, index), _gather(widths, index)
    y_k, h_k = _gather(knots_y, index), _gather(heights, index)
    d_k, d_k1 = _gather(derivatives, index), _gather(derivatives[..., 1:], index)
    slope = h_k / w_k
    curvature = d_k + d_k1 - 2.0 * slope

    if inverse:
        # Solve y - y_k = h_k (s t^2 + d_k t (1 - t)) / (s + curvature t (1 - t)) for t:
        # a t^2 + b t + c = 0, taking the root in [0, 1] in the cancellation-free form.
        offset = clamped - y_k
        a = h_k * (slope - d_k) + offset * curvature
        b = h_k * d_k - offset * curvature
        c = -slope * offset
        discriminant = (b * b - 4.0 * a * c).clamp_min(0.0)
        theta = ((2.0 * c) / (-b - torch.sqrt(discriminant))).clamp(0.0, 1.0)
        outputs = x_k + theta * w_k
    else:
        theta = ((clamped - x_k) / w_k).clamp(0.0, 1.0)
        one_minus = 1.0 - theta
        numerator = h_k * (slope * theta * theta + d_k * theta * one_minus)
        outputs = y_k + numerator / (slope + curvature * theta * one_minus)

    # d y / d x (eq. 5 of Durkan et al.), at the bin position theta of either direction.
    one_minus = 1.0 - theta
    denominator = slope + curvature * theta * one_minus
    log_derivative = (2.0 * torch.log(slope)
                      + torch.log(d_k1 * theta * theta + 2.0 * slope * theta * one_minus + d_k * one_minus * one_minus)
                      - 2.0 * torch.log(denominator))
    logabsdet = -log_derivative if inverse else log_derivative
    outputs = torch.where(inside, outputs, inputs)
    logabsdet = torch.where(inside, logabsdet, torch.zeros_like(logabsdet))
    return outputs, logabsdet


class SplineCoupling(_Coupling):
    """``y_b = RQS(x_b; NN(x_a [, c]))``: an elementwise rational-quadratic spline with
    linear tails whose ``3 K - 1`` parameters per transformed entry come from the
    coupling network (Durkan et al. 2019; seed 003 sec. 3.2.2.b, whose eq. 3.11 prints
    the map as affine, a typo: see the module docstring).

    The zero-initialized last layer of the network (``ZeroConv2d``) gives all-zero raw
    parameters, hence uniform bins and unit knot derivatives: the coupling starts as
    the exact identity.

    Unlike nflows we do not divide the raw widths and heights by sqrt(hidden_channels).
    nflows does that because its last layer starts random, with outputs of size
    ~sqrt(hidden), which would start the spline far from uniform bins; our last layer
    starts at zero with a learned output gain (ZeroConv2d's log-scale), which already
    sets their size, and the extra factor would only slow (under Adam, by the same
    constant) the learning of the bin sizes relative to the derivatives.
    """

    def __init__(self, num_channels: int, hidden_channels: int = 512, cond_channels: int = 0, *,
                 mask: CouplingMask | None = None, net: NetFactory = CouplingNet, num_bins: int = 8,
                 tail_bound: float = 3.0, min_bin_width: float = 1e-3, min_bin_height: float = 1e-3,
                 min_derivative: float = 1e-3) -> None:
        if num_bins < 1:
            raise ValueError(f"a spline needs num_bins >= 1, got {num_bins}")
        if not tail_bound > 0:
            raise ValueError(f"tail_bound must be positive, got {tail_bound}")
        # Per instance (the base class reads it to size the network's output); a plain
        # int may be set before nn.Module.__init__.
        self.params_per_entry = 3 * num_bins - 1
        super().__init__(num_channels, hidden_channels, cond_channels, mask, net)
        self.num_bins = num_bins
        self.tail_bound = tail_bound
        self.min_bin_width = min_bin_width
        self.min_bin_height = min_bin_height
        self.min_derivative = min_derivative

    def _network_params(self, passive: Tensor, cond: Condition):
        out = at_least_float32(self._net_output(passive, cond))
        batch, _, height, width = out.shape
        # [B, active * (3K - 1), H, W] -> [B, active, H, W, 3K - 1]: entry-major channels.
        return out.reshape(batch, -1, self.params_per_entry, height, width).permute(0, 1, 3, 4, 2)

    def _couple(self, active: Tensor, params, inverse: bool) -> tuple[Tensor, Tensor]:
        k = self.num_bins
        new_active, logabsdet = rational_quadratic_spline(
            active, params[..., :k], params[..., k:2 * k], params[..., 2 * k:], inverse=inverse,
            tail_bound=self.tail_bound, min_bin_width=self.min_bin_width, min_bin_height=self.min_bin_height,
            min_derivative=self.min_derivative)
        return new_active.to(active.dtype), self.mask.sum_active(logabsdet)

    def extra_repr(self) -> str:
        return f"num_bins={self.num_bins}, tail_bound={self.tail_bound}"
