"""Networks used inside flow layers. None of these need to be invertible."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flows.actnorm import ActNorm


def edge_indicator(height: int, width: int, pad: int, like: Tensor) -> Tensor:
    """[1, 1, H + 2 pad, W + 2 pad]: 1 on the zero padding, 0 on the image."""
    indicator = torch.ones(1, 1, height + 2 * pad, width + 2 * pad, device=like.device, dtype=like.dtype)
    indicator[:, :, pad:pad + height, pad:pad + width] = 0
    return indicator


class EdgePadding(nn.Module):
    """Zero padding plus an indicator channel that is 1 on the padded border (openai/glow's
    ``edge_bias``): a convolution can then tell an image edge from a dark pixel, which
    plain zero padding hides. Adds one input channel to the convolution that follows."""

    def __init__(self, pad: int) -> None:
        super().__init__()
        self.pad = pad

    def forward(self, x: Tensor) -> Tensor:
        padded = F.pad(x, (self.pad,) * 4)
        indicator = edge_indicator(x.shape[2], x.shape[3], self.pad, x).expand(x.shape[0], -1, -1, -1)
        return torch.cat([padded, indicator], dim=1)


def same_conv2d(in_channels: int, out_channels: int, kernel_size: int, edge_padding: bool = False,
                bias: bool = True) -> nn.Module:
    """A size-preserving convolution, with zero padding or with edge-indicator padding."""
    if not edge_padding or kernel_size == 1:
        return nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=bias)
    return nn.Sequential(EdgePadding(kernel_size // 2), nn.Conv2d(in_channels + 1, out_channels, kernel_size,
                                                                   bias=bias))


def _conv_of(module: nn.Module) -> nn.Conv2d:
    return module if isinstance(module, nn.Conv2d) else module[-1]


class ZeroConv2d(nn.Module):
    """Convolution whose weights, bias and output log-scale start at zero (Glow's
    ``conv2d_zeros``), so couplings and priors start as identity / standard normal."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3,
                 log_scale_factor: float = 3.0, edge_padding: bool = False,
                 lr_multiplier: float | None = None) -> None:
        super().__init__()
        if lr_multiplier is not None:
            # Equalized learning rate (EqualizedConv2d, zero start): the same parameter
            # names, so the state dict keys do not depend on the option.
            if edge_padding:
                raise ValueError("ZeroConv2d: edge_padding is not available with an equalized learning rate")
            self.conv = EqualizedConv2d(in_channels, out_channels, kernel_size, lr_multiplier, gain=1.0,
                                        zero_init=True)
        else:
            self.conv = same_conv2d(in_channels, out_channels, kernel_size, edge_padding)
            nn.init.zeros_(_conv_of(self.conv).weight)
            nn.init.zeros_(_conv_of(self.conv).bias)
        self.log_scale = nn.Parameter(torch.zeros(1, out_channels, 1, 1))
        self.log_scale_factor = log_scale_factor

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x) * torch.exp(self.log_scale * self.log_scale_factor)


class ActNormLayer(nn.Module):
    """ActNorm as a plain layer of a network (its output only), with the same
    data-dependent initialization on the first training batch."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.actnorm = ActNorm(channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.actnorm(x)[0]


class CouplingNet(nn.Module):
    """Glow's coupling network: conv3x3 - ReLU - conv1x1 - ReLU - zero-init conv3x3
    (seed 004 sec. 2.1; seed 000 sec. 4.3.1 uses 512 hidden channels for Glow, 64 for
    SRFlow).

    Options from openai/glow's code (``model.py``: ``conv2d`` with ``do_actnorm`` and
    ``edge_bias``), measured in ``benchmarks/learning_curves.py``:

    * ``actnorm``: the two hidden convolutions are followed by ActNorm (data-dependent
      initialization) instead of a bias, so the hidden activations start at unit scale
      whatever the input's scale;
    * ``edge_padding``: the 3x3 convolutions pad with zeros plus an edge-indicator channel
      (:class:`EdgePadding`).
    """

    def __init__(self, in_channels: int, out_channels: int, hidden_channels: int, actnorm: bool = False,
                 edge_padding: bool = False) -> None:
        super().__init__()
        self.actnorm = actnorm
        self.edge_padding = edge_padding
        first = same_conv2d(in_channels, hidden_channels, 3, edge_padding, bias=not actnorm)
        second = nn.Conv2d(hidden_channels, hidden_channels, 1, bias=not actnorm)
        layers = [first, *([ActNormLayer(hidden_channels)] if actnorm else []), nn.ReLU(inplace=True),
                  second, *([ActNormLayer(hidden_channels)] if actnorm else []), nn.ReLU(inplace=True),
                  ZeroConv2d(hidden_channels, out_channels, 3, edge_padding=edge_padding)]
        self.layers = nn.Sequential(*layers)
        # Small random first layers as in Glow (std 0.05); the zero last layer makes
        # the coupling start as a fixed, well-conditioned map.
        for conv in (_conv_of(first), second):
            nn.init.normal_(conv.weight, std=0.05)
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class _ResidualBlock(nn.Module):
    """``x + conv(ReLU(conv(ReLU(norm(x)))))``; the second conv starts at zero, so the
    block starts as the identity (as the near-zero last layer of nflows'
    ConvResidualBlock, or the zero-initialized residual branches of Goyal et al. 2017)."""

    def __init__(self, channels: int, norm_groups: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(math.gcd(norm_groups, channels), channels) if norm_groups else nn.Identity()
        self.first = nn.Conv2d(channels, channels, 3, padding=1)
        self.second = nn.Conv2d(channels, channels, 3, padding=1)
        nn.init.zeros_(self.second.weight)
        nn.init.zeros_(self.second.bias)

    def forward(self, x: Tensor) -> Tensor:
        h = self.first(F.relu(self.norm(x)))
        return x + self.second(F.relu(h))


class ResNetCouplingNet(nn.Module):
    """The residual coupling network of Neural Spline Flows (Durkan et al. 2019, the
    "nflow" ResNet of seed 003 Table 5.1: 2 blocks for MNIST, 3 for CIFAR-10 and
    CelebA): conv3x3 -> ``num_blocks`` x (norm, ReLU, conv3x3, ReLU, conv3x3, + skip)
    -> ReLU -> zero-initialized conv3x3.

    A :data:`~flows.layers.coupling.NetFactory`: ``(in, out, hidden)`` come from the
    coupling, ``num_blocks`` and ``norm_groups`` from YAML
    (``coupling_net: {class_path: flows.nets.ResNetCouplingNet, init_args: {num_blocks: 3}}``).

    Normalization: GroupNorm (``gcd(norm_groups, hidden)`` groups; 0 turns it off).
    NSF's code offers BatchNorm, whose batch statistics would make a coupling's
    output depend on the rest of the batch and on train/eval mode (so the log-det of
    a training batch would not be that of the per-sample map we invert); GroupNorm
    normalizes each sample by itself, so every coupling stays a per-sample bijection,
    and still keeps the residual stack of a deep flow (48-80 couplings) well scaled.
    It sits inside the residual branch only, so the skip path keeps the input's scale.
    """

    def __init__(self, in_channels: int, out_channels: int, hidden_channels: int, num_blocks: int = 2,
                 norm_groups: int = 32) -> None:
        super().__init__()
        if num_blocks < 0 or norm_groups < 0:
            raise ValueError(f"ResNetCouplingNet needs num_blocks >= 0 and norm_groups >= 0, got "
                             f"{num_blocks}, {norm_groups}")
        self.first = nn.Conv2d(in_channels, hidden_channels, 3, padding=1)
        self.blocks = nn.Sequential(*(_ResidualBlock(hidden_channels, norm_groups) for _ in range(num_blocks)))
        self.out = ZeroConv2d(hidden_channels, out_channels, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(F.relu(self.blocks(self.first(x))))


class ResidualDenseBlock(nn.Module):
    """Five densely connected 3x3 convs with a scaled residual (ESRGAN's RDB)."""

    def __init__(self, num_features: int, growth: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv2d(num_features + i * growth, growth if i < 4 else num_features, 3, padding=1)
            for i in range(5))
        for conv in self.convs:
            # ESRGAN's initialization: Kaiming scaled by 0.1 keeps the deep residual
            # trunk close to identity at the start.
            nn.init.kaiming_normal_(conv.weight, a=0.0, mode="fan_in")
            conv.weight.data.mul_(0.1)
            nn.init.zeros_(conv.bias)

    def forward(self, x: Tensor) -> Tensor:
        features = [x]
        for conv in self.convs[:-1]:
            features.append(F.leaky_relu(conv(torch.cat(features, dim=1)), 0.2))
        return x + 0.2 * self.convs[-1](torch.cat(features, dim=1))


class RRDB(nn.Module):
    """Residual-in-residual dense block: three RDBs and a scaled outer residual."""

    def __init__(self, num_features: int, growth: int) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*(ResidualDenseBlock(num_features, growth) for _ in range(3)))

    def forward(self, x: Tensor) -> Tensor:
        return x + 0.2 * self.blocks(x)


class RRDBEncoder(nn.Module):
    """The RRDB network that turns a low-resolution image into SRFlow's conditioning
    features (seed 000 sec. 2.2.4.1 and 4.3.1: the standard 23-block RRDB).

    ``features(lowres)`` concatenates the outputs of the blocks listed in
    ``feature_blocks`` and the trunk output, at the low resolution (SRFlow's choice of
    intermediate features). ``forward(lowres)`` is the 2x super-resolution head used for the
    L1 pre-training: ESRGAN's nearest-upsample + convs, added to the bicubic upsample
    of the input so an untrained encoder starts at bicubic quality.
    """

    def __init__(self, in_channels: int = 3, num_features: int = 64, num_blocks: int = 23,
                 growth: int = 32, feature_blocks: list[int] | None = None) -> None:
        super().__init__()
        if num_blocks < 1:
            raise ValueError("the RRDB encoder needs num_blocks >= 1")
        if feature_blocks is None:
            # SRFlow taps blocks 1, 8, 15 and 22 of 23: four taps spread evenly from the
            # second block to the last, for any trunk length.
            feature_blocks = [min(num_blocks - 1, round(1 + i * (num_blocks - 2) / 3))
                              for i in range(4)]
        bad = [b for b in feature_blocks if not 0 <= b < num_blocks]
        if bad:
            raise ValueError(f"feature_blocks {bad} are outside the trunk's blocks 0..{num_blocks - 1}")
        self.in_channels = in_channels
        self.feature_blocks = sorted(set(feature_blocks))
        self.out_channels = num_features * (len(self.feature_blocks) + 1)
        self.conv_first = nn.Conv2d(in_channels, num_features, 3, padding=1)
        self.trunk = nn.ModuleList(RRDB(num_features, growth) for _ in range(num_blocks))
        self.trunk_conv = nn.Conv2d(num_features, num_features, 3, padding=1)
        self.upsample_conv = nn.Conv2d(num_features, num_features, 3, padding=1)
        self.hr_conv = nn.Conv2d(num_features, num_features, 3, padding=1)
        self.conv_last = nn.Conv2d(num_features, in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_last.weight)
        nn.init.zeros_(self.conv_last.bias)

    def _trunk(self, lowres: Tensor) -> tuple[Tensor, list[Tensor]]:
        first = self.conv_first(lowres)
        h, tapped = first, []
        for index, block in enumerate(self.trunk):
            h = block(h)
            if index in self.feature_blocks:
                tapped.append(h)
        return first + self.trunk_conv(h), tapped

    def features(self, lowres: Tensor) -> Tensor:
        trunk, tapped = self._trunk(lowres)
        return torch.cat(tapped + [trunk], dim=1)

    def forward(self, lowres: Tensor) -> Tensor:
        trunk, _ = self._trunk(lowres)
        h = F.leaky_relu(self.upsample_conv(F.interpolate(trunk, scale_factor=2, mode="nearest")), 0.2)
        residual = self.conv_last(F.leaky_relu(self.hr_conv(h), 0.2))
        return F.interpolate(lowres, scale_factor=2, mode="bicubic", align_corners=False) + residual


# --- the hierarchical flow's networks (seed 001 App. E, Fig. 12) ----------------------------
LEAKY_SLOPE = 0.1  # seed 001 Table 4: LeakyReLU slope 0.1


def _blur_kernel(channels: int, like: Tensor) -> Tensor:
    """The [1, 3, 3, 1] / 8 binomial filter as a 2-D depthwise kernel (the official
    code's anti-aliasing filter): down- and upsampling without Glow's aliasing."""
    taps = torch.tensor([1.0, 3.0, 3.0, 1.0], dtype=like.dtype, device=like.device) / 8.0
    return (taps[:, None] * taps[None, :]).expand(channels, 1, 4, 4)


def blur_downsample(x: Tensor) -> Tensor:
    """Halve the resolution: low-pass with the binomial filter, then keep every second
    pixel. Maps of 4 pixels or fewer are average-pooled (too small to reflect-pad)."""
    if x.shape[-1] <= 4:
        return F.avg_pool2d(x, 2)
    channels = x.shape[1]
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), _blur_kernel(channels, x), stride=2, groups=channels)


def blur_upsample(x: Tensor) -> Tensor:
    """Double the resolution: zero-insertion then the binomial filter (gain 4). Maps of
    one pixel are repeated."""
    if x.shape[-1] < 2:
        return F.interpolate(x, scale_factor=2, mode="nearest")
    batch, channels, height, width = x.shape
    stuffed = x.new_zeros(batch, channels, 2 * height, 2 * width)
    stuffed[:, :, 1::2, 1::2] = x
    stuffed = F.pad(stuffed, (1, 2, 1, 2), mode="reflect")
    return F.conv2d(stuffed, 4.0 * _blur_kernel(channels, x), groups=channels)


class InstanceNorm(nn.Module):
    """Instance normalization without affine parameters; the identity on 1x1 maps,
    where there are no spatial statistics to take."""

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] * x.shape[-2] == 1:
            return x
        return F.instance_norm(x, eps=1e-5)


LEAKY_GAIN = math.sqrt(2.0 / (1.0 + LEAKY_SLOPE ** 2))  # He's gain for LeakyReLU(0.1)
TANH_GAIN = 5.0 / 3.0  # torch.nn.init.calculate_gain("tanh")


class EqualizedConv2d(nn.Module):
    """A size-preserving convolution with an equalized learning rate (Karras et al.
    2018; seed 001's official code, ``MyConv``/``MyLinear``): the weight is stored as
    ``N(0, 1) / lr_multiplier`` and used as ``weight * gain / sqrt(fan_in) * lr_multiplier``
    (He's constant applied at run time, not at initialization), the bias as
    ``bias * lr_multiplier``. The function at initialization is He-initialized, but an
    Adam step, which moves every stored entry by about ``lr``, changes each weight
    tensor by ``lr * lr_multiplier`` relative to its size whatever its fan-in: seed 001
    Table 2's learning rates were tuned for that (a plain ``nn.Conv2d`` with PyTorch's
    init, whose entries are ~1/sqrt(3 fan_in), moves 40-60x more per step). The
    official code uses ``lr_multiplier`` 10 for encoders and decoders, 1 elsewhere.

    Parameters are named ``weight`` and ``bias`` with ``nn.Conv2d``'s shapes, so a model
    has the same state-dict keys and parameter count with or without the option."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, lr_multiplier: float = 1.0,
                 gain: float = LEAKY_GAIN, zero_init: bool = False) -> None:
        super().__init__()
        if not lr_multiplier > 0:
            raise ValueError(f"lr_multiplier must be > 0, got {lr_multiplier}")
        shape = (out_channels, in_channels, kernel_size, kernel_size)
        self.weight = nn.Parameter(torch.zeros(shape) if zero_init else torch.randn(shape) / lr_multiplier)
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.weight_scale = gain / math.sqrt(in_channels * kernel_size * kernel_size) * lr_multiplier
        self.bias_scale = lr_multiplier
        self.lr_multiplier = lr_multiplier
        self.padding = kernel_size // 2

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight * self.weight_scale, self.bias * self.bias_scale, padding=self.padding)

    def extra_repr(self) -> str:
        out, inp, k, _ = self.weight.shape
        return f"{inp}, {out}, kernel_size={k}, lr_multiplier={self.lr_multiplier}"


def conv(in_channels: int, out_channels: int, kernel_size: int = 3, lr_multiplier: float | None = None,
         gain: float = LEAKY_GAIN) -> nn.Module:
    """A size-preserving convolution: ``nn.Conv2d`` (PyTorch's init) when ``lr_multiplier``
    is None, else an :class:`EqualizedConv2d` for the nonlinearity's ``gain``."""
    if lr_multiplier is None:
        return nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
    return EqualizedConv2d(in_channels, out_channels, kernel_size, lr_multiplier, gain)


def _leaky(x: Tensor) -> Tensor:
    return F.leaky_relu(x, LEAKY_SLOPE)


class ConvCouplingNet(nn.Module):
    """The coupling network of channel splits (seed 001 App. E): ``num_convs`` convs, the
    first with tanh and instance norm after it, the others LeakyReLU, then a
    zero-initialized output conv. ``kernel_size`` 1 at 1x1 resolution; ``lr_multiplier``
    (not None) makes every conv an :class:`EqualizedConv2d`."""

    def __init__(self, in_channels: int, out_channels: int, hidden_channels: int, num_convs: int = 4,
                 kernel_size: int = 3, lr_multiplier: float | None = None) -> None:
        super().__init__()
        if num_convs < 1:
            raise ValueError(f"a coupling network needs num_convs >= 1, got {num_convs}")
        self.first = conv(in_channels, hidden_channels, kernel_size, lr_multiplier, TANH_GAIN)
        self.norm = InstanceNorm()
        self.hidden = nn.ModuleList(conv(hidden_channels, hidden_channels, kernel_size, lr_multiplier)
                                    for _ in range(num_convs - 1))
        self.out = ZeroConv2d(hidden_channels, out_channels, 1, lr_multiplier=lr_multiplier)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(torch.tanh(self.first(x)))
        for layer in self.hidden:
            h = _leaky(layer(h))
        return self.out(h)


class UNet(nn.Module):
    """A U-Net on ``channels`` features with ``depth`` halvings (anti-aliased), two
    LeakyReLU convs and instance norm per level, skips added and scaled by 1/sqrt(2)
    so the variance does not grow with depth."""

    def __init__(self, channels: int, depth: int, lr_multiplier: float | None = None) -> None:
        super().__init__()
        self.depth = depth
        self.down = nn.ModuleList(nn.ModuleList([conv(channels, channels, 3, lr_multiplier),
                                                 conv(channels, channels, 3, lr_multiplier)])
                                  for _ in range(depth))
        self.up = nn.ModuleList(conv(channels, channels, 3, lr_multiplier) for _ in range(depth))
        self.norm = InstanceNorm()

    def forward(self, x: Tensor) -> Tensor:
        skips, h = [], x
        for first, second in self.down:
            skips.append(h)
            h = self.norm(_leaky(first(blur_downsample(h))))
            h = _leaky(second(h))
        for layer, skip in zip(self.up, reversed(skips)):
            h = (_leaky(layer(blur_upsample(h))) + skip) / math.sqrt(2.0)
        return h


def unet_depth(resolution: int, max_depth: int = 4) -> int:
    """Halvings a U-Net at ``resolution`` can take while keeping maps of >= 4 pixels."""
    return max(0, min(max_depth, int(math.log2(max(resolution, 1))) - 2))


class UNetCouplingNet(nn.Module):
    """The coupling network of checkerboard splits and of the condition-only couplings
    (seed 001 sec. 2.2 "U-Nets in normalizing flows", App. E): a tanh input conv, a
    U-Net of ``depth`` levels, a zero-initialized output conv."""

    def __init__(self, in_channels: int, out_channels: int, hidden_channels: int, depth: int = 2,
                 lr_multiplier: float | None = None) -> None:
        super().__init__()
        self.first = conv(in_channels, hidden_channels, 3, lr_multiplier, TANH_GAIN)
        self.unet = UNet(hidden_channels, depth, lr_multiplier)
        self.out = ZeroConv2d(hidden_channels, out_channels, 3, lr_multiplier=lr_multiplier)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.unet(torch.tanh(self.first(x))))
