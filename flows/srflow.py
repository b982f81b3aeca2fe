"""SRFlow: a conditional Glow for 2x super-resolution (seed 000 sec. 2.2.4 and 4.3.1).

An RRDB encoder turns the low-resolution image into a feature map; the same features
condition every level of a Glow-shaped flow (L = 4, K = 16, 64 hidden channels): the
couplings see them as extra input (eq. 2.18), an affine injector precedes each
coupling (eq. 2.19-2.20), and the split and top priors are zero-init convs on the
kept half and the features. Sigmoid squishing with a = 0.5 bounds every affine scale
to [0.5, 1] (sec. 3.2.1), which keeps the inverse stable under the latent noise of
variational training.

The model's density is p(x_hr | x_lr): ``log_prob(x, lr)`` and ``sample(lr)``.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from flows.glow import FlowEncoding, Glow
from flows.layers.coupling import ScaleFunction
from flows.layers.flow_step import CouplingKind, InvConvKind
from flows.nets import RRDBEncoder


class SRFlow(nn.Module):
    def __init__(self, in_channels: int = 3, image_size: int = 32, levels: int = 4,
                 steps_per_level: int = 16, hidden_channels: int = 64,
                 invconv: InvConvKind = "lu", coupling: CouplingKind = "affine",
                 scale_fn: ScaleFunction = "squish", squish_alpha: float = 0.5,
                 affine_injector: bool = True, learn_top_prior: bool = True,
                 num_classes: int = 0, rrdb_features: int = 64, rrdb_blocks: int = 23,
                 rrdb_growth: int = 32, rrdb_feature_blocks: list[int] | None = None) -> None:
        super().__init__()
        if image_size % 2:
            raise ValueError(f"SRFlow doubles the resolution: image_size must be even, got {image_size}")
        self.in_channels = in_channels
        self.image_size = image_size
        self.lr_size = image_size // 2
        self.num_classes = num_classes
        self.encoder = RRDBEncoder(in_channels, rrdb_features, rrdb_blocks, rrdb_growth,
                                   rrdb_feature_blocks)
        self.flow = Glow(in_channels, image_size, levels, steps_per_level, hidden_channels,
                         invconv, coupling, scale_fn, squish_alpha, learn_top_prior, num_classes,
                         cond_channels=self.encoder.out_channels, affine_injector=affine_injector)

    @property
    def dims(self) -> int:
        return self.flow.dims

    @property
    def num_latents(self) -> int:
        return len(self.flow.levels)

    def features(self, lr: Tensor) -> Tensor:
        expected = (self.in_channels, self.lr_size, self.lr_size)
        if tuple(lr.shape[1:]) != expected:
            raise ValueError(f"SRFlow at {self.image_size}px conditions on [B, {expected[0]}, "
                             f"{expected[1]}, {expected[2]}] images, got {list(lr.shape)}")
        return self.encoder.features(lr)

    def encode(self, x: Tensor, lr: Tensor, y: Tensor | None = None,
               features: Tensor | None = None) -> FlowEncoding:
        """``features`` may be passed when already computed (e.g. under no_grad while
        the encoder is frozen)."""
        return self.flow.encode(x, y, self.features(lr) if features is None else features)

    def decode(self, latents: list[Tensor | None], lr: Tensor, y: Tensor | None = None,
               temperature: float = 1.0) -> tuple[Tensor, Tensor]:
        return self.flow.decode(latents, y, self.features(lr), temperature, batch_size=lr.shape[0])

    def log_prob(self, x: Tensor, lr: Tensor, y: Tensor | None = None) -> Tensor:
        """Exact log p(x | lr) in nats, per sample."""
        return self.encode(x, lr, y).log_prob

    @torch.no_grad()
    def sample(self, lr: Tensor, temperature: float = 1.0, y: Tensor | None = None) -> Tensor:
        if self.num_classes and y is None:
            raise ValueError("this SRFlow is class-conditional: pass the labels y of the low-resolution images")
        x, _ = self.decode([None] * self.num_latents, lr, y, temperature)
        return x

    def class_loss(self, encoding: FlowEncoding, y: Tensor) -> Tensor:
        return self.flow.class_loss(encoding, y)
