"""Image pyramids and quantization (seed 000 sec. 4.1; seed 004 sec. 3).

An image is brought to ``image_size`` once, then halved repeatedly with an
antialiased bicubic kernel and re-quantized to 8 bits at every step. Each level is
the deterministic downsample of the next finer one, which is what the cascade's exact
density (seed 000 sec. 3.1.1) needs: x_{i-1} = d(x_i).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def resize_uint8(image: Tensor, size: int | tuple[int, int]) -> Tensor:
    """Antialiased bicubic resize of a uint8 image ([C,H,W] or [B,C,H,W]), rounded and
    clamped back to uint8."""
    if isinstance(size, int):
        size = (size, size)
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    batched = image.dim() == 4
    x = image if batched else image.unsqueeze(0)
    x = F.interpolate(x.float(), size=size, mode="bicubic", antialias=True, align_corners=False)
    x = x.round_().clamp_(0, 255).to(torch.uint8)
    return x if batched else x.squeeze(0)


def check_resolutions(image_size: int, resolutions: list[int]) -> list[int]:
    resolutions = sorted(set(int(r) for r in resolutions), reverse=True)
    for r in resolutions:
        ratio = image_size / r
        if r > image_size or ratio != 2 ** round(math.log2(ratio)):
            raise ValueError(
                f"resolution {r} is not image_size {image_size} divided by a power of two; "
                f"valid ones are {[image_size // 2 ** k for k in range(int(math.log2(image_size)) + 1)]}")
    return resolutions


class ImagePyramid:
    """uint8 image at ``image_size`` -> {resolution: uint8 image} for the requested
    resolutions (each a power-of-two fraction of ``image_size``)."""

    def __init__(self, image_size: int, resolutions: list[int]) -> None:
        self.image_size = image_size
        self.resolutions = check_resolutions(image_size, resolutions)

    def __call__(self, image: Tensor) -> dict[int, Tensor]:
        if tuple(image.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(f"pyramid expects {self.image_size}x{self.image_size} images, "
                             f"got {tuple(image.shape[-2:])}")
        pyramid, current = {}, image
        size = self.image_size
        while size >= self.resolutions[-1]:
            if size in self.resolutions:
                pyramid[size] = current
            size //= 2
            if size >= self.resolutions[-1]:
                current = resize_uint8(current, size)
        return pyramid


def dequantize(image: Tensor, n_bits: int = 8, noise: bool | Tensor = True) -> Tensor:
    """uint8 -> float in [-0.5, 0.5]: reduce to ``n_bits``, add uniform noise over one
    bin (seed 004 sec. 3; Glow's preprocessing), scale by 2**n_bits. ``noise`` may be
    the uniform [0, 1) noise itself (evaluation draws it per sample, see
    :func:`per_sample_uniform`), True to draw it here, or False for bin centres."""
    if not 1 <= n_bits <= 8:
        raise ValueError(f"n_bits must be in [1, 8], got {n_bits}")
    bins = 2 ** n_bits
    x = torch.div(image.to(torch.int32), 2 ** (8 - n_bits), rounding_mode="floor").float()
    if isinstance(noise, Tensor):
        x = x + noise.to(x.device, x.dtype)
    elif noise:
        x = x + torch.rand_like(x)
    else:
        x = x + 0.5
    return x / bins - 0.5


def quantize(x: Tensor, n_bits: int = 8) -> Tensor:
    """Float in [-0.5, 0.5] (model space) -> uint8 image for display."""
    bins = 2 ** n_bits
    levels = torch.floor((x.float() + 0.5) * bins).clamp(0, bins - 1)
    step = 256 // bins
    return (levels * step + step // 2).to(torch.uint8)  # the centre of each 8-bit bin


def bits_per_dim(log_prob: Tensor, dims: int, n_bits: int = 8) -> Tensor:
    """Glow's bits per dimension of a continuous density on data scaled to a unit-wide
    box with bins of width 2**-n_bits: (-log p(x) + D log 2**n_bits) / (D log 2)."""
    return (-log_prob + dims * n_bits * math.log(2.0)) / (dims * math.log(2.0))


def per_sample_uniform(shape: tuple[int, ...], indices: Tensor, seed: int) -> Tensor:
    """Uniform [0, 1) noise of ``shape`` ([B, ...]) whose row i depends only on
    (seed, indices[i]): evaluation figures then depend on the data and the model alone,
    not on batch size, order or the number of processes."""
    rows = []
    for index in indices.tolist():
        generator = torch.Generator().manual_seed(seed * 1_000_003 + int(index))
        rows.append(torch.rand(shape[1:], generator=generator))
    return torch.stack(rows)
