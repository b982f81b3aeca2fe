"""Glow: a multi-scale flow of L scales with K steps each (seed 004; seed 000 sec.
2.2.3 and 4.3.1; the seeds call a scale a "level").

Scale i: squeeze -> K x (actnorm, 1x1 conv, coupling) -> split (all but the last).
The split keeps the first half of the channels and factors out the second half as a
latent whose prior is conditioned on the kept half (Glow's code). Every factored-out
latent is kept, so ``decode(encode(x)) == x``.

Priors are arguments: ``top_prior`` and ``split_prior`` are factories (a class, or
``class_path``/``init_args`` in YAML) called with the latent's shape; by default the
Gaussian priors of ``flows/distributions.py``. A DDPM or a flow over the top latent
plugs in there; its ``exact`` flag carries through to :class:`~flows.model.Encoding`.

``joint_prior`` instead models every latent at once: the split-off latents and the top
latent are gathered into one tensor of the image's shape (each put back where its
squeezes took it from, so neighbouring pixels stay neighbours) and one prior, e.g. the
DDPM of ``flows/diffusion.py``, models it (seed 003's diffusion-augmented flow: the
DDPM Gaussianizes the *whole* latent z_0 = f(x), not only its coarsest part).

Conditions (``cond``): ``"labels"`` for a class-conditional prior (``num_classes > 0``),
``"features"`` for the conditional couplings, injectors and priors
(``cond_channels > 0``), which is how SRFlow is built on Glow (``flows/srflow.py``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flows.base import LABELS, NULL_LABEL, Condition, GuidanceRule, condition_value, with_condition, zero_logdet
from flows.distributions import (KEPT, GaussianPrior, GaussianSplitPrior, LatentPrior, PriorTraining,
                                 SplitPriorFactory, TopPriorFactory)
from flows.layers import Squeeze, flow_step
from flows.layers.coupling import NetFactory, ScaleFunction
from flows.layers.flow_step import CouplingKind, InvConvKind
from flows.dequantization import DequantizerFactory
from flows.model import Encoding, FlowModel, Objective
from flows.nets import CouplingNet
from flows.reversible import sequential_for


BlockFactory = Callable[[int, int], list[nn.Module]]


@dataclass
class GlowEncoding(Encoding):
    """A Glow's encoding; ``class_logits``: its class head's logits on the top latent
    (GlowCC, seed 004 sec. 3), None without classes."""

    class_logits: Tensor | None = None


class Glow(FlowModel):
    """Args (seed 000 sec. 4.3.1 defaults for CIFAR-10 / CelebA: L=3, K=32, 512 hidden):
        in_channels, image_size: the images modelled.
        scales, steps_per_scale: L and K.
        hidden_channels: width of the coupling networks.
        invconv: "lu" or "full" 1x1 convolutions. coupling: "affine", "additive" or "spline"
            (rational-quadratic splines: the Neural Spline Flow of seed 003 sec. 3.2.2.b).
        scale_fn: "glow" (sigmoid(h + 2)) or "squish" (seed 000 eq. 3.15); squish_alpha: its a.
        learn_top_prior: learn the default top prior's mean and log-std.
        num_classes: > 0 makes the default top prior class-conditional and adds Glow's
            class head on the top latent (GlowCC).
        cond_channels: > 0 conditions couplings and priors on ``cond["features"]``.
        affine_injector: an affine injector before each coupling (SRFlow).
        top_prior: factory (latent shape) -> LatentPrior; default GaussianPrior.
        split_prior: factory (kept channels, latent shape) -> LatentPrior; default
            GaussianSplitPrior.
        joint_prior: factory (image shape (C, H, W)) -> LatentPrior over all latents
            gathered into one tensor (:meth:`gather_latents`); replaces top_prior and
            split_prior.
        coupling_net: factory (in, out, hidden) -> nn.Module of the couplings.
        num_bins, tail_bound: the spline couplings' bins K and interval [-B, B] (identity
            outside); only used with coupling "spline".
        memory_efficient: train without storing the flow steps' activations: backward
            recomputes each step's input from its output with the inverse
            (:class:`~flows.reversible.ReversibleSequential`), so memory stays flat in K.
        activation_checkpointing: instead, checkpoint every step (keeps each step's input).
        block: the seam for other multi-scale flows: a factory (scale index, channels
            entering the scale) -> that scale's layers, which must squeeze once, [C, S, S]
            -> [4C, S/2, S/2]. None: Glow's squeeze then K flow steps built from the
            arguments above (``invconv`` to ``tail_bound``, which a block ignores).
            The split-offs, priors and conditions stay this class's
            (``flows/realnvp.py`` is a block).
        dequantizer: factory (image channels) -> how :meth:`training_loss` dequantizes
            the data (``flows/dequantization.py``): uniform by default, or Flow++'s
            learned ``VariationalDequantizer`` (``class_path`` and its other settings in
            YAML; the likelihood is then a bound, logged as one), or TarFlow's noise
            augmentation ``GaussianNoiseDequantizer``.
        label_dropout, guidance: classifier-free guidance of a GlowCC (TarFlow sec. 2.4,
            carried to Glow): the share of training labels that are the null class (-1,
            the default top prior's bias alone), and the weight w with which sampling
            extrapolates the class's top-prior mean and log-std from the null class's
            (:meth:`~flows.distributions.GaussianPrior.sample`; a call's
            ``cond["guidance"]`` overrides it). The class head trains on the true labels.
        guidance_rule: ``cfg`` (the above) or ``starflow``: the top prior's Gaussian of
            (1 + w) log p_c - w log p_u (:class:`~flows.base.Guidance`).
    """

    def __init__(self, *, in_channels: int = 3, image_size: int = 32, scales: int = 3,
                 steps_per_scale: int = 32, hidden_channels: int = 512,
                 invconv: InvConvKind = "lu", coupling: CouplingKind = "affine",
                 scale_fn: ScaleFunction = "glow", squish_alpha: float = 0.5,
                 learn_top_prior: bool = True, num_classes: int = 0,
                 cond_channels: int = 0, affine_injector: bool = False,
                 top_prior: TopPriorFactory | None = None,
                 split_prior: SplitPriorFactory | None = None,
                 joint_prior: TopPriorFactory | None = None,
                 coupling_net: NetFactory = CouplingNet, num_bins: int = 8,
                 tail_bound: float = 3.0, memory_efficient: bool = False,
                 activation_checkpointing: bool = False, block: BlockFactory | None = None,
                 dequantizer: DequantizerFactory | None = None, label_dropout: float = 0.0,
                 guidance: float = 0.0, guidance_rule: GuidanceRule = "cfg") -> None:
        super().__init__(dequantizer, in_channels)
        if scales < 1 or steps_per_scale < 1:
            raise ValueError("Glow needs scales >= 1 and steps_per_scale >= 1")
        if image_size % (2 ** scales):
            raise ValueError(
                f"image_size {image_size} is not divisible by 2**scales = {2 ** scales}; "
                "lower `scales` or change the resolution")
        self.in_channels = in_channels
        self.image_size = image_size
        self.num_classes = num_classes
        self.set_guidance(label_dropout, guidance, guidance_rule)
        self.coupling = coupling
        if joint_prior is not None and (top_prior is not None or split_prior is not None or num_classes
                                        or cond_channels):
            raise ValueError("joint_prior models every latent: it replaces top_prior and split_prior, and "
                             "takes no labels or condition features (num_classes = cond_channels = 0)")
        self.num_splits = scales - 1
        composition = sequential_for(memory_efficient, activation_checkpointing)
        self.scales = nn.ModuleList()
        self.split_priors = nn.ModuleList()
        self.latent_shapes: list[tuple[int, int, int]] = []
        channels, size = in_channels, image_size
        for scale in range(scales):
            if block is not None:
                self.scales.append(composition(*block(scale, channels)))
            else:
                steps = [flow_step(channels * 4, hidden_channels, invconv=invconv, coupling=coupling,
                                   scale_fn=scale_fn, squish_alpha=squish_alpha,
                                   cond_channels=cond_channels, affine_injector=affine_injector,
                                   net=coupling_net, num_bins=num_bins, tail_bound=tail_bound)
                         for _ in range(steps_per_scale)]
                self.scales.append(composition(Squeeze(), *steps))
            channels, size = channels * 4, size // 2
            if scale < scales - 1:
                kept = channels // 2
                latent_shape = (channels - kept, size, size)
                if joint_prior is None:
                    self.split_priors.append(
                        split_prior(kept, latent_shape) if split_prior is not None
                        else GaussianSplitPrior(kept, channels - kept, cond_channels))
                self.latent_shapes.append(latent_shape)
                channels = kept
        top_shape = (channels, size, size)
        self.latent_shapes.append(top_shape)
        self.joint_prior: LatentPrior | None = None
        self.top_prior: LatentPrior | None = None
        if joint_prior is not None:
            self.joint_prior = joint_prior((in_channels, image_size, image_size))
        else:
            self.top_prior = (top_prior(top_shape) if top_prior is not None else
                              GaussianPrior(top_shape, learn_top_prior, num_classes, cond_channels))
        self.class_head = None
        if num_classes:
            # Glow's class-logits head on the top latent (seed 000 sec. 4.3.1).
            self.class_head = nn.Linear(channels, num_classes)
            nn.init.zeros_(self.class_head.weight)
            nn.init.zeros_(self.class_head.bias)
        self.check_dequantizer()

    @property
    def display_name(self) -> str:
        # Spline couplings make the flow the Neural Spline Flow baseline (seed 003); a class
        # head makes it GlowCC (seed 000 sec. 4.3.1).
        family = "NSF" if self.coupling == "spline" else type(self).__name__  # Glow, or a builder's name
        return f"{family}{'CC' if self.num_classes else ''}{self.image_size}"

    def _check_input(self, x: Tensor) -> None:
        expected = (self.in_channels, self.image_size, self.image_size)
        if tuple(x.shape[1:]) != expected:
            raise ValueError(f"Glow expects images of shape [B, {expected[0]}, {expected[1]}, "
                             f"{expected[2]}], got {list(x.shape)}")

    # The multi-scale seam, written once: each scale's operation, then (all but the last)
    # the split of half the channels into a latent. ``step(index, h) -> (h, logdet)`` is
    # the scale's flow (transform, decode) or its squeeze alone (scatter, gather).
    def _walk_down(self, h: Tensor, step) -> tuple[list[Tensor], list[Tensor], Tensor]:
        """(latents, kept halves, logdet) of ``h`` through every scale and split."""
        logdet = zero_logdet(h)
        latents, kept = [], []
        for index in range(len(self.scales)):
            h, step_logdet = step(index, h)
            logdet = logdet + step_logdet
            if index < self.num_splits:
                kept_channels = h.shape[1] // 2
                h, latent = h[:, :kept_channels], h[:, kept_channels:]
                latents.append(latent)
                kept.append(h)
        latents.append(h)
        return latents, kept, logdet

    def _walk_up(self, latents: list[Tensor | None], step, draw=None) -> tuple[Tensor, Tensor]:
        """The inverse of :meth:`_walk_down`: (x, logdet). ``draw(index, kept)`` gives
        split ``index``'s latent where it is None."""
        h = latents[-1]
        logdet = zero_logdet(h)
        for index in reversed(range(len(self.scales))):
            if index < self.num_splits:
                latent = latents[index] if latents[index] is not None else draw(index, h)
                h = torch.cat([h, latent], dim=1)
            h, step_logdet = step(index, h)
            logdet = logdet + step_logdet
        return h, logdet

    def transform(self, x: Tensor, cond: Condition = None) -> tuple[list[Tensor], list[Tensor], Tensor]:
        """The flow alone, no prior: (latents, kept, logdet). ``latents`` as in
        :meth:`encode`; ``kept[i]``: the half kept at split i (what split prior i
        conditions on); ``logdet``: log|det d latents / dx| per sample."""
        self._check_input(x)
        return self._walk_down(x, lambda index, h: self.scales[index](h, cond))

    def gather_latents(self, latents: list[Tensor]) -> Tensor:
        """All latents as one tensor of the image's shape: the inverse of the squeezes
        and splits alone (the flow steps left out), so each latent entry sits at the
        pixels it was squeezed from."""
        return self._walk_up(latents, lambda index, h: self._squeeze.inverse(h))[0]

    def scatter_latents(self, z: Tensor) -> list[Tensor]:
        """The inverse of :meth:`gather_latents`."""
        return self._walk_down(z, lambda index, h: self._squeeze(h))[0]

    _squeeze = Squeeze()

    def encode(self, x: Tensor, cond: Condition = None) -> Encoding:
        return self._encode(x, cond, training=False)[0]

    def encode_for_training(self, x: Tensor, cond: Condition = None) -> tuple[Encoding, PriorTraining]:
        """:meth:`encode` with every prior's training estimate (a DDPM joint prior's
        one-step estimate of its bound; a Gaussian prior's exact log-density)."""
        return self._encode(x, cond, training=True)

    def _encode(self, x: Tensor, cond: Condition, training: bool) -> tuple[Encoding, PriorTraining]:
        latents, kept, logdet = self.transform(x, cond)
        h = latents[-1]

        def prior_term(prior: LatentPrior, z: Tensor, prior_cond: Condition) -> PriorTraining:
            return prior.training_estimate(z, prior_cond) if training else PriorTraining(prior.log_prob(z, prior_cond))

        if self.joint_prior is not None:
            terms = [prior_term(self.joint_prior, self.gather_latents(latents), cond)]
        else:
            terms = [prior_term(self.top_prior, h, cond)]
            terms += [prior_term(prior, latents[index], with_condition(cond, **{KEPT: kept[index]}))
                      for index, prior in enumerate(self.split_priors)]
        prior = PriorTraining.combine(terms)
        class_logits = None
        if self.class_head is not None:
            class_logits = self.class_head(h.to(self.class_head.weight.dtype).mean(dim=(2, 3)))
        return GlowEncoding(latents, logdet, prior.log_prob, self.exact, class_logits), prior

    def decode(self, latents: list[Tensor | None], cond: Condition = None,
               temperature: float = 1.0) -> Tensor:
        """Inverse of :meth:`encode`. A latent given as None is drawn from its prior at
        ``temperature`` (the batch size then comes from another latent or the labels)."""
        return self.decode_with_logdet(latents, cond, temperature)[0]

    def decode_with_logdet(self, latents: list[Tensor | None], cond: Condition = None,
                           temperature: float = 1.0, n: int | None = None) -> tuple[Tensor, Tensor]:
        """(x, log|det dx/dz|); ``n`` fixes the batch size when every latent is None."""
        cond = self.guided_condition(cond)
        if len(latents) != len(self.scales):
            raise ValueError(f"expected {len(self.scales)} latents, got {len(latents)}")
        if n is None:
            known = [z for z in latents if z is not None]
            labels = condition_value(cond, LABELS)
            n = known[0].shape[0] if known else (labels.shape[0] if labels is not None else None)
        if n is None:
            raise ValueError("pass n (or a latent or labels) to fix the batch size")
        if self.joint_prior is not None:
            if all(z is None for z in latents):
                latents = self.scatter_latents(self.joint_prior.sample(n, cond, temperature))
            elif any(z is None for z in latents):
                raise ValueError("a Glow with a joint prior draws all latents together: pass every latent, "
                                 "or none (a joint prior cannot draw some latents given the others)")
        if latents[-1] is None:
            latents = [*latents[:-1], self.top_prior.sample(n, cond, temperature)]
        return self._walk_up(
            latents, lambda index, h: self.scales[index].inverse(h, cond),
            draw=lambda index, kept: self.split_priors[index].sample(n, with_condition(cond, **{KEPT: kept}),
                                                                     temperature))

    @torch.no_grad()
    def sample(self, n: int, cond: Condition = None, temperature: float = 1.0) -> Tensor:
        """n samples; a class-conditional Glow without labels draws them uniformly."""
        if self.num_classes and condition_value(cond, LABELS) is None:
            labels = torch.randint(0, self.num_classes, (n,), device=self._device())
            cond = with_condition(cond, **{LABELS: labels})
        x, _ = self.decode_with_logdet([None] * len(self.scales), cond, temperature, n)
        return self.finish_samples(x, cond)

    def class_loss(self, encoding: Encoding, labels: Tensor) -> Tensor:
        """Per-sample cross-entropy of the class head (seed 000 sec. 4.3.1 weights it by
        lambda_c = 0.01; the seed says "binary" cross-entropy, which fits multi-label
        attributes; CIFAR-10 classes are exclusive, so we use the softmax form). A null
        label (-1, no class) costs 0."""
        if encoding.class_logits is None:
            raise ValueError("this Glow has no class head (num_classes = 0)")
        return F.cross_entropy(encoding.class_logits, labels.long(), reduction="none", ignore_index=NULL_LABEL)

    def training_loss(self, clean: Tensor, cond: Condition = None, *, n_bits: int,
                      noise: Tensor | None = None) -> Objective:
        """The flow's bits per dim, and for GlowCC the class head's cross-entropy in bits
        as the term ``class_bits`` (its weight lambda_c is the module's)."""
        objective = super().training_loss(clean, cond, n_bits=n_bits, noise=noise)
        if self.class_head is not None:
            labels = condition_value(cond, LABELS)
            class_bits = self.class_loss(objective.encoding, labels) / math.log(2.0)
            objective.terms["class_bits"] = class_bits.mean()
            # Over the labelled images (a weighted mean, not a boolean index: no host read).
            known = (labels != NULL_LABEL).float()
            right = (objective.encoding.class_logits.argmax(1) == labels).float()
            accuracy = (right * known).sum() / known.sum().clamp_min(1.0)
            objective.extra["class_accuracy"] = accuracy
        return objective
