"""Invertible 1x1 convolutions (Glow; seed 000 sec. 2.2.3.2, seed 004 sec. 2.1).

The log-determinant and the inverse of the weight are computed in float64 whatever
the input precision: they are the numerically fragile part of the flow.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flows.base import Bijection, Condition


def random_rotation(num_channels: int, generator: torch.Generator | None = None) -> Tensor:
    matrix = torch.randn(num_channels, num_channels, generator=generator, dtype=torch.float64)
    q, _ = torch.linalg.qr(matrix)
    return q


class _InvertibleConv1x1Base(Bijection):
    def weight_and_logabsdet(self) -> tuple[Tensor, Tensor]:
        """(W as float64 [C, C], log|det W| as float64 scalar)."""
        raise NotImplementedError

    def _conv1x1(self, x: Tensor, matrix64: Tensor) -> Tensor:
        # Under autocast conv2d would drop to low precision anyway; do the 1x1 conv in
        # the input's dtype with a weight cast once.
        weight = matrix64.to(x.dtype)[:, :, None, None]
        return F.conv2d(x, weight)

    def forward(self, x: Tensor, cond: Condition = None) -> tuple[Tensor, Tensor]:
        matrix, logabsdet = self.weight_and_logabsdet()
        pixels = x.shape[2] * x.shape[3]
        logdet = (logabsdet * pixels).to(torch.promote_types(x.dtype, torch.float32)).expand(x.shape[0])
        return self._conv1x1(x, matrix), logdet

    def inverse(self, z: Tensor, cond: Condition = None) -> tuple[Tensor, Tensor]:
        matrix, logabsdet = self.weight_and_logabsdet()
        pixels = z.shape[2] * z.shape[3]
        logdet = (-logabsdet * pixels).to(torch.promote_types(z.dtype, torch.float32)).expand(z.shape[0])
        return self._conv1x1(z, torch.linalg.inv(matrix)), logdet


class InvertibleConv1x1(_InvertibleConv1x1Base):
    """Full c x c weight, initialized as a random rotation; slogdet in float64."""

    def __init__(self, num_channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(random_rotation(num_channels).float())

    def weight_and_logabsdet(self) -> tuple[Tensor, Tensor]:
        matrix = self.weight.double()
        return matrix, torch.linalg.slogdet(matrix).logabsdet


class InvertibleConv1x1LU(_InvertibleConv1x1Base):
    """LU-decomposed weight W = P L (U + diag(sign * exp(log_s))): log|det| = sum(log_s)."""

    def __init__(self, num_channels: int) -> None:
        super().__init__()
        permutation, lower, upper = torch.linalg.lu(random_rotation(num_channels))
        diagonal = torch.diagonal(upper)
        self.register_buffer("permutation", permutation.float())
        self.register_buffer("sign_s", torch.sign(diagonal).float())
        self.register_buffer("lower_mask", torch.tril(torch.ones(num_channels, num_channels), -1))
        self.lower = nn.Parameter(lower.float())
        self.upper = nn.Parameter(torch.triu(upper, 1).float())
        self.log_s = nn.Parameter(torch.log(diagonal.abs()).float())

    def weight_and_logabsdet(self) -> tuple[Tensor, Tensor]:
        eye = torch.eye(self.lower.shape[0], dtype=torch.float64, device=self.lower.device)
        lower = self.lower.double() * self.lower_mask.double() + eye
        upper = self.upper.double() * self.lower_mask.T.double()
        upper = upper + torch.diag(self.sign_s.double() * torch.exp(self.log_s.double()))
        matrix = self.permutation.double() @ lower @ upper
        return matrix, self.log_s.double().sum()


class OrthogonalConv1x1(_InvertibleConv1x1Base):
    """Orthogonal ("unitary", seed 001 Table 4) weight W = exp(A - A^T): a rotation for
    any A, so log|det W| = 0 and the inverse is W^T. The hierarchical flow uses it at
    resolution 1, where a free-form matrix over hundreds of channels would let the
    flow's log-det drift (the official code's ``UnitaryPermute``). Starts at a random
    rotation."""

    def __init__(self, num_channels: int, init_scale: float = 1.0) -> None:
        super().__init__()
        self.generator = nn.Parameter(init_scale * torch.randn(num_channels, num_channels))

    def weight_and_logabsdet(self) -> tuple[Tensor, Tensor]:
        a = self.generator.double()
        matrix = torch.linalg.matrix_exp(a - a.T)
        return matrix, torch.zeros((), dtype=torch.float64, device=matrix.device)

    def inverse(self, z: Tensor, cond: Condition = None) -> tuple[Tensor, Tensor]:
        matrix, _ = self.weight_and_logabsdet()
        return self._conv1x1(z, matrix.T), torch.zeros(z.shape[0], device=z.device,
                                                      dtype=torch.promote_types(z.dtype, torch.float32))
