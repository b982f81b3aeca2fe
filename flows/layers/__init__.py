from flows.actnorm import ActNorm
from flows.layers.coupling import AdditiveCoupling, AffineCoupling, AffineInjector, ScaleMap
from flows.layers.flow_step import flow_step
from flows.layers.invconv import InvertibleConv1x1, InvertibleConv1x1LU, OrthogonalConv1x1
from flows.layers.masks import ChannelMask, CheckerboardMask, CouplingMask
from flows.layers.spline import SplineCoupling, rational_quadratic_spline
from flows.layers.squeeze import Squeeze

__all__ = ["ActNorm", "AdditiveCoupling", "AffineCoupling", "AffineInjector", "ScaleMap", "flow_step",
           "InvertibleConv1x1", "InvertibleConv1x1LU", "OrthogonalConv1x1", "ChannelMask", "CheckerboardMask",
           "CouplingMask", "SplineCoupling", "rational_quadratic_spline", "Squeeze"]
