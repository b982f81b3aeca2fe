"""Quantization in one place: how discrete images become the continuous data a flow
models, and how densities become bits (seed 004 sec. 3; seed 000 sec. 3.1.1).

Model space: an image with ``n_bits`` per channel has ``2**n_bits`` bins per dimension,
laid out over [-0.5, 0.5]; bin k covers [k, k + 1) / 2**n_bits - 0.5.

* :func:`dequantize`: uint8 -> a point in its bin (uniform noise, Glow's preprocessing),
  or the bin centre.
* :func:`snap_to_bins`: model space -> the centre of the bin it falls in.
* :func:`to_uint8`: model space -> displayable uint8 (the centre of each 8-bit bin).
* :func:`reduce_bits`: uint8 -> uint8 at the centres of ``n_bits`` bins (real images
  shown as a model of ``n_bits`` data shows its samples).
* :func:`bin_log_volume`: log of one bin's volume; a density over dequantized data
  times it is the probability of the bin (a lower bound, by Jensen, when the density
  is averaged over the dequantization noise).
* :func:`bits_per_dim`: Glow's bits per dimension of a density,
  ``(-log p(x) - log bin volume) / (D log 2)``.
* :func:`per_sample_uniform`: evaluation noise that depends on the image's dataset
  index only, so evaluation figures do not depend on batching or process count.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def check_n_bits(n_bits: int) -> int:
    if not 1 <= n_bits <= 8:
        raise ValueError(f"n_bits must be in [1, 8], got {n_bits}")
    return n_bits


def dequantize(image: Tensor, n_bits: int = 8, noise: bool | Tensor = True) -> Tensor:
    """uint8 -> float in [-0.5, 0.5]: reduce to ``n_bits``, add uniform noise over one
    bin, scale by 2**n_bits. ``noise`` may be the uniform [0, 1) noise itself (see
    :func:`per_sample_uniform`), True to draw it here, or False for bin centres."""
    bins = 2 ** check_n_bits(n_bits)
    x = torch.div(image.to(torch.int32), 2 ** (8 - n_bits), rounding_mode="floor").float()
    if isinstance(noise, Tensor):
        x = x + noise.to(x.device, x.dtype)
    elif noise:
        x = x + torch.rand_like(x)
    else:
        x = x + 0.5
    return x / bins - 0.5


def snap_to_bins(x: Tensor, n_bits: int) -> Tensor:
    """Model space -> the centre of the ``n_bits`` bin each value falls in. Non-finite
    values become mid-grey or saturate, so a failed sample shows as such instead of
    poisoning whatever reads it next."""
    bins = 2 ** check_n_bits(n_bits)
    x = torch.nan_to_num(x.float(), nan=0.0, posinf=0.5, neginf=-0.5)
    return (torch.floor((x + 0.5) * bins).clamp(0, bins - 1) + 0.5) / bins - 0.5


def to_uint8(x: Tensor, n_bits: int = 8) -> Tensor:
    """Model space -> uint8 image for display: the centre of each 8-bit bin."""
    bins = 2 ** check_n_bits(n_bits)
    levels = torch.floor((torch.nan_to_num(x.float(), nan=0.0) + 0.5) * bins).clamp(0, bins - 1)
    step = 256 // bins
    return (levels * step + step // 2).to(torch.uint8)


def reduce_bits(image: Tensor, n_bits: int) -> Tensor:
    """uint8 -> uint8 at the centre of its ``n_bits`` bin (identity for 8 bits)."""
    if check_n_bits(n_bits) == 8:
        return image
    step = 2 ** (8 - n_bits)
    return (torch.div(image, step, rounding_mode="floor") * step + step // 2).to(torch.uint8)


def bin_log_volume(dims: int, n_bits: int) -> float:
    """log volume of one bin of a ``dims``-dimensional image in model space."""
    return -dims * check_n_bits(n_bits) * math.log(2.0)


def bits_per_dim(log_prob: Tensor, dims: int, n_bits: int = 8) -> Tensor:
    """Glow's bits per dimension of a density on model space:
    (-log p(x) + D log 2**n_bits) / (D log 2) = -log P(bin) / (D log 2)."""
    return (-log_prob - bin_log_volume(dims, n_bits)) / (dims * math.log(2.0))


def noisy_data_bits(log_prob: Tensor, dims: int) -> Tensor:
    """Bits per dim of a continuous density on model space, -log p(y) / (D log 2): the
    figure of data with Gaussian noise added (noise augmentation), which have no bins.
    Not comparable with :func:`bits_per_dim` (it can be negative)."""
    return -log_prob / (dims * math.log(2.0))


def likelihood_figure(log_prob: Tensor, dims: int, n_bits: int, continuous: bool) -> Tensor:
    """Per sample, what a log-likelihood is reported as: bits per dim of the discrete data
    (:func:`bits_per_dim`), or for noisy data (``continuous``, noise augmentation) the bits
    per dim of their density (:func:`noisy_data_bits`)."""
    return noisy_data_bits(log_prob, dims) if continuous else bits_per_dim(log_prob, dims, n_bits)


def per_sample_uniform(shape: tuple[int, ...], indices: Tensor, seed: int) -> Tensor:
    """Uniform [0, 1) noise of ``shape`` ([B, ...]) whose row i depends only on
    (seed, indices[i])."""
    rows = []
    for index in indices.tolist():
        generator = torch.Generator().manual_seed(seed * 1_000_003 + int(index))
        rows.append(torch.rand(shape[1:], generator=generator))
    return torch.stack(rows)
