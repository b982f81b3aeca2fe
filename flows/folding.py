"""Inference-time folding: ActNorm followed by an invertible 1x1 convolution is one
affine 1x1 convolution, so a frozen model can run it as one kernel instead of an
elementwise pass plus a convolution (in both directions).

    ActNorm:   a = (x + b) * s            s = exp(log_scale)
    1x1 conv:  y = W a
    folded:    y = A x + c                A = W diag(s),  c = A b
    inverse:   x = A^-1 y - b             A^-1 = diag(1/s) W^-1
    log-det:   H W (log|det W| + sum(log s)) per sample

:func:`fold_for_inference` returns a folded *copy*; the model it is given keeps
training unchanged. The folded layers hold buffers, not parameters: a folded model is
for sampling and evaluation only (fold again after further training).
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flows.base import Bijection, Condition, FlowSequential
from flows.actnorm import ActNorm
from flows.layers.invconv import _InvertibleConv1x1Base


class AffineConv1x1(Bijection):
    """``y = A x + c`` per pixel with a precomputed inverse and log|det A|."""

    def __init__(self, matrix: Tensor, bias: Tensor, inverse_matrix: Tensor, inverse_bias: Tensor,
                 logabsdet: Tensor) -> None:
        super().__init__()
        self.register_buffer("matrix", matrix[:, :, None, None].clone())
        self.register_buffer("bias", bias.clone())
        self.register_buffer("inverse_matrix", inverse_matrix[:, :, None, None].clone())
        self.register_buffer("inverse_bias", inverse_bias.clone())
        self.register_buffer("logabsdet", logabsdet.clone())

    def _logdet(self, like: Tensor, sign: float) -> Tensor:
        per_sample = sign * self.logabsdet * (like.shape[2] * like.shape[3])
        return per_sample.to(torch.promote_types(like.dtype, torch.float32)).expand(like.shape[0])

    def forward(self, x: Tensor, cond: Condition = None) -> tuple[Tensor, Tensor]:
        return F.conv2d(x, self.matrix.to(x.dtype), self.bias.to(x.dtype)), self._logdet(x, 1.0)

    def inverse(self, z: Tensor, cond: Condition = None) -> tuple[Tensor, Tensor]:
        x = F.conv2d(z, self.inverse_matrix.to(z.dtype), self.inverse_bias.to(z.dtype))
        return x, self._logdet(z, -1.0)


@torch.no_grad()
def fold_actnorm_conv(actnorm: ActNorm, conv: _InvertibleConv1x1Base) -> AffineConv1x1:
    """The one affine 1x1 convolution equal to ``conv(actnorm(x))`` (float64 algebra,
    stored in the parameters' precision)."""
    dtype = actnorm.log_scale.dtype
    weight, logabsdet = (t.double() for t in conv.weight_and_logabsdet())
    log_scale = actnorm.log_scale.double().flatten()
    shift = actnorm.bias.double().flatten()
    matrix = weight * torch.exp(log_scale)[None, :]
    inverse_matrix = torch.exp(-log_scale)[:, None] * conv.inverse_weight(weight)
    return AffineConv1x1(matrix.to(dtype), (matrix @ shift).to(dtype), inverse_matrix.to(dtype),
                         (-shift).to(dtype), logabsdet + log_scale.sum())


def fold_for_inference(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode where every ActNorm directly followed by an
    invertible 1x1 convolution inside a composition is replaced by their fold."""
    folded = copy.deepcopy(model).eval()
    for module in folded.modules():
        if not isinstance(module, FlowSequential):
            continue
        layers, index = list(module.layers), 0
        merged: list[nn.Module] = []
        while index < len(layers):
            first = layers[index]
            second = layers[index + 1] if index + 1 < len(layers) else None
            if isinstance(first, ActNorm) and isinstance(second, _InvertibleConv1x1Base):
                merged.append(fold_actnorm_conv(first, second))
                index += 2
            else:
                merged.append(first)
                index += 1
        module.layers = nn.ModuleList(merged)
    for parameter in folded.parameters():
        parameter.requires_grad_(False)
    return folded
