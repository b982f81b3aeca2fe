"""Glow as a LightningModule (seed 000 sec. 4.3; seed 004)."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from flows.glow import Glow
from flows.layers.coupling import ScaleFunction
from flows.layers.flow_step import CouplingKind, InvConvKind
from lightning_modules.base import FlowModule, LossOutput


class GlowModule(FlowModule):
    """Unconditional or class-conditional Glow at one resolution.

    Model args (seed 000 sec. 4.3.1 defaults: L=3, K=32, 512 hidden channels):
        resolution: image size the model generates (a pyramid level of the data).
        in_channels: colour channels (3, or 1 for MNIST).
        levels, steps_per_level, hidden_channels: L, K and the coupling width.
        invconv: "lu" or "full" 1x1 convolutions.
        coupling: "affine" or "additive".
        scale_fn: "glow" (sigmoid(h + 2)) or "squish" (seed 000 eq. 3.15).
        squish_alpha: the lower bound a of the squished scale.
        learn_top_prior: learn the top prior's mean and log-std.
        num_classes: > 0 makes the model class-conditional (GlowCC).
        class_loss_weight: lambda_c of the class-logits cross-entropy (seed 000 sec. 4.3.1).
    The remaining args are the optimization and sampling ones of :class:`FlowModule`.
    """

    def __init__(self, resolution: int = 32, in_channels: int = 3, levels: int = 3,
                 steps_per_level: int = 32, hidden_channels: int = 512,
                 invconv: InvConvKind = "lu", coupling: CouplingKind = "affine",
                 scale_fn: ScaleFunction = "glow", squish_alpha: float = 0.5,
                 learn_top_prior: bool = True, num_classes: int = 0,
                 class_loss_weight: float = 0.01, **kwargs) -> None:
        super().__init__(**kwargs)
        self.resolution = resolution
        self.class_loss_weight = class_loss_weight
        self.model = Glow(in_channels, resolution, levels, steps_per_level, hidden_channels,
                          invconv, coupling, scale_fn, squish_alpha, learn_top_prior, num_classes)

    @property
    def model_name(self) -> str:
        return f"Glow{'CC' if self.model.num_classes else ''}{self.resolution}"

    @property
    def resolutions(self) -> list[int]:
        return [self.resolution]

    @property
    def in_channels(self) -> int:
        return self.model.in_channels

    def compute_losses(self, images: dict[int, Tensor], labels: Tensor) -> LossOutput:
        x = images[self.resolution]
        y = labels if self.model.num_classes else None
        encoding = self.model.encode(x, y)
        log_prob = encoding.log_prob
        dims = self.model.dims
        # Minimize bits per dim (Glow's objective; the n_bits offset does not move
        # gradients but keeps the loss in the unit users read).
        loss = (-log_prob.mean() / (dims * math.log(2.0))) + self.n_bits
        extra = {}
        if self.model.num_classes:
            class_bits = self.model.class_loss(encoding, labels) / math.log(2.0)
            loss = loss + self.class_loss_weight * class_bits.mean()
            accuracy = (encoding.class_logits.argmax(1) == labels).float().mean()
            extra = {"class_bits": class_bits.mean(), "class_accuracy": accuracy}
        return LossOutput(loss, {self.resolution: log_prob}, {self.resolution: dims}, extra)

    def sample_images(self, n: int, temperature: float) -> dict[int, Tensor]:
        y = None
        if self.model.num_classes:  # a row-major grid: classes cycle along each row
            y = torch.arange(n, device=self.device) % self.model.num_classes
        return {self.resolution: self.model.sample(n, temperature, y)}
