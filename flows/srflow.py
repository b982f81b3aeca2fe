"""SRFlow: a conditional Glow for 2x super-resolution (seed 000 sec. 2.2.4 and 4.3.1).

An RRDB encoder turns the low-resolution image into a feature map; the same features
condition every scale of a Glow-shaped flow (L = 4, K = 16, 64 hidden channels): the
couplings see them as extra input (eq. 2.18), an affine injector precedes each
coupling (eq. 2.19-2.20), and the split and top priors are zero-init convs on the
kept half and the features. Sigmoid squishing with a = 0.5 bounds every affine scale
to [0.5, 1] (sec. 3.2.1), which keeps the inverse stable under the latent noise of
variational training.

The model's density is p(x_hr | x_lr), exact: ``cond["lowres"]`` is the
low-resolution image (``cond["labels"]`` too when class-conditional). Features already
computed may be passed as ``cond["features"]``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from flows.base import FEATURES, LABELS, LOWRES, Condition, condition_value, with_condition
from flows.glow import Glow
from flows.layers.coupling import ScaleFunction
from flows.model import Encoding, FlowModel, Objective
from flows.nets import RRDBEncoder


class SRFlow(FlowModel):
    """An RRDB condition encoder plus a conditional :class:`~flows.glow.Glow`.

    Args: the RRDB encoder's ``rrdb_features``, ``rrdb_blocks`` (23), ``rrdb_growth``
    and ``rrdb_feature_blocks`` (the tapped blocks; SRFlow's 1, 8, 15, 22 by default);
    the flow's arguments where seed 000 sec. 4.3.1 sets another default than Glow's
    (L=4, K=16, 64 hidden, affine injectors, squishing a = 0.5); and, in
    ``**flow_options``, every other :class:`~flows.glow.Glow` argument as it is there
    (``coupling``, ``coupling_net``, ``num_bins``, ``top_prior``, ``split_prior``,
    ``memory_efficient``, ``dequantizer``, ``block`` ...), so an SR stage takes every option
    a Glow takes. The flow's ``cond_channels`` are the encoder's."""

    def __init__(self, *, in_channels: int = 3, image_size: int = 32, scales: int = 4,
                 steps_per_scale: int = 16, hidden_channels: int = 64,
                 scale_fn: ScaleFunction = "squish", squish_alpha: float = 0.5,
                 affine_injector: bool = True, num_classes: int = 0, rrdb_features: int = 64,
                 rrdb_blocks: int = 23, rrdb_growth: int = 32, rrdb_feature_blocks: list[int] | None = None,
                 **flow_options) -> None:
        super().__init__()
        if image_size % 2:
            raise ValueError(f"SRFlow doubles the resolution: image_size must be even, got {image_size}")
        if "cond_channels" in flow_options:
            raise ValueError("SRFlow's flow is conditioned on its RRDB features: cond_channels is the encoder's, "
                             "set rrdb_features / rrdb_feature_blocks instead")
        self.in_channels = in_channels
        self.image_size = image_size
        self.lr_size = image_size // 2
        self.num_classes = num_classes
        self.encoder = RRDBEncoder(in_channels, rrdb_features, rrdb_blocks, rrdb_growth,
                                   rrdb_feature_blocks)
        self.flow = Glow(in_channels=in_channels, image_size=image_size, scales=scales,
                         steps_per_scale=steps_per_scale, hidden_channels=hidden_channels,
                         scale_fn=scale_fn, squish_alpha=squish_alpha, num_classes=num_classes,
                         cond_channels=self.encoder.out_channels, affine_injector=affine_injector,
                         **flow_options)
        # The model's dequantizer is the flow's (SRFlow.training_loss is the flow's).
        self.dequantizer = self.flow.dequantizer

    def features(self, lowres: Tensor) -> Tensor:
        expected = (self.in_channels, self.lr_size, self.lr_size)
        if tuple(lowres.shape[1:]) != expected:
            raise ValueError(f"SRFlow at {self.image_size}px conditions on [B, {expected[0]}, "
                             f"{expected[1]}, {expected[2]}] images, got {list(lowres.shape)}")
        return self.encoder.features(lowres)

    def flow_condition(self, cond: Condition) -> dict:
        """``cond`` with the RRDB features of ``cond["lowres"]`` (unless given)."""
        if condition_value(cond, FEATURES) is not None:
            return with_condition(cond)
        lowres = condition_value(cond, LOWRES)
        if lowres is None:
            raise ValueError(f"SRFlow conditions on a low-resolution image: pass cond['{LOWRES}'] "
                             f"of shape [B, {self.in_channels}, {self.lr_size}, {self.lr_size}]")
        return with_condition(cond, **{FEATURES: self.features(lowres)})

    def encode(self, x: Tensor, cond: Condition = None) -> Encoding:
        return self.flow.encode(x, self.flow_condition(cond))

    def training_loss(self, clean: Tensor, cond: Condition = None, *, n_bits: int,
                      noise: Tensor | None = None) -> Objective:
        """The conditional flow's objective (its dequantizer, its class term) given the
        RRDB features."""
        return self.flow.training_loss(clean, self.flow_condition(cond), n_bits=n_bits, noise=noise)

    def decode(self, latents: list[Tensor | None], cond: Condition = None,
               temperature: float = 1.0) -> Tensor:
        flow_cond = self.flow_condition(cond)
        n = flow_cond[FEATURES].shape[0]
        return self.flow.decode_with_logdet(latents, flow_cond, temperature, n)[0]

    @torch.no_grad()
    def sample(self, n: int, cond: Condition = None, temperature: float = 1.0) -> Tensor:
        if self.num_classes and condition_value(cond, LABELS) is None:
            raise ValueError("this SRFlow is class-conditional: pass the labels of the "
                             f"low-resolution images as cond['{LABELS}']")
        x = self.decode([None] * len(self.flow.scales), cond, temperature)
        if x.shape[0] != n:
            raise ValueError(f"asked for {n} samples of {x.shape[0]} low-resolution images")
        return x

    def class_loss(self, encoding: Encoding, labels: Tensor) -> Tensor:
        return self.flow.class_loss(encoding, labels)
