"""The DDPM's noise schedules and Gaussian terms (Ho et al. 2020; Nichol & Dhariwal 2021,
"improved DDPM"), shared by the diffusion prior and the pixel DDPM (``flows/diffusion.py``):
beta schedules, DDIM's time steps, the Gaussian KL and improved DDPM's discretized
decoder, in pure PyTorch."""
from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

Schedule = Literal["linear", "cosine"]


# --- schedules -------------------------------------------------------------------------
def linear_betas(timesteps: int) -> Tensor:
    """DDPM's linear schedule, 1e-4 .. 0.02 at T = 1000, scaled by 1000 / T so other T
    keep the same total noise (improved-diffusion's ``get_named_beta_schedule``). Below
    T = 50 the scaled betas would pass 1 (abar_T = 0, a division by zero); they are
    clipped at 0.999 like the cosine schedule's."""
    scale = 1000.0 / timesteps
    return torch.linspace(scale * 1e-4, scale * 0.02, timesteps, dtype=torch.float64).clamp(max=0.999)


def cosine_betas(timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Improved DDPM's cosine schedule (eq. 17): abar(t) = cos(((t/T + s) / (1 + s)) pi/2)^2,
    beta_t = min(1 - abar(t+1)/abar(t), 0.999)."""
    def abar(u: float) -> float:
        return math.cos((u + s) / (1.0 + s) * math.pi / 2.0) ** 2

    betas = [min(1.0 - abar((i + 1) / timesteps) / abar(i / timesteps), max_beta) for i in range(timesteps)]
    return torch.tensor(betas, dtype=torch.float64)


def make_betas(schedule: Schedule, timesteps: int) -> Tensor:
    if timesteps < 2:
        raise ValueError(f"a diffusion needs timesteps >= 2, got {timesteps}")
    if schedule == "linear":
        return linear_betas(timesteps)
    if schedule == "cosine":
        return cosine_betas(timesteps)
    raise ValueError(f"schedule must be 'linear' or 'cosine', got {schedule!r}")


def ddim_timesteps(timesteps: int, steps: int) -> list[int]:
    """S time indices from T-1 down to 0, evenly spaced (all of them when S = T)."""
    if not 1 <= steps <= timesteps:
        raise ValueError(f"DDIM steps must lie in [1, {timesteps}] (the timesteps), got {steps}")
    if steps == 1:
        return [timesteps - 1]
    indices = torch.linspace(timesteps - 1, 0, steps, dtype=torch.float64).round().long().tolist()
    return sorted(set(indices), reverse=True)


# --- Gaussian densities ------------------------------------------------------------------
def normal_kl(mean1: Tensor, log_var1: Tensor, mean2: Tensor, log_var2: Tensor) -> Tensor:
    """KL(N(mean1, e^log_var1) || N(mean2, e^log_var2)), elementwise, in nats."""
    return 0.5 * (log_var2 - log_var1 + torch.exp(log_var1 - log_var2)
                  + (mean1 - mean2) ** 2 * torch.exp(-log_var2) - 1.0)


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, log_var: Tensor, bins: int) -> Tensor:
    """log P(bin of x) under N(mean, e^log_var), elementwise, for data in [-1, 1] with
    ``bins`` equal bins (x at the bin centres): the edge bins take the tails
    (improved-diffusion's decoder, with exact normal CDFs and our bin layout)."""
    half_width = 1.0 / bins
    inv_std = torch.exp(-0.5 * log_var)
    upper = torch.special.ndtr((x - mean + half_width) * inv_std)
    lower = torch.special.ndtr((x - mean - half_width) * inv_std)
    # log(1 - Phi(a)) = log Phi(-a) and log Phi(b) via log_ndtr keep the tails accurate.
    log_upper_tail = torch.special.log_ndtr(-(x - mean - half_width) * inv_std)
    log_lower_tail = torch.special.log_ndtr((x - mean + half_width) * inv_std)
    log_middle = torch.log((upper - lower).clamp(min=1e-12))
    first = x < -1.0 + 1.5 * half_width
    last = x > 1.0 - 1.5 * half_width
    return torch.where(first, log_lower_tail, torch.where(last, log_upper_tail, log_middle))


def sum_per_sample(x: Tensor) -> Tensor:
    """The sum over every dimension but the batch's."""
    return x.flatten(1).sum(dim=1)
