"""LightningModules of the model families, sharing one base (FlowModule)."""
from lightning_modules.base import FlowModule, LossOutput
from lightning_modules.glow_module import GlowModule

__all__ = ["FlowModule", "LossOutput", "GlowModule"]
