"""CSRFlow: a cascade of a base Glow and 2x SRFlow levels (seed 000 ch. 3).

The base models p_0(x_0) at the lowest resolution; level i models p_i(x_i | x_{i-1}),
where x_{i-1} is the deterministic downsample of x_i. Hence (sec. 3.1.1, eq. 3.1-3.5)

    log P(x_k) = log P_0(x_0) + sum_i log P_i(x_i | x_{i-1}),

an exact log-likelihood of the top resolution. The P are probabilities of the discrete
images: each level's density over dequantized data times the volume of one bin. That
matters for bits per dim: every level's bins count, so the cascade's bpd at x_k is
-log P(x_k) / (D_k log 2), not the sum of the densities pushed through a
single-resolution bpd formula (which would leave out the lower levels' bins and
under-report the bits). (With n_bits < 8 the pyramid is built on 8-bit images and then
reduced, so the sum is the log-probability of the whole reduced pyramid, a lower bound
on that of the reduced top image; with n_bits = 8 it is exact.)

Conditions. A level never sees a dequantized (noisy) low-resolution image: its
condition is the low-resolution image at the centres of its quantization bins, a
deterministic function of the discrete data, which is what the factorization above
needs. At sampling time the generated x_{i-1} is snapped to the same grid before it
conditions level i, so training and sampling conditions come from one distribution.

Variational training (sec. 3.2): the condition of a level with sigma > 0 is
x'_{i-1} = f_{i-1}^{-1}(f_{i-1}(x_{i-1}) + sigma * eps), the same sigma on every latent,
computed without gradients (f_{i-1} is frozen for this term), then snapped to the
grid. Reconstructions with non-finite values or values far outside the data range
are replaced by the clean condition and counted.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from flows.glow import Glow
from flows.srflow import SRFlow


def snap_to_bins(x: Tensor, n_bits: int) -> Tensor:
    """Model-space images -> the centre of their n_bits quantization bin, in [-0.5, 0.5].
    Non-finite values become mid-grey or saturate, so a failed sample shows as such
    instead of poisoning the next level."""
    bins = 2 ** n_bits
    x = torch.nan_to_num(x.float(), nan=0.0, posinf=0.5, neginf=-0.5)
    return (torch.floor((x + 0.5) * bins).clamp(0, bins - 1) + 0.5) / bins - 0.5


@dataclass
class NoisyReconstruction:
    """``images``: the reconstructions (failed ones replaced by the clean input).
    ``failed``: per-sample bool, True where the reconstruction was non-finite or
    exceeded the allowed magnitude."""

    images: Tensor
    failed: Tensor

    @property
    def failure_rate(self) -> Tensor:
        return self.failed.float().mean()


class Cascade(nn.Module):
    def __init__(self, base: Glow, levels: list[SRFlow], n_bits: int = 8) -> None:
        super().__init__()
        self.base = base
        self.n_bits = n_bits
        size = base.image_size
        for level in levels:
            if level.image_size != 2 * size:
                raise ValueError(f"cascade levels must double the resolution: a level at "
                                 f"{level.image_size}px follows one at {size}px")
            if level.in_channels != base.in_channels:
                raise ValueError("every level of a cascade must have the base's channels")
            size = level.image_size
        # Keyed by resolution, so a level's weights carry over between cascades that
        # share it (e.g. SRF32 of Glow16-SRF32 and of Glow8-SRF16-SRF32).
        self.levels = nn.ModuleDict({str(level.image_size): level for level in levels})

    @property
    def resolutions(self) -> list[int]:
        return [self.base.image_size] + [int(r) for r in self.levels]

    def model(self, resolution: int) -> Glow | SRFlow:
        if resolution == self.base.image_size:
            return self.base
        if str(resolution) not in self.levels:
            raise KeyError(f"the cascade has no level at {resolution}px (levels: {self.resolutions})")
        return self.levels[str(resolution)]

    def to_condition(self, x: Tensor) -> Tensor:
        return snap_to_bins(x, self.n_bits)

    # --- densities --------------------------------------------------------------------
    def level_log_prob(self, resolution: int, x: Tensor, condition: Tensor | None = None,
                       y: Tensor | None = None) -> Tensor:
        """log p_0(x_0) for the base, log p_i(x_i | condition) for a super-resolution level."""
        model = self.model(resolution)
        if model is self.base:
            return self.base.log_prob(x, y)
        if condition is None:
            raise ValueError(f"the level at {resolution}px needs its low-resolution condition")
        return model.log_prob(x, condition, y)

    def log_prob_levels(self, images: dict[int, Tensor], conditions: dict[int, Tensor],
                        y: Tensor | None = None) -> dict[int, Tensor]:
        """Each level's own log-density (nats) of its dequantized images: log p_0(x_0)
        and log p_i(x_i | condition_i). ``images``: {resolution: dequantized x};
        ``conditions``: {resolution: the clean condition of the level at that
        resolution}, i.e. x at resolution / 2 at its bin centres."""
        return {r: self.level_log_prob(r, images[r], conditions.get(r), y) for r in self.resolutions}

    def bin_log_volume(self, resolution: int) -> float:
        """log of the volume of one quantization bin of an image at ``resolution``:
        a density over dequantized data times this is the probability of the bin."""
        return -self.model(resolution).dims * self.n_bits * math.log(2.0)

    def log_likelihoods(self, images: dict[int, Tensor], conditions: dict[int, Tensor],
                        y: Tensor | None = None) -> dict[int, Tensor]:
        """{resolution R: log P(x_R)}, the cascade's log-probability of the discrete
        images at every resolution, in nats:

            log P(x_R) = log P_0(x_0) + sum_{i <= R} log P_i(x_i | x_{i-1}),

        each term the level's density times its bin volume (eq. 3.5 times p_0). The
        lower levels' bins count too: bits per dim of x_R = -log P(x_R) / (D_R log 2)."""
        return self.accumulate(self.log_prob_levels(images, conditions, y))

    def accumulate(self, level_log_probs: dict[int, Tensor]) -> dict[int, Tensor]:
        """Level densities -> {R: log P(x_R)} for every R whose levels up to R are
        all given (from the base up)."""
        total, out = None, {}
        for resolution in self.resolutions:
            if resolution not in level_log_probs:
                break
            term = level_log_probs[resolution] + self.bin_log_volume(resolution)
            total = term if total is None else total + term
            out[resolution] = total
        return out

    def log_likelihood(self, images: dict[int, Tensor], conditions: dict[int, Tensor],
                       y: Tensor | None = None) -> Tensor:
        """log P(x_k) of the top resolution, nats per sample."""
        return self.log_likelihoods(images, conditions, y)[self.resolutions[-1]]

    # --- sampling -----------------------------------------------------------------------
    def temperatures(self, temperature: float | list[float]) -> dict[int, float]:
        if isinstance(temperature, (int, float)):
            return {r: float(temperature) for r in self.resolutions}
        temps = list(temperature)
        if len(temps) != len(self.resolutions):
            raise ValueError(f"give one temperature, or one per level ({len(self.resolutions)}: "
                             f"{self.resolutions}), got {temps}")
        return dict(zip(self.resolutions, map(float, temps)))

    @torch.no_grad()
    def sample(self, n: int, temperature: float | list[float] = 1.0,
               y: Tensor | None = None) -> dict[int, Tensor]:
        """Sequential sampling, one temperature for all levels or one per level.
        Returns {resolution: samples snapped to the data grid}."""
        temps = self.temperatures(temperature)
        if self.base.num_classes and y is None:
            y = torch.randint(0, self.base.num_classes, (n,), device=self._device())
        out = {}
        x = self.to_condition(self.base.sample(n, temps[self.base.image_size], y))
        out[self.base.image_size] = x
        for key, level in self.levels.items():
            x = self.to_condition(level.sample(x, temps[int(key)], y if level.num_classes else None))
            out[int(key)] = x
        return out

    # --- variational conditions and the failure probe -------------------------------------
    @torch.no_grad()
    def reconstruct_with_latent_noise(self, resolution: int, x: Tensor, sigma: float,
                                      condition: Tensor | None = None, y: Tensor | None = None,
                                      max_abs: float = 1.0) -> NoisyReconstruction:
        """f^{-1}(f(x) + sigma * eps) through the level at ``resolution``, the same sigma
        on every latent (seed 000 sec. 3.2). A sample fails when its reconstruction has
        a non-finite value or one with |value| > max_abs (data lie in [-0.5, 0.5]); a
        failed sample is returned as the clean ``x``."""
        model = self.model(resolution)
        labels = y if model.num_classes else None
        was_training = model.training
        model.eval()  # no data-dependent initialization may happen on noisy inputs
        try:
            recon = self._reconstruct(model, x, sigma, condition, labels)
        finally:
            model.train(was_training)
        failed = ~torch.isfinite(recon).flatten(1).all(dim=1)
        magnitude = torch.nan_to_num(recon, nan=0.0, posinf=0.0, neginf=0.0).abs().flatten(1).amax(dim=1)
        failed = failed | (magnitude > max_abs)
        images = torch.where(failed[:, None, None, None], x.float(), recon).to(x.dtype)
        return NoisyReconstruction(images, failed)

    def _reconstruct(self, model, x, sigma, condition, labels) -> Tensor:
        if model is self.base:
            encoding = model.encode(x, labels)
            noisy = [z + sigma * torch.randn_like(z) for z in encoding.latents]
            recon, _ = model.decode(noisy, labels)
        else:
            encoding = model.encode(x, condition, labels)
            noisy = [z + sigma * torch.randn_like(z) for z in encoding.latents]
            recon, _ = model.decode(noisy, condition, labels)
        return recon.float()

    def variational_condition(self, resolution: int, clean: dict[int, Tensor], sigma: float,
                              y: Tensor | None = None, max_abs: float = 1.0) -> NoisyReconstruction:
        """The condition of the level at ``resolution`` under variational training:
        the previous level's noisy reconstruction of its clean input, snapped to the
        data grid. ``clean``: {resolution: the clean condition of the level at that
        resolution}; the previous level's own condition is looked up there too."""
        previous = resolution // 2
        x_prev = clean[resolution]
        previous_condition = None if previous == self.base.image_size else clean[previous]
        recon = self.reconstruct_with_latent_noise(previous, x_prev, sigma, previous_condition, y, max_abs)
        return NoisyReconstruction(self.to_condition(recon.images), recon.failed)

    def _device(self) -> torch.device:
        return next(self.parameters()).device
