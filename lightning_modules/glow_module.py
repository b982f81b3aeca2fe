"""Glow as a LightningModule (seed 000 sec. 4.3; seed 004)."""
from __future__ import annotations

import math


from flows.base import LABELS
from flows.glow import Glow
from flows.quantization import bits_per_dim
from lightning_modules.base import Batch, FlowModule, LossOutput
from lightning_modules.parts import OptimizerSettings


class GlowModule(FlowModule):
    """Unconditional or class-conditional Glow at one resolution.

    Args:
        flow: the Glow (``class_path: flows.Glow`` with its ``init_args``; seed 000
            sec. 4.3.1: L=3, K=32, 512 hidden channels). Its ``image_size`` is the
            pyramid resolution it models, ``num_classes > 0`` makes it GlowCC.
        optimizer: Adamax settings (seed 000 sec. 4.3.2 defaults).
        class_loss_weight: lambda_c of the class-logits cross-entropy (seed 000 sec. 4.3.1).
        grad_clip_relative: 2.0 by default: Glow learns faster and with fewer loss spikes
            clipped at twice its running gradient norm (``benchmarks/learning_curves.py``).
    The remaining args are :class:`FlowModule`'s.
    """

    def __init__(self, *, flow: Glow, optimizer: OptimizerSettings | None = None,
                 class_loss_weight: float = 0.01, grad_clip_relative: float | None = 2.0, **training) -> None:
        super().__init__(grad_clip_relative=grad_clip_relative, **training)
        self.save_config()
        self.model = flow
        self.optimizer_settings = optimizer or OptimizerSettings()
        self.class_loss_weight = class_loss_weight
        self.load_parts()

    def compute_losses(self, batch: Batch) -> LossOutput:
        encoding = self.model.encode(batch.images[self.resolution], {LABELS: batch.labels})
        log_prob = encoding.log_prob
        dims = self.model.dims
        # Minimize bits per dim (Glow's objective, in the unit users read).
        loss = bits_per_dim(log_prob, dims, self.n_bits).mean()
        extra = {}
        if self.model.num_classes:
            class_bits = self.model.class_loss(encoding, batch.labels) / math.log(2.0)
            loss = loss + self.class_loss_weight * class_bits.mean()
            accuracy = (encoding.class_logits.argmax(1) == batch.labels).float().mean()
            extra = {"class_bits": class_bits.mean(), "class_accuracy": accuracy}
        return LossOutput(loss, {self.resolution: log_prob}, {self.resolution: dims},
                          {self.resolution: encoding.exact}, extra)
