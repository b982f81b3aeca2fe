"""Gaussian priors of the multi-scale flows.

* :class:`TopPrior`: the prior of the last level's latent. Learned per-channel mean and
  log-std (Glow's ``learntop``: a zero-init conv on a zero input, seed 004 sec. 2.3),
  optionally plus a class-dependent term: one-hot -> linear -> (mean, log-std)
  (Glow's ``ycond``; seed 000 sec. 4.3.1), and plus a zero-init conv on condition
  features (SRFlow: the top latent's prior also depends on the low-resolution image).
* :class:`SplitPrior`: the prior of a split-off half, a Gaussian whose mean and log-std
  come from a zero-init 3x3 conv on the kept half (seed 004 sec. 2.3), optionally also
  on condition features (SRFlow).

Log-probabilities are summed over every non-batch dimension and computed in float32.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flows.base import at_least_float32
from flows.layers.coupling import condition_features
from flows.nets import ZeroConv2d

LOG_2PI = math.log(2.0 * math.pi)


def gaussian_log_prob(z: Tensor, mean: Tensor, log_std: Tensor) -> Tensor:
    z, mean, log_std = at_least_float32(z), at_least_float32(mean), at_least_float32(log_std)
    normalized = (z - mean) * torch.exp(-log_std)
    return (-0.5 * (LOG_2PI + normalized ** 2) - log_std).flatten(1).sum(dim=1)


def gaussian_sample(mean: Tensor, log_std: Tensor, temperature: float) -> Tensor:
    """Reduced-temperature sampling: the prior's std is multiplied by ``temperature``
    (seed 000 sec. 4.4)."""
    return mean + temperature * torch.exp(log_std) * torch.randn_like(mean)


class TopPrior(nn.Module):
    def __init__(self, shape: tuple[int, int, int], learned: bool = True,
                 num_classes: int = 0, cond_channels: int = 0) -> None:
        super().__init__()
        channels = shape[0]
        self.shape = tuple(shape)
        self.num_classes = num_classes
        self.learned = learned
        self.cond_channels = cond_channels
        if cond_channels:
            self.cond_conv = ZeroConv2d(cond_channels, 2 * channels, 3)
        if learned:
            self.mean = nn.Parameter(torch.zeros(1, channels, 1, 1))
            self.log_std = nn.Parameter(torch.zeros(1, channels, 1, 1))
        if num_classes:
            self.class_embedding = nn.Linear(num_classes, 2 * channels)
            nn.init.zeros_(self.class_embedding.weight)
            nn.init.zeros_(self.class_embedding.bias)

    def params(self, batch_size: int, y: Tensor | None = None, device=None,
               cond=None) -> tuple[Tensor, Tensor]:
        if device is None:
            device = next(self.parameters(), torch.empty(0)).device
        mean = torch.zeros(batch_size, *self.shape, device=device)
        log_std = torch.zeros_like(mean)
        if self.learned:
            mean = mean + self.mean
            log_std = log_std + self.log_std
        if self.num_classes:
            if y is None:
                raise ValueError("this prior is class-conditional: pass labels y")
            if y.min() < 0 or y.max() >= self.num_classes:
                raise ValueError(f"labels must lie in [0, {self.num_classes}), got "
                                 f"[{int(y.min())}, {int(y.max())}]")
            onehot = F.one_hot(y.long(), self.num_classes).float()
            class_mean, class_log_std = self.class_embedding(onehot).chunk(2, dim=1)
            mean = mean + class_mean[:, :, None, None]
            log_std = log_std + class_log_std[:, :, None, None]
        if self.cond_channels:
            features = condition_features(cond, self.shape[1:])
            if features is None:
                raise ValueError("this top prior is conditional: pass cond (feature map)")
            out = at_least_float32(self.cond_conv(features))
            mean = mean + out[:, 0::2]
            log_std = log_std + out[:, 1::2]
        return mean, log_std

    def log_prob(self, z: Tensor, y: Tensor | None = None, cond=None) -> Tensor:
        mean, log_std = self.params(z.shape[0], y, z.device, cond)
        return gaussian_log_prob(z, mean, log_std)

    def sample(self, batch_size: int, temperature: float = 1.0, y: Tensor | None = None,
               device=None, cond=None) -> Tensor:
        mean, log_std = self.params(batch_size, y, device, cond)
        return gaussian_sample(mean, log_std, temperature)


class SplitPrior(nn.Module):
    def __init__(self, kept_channels: int, latent_channels: int, cond_channels: int = 0) -> None:
        super().__init__()
        self.cond_channels = cond_channels
        self.conv = ZeroConv2d(kept_channels + cond_channels, 2 * latent_channels, 3)

    def params(self, kept: Tensor, cond=None) -> tuple[Tensor, Tensor]:
        net_input = kept
        if self.cond_channels:
            features = condition_features(cond, kept.shape[-2:])
            if features is None:
                raise ValueError("this split prior is conditional: pass cond (feature map)")
            net_input = torch.cat([kept, features.to(kept.dtype)], dim=1)
        out = at_least_float32(self.conv(net_input))
        return out[:, 0::2], out[:, 1::2]

    def log_prob(self, latent: Tensor, kept: Tensor, cond=None) -> Tensor:
        mean, log_std = self.params(kept, cond)
        return gaussian_log_prob(latent, mean, log_std)

    def sample(self, kept: Tensor, temperature: float = 1.0, cond=None) -> Tensor:
        mean, log_std = self.params(kept, cond)
        return gaussian_sample(mean, log_std, temperature).to(kept.dtype)
