"""Activation normalization (Glow; seed 000 sec. 2.2.3.1, seed 004 sec. 2.1).

A layer of the flow steps (exported by ``flows.layers``) and a normalization inside the
coupling networks (``flows.nets``), so it sits below both: it needs only the contract."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from flows.base import Bijection, Condition, at_least_float32


class ActNorm(Bijection):
    """Per-channel affine map ``y = (x + bias) * exp(log_scale)``.

    Data-dependent initialization: the first forward pass in training mode sets
    ``bias`` and ``log_scale`` so that the output of that batch has zero mean and unit
    variance per channel. The ``initialized`` flag is a buffer, so a model loaded from a
    checkpoint never re-initializes; an explicit :meth:`initialize_from` lets callers
    (e.g. a DDP set-up that all-reduces statistics) run the initialization themselves.

    The flag is mirrored by a plain Python attribute, so that after the first training
    forward no step reads the buffer back to the host (a GPU step would wait on it at
    every ActNorm, and ``torch.compile`` would break its graph there). The mirror is read
    from the buffer once (the first training forward) and again whenever a state dict is
    loaded; every DDP rank initializes at the same first step (the statistics are
    all-reduced), so the ranks agree.

    ``data_init=False`` starts as the identity and never initializes from data (seed
    001's official code at resolution 1, ``Actnorm.initialize``): on 1x1 maps the
    statistics of a small first batch are those of a handful of numbers per channel, and
    with an init batch of 2 the scale can be ~1e12 (one channel whose two values nearly
    agree), which no later step recovers from.
    """

    def __init__(self, num_channels: int, eps: float = 1e-6, data_init: bool = True) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, num_channels, 1, 1))
        self.log_scale = nn.Parameter(torch.zeros(1, num_channels, 1, 1))
        # Identity start: marked initialized, so the flag (saved in checkpoints) means the
        # same for both kinds and a loaded model never re-initializes.
        self.register_buffer("initialized", torch.tensor(not data_init))
        self.eps = eps
        self._known_initialized = not data_init  # the host-side mirror of ``initialized``

    @torch.no_grad()
    def initialize_from(self, x: Tensor) -> None:
        """Under torch.distributed the first and second moments are averaged over all
        processes (equal batch sizes), so every rank gets the same parameters."""
        x = x.float()
        moments = torch.stack([x.mean(dim=(0, 2, 3)), (x * x).mean(dim=(0, 2, 3))])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(moments)
            moments /= torch.distributed.get_world_size()
        mean = moments[0].view(1, -1, 1, 1)
        std = (moments[1].view(1, -1, 1, 1) - mean * mean).clamp_min(0).sqrt()
        self.bias.copy_(-mean)
        self.log_scale.copy_(-torch.log(std + self.eps))
        self.initialized.fill_(True)
        self._known_initialized = True

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._known_initialized = None  # read from the loaded buffer at the next training forward

    def _logdet(self, x: Tensor) -> Tensor:
        height, width = x.shape[2], x.shape[3]
        per_sample = at_least_float32(self.log_scale).sum() * (height * width)
        return per_sample.expand(x.shape[0])

    def forward(self, x: Tensor, cond: Condition = None) -> tuple[Tensor, Tensor]:
        if self.training and not self._known_initialized:
            # Once per module (and per state-dict load): the only host read of the flag.
            self._known_initialized = bool(self.initialized)
            if not self._known_initialized:
                self.initialize_from(x)
        y = (x + self.bias) * torch.exp(self.log_scale)
        return y, self._logdet(x)

    def inverse(self, z: Tensor, cond: Condition = None) -> tuple[Tensor, Tensor]:
        x = z * torch.exp(-self.log_scale) - self.bias
        return x, -self._logdet(z)
