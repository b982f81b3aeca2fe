"""The hierarchical conditional flow of seed 001 ("Invertible hierarchical generative
model for images", TMLR 2023): stochastic encoders, decoders and one shallow
conditional flow per y-variable.

    encode:  x = y_R1 --enc--> y_R2 --enc--> ... --enc--> y_1 --head--> y_prior
             z_prior = f_prior(y_prior)                       (the prior flow, eq. 4)
             z_Ri    = f_Ri(y_Ri; dec(y_Ri+1, skip))          (conditional flows, eq. 12)
    decode:  y_prior = f_prior^-1(z_prior), then coarse to fine y_Ri = f_Ri^-1(z_Ri; dec(...))

so decode(encode(x)) == x exactly given the encoded latents, whatever the encoder did
(eq. 6-9). The model lifts x into more dimensions than it has; its ``log_prob`` is the
ELBO (sec. 2.2), a lower bound, and :class:`HierarchicalEncoding` says so.

Levels are listed fine to coarse: ``levels[0]`` is the data, ``levels[-1]`` the prior
(unconditional) flow's y; every other level's flow is conditioned on the decoder of
the next coarser y. Each :class:`Level` is one column of seed 001 Table 4.

Where the seed is vague, the official code (timoneh/hflow) settles it, and where the
two differ it says so here:

* Noise (eq. 11): ``q(y|x) = N(mu(x), alpha^2 sigma(X)^2 I)``, with ``sigma(X)`` the
  element-wise standard deviation of ``mu`` over a sub-batch of ``var_batch_size``
  images (unbiased, as ``torch.var``), averaged over the dimensions: one scalar per
  level and sub-batch, not detached (as the code). In training the flow and the decoder
  get independent noisy copies (alphas "to flow" and "to decoder", Table 4).
* Evaluation (``model.eval()``): ``sigma`` is the running average of the training
  estimates (like batch norm), so q(y|x) of one image does not depend on the others in
  its batch, and the flow and the decoder see **one** draw ``y ~ q`` at the flow's alpha.
  Then ``log p(x, y) - log q(y|x)`` is a single-sample ELBO. (The official code keeps two
  noise sources in its evaluation, which is not an ELBO of one model; ours is.) Where a
  level's alpha is 0 the encoder is deterministic, q has no density and the ELBO is
  -inf (Config B): reported as such, not hidden.
* Stop-gradient (eq. 5): the prior flow's input is detached, so it cannot move the
  encoders. The official code detaches every flow's input (the same loophole, shrinking
  y to please its flow, exists at every level); that is ``stop_gradient: all``, the
  default; ``prior`` detaches only the prior flow's input, as eq. 5 prints.
* Table 4 lists 408 channels at resolution 1 and 4 for the prior; its total |y| =
  271,360 and the code (a 512-channel y_1 split 4 + 508) say 508: 408 is a typo.

Switches that follow the official code where the paper's text differs or is silent
(Config A, ``experiments/hierarchical_celebahq256.yaml``, turns them all on, since the
official run produced the FID 27.3; the defaults keep the paper text and older configs):
``equalized_lr`` (the official ``MyConv``; Table 2's rates were tuned for it),
``actnorm_identity_at_1x1``, the per-level alphas and loss weights (YAML), and in the
module and optimizer settings the decay every second epoch after epoch 10
(``epoch_decay_every`` / ``epoch_decay_after``), micro-batch accumulation to 16
(``accumulate_grad_batches``) and FID against the training images at temperature 0.8.
Parameters: 78.29 M for Config A against the official 77.38 M trainable (Table 2's
80.15 M counts 2.77 M fixed mask tensors the official code registers as parameters);
``python -m benchmarks.hierarchical_step`` prints both.

Remaining differences from the official code (timoneh/hflow, ``hflow/network.py``), kept
on purpose:

* Decoder top: the official code feeds y_1 through a 6-layer, 512-wide mapping network
  (``GlobalStateNetwork``) whose output modulates ("styles") the decoder at 8x8 from a
  learned 4x4 constant, masks y_prior out of the decoder and conditions y_1's flow on the
  clean y_prior through a 1x1 linear layer. Ours decodes y_1 with the same decoder as
  every level (Fig. 12) and conditions y_1's flow on the decoded y_prior: the paper
  describes no mapping network, and one decoder kind keeps every level's ELBO term alike.
  Not built yet (a candidate switch, ``decoder_top``).
* Coupling networks of channel splits: the official compresses condition and input to
  ``c_in`` by a tanh layer, has separate scale and shift heads and clips the shift at
  +-5; ours concatenate them into one network with one zero-started head and an
  unbounded shift (App. E's description; the scale is bounded by ``scale_fn``).
* U-Net couplings: the official uses 1x1 convs, x4 downsampling per level, 2/2/1 levels
  and channels x1.1-1.2 per level (``UNET_C_MULT``); ours 3x3 convs, x2 per level at a
  constant width, as deep as the map allows (Fig. 12's drawing, and no width growth keeps
  Table 4's "hidden layer channels" the width everywhere).
* Decoders: the official has 4 residual convs per doubling and skip channels
  [8, 32, 32, 32]; ours one residual conv per doubling plus a refine conv, and one
  ``skip_channels`` (Table 4 gives neither; Config A's parameter count stays within 1.2 %).
* Injectors (condition-only affine layers): the official computes them in the decoder,
  trained at the decoder's rate; ours sit in the flow at the flow's rate (App. E puts them
  in the flow, and they are part of the invertible map whose log-det we count).
* Input scale and 1x1-conv reparameterization: the official multiplies x by 4 (with its
  log-det) and scales its 1x1 conv parameters (``PERMUTE_SCALING`` 0.3; unitary 0.1);
  ours works on [-0.5, 0.5] and keeps the 1x1 convs unscaled: both are
  reparameterizations of the same model that only change effective learning rates, and
  the bits per dim are the same either way.
* EMA: the official copies the weights into the EMA (decay 1.0) through epoch 0 and
  averages at 0.995 after; ours averages at 0.995 from the first step (the EMA callback,
  shared by every family).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Literal

import torch
from torch import Tensor, nn

from flows.base import FEATURES, Condition, FlowSequential, sum_except_batch
from flows.layers import ActNorm, AffineCoupling, AffineInjector, InvertibleConv1x1, OrthogonalConv1x1
from flows.layers.masks import ChannelMask, CheckerboardMask
from flows.distributions import LOG_2PI, gaussian_log_density
from flows.model import Encoding, FlowModel, Objective, temperature_per_part
from flows.nets import (ConvCouplingNet, InstanceNorm, UNet, UNetCouplingNet, _leaky, blur_downsample,
                        blur_upsample, conv, unet_depth)

# The official code's conv scaling for its linear (no nonlinearity) output convs.
LINEAR_GAIN = 1.0



@dataclass
class Level:
    """One y-variable and the flow that models it (a column of seed 001 Table 4).

    resolution, channels: the y-variable's size ("flows at resolutions", "number of
        channels at flows"); ``levels[0]`` is the image itself.
    couplings: the flow's coupling split types from the input side ("affine-coupling
        split type", expanded: ``[2C, 2S2]`` is ``[C, C, S2, S2]``): ``C`` a channel
        split with a convolutional network, ``S<k>`` a checkerboard of k x k blocks
        with a U-Net (parities alternate). The flow length K is the list's length.
    coupling_hidden: width of the coupling networks ("hidden layer channels").
    coupling_convs: N, convolutions per channel-split coupling network.
    cond_channels: channels of the condition the decoder gives this flow ("conditioning
        channels"); 0 for the prior level, which is unconditional.
    alpha_flow, alpha_decoder: noise scales of the two noisy copies of this y (Table 4);
        unused at ``levels[0]`` (x has no encoder).
    loss_weight: w_i of eq. 12, applied to the level's negative log-likelihood in bits.
    invconv: ``full`` (free-form) or ``unitary`` (orthogonal, log-det 0) 1x1 convs.
    conditioning_unet: the condition-only first and last affine layers of the flow use
        U-Nets (App. E: all conditional flows but those of y_8 and y_256).
    encoder_hidden: width of the encoder producing this y (unused at ``levels[0]``; the
        prior's y is a head on the previous encoder).
    decoder_hidden: width of the decoder producing this flow's condition.
    """

    resolution: int
    channels: int
    couplings: list[str]
    coupling_hidden: int
    cond_channels: int = 0
    alpha_flow: float = 0.0
    alpha_decoder: float = 0.0
    loss_weight: float = 1.0
    coupling_convs: int = 4
    invconv: Literal["full", "unitary"] = "full"
    conditioning_unet: bool = False
    encoder_hidden: int = 64
    decoder_hidden: int = 64


def checkerboard_block(split: str) -> int | None:
    """``"S4"`` -> 4, ``"C"`` -> None; ValueError for anything else."""
    if split == "C":
        return None
    if split.startswith("S") and split[1:].isdigit() and int(split[1:]) >= 1:
        return int(split[1:])
    raise ValueError(f"unknown coupling split {split!r}: use 'C' or 'S<k>' (S2, S4, S8)")


def downsampling_steps(fine: int, coarse: int) -> int:
    """How many halvings take ``fine`` to ``coarse`` (both powers-of-two apart)."""
    return int(round(math.log2(fine // coarse)))


def validate_levels(levels: list[Level], image_size: int, in_channels: int) -> None:
    """ValueError naming the key (``levels[i].field``) for settings that cannot work."""
    if len(levels) < 2:
        raise ValueError("levels: the hierarchical flow needs the image level and at least a prior level")
    if levels[0].resolution != image_size or levels[0].channels != in_channels:
        raise ValueError(f"levels[0] is the image: resolution {image_size} and channels {in_channels}, got "
                         f"{levels[0].resolution} and {levels[0].channels}")
    for i, level in enumerate(levels):
        key = f"levels[{i}]"
        if level.resolution < 1 or level.channels < 1:
            raise ValueError(f"{key}: resolution and channels must be >= 1, got {level.resolution}, "
                             f"{level.channels}")
        if i:
            finer = levels[i - 1].resolution
            ratio = finer // level.resolution if level.resolution else 0
            if finer % level.resolution or ratio & (ratio - 1):
                raise ValueError(f"{key}.resolution: {level.resolution} must divide {levels[i - 1].resolution} "
                                 f"(levels[{i - 1}].resolution) by a power of two (1, 2, 4, ...)")
            if ratio == 1 and i != len(levels) - 1:
                raise ValueError(f"{key}.resolution: only the prior level (the last) may repeat the "
                                 f"resolution of the level before it, got {level.resolution} twice")
        if level.alpha_flow < 0 or level.alpha_decoder < 0:
            raise ValueError(f"{key}.alpha_flow / alpha_decoder: noise scales must be >= 0, got "
                             f"{level.alpha_flow}, {level.alpha_decoder}")
        if level.loss_weight < 0:
            raise ValueError(f"{key}.loss_weight must be >= 0, got {level.loss_weight}")
        if not level.couplings:
            raise ValueError(f"{key}.couplings: a flow needs at least one coupling")
        for split in level.couplings:
            try:
                block = checkerboard_block(split)
            except ValueError as error:
                raise ValueError(f"{key}.couplings: {error}") from None
            if block is None and level.channels < 2:
                raise ValueError(f"{key}.couplings: a channel split needs >= 2 channels, the level has "
                                 f"{level.channels}; use a checkerboard split (S2) instead")
            if block is not None and (2 * block > level.resolution or level.resolution % block):
                raise ValueError(f"{key}.couplings: the {block}x{block} checkerboard {split} does not fit the "
                                 f"{level.resolution}x{level.resolution} feature map (it needs a resolution "
                                 f"divisible by {block} and at least {2 * block}); use a smaller block or 'C'")
        last = i == len(levels) - 1
        if last and level.cond_channels:
            raise ValueError(f"{key}.cond_channels: the prior level (the last) is unconditional; set it to 0")
        if not last and level.cond_channels < 1:
            raise ValueError(f"{key}.cond_channels: a conditional flow needs cond_channels >= 1")
        if level.invconv not in ("full", "unitary"):
            raise ValueError(f"{key}.invconv must be 'full' or 'unitary', got {level.invconv!r}")


def minibatch_sigma(mu: Tensor, var_batch_size: int) -> Tensor:
    """sigma(X) of seed 001 eq. 11 for every image: the element-wise standard deviation
    of ``mu`` over its sub-batch of ``var_batch_size`` images, averaged over all
    dimensions; returns ``[B]``. A trailing sub-batch of one image joins the one before."""
    batch = mu.shape[0]
    if batch < 2:
        raise ValueError("sigma(X) of eq. 11 is a standard deviation over images: training needs batches "
                         "of at least 2")
    starts = list(range(0, batch, var_batch_size))
    if batch - starts[-1] < 2 and len(starts) > 1:
        starts.pop()
    bounds = starts + [batch]
    flat = mu.flatten(1)
    sigma = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        std = flat[start:end].float().var(dim=0).sqrt().mean()
        sigma.append(std.expand(end - start))
    return torch.cat(sigma)


def gaussian_entropy(dims: int, std: Tensor) -> Tensor:
    """Entropy in nats of N(mu, std^2 I) in ``dims`` dimensions, per entry of ``std``."""
    return 0.5 * dims * (LOG_2PI + 1.0 + 2.0 * torch.log(std))


def standard_normal_log_prob(z: Tensor) -> Tensor:
    z = z.float() if z.dtype in (torch.float16, torch.bfloat16) else z
    return sum_except_batch(gaussian_log_density(z, 0.0, 0.0))


class Encoder(nn.Module):
    """From the finer level's features down to this level's y (seed 001 Fig. 12): per
    halving conv - LeakyReLU - anti-aliased downsampling - instance norm - conv -
    LeakyReLU - instance norm (units stacked where the resolution drops by more than 2),
    then a 1x1 conv to the y channels, instance-normalized above 1x1 so the signal's
    scale is fixed and ``alpha`` sets its signal-to-noise ratio. ``features`` go on to
    the next encoder. ``lr_multiplier``: equalized-learning-rate convs (None: plain)."""

    def __init__(self, in_channels: int, hidden_channels: int, y_channels: int, steps: int,
                 in_resolution: int, lr_multiplier: float | None = None) -> None:
        super().__init__()
        self.units = nn.ModuleList()
        resolution, channels = in_resolution, in_channels
        for _ in range(steps):
            kernel = 3 if resolution > 2 else 1
            self.units.append(nn.ModuleList([
                conv(channels, hidden_channels, kernel, lr_multiplier),
                conv(hidden_channels, hidden_channels, 3 if resolution > 4 else 1, lr_multiplier)]))
            resolution, channels = resolution // 2, hidden_channels
        self.out_channels = channels
        self.norm = InstanceNorm()
        self.head = conv(channels, y_channels, 1, lr_multiplier, LINEAR_GAIN)

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        h = features
        for first, second in self.units:
            h = self.norm(blur_downsample(_leaky(first(h))))
            h = self.norm(_leaky(second(h)))
        return self.norm(self.head(h)), h


class Decoder(nn.Module):
    """From a coarser y (and the coarser decoder's skip features) up to the condition of
    the finer flow (seed 001 Fig. 12): an input conv, a residual U-Net at the start of the
    upscaler (when the input is at least 8x8 and ``unet``), then per doubling an
    anti-aliased upsampling and a residual conv; 1x1 convs give the condition and the
    skip features for the next decoder. Residuals are scaled by 1/sqrt(2).
    ``lr_multiplier``: equalized-learning-rate convs (None: plain); the U-Net's are at
    ``unet_lr_multiplier`` (the official code: 1 for the decoders' U-Nets)."""

    def __init__(self, y_channels: int, skip_in: int, hidden_channels: int, cond_channels: int, skip_out: int,
                 steps: int, in_resolution: int, unet: bool, lr_multiplier: float | None = None,
                 unet_lr_multiplier: float | None = None) -> None:
        super().__init__()
        kernel = 3 if in_resolution > 1 else 1
        m = lr_multiplier
        self.first = conv(y_channels + skip_in, hidden_channels, kernel, m)
        depth = unet_depth(in_resolution)
        self.unet = UNet(hidden_channels, depth, unet_lr_multiplier) if unet and depth > 0 else None
        self.refine = conv(hidden_channels, hidden_channels, kernel, m)
        self.up = nn.ModuleList(conv(hidden_channels, hidden_channels, 3, m) for _ in range(steps))
        self.cond = conv(hidden_channels, cond_channels, 1, m, LINEAR_GAIN)
        self.skip = conv(hidden_channels, skip_out, 1, m, LINEAR_GAIN) if skip_out else None

    def forward(self, y: Tensor, skip: Tensor | None) -> tuple[Tensor, Tensor | None]:
        h = _leaky(self.first(y if skip is None else torch.cat([y, skip], dim=1)))
        if self.unet is not None:
            h = (h + self.unet(h)) / math.sqrt(2.0)
        h = (h + _leaky(self.refine(h))) / math.sqrt(2.0)
        for layer in self.up:
            h = blur_upsample(h)
            h = (h + _leaky(layer(h))) / math.sqrt(2.0)
        return self.cond(h), None if self.skip is None else self.skip(h)


def level_flow(level: Level, scale_fn: str = "exp", unets: bool = True, lr_multiplier: float | None = None,
               actnorm_data_init: bool = True) -> FlowSequential:
    """The flow of one level: no squeeze and no split (sec. 2.2). K steps of ActNorm,
    1x1 conv and affine coupling; a conditional flow starts and ends with affine layers
    computed from the condition only (App. E: "completely mask out the flow-input").
    ``unets=False`` gives every coupling the convolutional network (Config D).
    ``lr_multiplier``: equalized-learning-rate convs in the coupling networks (None:
    plain). ``actnorm_data_init=False``: the ActNorms start as the identity."""
    resolution = level.resolution
    kernel = 3 if resolution > 1 else 1
    conv_net = partial(ConvCouplingNet, num_convs=level.coupling_convs, kernel_size=kernel,
                       lr_multiplier=lr_multiplier)
    unet_net = partial(UNetCouplingNet, depth=unet_depth(resolution), lr_multiplier=lr_multiplier) \
        if unets else conv_net
    condition_net = unet_net if level.conditioning_unet and resolution >= 8 else conv_net
    layers = []
    if level.cond_channels:
        layers.append(AffineInjector(level.channels, level.cond_channels, level.coupling_hidden, scale_fn,
                                     net=condition_net))
    parity: dict[int, int] = {}
    for split in level.couplings:
        block = checkerboard_block(split)
        if block is None:
            mask, net = ChannelMask(), conv_net
        else:
            mask, net = CheckerboardMask(block, parity.get(block, 0)), unet_net
            parity[block] = 1 - parity.get(block, 0)
        invconv = InvertibleConv1x1(level.channels) if level.invconv == "full" else OrthogonalConv1x1(level.channels)
        layers += [ActNorm(level.channels, data_init=actnorm_data_init), invconv,
                   AffineCoupling(level.channels, level.coupling_hidden, level.cond_channels, scale_fn,
                                  mask=mask, net=net)]
    if level.cond_channels:
        layers.append(AffineInjector(level.channels, level.cond_channels, level.coupling_hidden, scale_fn,
                                     net=condition_net))
    return FlowSequential(*layers)


@dataclass
class HierarchicalEncoding(Encoding):
    """An :class:`Encoding` whose ``log_prob`` is the single-sample ELBO:
    ``log_prior + logdet + entropy`` (sec. 2.2). ``level_log_probs``: log p(y_i | y_>i)
    in nats per level (fine to coarse, the prior last), the terms of eq. 12.
    ``log_posterior``: log q(y|x) of the drawn y's (whose expectation is -entropy). ``ys``: the
    y-variables the flows saw. ``sigmas``: sigma(X) per level [B] (None at the image)."""

    entropy: Tensor | None = None
    log_posterior: Tensor | None = None
    level_log_probs: list[Tensor] = field(default_factory=list)
    ys: list[Tensor] = field(default_factory=list)
    sigmas: list[Tensor | None] = field(default_factory=list)

    @property
    def log_prob(self) -> Tensor:
        return self.log_prior + self.logdet + self.entropy


class HierarchicalFlow(FlowModel):
    """Seed 001's model. Args:
        levels: fine to coarse, the image first and the prior last (:class:`Level`;
            seed 001 Table 4, Config A in ``experiments/hierarchical_celebahq256.yaml``).
        var_batch_size: images per sub-batch of the sigma(X) estimate (Table 2: 4).
        skip_channels: channels of the skip features from a decoder to the next finer one.
        unets: U-Nets in the checkerboard and condition-only couplings and at the start
            of each upscaler (Fig. 12); False is Config D of Fig. 7a (none anywhere).
        noise_multiplier: scales every level's alphas: 0 makes the encoders deterministic
            (Config B of Fig. 7a), > 1 is "high noise" (Config C; the seed gives no value).
        stop_gradient: ``all`` (the official code) or ``prior`` (eq. 5): whose flow
            inputs are detached from the encoders.
        top_temperature: levels at resolution 1 are sampled at this temperature whatever
            the requested one (Fig. 4: 0.7 above 1, 1.0 at 1); None: the requested one.
        sigma_momentum: weight of each training batch in the running sigma(X) that
            evaluation uses.
        scale_fn: the couplings' scale function (``exp``: bounded log-scale, as the code).
        equalized_lr: every conv of the encoders, decoders and coupling networks is an
            :class:`~flows.nets.EqualizedConv2d` (the official code's ``MyConv``), for which
            Table 2's learning rates were tuned; False: ``nn.Conv2d`` with PyTorch's init.
        encoder_lr_multiplier, decoder_lr_multiplier: their multipliers with
            ``equalized_lr`` (the official ``ENCODER_LR_SCALE`` / ``DECODER_LR_SCALE``: 10;
            the decoders' U-Nets and the flows use 1, as the official code).
        actnorm_identity_at_1x1: the ActNorms of the levels at resolution 1 start as the
            identity instead of from the first batch (the official code; see
            :class:`~flows.layers.ActNorm`).
    """

    def __init__(self, *, levels: list[Level], var_batch_size: int = 4, skip_channels: int = 32,
                 unets: bool = True, noise_multiplier: float = 1.0, stop_gradient: Literal["all", "prior"] = "all",
                 top_temperature: float | None = 1.0, sigma_momentum: float = 0.01,
                 scale_fn: Literal["glow", "squish", "exp"] = "exp", equalized_lr: bool = False,
                 encoder_lr_multiplier: float = 10.0, decoder_lr_multiplier: float = 10.0,
                 actnorm_identity_at_1x1: bool = False) -> None:
        super().__init__()
        levels = [Level(**level) if isinstance(level, dict) else level for level in levels]
        if noise_multiplier < 0:
            raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
        levels = [replace(level, alpha_flow=level.alpha_flow * noise_multiplier,
                          alpha_decoder=level.alpha_decoder * noise_multiplier) for level in levels]
        self.in_channels, self.image_size = levels[0].channels, levels[0].resolution
        validate_levels(levels, self.image_size, self.in_channels)
        if var_batch_size < 2:
            raise ValueError(f"var_batch_size must be >= 2 (a standard deviation over images), got {var_batch_size}")
        if stop_gradient not in ("all", "prior"):
            raise ValueError(f"stop_gradient must be 'all' or 'prior', got {stop_gradient!r}")
        if not 0.0 < sigma_momentum <= 1.0:
            raise ValueError(f"sigma_momentum must lie in (0, 1], got {sigma_momentum}")
        if not (encoder_lr_multiplier > 0 and decoder_lr_multiplier > 0):
            raise ValueError(f"encoder_lr_multiplier and decoder_lr_multiplier must be > 0, got "
                             f"{encoder_lr_multiplier}, {decoder_lr_multiplier}")
        # None: plain convs; a number: equalized learning rate at that multiplier.
        flow_m, encoder_m, decoder_m = (1.0, encoder_lr_multiplier, decoder_lr_multiplier) if equalized_lr \
            else (None, None, None)
        self.levels = levels
        self.var_batch_size = var_batch_size
        self.stop_gradient = stop_gradient
        self.top_temperature = top_temperature
        self.sigma_momentum = sigma_momentum
        self.flows = nn.ModuleList(
            level_flow(level, scale_fn, unets, flow_m,
                       actnorm_data_init=not (actnorm_identity_at_1x1 and level.resolution == 1))
            for level in levels)
        self.encoders = nn.ModuleList()
        channels = self.in_channels
        for finer, level in zip(levels[:-1], levels[1:]):
            encoder = Encoder(channels, level.encoder_hidden, level.channels,
                              downsampling_steps(finer.resolution, level.resolution), finer.resolution,
                              encoder_m)
            self.encoders.append(encoder)
            channels = encoder.out_channels
        # decoders[i] makes the condition of flows[i] from y_{i+1} and decoders[i+1]'s skip.
        self.decoders = nn.ModuleList()
        last = len(levels) - 1
        for i, (level, coarser) in enumerate(zip(levels[:-1], levels[1:])):
            skip_in = skip_channels if i + 1 < last else 0
            self.decoders.append(Decoder(coarser.channels, skip_in, level.decoder_hidden, level.cond_channels,
                                         skip_channels if i > 0 else 0,
                                         downsampling_steps(level.resolution, coarser.resolution),
                                         coarser.resolution, unets and skip_in > 0, decoder_m, flow_m))
        # Running sigma(X) per encoded level, for evaluation (see the module docstring).
        self.register_buffer("running_sigma", torch.ones(len(levels) - 1))
        self.register_buffer("sigma_initialized", torch.tensor(False))

    @property
    def exact(self) -> bool:
        return False  # the ELBO: a lower bound on log p(x)

    @property
    def latent_shapes(self) -> list[tuple[int, int, int]]:
        return [(level.channels, level.resolution, level.resolution) for level in self.levels]

    # --- q(y|x) --------------------------------------------------------------------
    def _sigmas(self, mus: list[Tensor]) -> list[Tensor]:
        batch = mus[0].shape[0]
        if not self.training:
            return [self.running_sigma[i].expand(batch) for i in range(len(mus))]
        sigmas = [minibatch_sigma(mu, self.var_batch_size) for mu in mus]
        with torch.no_grad():
            batch_means = torch.stack([s.detach().mean() for s in sigmas]).to(self.running_sigma)
            # The first batch sets the average, later ones move it; chosen on the device,
            # so that no training step reads the flag back to the host.
            moved = torch.lerp(self.running_sigma, batch_means, self.sigma_momentum)
            self.running_sigma.copy_(torch.where(self.sigma_initialized, moved, batch_means))
            self.sigma_initialized.fill_(True)
        return sigmas

    def encode_means(self, x: Tensor) -> list[Tensor]:
        """mu(x) of every level below the image, fine to coarse."""
        mus, features = [], x
        for encoder in self.encoders:
            mu, features = encoder(features)
            mus.append(mu)
        return mus

    def conditions(self, ys: list[Tensor]) -> list[Tensor | None]:
        """The condition of every flow from the y's the decoders see (``ys[0]`` unused);
        None for the prior flow."""
        conds: list[Tensor | None] = [None] * len(self.levels)
        skip = None
        for i in reversed(range(len(self.decoders))):
            conds[i], skip = self.decoders[i](ys[i + 1], skip)
        return conds

    def encode(self, x: Tensor, cond: Condition = None) -> HierarchicalEncoding:
        """Draws y ~ q(y|x) and encodes every y with its flow (eq. 6-7). In training the
        flows and the decoders get independent noisy copies; in evaluation one draw."""
        mus = self.encode_means(x)
        sigmas = self._sigmas(mus)
        noisy = []
        log_posterior = torch.zeros(x.shape[0], device=x.device, dtype=torch.promote_types(x.dtype, torch.float32))
        for mu, sigma, level in zip(mus, sigmas, self.levels[1:]):
            std = level.alpha_flow * sigma.to(log_posterior.dtype)
            eps = torch.randn_like(mu)
            noisy.append(mu + std.view(-1, *[1] * (mu.dim() - 1)).to(mu.dtype) * eps)
            # log q(y|x) of this draw: what an importance-weighted bound needs.
            log_posterior = log_posterior + standard_normal_log_prob(eps) - mu[0].numel() * torch.log(std)
        flow_inputs = [x] + noisy
        if self.training:
            decoder_inputs = [x]
            for mu, sigma, level in zip(mus, sigmas, self.levels[1:]):
                scale = (level.alpha_decoder * sigma).view(-1, *[1] * (mu.dim() - 1)).to(mu.dtype)
                decoder_inputs.append(mu + scale * torch.randn_like(mu))
        else:
            decoder_inputs = flow_inputs
        conds = self.conditions(decoder_inputs)
        last = len(self.levels) - 1
        latents, level_log_probs = [], []
        logdet = log_prior = torch.zeros(x.shape[0], device=x.device, dtype=torch.promote_types(x.dtype, torch.float32))
        for i, (flow, y, c) in enumerate(zip(self.flows, flow_inputs, conds)):
            if i > 0 and (i == last or self.stop_gradient == "all"):
                y = y.detach()  # eq. 5: this flow's loss must not move the encoders
            z, level_logdet = flow(y, {FEATURES: c} if c is not None else None)
            level_log_prior = standard_normal_log_prob(z)
            latents.append(z)
            level_log_probs.append(level_log_prior + level_logdet)
            logdet, log_prior = logdet + level_logdet, log_prior + level_log_prior
        entropy = torch.zeros_like(logdet)
        for mu, sigma, level in zip(mus, sigmas, self.levels[1:]):
            entropy = entropy + gaussian_entropy(mu[0].numel(), level.alpha_flow * sigma.to(entropy.dtype))
        return HierarchicalEncoding(latents, logdet, log_prior, exact=self.exact, entropy=entropy.detach(),
                                    log_posterior=log_posterior.detach(), level_log_probs=level_log_probs,
                                    ys=flow_inputs, sigmas=[None] + list(sigmas))

    def level_names(self) -> list[str]:
        """The levels' names in logs, fine to coarse: their resolutions, the prior last."""
        return [str(level.resolution) for level in self.levels[:-1]] + ["prior"]

    def training_loss(self, clean: Tensor, cond: Condition = None, *, n_bits: int,
                      noise: Tensor | None = None) -> Objective:
        """Eq. 12 with Table 4's weights, sum_i w_i (-log p(y_i | y_>i)) in bits: what the
        model minimizes, not a likelihood. ``log_prob`` is the single-sample ELBO
        (entropy of q included, a bound). ``extra``: ``level_bpd_<R>`` (the unweighted
        terms of eq. 12 per dimension of y_i, bits), ``sigma_<R>`` (sigma(X) of eq. 11)
        and ``entropy_bpd`` (the entropy of q per image dimension)."""
        objective = self.dequantized_likelihood(clean, cond, n_bits, noise)
        encoding = objective.encoding
        weighted = 0.0
        for name, level, level_log_prob, sigma in zip(self.level_names(), self.levels,
                                                      encoding.level_log_probs, encoding.sigmas):
            level_bits = -level_log_prob / math.log(2.0)
            weighted = weighted + level.loss_weight * level_bits
            objective.extra[f"level_bpd_{name}"] = (level_bits / (level.channels * level.resolution ** 2)).mean()
            if sigma is not None:
                objective.extra[f"sigma_{name}"] = sigma.detach().mean()
        objective.extra["entropy_bpd"] = (encoding.entropy / (self.dims * math.log(2.0))).mean()
        objective.loss = weighted.mean()
        return objective

    @torch.no_grad()
    def importance_weighted_log_prob(self, x: Tensor, samples: int) -> Tensor:
        """log (1/K) sum_k p(x, y_k) / q(y_k|x) with K = ``samples`` draws y_k ~ q(y|x)
        (Burda et al.'s bound): a lower bound on log p(x) that tightens as K grows, and
        whose K = 1 expectation is the ELBO. Needs evaluation mode (q fixed per image)."""
        if self.training:
            raise RuntimeError("importance_weighted_log_prob needs model.eval(): in training q(y|x) "
                               "depends on the batch through sigma(X)")
        log_weights = []
        for _ in range(samples):
            encoding = self.encode(x)
            log_weights.append(encoding.log_prior + encoding.logdet - encoding.log_posterior)
        return torch.logsumexp(torch.stack(log_weights), dim=0) - math.log(samples)

    # --- p(x, y) -------------------------------------------------------------------
    def temperatures(self, temperature: float | list[float]) -> list[float]:
        """One temperature per level: a list is used as given (fine to coarse); one number
        applies to every level above resolution 1, and ``top_temperature`` (when set) to
        those at 1 (seed 001 Fig. 4)."""
        resolutions = [level.resolution for level in self.levels]
        if not isinstance(temperature, (int, float)):
            return temperature_per_part(temperature, resolutions, "level (fine to coarse, by resolution)")
        return [float(temperature) if resolution > 1 or self.top_temperature is None
                else float(self.top_temperature) for resolution in resolutions]

    def decode(self, latents: list[Tensor | None], cond: Condition = None,
               temperature: float | list[float] = 1.0, n: int | None = None) -> Tensor:
        """x from the latents (eq. 8-9), coarse to fine; a latent given as None is drawn
        from N(0, T^2 I) at its level's temperature."""
        if len(latents) != len(self.levels):
            raise ValueError(f"the hierarchical flow has {len(self.levels)} latents, got {len(latents)}")
        temperatures = self.temperatures(temperature)
        if n is None:
            n = next((z.shape[0] for z in latents if z is not None), None)
            if n is None:
                raise ValueError("decode needs n when every latent is to be drawn")
        device = self._device()
        ys: list[Tensor | None] = [None] * len(self.levels)
        skip = None
        for i in reversed(range(len(self.levels))):
            z = latents[i]
            if z is None:
                z = temperatures[i] * torch.randn(n, *self.latent_shapes[i], device=device)
            c = None
            if i < len(self.decoders):
                c, skip = self.decoders[i](ys[i + 1], skip)
            ys[i], _ = self.flows[i].inverse(z, {FEATURES: c} if c is not None else None)
        return ys[0]

    def sample(self, n: int, cond: Condition = None, temperature: float | list[float] = 1.0) -> Tensor:
        return self.decode([None] * len(self.levels), cond, temperature, n=n)
