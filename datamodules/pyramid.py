"""Image pyramids (seed 000 sec. 4.1). Quantization and bits per dim live in
``flows/quantization.py``.

An image is brought to ``image_size`` once, then halved repeatedly with an
antialiased bicubic kernel and re-quantized to 8 bits at every step. Each resolution is
the deterministic downsample of the next finer one, which is what the cascade's factorized
likelihood (seed 000 sec. 3.1.1) needs: x_{i-1} = d(x_i).
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


def data_mismatch(datamodule, resolutions: list[int], channels: int, model: str,
                  num_classes: int = 0) -> str | None:
    """Why ``datamodule`` cannot feed a model of ``resolutions``, ``channels`` and
    ``num_classes`` (named ``model`` in the message), with the setting that fixes it; None
    when it can. A class-conditional model needs labelled data whose every label is one
    of its classes: a label equal to ``num_classes`` would otherwise be read as another
    class or as the null class of classifier-free guidance, silently."""
    missing = [r for r in resolutions if r not in datamodule.resolutions]
    if missing:
        fix = f"add {missing} to data.init_args.resolutions"
        image_size = getattr(getattr(datamodule, "pyramid", None), "image_size", None)
        try:  # a pyramid only halves its image_size: a larger resolution cannot be added
            check_resolutions(image_size, [*datamodule.resolutions, *missing])
        except (TypeError, ValueError):
            fix = (f"set data.init_args.image_size: {max(resolutions)} and data.init_args.resolutions: "
                   f"{sorted(resolutions, reverse=True)} (the data's image_size is {image_size}), or "
                   f"build the model for {image_size}-pixel images")
        return f"{model} models resolutions {resolutions} but the data module yields {datamodule.resolutions}; {fix}"
    if datamodule.channels != channels:
        return (f"the data have {datamodule.channels} channels but the model expects {channels}; "
                f"set in_channels: {datamodule.channels} in the model")
    data_classes = int(getattr(datamodule, "num_classes", 0) or 0)
    if num_classes and not data_classes:
        return (f"{model} is class-conditional (num_classes: {num_classes}) but {type(datamodule).__name__} "
                "yields no class labels; use labelled data (e.g. data.init_args.labels_from_subfolders: true for a "
                "folder of class folders) or set num_classes: 0 in the model")
    if num_classes and data_classes > num_classes:
        return (f"the data have {data_classes} classes (labels 0..{data_classes - 1}) but {model} models "
                f"num_classes: {num_classes}; set num_classes: {data_classes} in the model")
    return None


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
