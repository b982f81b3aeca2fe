"""Invertible layers and flow models in pure PyTorch (no Lightning imports)."""
from flows.base import Bijection, FlowSequential
from flows.glow import FlowEncoding, Glow

__all__ = ["Bijection", "FlowSequential", "FlowEncoding", "Glow"]
