"""Glow as a LightningModule (seed 000 sec. 4.3; seed 004), and the density module of
every single model that needs no parts of its own."""
from __future__ import annotations

from flows.model import FlowModel
from lightning_modules.base import FlowModule
from lightning_modules.parts import OptimizerSettings


class GlowModule(FlowModule):
    """Unconditional or class-conditional Glow at one resolution, every model built on
    it (NSF, RealNVP), and any other :class:`~flows.model.FlowModel` of one image size
    that trains as one part. Its loss is the model's ``training_loss``: for Glow bits per
    dim through the model's dequantizer, plus lambda_c times GlowCC's class term.

    Args:
        flow: the model, e.g. a Glow (``class_path: flows.Glow`` with its ``init_args``; seed 000
            sec. 4.3.1: L=3, K=32, 512 hidden channels). Its ``image_size`` is the
            pyramid resolution it models, ``num_classes > 0`` makes it GlowCC.
        optimizer: Adamax settings (seed 000 sec. 4.3.2 defaults).
        class_loss_weight: lambda_c of the class-logits cross-entropy (seed 000 sec. 4.3.1).
        grad_clip_relative: 2.0 by default: Glow learns faster and with fewer loss spikes
            clipped at twice its running gradient norm (``benchmarks/learning_curves.py``).
    The remaining args are :class:`FlowModule`'s.
    """

    def __init__(self, *, flow: FlowModel, optimizer: OptimizerSettings | None = None,
                 class_loss_weight: float = 0.01, grad_clip_relative: float | None = 2.0, **training) -> None:
        super().__init__(grad_clip_relative=grad_clip_relative, **training)
        self.save_config()
        self.model = flow
        self.optimizer_settings = optimizer or OptimizerSettings()
        self.loss_weights = {"class_bits": class_loss_weight}
        self.load_parts()
