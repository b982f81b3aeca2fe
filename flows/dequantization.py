"""Dequantizers: how a discrete image becomes the continuous point a flow models, as a
part of the model (Ho et al. 2019, Flow++ sec. 3.1; SurVAE's ``VariationalDequantization``
is the same idea as one transform of a list).

A pixel of ``n_bits`` lies in a bin of width ``w = 2**-n_bits`` around its bin centre
``c`` (``flows/quantization.py``). A dequantizer draws an offset ``u`` in [0, 1)^D from
q(u | x) and returns ``y = c + (u - 1/2) w``. For any q,

    log P(x) >= E_q[ log p(y) - log q(u | x) ] + D log w,

and the bits-per-dim formula adds the ``D log w`` (``bits_per_dim``), so a model hands
on ``log p(y) - log q(u | x)`` as its log-likelihood:

* :class:`UniformDequantizer`: q is uniform, ``log q = 0``: Glow's preprocessing. The
  figure is the usual continuous-density bits per dim, reported as exact (the convention
  of every flow paper; it is also a bound on the discrete likelihood).
* :class:`VariationalDequantizer`: q is a small conditional flow trained jointly with
  the model; the figure is a bound on the discrete likelihood and is logged as one
  (``bpd_bound_R``). Since the uniform q is one of its members (its flow starts as the
  identity, where it *is* the uniform q), training can only tighten the bound.
* :class:`GaussianNoiseDequantizer`: TarFlow's noise augmentation, ``y = c + sigma eps``.
  Not a dequantization in the sense above: ``log p(y)`` is the density of the noisy
  data, a continuous density that bounds nothing discrete. It is logged under its own
  name (``noisy_data_nll_bits_R``, ``Dequantized.continuous``), never as bits per dim.

Each takes the uniform noise ``noise`` from the caller: in evaluation it is the per-image
noise of ``per_sample_uniform``, so a variational q's evaluation draws repeat too.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flows.base import FEATURES, FlowSequential, sum_except_batch, zero_logdet
from flows.actnorm import ActNorm
from flows.layers.coupling import AffineCoupling
from flows.layers.masks import CheckerboardMask

# Uniform noise is kept this far inside (0, 1) before its logit: float32 rounds
# rand() to exactly 0 now and then.
NOISE_MARGIN = 1e-6


@dataclass
class Dequantized:
    """``images``: the dequantized images ``c + (u - 1/2) w`` in model space. ``log_q``:
    log q(u | x) per sample in nats (a density on [0, 1)^D). ``exact``: False where
    ``log_q`` comes from a learned q, so the likelihood built on it is a bound.
    ``continuous``: True where ``images`` are the data plus Gaussian noise, so the
    likelihood is the density of those noisy data (no bin volume, no discrete bound)."""

    images: Tensor
    log_q: Tensor
    exact: bool
    continuous: bool = False


class Dequantizer(nn.Module):
    """The contract: ``forward(clean, bin_width, noise) -> Dequantized``, with ``clean``
    the bin centres in model space, ``bin_width`` = 2**-n_bits and ``noise`` uniform
    [0, 1) of ``clean``'s shape (None: drawn here). ``in_channels``: the channel count it
    was built for (None: any). A subclass takes ``in_channels`` as its first argument:
    a YAML's ``class_path`` names the class, the model passes the channel count."""

    exact: bool = True
    continuous: bool = False  # see Dequantized.continuous
    noise_std: float | None = None  # the Gaussian noise's std where continuous (denoising's sigma)
    denoise_samples: bool = False  # the model's samples are denoised (FlowModel.finish_samples)
    in_channels: int | None = None

    def forward(self, clean: Tensor, bin_width: float, noise: Tensor | None = None) -> Dequantized:
        raise NotImplementedError(f"{type(self).__name__} must implement forward")


class UniformDequantizer(Dequantizer):
    """u ~ U[0, 1)^D: log q(u | x) = 0 (Glow, seed 004 sec. 3).

    ``training_noise_std``: while training (``self.training``), also add Gaussian noise
    of this std in model space (seed 001 App. G: 5e-3). It smooths the training data
    only; evaluation leaves it out, so the likelihood there bounds the discrete data."""

    def __init__(self, in_channels: int | None = None, training_noise_std: float = 0.0) -> None:
        super().__init__()
        self.in_channels = in_channels
        if not training_noise_std >= 0:
            raise ValueError(f"training_noise_std must be >= 0, got {training_noise_std}")
        self.training_noise_std = float(training_noise_std)

    def forward(self, clean: Tensor, bin_width: float, noise: Tensor | None = None) -> Dequantized:
        noise = torch.rand_like(clean) if noise is None else noise.to(clean)
        images = clean + (noise - 0.5) * bin_width
        if self.training and self.training_noise_std:
            images = images + self.training_noise_std * torch.randn_like(images)
        return Dequantized(images, zero_logdet(clean), True)

    def extra_repr(self) -> str:
        return f"training_noise_std={self.training_noise_std}" if self.training_noise_std else ""


def standard_normal_from_uniform(noise: Tensor) -> Tensor:
    """N(0, 1) draws from uniform [0, 1) ones (the inverse CDF), so the evaluation's
    per-image uniform noise fixes a Gaussian dequantizer's draws as well."""
    u = noise.clamp(NOISE_MARGIN, 1.0 - NOISE_MARGIN)
    return math.sqrt(2.0) * torch.erfinv(2.0 * u - 1.0)


class GaussianNoiseDequantizer(Dequantizer):
    """Noise augmentation (TarFlow, Zhai et al. 2024, sec. 2.3): train on
    ``y = c + noise_std * eps``, eps ~ N(0, I), the bin centres ``c`` plus Gaussian noise,
    in place of the uniform offset within the bin.

    The model's ``log p(y)`` is then the density of the noisy data: a continuous density
    on model space, not a bound on the likelihood of the discrete images. It is logged as
    ``noisy_data_nll_bits_R`` (``-log p(y) / (D log 2)``, bits per dim of that density,
    negative for sharp ones) and never as ``bpd_R``; for the discrete data's bits per
    dim, train with the uniform dequantizer. Samples of such a model are noisy by
    construction: with ``denoise_samples`` (default) the model's ``sample`` hands them
    out denoised by Tweedie's formula (:meth:`~flows.model.FlowModel.denoise`), and so do
    the sample grids and FID, which draw through it; ``denoise_samples: false`` keeps
    them raw.

    ``noise_std`` is in model space ([-0.5, 0.5], ``flows/quantization.py``): half of
    the paper's value, whose images are in [-1, 1] (AFHQ 256: 0.07 there, 0.035 here).
    Evaluation passes its per-image uniform noise, turned Gaussian by the inverse CDF."""

    continuous = True

    def __init__(self, in_channels: int | None = None, noise_std: float = 0.025, denoise_samples: bool = True) -> None:
        super().__init__()
        if not noise_std > 0:
            raise ValueError(f"noise_std must be > 0 (the std of the Gaussian noise in model space), got {noise_std}; "
                             "for no noise use the UniformDequantizer")
        self.in_channels = in_channels
        self.noise_std = float(noise_std)
        self.denoise_samples = bool(denoise_samples)

    def forward(self, clean: Tensor, bin_width: float, noise: Tensor | None = None) -> Dequantized:
        eps = torch.randn_like(clean) if noise is None else standard_normal_from_uniform(noise.to(clean))
        return Dequantized(clean + self.noise_std * eps, zero_logdet(clean), True, continuous=True)

    def extra_repr(self) -> str:
        return f"noise_std={self.noise_std}, denoise_samples={self.denoise_samples}"


def _log_logistic(x: Tensor) -> Tensor:
    """log of the standard logistic density, which is sigmoid'(x)."""
    return F.logsigmoid(x) + F.logsigmoid(-x)


class VariationalDequantizer(Dequantizer):
    """Flow++'s variational dequantization: u = sigmoid(g(eps; x)), eps ~ Logistic(0, 1),
    g a conditional flow on the bin centres' features.

    Choices where Flow++ (its code: aravindsrinivas/flowpp) is not followed to the letter:

    * The base is a standard *logistic* rather than a Gaussian: sigmoid of a logistic
      variable is uniform, and g's couplings start as identities (zero-initialized last
      convolution), so q starts exactly as the uniform dequantizer (``log q = 0``) and the
      joint training starts from Glow's objective. eps is the logit of the caller's
      uniform noise, so evaluation noise works as for the uniform q.
    * g is ``steps`` pairs of (identity-initialized ActNorm, affine coupling with a
      checkerboard mask of alternating parity), conditioned through ``cond["features"]``
      on a 3-layer CNN of the bin centres; Flow++ uses mixture-of-logistics couplings and
      a deeper context net. Checkerboards work for any channel count (MNIST has one).

    Args:
        in_channels: channels of the images.
        hidden_channels: width of the coupling and context networks.
        steps: number of (ActNorm, coupling) pairs.
        context_channels: channels of the features the couplings are conditioned on.
    """

    exact = False

    def __init__(self, in_channels: int = 3, hidden_channels: int = 32, steps: int = 4,
                 context_channels: int = 16) -> None:
        super().__init__()
        if min(in_channels, hidden_channels, steps, context_channels) < 1:
            raise ValueError("VariationalDequantizer needs in_channels, hidden_channels, steps and "
                             f"context_channels >= 1, got {in_channels}, {hidden_channels}, {steps}, "
                             f"{context_channels}")
        self.in_channels = in_channels
        self.context = nn.Sequential(
            nn.Conv2d(in_channels, hidden_channels, 3, padding=1), nn.ReLU(),
            nn.Conv2d(hidden_channels, hidden_channels, 3, padding=1), nn.ReLU(),
            nn.Conv2d(hidden_channels, context_channels, 3, padding=1))
        layers = []
        for step in range(steps):
            layers += [ActNorm(in_channels, data_init=False),
                       AffineCoupling(in_channels, hidden_channels, context_channels, scale_fn="exp",
                                      mask=CheckerboardMask(1, step % 2))]
        self.flow = FlowSequential(*layers)

    def _condition(self, clean: Tensor) -> dict[str, Tensor]:
        if clean.shape[1] != self.in_channels:
            raise ValueError(f"VariationalDequantizer was built for {self.in_channels} channels, got images "
                             f"of {clean.shape[1]}; set its in_channels to the data's channel count")
        return {FEATURES: self.context(clean * 2.0)}  # bin centres scaled to [-1, 1]

    def forward(self, clean: Tensor, bin_width: float, noise: Tensor | None = None) -> Dequantized:
        noise = torch.rand_like(clean) if noise is None else noise.to(clean)
        eps = torch.logit(noise.clamp(NOISE_MARGIN, 1.0 - NOISE_MARGIN))
        h, logdet = self.flow(eps, self._condition(clean))
        # q(u) = logistic(eps) / |d h / d eps| / sigmoid'(h)
        log_q = sum_except_batch(_log_logistic(eps)) - logdet - sum_except_batch(_log_logistic(h))
        return Dequantized(clean + (torch.sigmoid(h) - 0.5) * bin_width, log_q, False)

    def log_prob(self, u: Tensor, clean: Tensor) -> Tensor:
        """log q(u | x) of given offsets ``u`` in (0, 1)^D: the density that ``forward``
        samples from (the tests integrate it to one)."""
        h = torch.logit(u)
        eps, logdet = self.flow.inverse(h, self._condition(clean))
        return sum_except_batch(_log_logistic(eps)) + logdet - sum_except_batch(_log_logistic(h))

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, steps={len(self.flow) // 2}"



# (image channels) -> the dequantizer: how a model takes one as an argument, so a YAML
# names the class and its settings, not the channel count again.
DequantizerFactory = Callable[[int], Dequantizer]
