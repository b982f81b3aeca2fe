"""A DDPM-like stand-in for a latent prior, for the tests: any LatentPrior plugs into
Glow from YAML (``top_prior: {class_path: tests.standin_prior.StandInDiffusionPrior}``).

Like a diffusion prior, its ``log_prob`` is a lower bound (the standard normal
log-density minus a learned, non-negative gap) and sampling runs ``steps`` refinement
passes from noise scaled by the temperature."""
import math

import torch
from torch import nn

from flows.distributions import LatentPrior


class StandInDiffusionPrior(LatentPrior):
    exact = False

    def __init__(self, shape: tuple[int, int, int], steps: int = 4) -> None:
        super().__init__()
        self.shape = tuple(shape)
        self.steps = steps
        self.gap = nn.Parameter(torch.tensor(0.1))
        self.shrink = nn.Parameter(torch.tensor(0.0))

    def log_prob(self, z, cond=None):
        dims = math.prod(self.shape)
        gaussian = -0.5 * (z.double() ** 2).flatten(1).sum(1) - 0.5 * dims * math.log(2 * math.pi)
        return (gaussian - self.gap.abs() * dims).to(torch.promote_types(z.dtype, torch.float32))

    def sample(self, n, cond=None, temperature=1.0):
        z = temperature * torch.randn(n, *self.shape, device=self.gap.device)
        for _ in range(self.steps):
            z = z * torch.sigmoid(self.shrink + 10.0)
        return z
