"""Invertible layers and flow models in pure PyTorch (no Lightning imports)."""
from flows.base import FEATURES, GUIDANCE, LABELS, LOWRES, NULL_LABEL, Bijection, FlowSequential
from flows.cascade import Cascade
from flows.diffusion import DiffusionPrior, PixelDiffusion
from flows.distributions import GaussianPrior, GaussianSplitPrior, LatentPrior
from flows.glow import Glow
from flows.hierarchical import HierarchicalFlow, Level
from flows.model import Encoding, FlowModel
from flows.srflow import SRFlow
from flows.tarflow import TarFlow

__all__ = ["FEATURES", "GUIDANCE", "LABELS", "LOWRES", "NULL_LABEL", "Bijection", "FlowSequential", "Cascade", "DiffusionPrior",
           "PixelDiffusion", "GaussianPrior", "GaussianSplitPrior", "LatentPrior", "Glow", "HierarchicalFlow", "Level",
           "Encoding", "FlowModel", "SRFlow", "TarFlow"]
