"""Networks used inside flow layers. None of these need to be invertible."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ZeroConv2d(nn.Module):
    """Convolution whose weights, bias and output log-scale start at zero (Glow's
    ``conv2d_zeros``), so couplings and priors start as identity / standard normal."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3,
                 log_scale_factor: float = 3.0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)
        self.log_scale = nn.Parameter(torch.zeros(1, out_channels, 1, 1))
        self.log_scale_factor = log_scale_factor

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x) * torch.exp(self.log_scale * self.log_scale_factor)


class CouplingNet(nn.Module):
    """Glow's coupling network: conv3x3 - ReLU - conv1x1 - ReLU - zero-init conv3x3
    (seed 004 sec. 2.1; seed 000 sec. 4.3.1 uses 512 hidden channels for Glow, 64 for
    SRFlow)."""

    def __init__(self, in_channels: int, out_channels: int, hidden_channels: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(in_channels, hidden_channels, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden_channels, hidden_channels, 1),
            nn.ReLU(inplace=True),
            ZeroConv2d(hidden_channels, out_channels, 3),
        )
        # Small random first layers as in Glow (std 0.05); the zero last layer makes
        # the coupling start as a fixed, well-conditioned map.
        for module in self.layers:
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, std=0.05)
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


def resize_features(features: Tensor, size: tuple[int, int]) -> Tensor:
    """Bring conditioning features to a layer's spatial size (no-op when equal)."""
    if tuple(features.shape[-2:]) == tuple(size):
        return features
    return F.interpolate(features, size=size, mode="bilinear", align_corners=False)
