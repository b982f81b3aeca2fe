"""One step of flow: ActNorm -> invertible 1x1 conv -> [affine injector] -> coupling
(Glow, seed 004 sec. 2.1; the injector is SRFlow's, seed 000 sec. 2.2.4.3). The coupling
is affine, additive, or a rational-quadratic spline (Neural Spline Flows, seed 003 sec.
3.2.2.b) with ``num_bins`` bins on ``[-tail_bound, tail_bound]``."""
from __future__ import annotations

from typing import Literal

from flows.base import FlowSequential
from flows.actnorm import ActNorm
from flows.layers.coupling import (AdditiveCoupling, AffineCoupling, AffineInjector, NetFactory,
                                   ScaleFunction)
from flows.layers.invconv import InvertibleConv1x1, InvertibleConv1x1LU
from flows.layers.masks import CouplingMask
from flows.layers.spline import SplineCoupling
from flows.nets import CouplingNet

InvConvKind = Literal["lu", "full"]
CouplingKind = Literal["affine", "additive", "spline"]


def flow_step(num_channels: int, hidden_channels: int, *, invconv: InvConvKind = "lu",
              coupling: CouplingKind = "affine", scale_fn: ScaleFunction = "glow",
              squish_alpha: float = 0.5, cond_channels: int = 0, affine_injector: bool = False,
              mask: CouplingMask | None = None, net: NetFactory = CouplingNet, num_bins: int = 8,
              tail_bound: float = 3.0) -> FlowSequential:
    if invconv not in ("lu", "full"):
        raise ValueError(f"invconv must be 'lu' or 'full', got {invconv!r}")
    if coupling not in ("affine", "additive", "spline"):
        raise ValueError(f"coupling must be 'affine', 'additive' or 'spline', got {coupling!r}")
    layers = [ActNorm(num_channels),
              InvertibleConv1x1LU(num_channels) if invconv == "lu" else InvertibleConv1x1(num_channels)]
    if affine_injector:
        if not cond_channels:
            raise ValueError("an affine injector needs cond_channels > 0")
        layers.append(AffineInjector(num_channels, cond_channels, hidden_channels, scale_fn, squish_alpha,
                                     net=net))
    if coupling == "affine":
        layers.append(AffineCoupling(num_channels, hidden_channels, cond_channels, scale_fn, squish_alpha,
                                     mask=mask, net=net))
    elif coupling == "spline":
        layers.append(SplineCoupling(num_channels, hidden_channels, cond_channels, mask=mask, net=net,
                                     num_bins=num_bins, tail_bound=tail_bound))
    else:
        layers.append(AdditiveCoupling(num_channels, hidden_channels, cond_channels, mask=mask, net=net))
    return FlowSequential(*layers)
