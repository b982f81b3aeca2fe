"""LightningModules of the model families, sharing one base (FlowModule), and the
callbacks any of them can use."""
from lightning_modules.analyses import (LatentInterpolation, LatentZeroing, NearestNeighbours, NoiseSweep,
                                        ResamplingMaps)
from lightning_modules.autoencoder_module import AutoencoderModule
from lightning_modules.averaging import EMAWeights
from lightning_modules.base import Batch, FlowModule, LossOutput
from lightning_modules.evaluation import RunSummary, TestMetrics, ValidationFID
from lightning_modules.exact_resume import ExactResume
from lightning_modules.sample_grids import SampleGrids
from lightning_modules.cascade_module import CascadeModule, GlowStage, SRFlowStage
from lightning_modules.diffusion_module import DiffusionFlowModule, PixelDiffusionModule
from lightning_modules.glow_module import GlowModule
from lightning_modules.hierarchical_module import HierarchicalModule
from lightning_modules.latent_module import LatentFlowModule
from lightning_modules.metrics import FIDSettings
from lightning_modules.model_checkpoint import ModelCheckpoint
from lightning_modules.mnist_classifier import LeNetFeatures, MNISTClassifierModule
from lightning_modules.parts import Freeze, OptimizerSettings, Part
from lightning_modules.rrdb_module import RRDBPretrainModule
from lightning_modules.signals import RunStopped, SignalCheckpoint

__all__ = ["Batch", "FlowModule", "LossOutput", "ExactResume", "RunSummary", "SampleGrids", "TestMetrics", "ValidationFID",
           "CascadeModule", "DiffusionFlowModule", "PixelDiffusionModule", "GlowStage", "SRFlowStage", "GlowModule",
           "HierarchicalModule", "FIDSettings", "Freeze", "OptimizerSettings", "Part", "RRDBPretrainModule",
           "LatentInterpolation", "LatentZeroing", "NearestNeighbours", "NoiseSweep", "ResamplingMaps", "LeNetFeatures",
           "MNISTClassifierModule", "ModelCheckpoint", "EMAWeights", "RunStopped", "SignalCheckpoint",
           "AutoencoderModule", "LatentFlowModule"]
