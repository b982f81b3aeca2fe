"""LightningModules of the model families, sharing one base (FlowModule)."""
from lightning_modules.base import FlowModule, LossOutput
from lightning_modules.cascade_module import CascadeModule, GlowLevel, SRFlowLevel
from lightning_modules.glow_module import GlowModule
from lightning_modules.metrics import FIDSettings
from lightning_modules.rrdb_module import RRDBPretrainModule

__all__ = ["FlowModule", "LossOutput", "GlowModule", "CascadeModule", "GlowLevel", "SRFlowLevel",
           "FIDSettings", "RRDBPretrainModule"]
