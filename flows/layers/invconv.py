"""Invertible 1x1 convolutions (Glow; seed 000 sec. 2.2.3.2, seed 004 sec. 2.1).

Precision: the inverse of the weight, and the slogdet of a full weight, are computed
in float64 whatever the input precision: they are the numerically fragile part of the
flow. The LU weight needs neither: its log-det is sum(log_s) and its product P L U is
computed in the parameters' precision (float32 or wider), which keeps tiny float64
kernels off the training step (on a GPU each is a launch, times every step of flow).

Cache: sampling, evaluation and FID push many batches through a model whose
parameters do not change. Without gradients, the weight, its inverse and log|det|
are cached and reused until a parameter changes (an optimizer step or a
``load_state_dict`` bumps the tensor's version counter, a ``.to()`` moves its
storage: either invalidates the cache). ``CACHE_FROZEN_WEIGHTS = False`` turns the
cache off (the benchmarks measure its effect that way).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flows.base import Bijection, Condition

CACHE_FROZEN_WEIGHTS = True


def random_rotation(num_channels: int, generator: torch.Generator | None = None) -> Tensor:
    matrix = torch.randn(num_channels, num_channels, generator=generator, dtype=torch.float64)
    q, _ = torch.linalg.qr(matrix)
    return q


class _InvertibleConv1x1Base(Bijection):
    def __init__(self) -> None:
        super().__init__()
        self._cache: dict = {}

    def weight_and_logabsdet(self) -> tuple[Tensor, Tensor]:
        """(W [C, C], log|det W| as a scalar), float32 or wider."""
        raise NotImplementedError

    def inverse_weight(self, matrix: Tensor) -> Tensor:
        # inv_ex: a diverged (non-finite or singular) weight gives non-finite samples,
        # which the callers count and report, instead of an exception mid-validation.
        return torch.linalg.inv_ex(matrix.double()).inverse

    def _state_key(self) -> tuple:
        return tuple((t.data_ptr(), t._version, t.dtype) for t in (*self.parameters(), *self.buffers()))

    def _frozen(self) -> bool:
        return not (torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()))

    def _weights(self, inverse: bool) -> tuple[Tensor, Tensor]:
        """(W or W^-1, log|det W|); from the cache when nothing can change them."""
        if torch.compiler.is_compiling():
            # Inside a compiled graph: computed in the graph (the cache's key, a data
            # pointer, is not traceable; the compiled graph is the cache).
            matrix, logabsdet = self.weight_and_logabsdet()
            return (self.inverse_weight(matrix) if inverse else matrix), logabsdet
        if not (CACHE_FROZEN_WEIGHTS and self._frozen()):
            self._cache.clear()
            matrix, logabsdet = self.weight_and_logabsdet()
            return (self.inverse_weight(matrix) if inverse else matrix), logabsdet
        key = self._state_key()
        if self._cache.get("key") != key:
            with torch.no_grad():
                matrix, logabsdet = self.weight_and_logabsdet()
            self._cache = {"key": key, "matrix": matrix, "logabsdet": logabsdet}
        if inverse and "inverse" not in self._cache:
            with torch.no_grad():
                self._cache["inverse"] = self.inverse_weight(self._cache["matrix"])
        return self._cache["inverse" if inverse else "matrix"], self._cache["logabsdet"]

    def _conv1x1(self, x: Tensor, matrix: Tensor) -> Tensor:
        # Under autocast conv2d would drop to low precision anyway; do the 1x1 conv in
        # the input's dtype with a weight cast once.
        weight = matrix.to(x.dtype)[:, :, None, None]
        return F.conv2d(x, weight)

    def _logdet(self, logabsdet: Tensor, like: Tensor) -> Tensor:
        pixels = like.shape[2] * like.shape[3]
        return (logabsdet * pixels).to(torch.promote_types(like.dtype, torch.float32)).expand(like.shape[0])

    def forward(self, x: Tensor, cond: Condition = None) -> tuple[Tensor, Tensor]:
        matrix, logabsdet = self._weights(inverse=False)
        return self._conv1x1(x, matrix), self._logdet(logabsdet, x)

    def inverse(self, z: Tensor, cond: Condition = None) -> tuple[Tensor, Tensor]:
        inverse_matrix, logabsdet = self._weights(inverse=True)
        return self._conv1x1(z, inverse_matrix), -self._logdet(logabsdet, z)


class InvertibleConv1x1(_InvertibleConv1x1Base):
    """Full c x c weight, initialized as a random rotation; slogdet in float64."""

    def __init__(self, num_channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(random_rotation(num_channels).float())

    def weight_and_logabsdet(self) -> tuple[Tensor, Tensor]:
        matrix = self.weight.double()
        return matrix, torch.linalg.slogdet(matrix).logabsdet


class InvertibleConv1x1LU(_InvertibleConv1x1Base):
    """LU-decomposed weight W = P L (U + diag(sign * exp(log_s))): log|det| = sum(log_s),
    all in the parameters' precision (no float64 on the training path)."""

    def __init__(self, num_channels: int) -> None:
        super().__init__()
        permutation, lower, upper = torch.linalg.lu(random_rotation(num_channels))
        diagonal = torch.diagonal(upper)
        self.register_buffer("permutation", permutation.float())
        self.register_buffer("sign_s", torch.sign(diagonal).float())
        # Unused since the masks became tril/triu; kept so earlier checkpoints still load.
        self.register_buffer("lower_mask", torch.tril(torch.ones(num_channels, num_channels), -1))
        self.lower = nn.Parameter(lower.float())
        self.upper = nn.Parameter(torch.triu(upper, 1).float())
        self.log_s = nn.Parameter(torch.log(diagonal.abs()).float())

    def weight_and_logabsdet(self) -> tuple[Tensor, Tensor]:
        lower = torch.tril(self.lower, -1) + torch.eye(self.lower.shape[0], dtype=self.lower.dtype,
                                                        device=self.lower.device)
        upper = torch.triu(self.upper, 1) + torch.diag(self.sign_s * torch.exp(self.log_s))
        matrix = self.permutation @ (lower @ upper)
        return matrix, self.log_s.sum()


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

    def inverse_weight(self, matrix: Tensor) -> Tensor:
        return matrix.T
