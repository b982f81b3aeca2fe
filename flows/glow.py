"""Glow: a multi-scale flow of L levels with K steps each (seed 004; seed 000 sec.
2.2.3 and 4.3.1).

Level i: squeeze -> K x (actnorm, 1x1 conv, coupling) -> split (all but the last).
The split keeps the first half of the channels and factors out the second half as a
latent with a learned Gaussian prior conditioned on the kept half (Glow's code). Every
factored-out latent is kept, so ``decode(encode(x)) == x``.

With ``cond_channels > 0`` every coupling, split prior and the top prior also see a
condition feature map (resized to each level), which is how SRFlow levels are built
on it (``flows/srflow.py``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flows.base import Condition, FlowSequential, zero_logdet
from flows.distributions import SplitPrior, TopPrior
from flows.layers import Squeeze, flow_step
from flows.layers.coupling import ScaleFunction
from flows.layers.flow_step import CouplingKind, InvConvKind


@dataclass
class FlowEncoding:
    """Result of encoding a batch.

    ``latents``: factored-out latents from the finest level to the coarsest, then the
    top latent. ``logdet``: log|det dz/dx| per sample. ``log_prior``: sum of the
    latents' log-densities under their priors. ``class_logits``: the classifier head on
    the top latent, for class-conditional models.
    """

    latents: list[Tensor]
    logdet: Tensor
    log_prior: Tensor
    class_logits: Tensor | None = None

    @property
    def log_prob(self) -> Tensor:
        return self.log_prior + self.logdet


class Glow(nn.Module):
    def __init__(self, in_channels: int = 3, image_size: int = 32, levels: int = 3,
                 steps_per_level: int = 32, hidden_channels: int = 512,
                 invconv: InvConvKind = "lu", coupling: CouplingKind = "affine",
                 scale_fn: ScaleFunction = "glow", squish_alpha: float = 0.5,
                 learn_top_prior: bool = True, num_classes: int = 0,
                 cond_channels: int = 0, affine_injector: bool = False) -> None:
        super().__init__()
        if levels < 1 or steps_per_level < 1:
            raise ValueError("Glow needs levels >= 1 and steps_per_level >= 1")
        if image_size % (2 ** levels):
            raise ValueError(
                f"image_size {image_size} is not divisible by 2**levels = {2 ** levels}; "
                "lower `levels` or change the resolution")
        self.in_channels = in_channels
        self.image_size = image_size
        self.num_classes = num_classes
        self.levels = nn.ModuleList()
        self.split_priors = nn.ModuleList()
        self.latent_shapes: list[tuple[int, int, int]] = []
        channels, size = in_channels, image_size
        for level in range(levels):
            channels, size = channels * 4, size // 2
            steps = [flow_step(channels, hidden_channels, invconv=invconv, coupling=coupling,
                               scale_fn=scale_fn, squish_alpha=squish_alpha,
                               cond_channels=cond_channels, affine_injector=affine_injector)
                     for _ in range(steps_per_level)]
            self.levels.append(FlowSequential(Squeeze(), *steps))
            if level < levels - 1:
                kept = channels // 2
                self.split_priors.append(SplitPrior(kept, channels - kept, cond_channels))
                self.latent_shapes.append((channels - kept, size, size))
                channels = kept
        self.latent_shapes.append((channels, size, size))
        self.top_prior = TopPrior((channels, size, size), learn_top_prior, num_classes, cond_channels)
        self.class_head = None
        if num_classes:
            # Glow's class-logits head on the top latent (seed 000 sec. 4.3.1).
            self.class_head = nn.Linear(channels, num_classes)
            nn.init.zeros_(self.class_head.weight)
            nn.init.zeros_(self.class_head.bias)

    @property
    def dims(self) -> int:
        return self.in_channels * self.image_size ** 2

    def _check_input(self, x: Tensor) -> None:
        expected = (self.in_channels, self.image_size, self.image_size)
        if tuple(x.shape[1:]) != expected:
            raise ValueError(f"Glow expects images of shape [B, {expected[0]}, {expected[1]}, "
                             f"{expected[2]}], got {list(x.shape)}")

    def encode(self, x: Tensor, y: Tensor | None = None, cond: Condition = None) -> FlowEncoding:
        self._check_input(x)
        logdet, log_prior = zero_logdet(x), zero_logdet(x)
        latents = []
        h = x
        for index, level in enumerate(self.levels):
            h, level_logdet = level(h, cond)
            logdet = logdet + level_logdet
            if index < len(self.split_priors):
                kept_channels = h.shape[1] // 2
                h, latent = h[:, :kept_channels], h[:, kept_channels:]
                log_prior = log_prior + self.split_priors[index].log_prob(latent, h, cond)
                latents.append(latent)
        log_prior = log_prior + self.top_prior.log_prob(h, y, cond)
        latents.append(h)
        class_logits = self.class_head(h.float().mean(dim=(2, 3))) if self.class_head else None
        return FlowEncoding(latents, logdet, log_prior, class_logits)

    def decode(self, latents: list[Tensor | None], y: Tensor | None = None,
               cond: Condition = None, temperature: float = 1.0,
               batch_size: int | None = None) -> tuple[Tensor, Tensor]:
        """Inverse of :meth:`encode`. A latent given as None is drawn from its prior at
        ``temperature``. Returns (x, log|det dx/dz|)."""
        if len(latents) != len(self.levels):
            raise ValueError(f"expected {len(self.levels)} latents, got {len(latents)}")
        if batch_size is None:
            known = [z for z in latents if z is not None]
            batch_size = known[0].shape[0] if known else (y.shape[0] if y is not None else None)
        if batch_size is None:
            raise ValueError("pass batch_size when no latent or label fixes it")
        h = latents[-1]
        if h is None:
            h = self.top_prior.sample(batch_size, temperature, y, device=self._device(), cond=cond)
        logdet = zero_logdet(h)
        for index in reversed(range(len(self.levels))):
            if index < len(self.split_priors):
                latent = latents[index]
                if latent is None:
                    latent = self.split_priors[index].sample(h, temperature, cond)
                h = torch.cat([h, latent], dim=1)
            h, level_logdet = self.levels[index].inverse(h, cond)
            logdet = logdet + level_logdet
        return h, logdet

    def log_prob(self, x: Tensor, y: Tensor | None = None, cond: Condition = None) -> Tensor:
        """Exact log-density of ``x`` in nats, per sample."""
        return self.encode(x, y, cond).log_prob

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0, y: Tensor | None = None,
               cond: Condition = None) -> Tensor:
        if self.num_classes and y is None:
            y = torch.randint(0, self.num_classes, (n,), device=self._device())
        x, _ = self.decode([None] * len(self.levels), y, cond, temperature, batch_size=n)
        return x

    def class_loss(self, encoding: FlowEncoding, y: Tensor) -> Tensor:
        """Per-sample cross-entropy of the class head (seed 000 sec. 4.3.1 weights it by
        lambda_c = 0.01; the seed says "binary" cross-entropy, which fits multi-label
        attributes; CIFAR-10 classes are exclusive, so we use the softmax form)."""
        if encoding.class_logits is None:
            raise ValueError("this Glow has no class head (num_classes = 0)")
        return F.cross_entropy(encoding.class_logits, y.long(), reduction="none")

    def _device(self) -> torch.device:
        return next(self.parameters()).device
