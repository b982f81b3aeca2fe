"""RealNVP (Dinh, Sohl-Dickstein and Bengio 2017, sec. 3.6), built on Glow's multi-scale
seam (``Glow(block=...)``: its split-offs, priors and conditions are reused as they are).

Each scale but the last: 3 affine couplings with alternating checkerboard masks, a
squeeze, 3 affine couplings with alternating channel masks; then half the channels are
factored out (Glow's split, with its learned split prior). The last scale: 4 couplings
with alternating checkerboard masks, then a squeeze (a fixed permutation with log-det 0,
which Glow's seam asks of every scale, so the top latent has Glow's shape).

Choices where this project differs from the paper (written down, not hidden):

* Batch normalization becomes an ActNorm before every coupling: batch statistics would
  make one image's log-likelihood depend on the rest of its batch (and on train/eval
  mode); ActNorm is per-sample, initialized from the first batch (Glow's substitute).
* The scale is Glow's sigmoid(h + 2) by default (``scale_fn``), bounded, rather than the
  paper's exp(s * tanh(h)); "exp" and "squish" are the other options.
* The coupling network is NSF's residual net (``flows.nets.ResNetCouplingNet``, GroupNorm
  inside the residual branch for the same reason), the closest of the project's nets
  to the paper's ResNet; ``coupling_net`` changes it.

Usage from YAML: ``flow: {class_path: flows.realnvp.RealNVP, init_args: {...}}`` under
``GlowModule`` (``experiments/quick_realnvp.yaml``).
"""
from __future__ import annotations

from functools import partial

from torch import nn

from flows.dequantization import DequantizerFactory
from flows.glow import Glow
from flows.layers import ActNorm, AffineCoupling, ChannelMask, CheckerboardMask, Squeeze
from flows.layers.coupling import NetFactory, ScaleFunction
from flows.nets import ResNetCouplingNet


class RealNVP(Glow):
    """Args:
        in_channels, image_size: the images modelled.
        scales: the number of scales (the paper: 3-5 by image size, e.g. 3 at 32x32).
        couplings: couplings per mask type and scale (the paper: 3; the last scale has
            one more checkerboard coupling).
        hidden_channels: width of the coupling networks (the paper: 64 features).
        coupling_net: factory (in, out, hidden) -> the couplings' network.
        scale_fn: the couplings' scale (see the module docstring).
        num_classes, learn_top_prior, top_prior, split_prior, memory_efficient, dequantizer,
            label_dropout, guidance: as Glow's.
    """

    def __init__(self, *, in_channels: int = 3, image_size: int = 32, scales: int = 3, couplings: int = 3,
                 hidden_channels: int = 64, coupling_net: NetFactory = ResNetCouplingNet,
                 scale_fn: ScaleFunction = "glow", num_classes: int = 0, learn_top_prior: bool = True,
                 top_prior=None, split_prior=None, memory_efficient: bool = False,
                 dequantizer: DequantizerFactory | None = None, label_dropout: float = 0.0,
                 guidance: float = 0.0) -> None:
        if couplings < 1:
            raise ValueError(f"RealNVP needs couplings >= 1 per mask type, got {couplings}")
        block = partial(realnvp_scale, scales=scales, couplings=couplings, hidden_channels=hidden_channels,
                        net=coupling_net, scale_fn=scale_fn)
        super().__init__(in_channels=in_channels, image_size=image_size, scales=scales, steps_per_scale=couplings,
                         hidden_channels=hidden_channels, coupling_net=coupling_net, scale_fn=scale_fn,
                         num_classes=num_classes, learn_top_prior=learn_top_prior, top_prior=top_prior,
                         split_prior=split_prior, memory_efficient=memory_efficient, block=block,
                         dequantizer=dequantizer, label_dropout=label_dropout, guidance=guidance)


def realnvp_scale(scale: int, channels: int, *, scales: int, couplings: int, hidden_channels: int,
                  net: NetFactory, scale_fn: ScaleFunction) -> list[nn.Module]:
    """The layers of one RealNVP scale entering with ``channels`` channels."""
    def coupling(num_channels: int, mask) -> list[nn.Module]:
        return [ActNorm(num_channels), AffineCoupling(num_channels, hidden_channels, scale_fn=scale_fn, mask=mask,
                                                      net=net)]

    last = scale == scales - 1
    layers = [layer for i in range(couplings + last) for layer in coupling(channels, CheckerboardMask(1, i % 2))]
    layers.append(Squeeze())
    if not last:
        layers += [layer for i in range(couplings) for layer in coupling(4 * channels, ChannelMask(i % 2))]
    return layers
