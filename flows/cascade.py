"""CSRFlow: a cascade of a base Glow and 2x SRFlow stages (seed 000 ch. 3).

The base models p_0(x_0) at the lowest resolution; stage i models p_i(x_i | x_{i-1}),
where x_{i-1} is the deterministic downsample of x_i. The seed (sec. 3.1.1, eq.
3.1-3.5) reads

    log P(x_k) = log P_0(x_0) + sum_i log P_i(x_i | x_{i-1})

as the cascade's log-likelihood of the top resolution. It is a **lower bound** on it:
the seed's argument shows p(x_{i-1} | x_i) = 1, but each SR stage also puts
probability on images whose downsample is not x_{i-1}, and sampling reaches x_k along
those paths too. The marginal P(x_k) = sum over all lower pyramids of the path
probabilities, of which the right-hand side is one term. Bits per dim computed from it
are therefore an upper bound (``exact`` is False; logged as ``bpd_bound_R``); the base
alone is exact. (With n_bits < 8 the pyramid is built on 8-bit images and then
reduced: another reason the figure is a bound.)

The P are probabilities of the discrete images: each stage's density over dequantized
data times the volume of one bin. Every stage's bins count, so the bits per dim of
x_k are -log P(x_k) / (D_k log 2), not the sum of the densities pushed through a
single-resolution bpd formula (which would leave out the lower stages' bins).

Inputs. ``x`` is a pyramid: {resolution: dequantized images}. ``cond`` may carry
``"labels"`` and ``"lowres"``: {resolution: the images at that resolution at the
centres of their bins}, which the stages condition on. A stage never sees a
dequantized (noisy) low-resolution image: its condition is a deterministic function of
the discrete data, which the factorization needs. Without ``"lowres"`` the conditions
are the lower resolutions of ``x`` snapped to their bins. Samples are snapped to the
same grid before they condition the next stage.

Variational training (sec. 3.2): the condition of a stage with sigma > 0 is
x'_{i-1} = f_{i-1}^{-1}(f_{i-1}(x_{i-1}) + sigma * eps), the same sigma on every latent,
computed without gradients (f_{i-1} is frozen for this term), then snapped to the
grid. Reconstructions with non-finite values or values far outside the data range
are replaced by the clean condition and counted.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from flows.base import LABELS, LOWRES, Condition, condition_value, with_condition, zero_logdet
from flows.model import Encoding, FlowModel, NoisyReconstruction, Objective, temperature_per_part
from flows.quantization import bin_log_volume, snap_to_bins

Pyramid = dict[int, Tensor]


@dataclass
class CascadeEncoding(Encoding):
    """A cascade's encoding; ``stages``: {resolution: that stage's own encoding}."""

    stages: dict[int, Encoding] = field(default_factory=dict)


@dataclass
class CascadeObjective:
    """What :meth:`Cascade.stage_objectives` returns. ``stages``: {R: the stage's own
    objective} (its loss, its log p(x_R | x_R/2) or log p_0(x_0), exact or bound).
    ``log_densities``: {R: log P(x_R) minus x_R's bin log-volume} for every R whose
    stages up to R all ran (:meth:`Cascade.cumulative_log_densities`), with ``exact``
    per R. ``replacement_rates``: {R: the share of a variational stage's noisy
    conditions replaced by clean ones}."""

    stages: dict[int, Objective]
    log_densities: dict[int, Tensor]
    exact: dict[int, bool]
    replacement_rates: dict[int, Tensor] = field(default_factory=dict)


class Cascade(FlowModel):
    """``base``: the model of the lowest resolution (a Glow). ``sr_stages``: one
    conditional model per doubling (SRFlow), in order of resolution."""

    def __init__(self, *, base: FlowModel, sr_stages: list[FlowModel], n_bits: int = 8) -> None:
        super().__init__()
        self.n_bits = n_bits
        size = base.image_size
        for stage in sr_stages:
            if stage.image_size != 2 * size:
                raise ValueError(f"cascade stages must double the resolution: a stage at "
                                 f"{stage.image_size}px follows one at {size}px")
            if stage.in_channels != base.in_channels:
                raise ValueError("every stage of a cascade must have the base's channels")
            size = stage.image_size
        for stage in [base, *sr_stages]:
            if stage.dequantizer.continuous:
                # log P(x_R) is a product of the stages' discrete likelihoods, and the
                # conditions are the discrete images: noisy data have neither.
                raise ValueError(f"the cascade's {stage.display_name} stage trains on noisy data "
                                 f"({type(stage.dequantizer).__name__}); a cascade composes discrete "
                                 "likelihoods: give its stages uniform or variational dequantization")
        self.in_channels = base.in_channels
        self.image_size = size
        self.base_resolution = base.image_size
        # Keyed by resolution, so a stage's weights carry over between cascades that
        # share it (e.g. SRF32 of Glow16-SRF32 and of Glow8-SRF16-SRF32).
        self.stages = nn.ModuleDict({str(m.image_size): m for m in [base, *sr_stages]})
        # The same stages by int resolution (a traced step looks them up without str()).
        self._stage_at = {m.image_size: m for m in [base, *sr_stages]}

    @property
    def exact(self) -> bool:
        # A stage beyond the base makes log P(x) a bound (seed 000 eq. 3.6: the pyramid's
        # lower resolutions are integrated out variationally), whatever the stages' parts.
        return len(self.stages) == 1 and self.base.exact

    @property
    def resolutions(self) -> list[int]:
        return [int(r) for r in self.stages]

    @property
    def base(self) -> FlowModel:
        return self.stages[str(self.base_resolution)]

    def stage(self, resolution: int) -> FlowModel:
        if resolution not in self._stage_at:
            raise KeyError(f"the cascade has no stage at {resolution}px (stages: {self.resolutions})")
        return self._stage_at[resolution]

    def stage_exact(self, resolution: int) -> bool:
        """Whether log P(x_R) of the cascade up to ``resolution`` is exact."""
        return resolution == self.base_resolution and self.base.exact

    def to_condition(self, x: Tensor) -> Tensor:
        return snap_to_bins(x, self.n_bits)

    def bin_log_volume(self, resolution: int) -> float:
        return bin_log_volume(self.stage(resolution).dims, self.n_bits)

    def stage_condition(self, resolution: int, cond: Condition, x: Pyramid | None = None) -> dict:
        """The condition of the stage at ``resolution``: the labels, and (above the base)
        the image at half the resolution at its bin centres, from ``cond["lowres"]`` or
        else snapped from ``x``."""
        stage_cond = with_condition(cond)
        stage_cond.pop(LOWRES, None)
        if resolution == self.base_resolution:
            return stage_cond
        lowres = (condition_value(cond, LOWRES) or {}).get(resolution // 2)
        if lowres is None:
            if x is None or resolution // 2 not in x:
                raise ValueError(f"the stage at {resolution}px needs the {resolution // 2}px images: "
                                 f"pass cond['{LOWRES}'][{resolution // 2}] or x[{resolution // 2}]")
            lowres = self.to_condition(x[resolution // 2])
        stage_cond[LOWRES] = lowres
        return stage_cond

    # --- densities --------------------------------------------------------------------
    def encode_stage(self, resolution: int, x: Pyramid, cond: Condition = None) -> Encoding:
        """The stage's own encoding of x[resolution]: log p_0(x_0) for the base,
        log p_i(x_i | x_{i-1}) above it, exact in both cases."""
        return self.stage(resolution).encode(x[resolution], self.stage_condition(resolution, cond, x))

    def encode(self, x: Pyramid, cond: Condition = None) -> CascadeEncoding:
        """Every stage's encoding (``stages``). ``log_prior`` adds the lower stages' bin
        log-volumes, so ``log_prob`` is log P(x_k) minus the top bin's log-volume: the
        density that Glow's bits-per-dim formula turns into -log P(x_k) / (D_k log 2)."""
        stages = {r: self.encode_stage(r, x, cond) for r in self.resolutions}
        logdet = sum((e.logdet for e in stages.values()), zero_logdet(x[self.base_resolution]))
        log_prior = self.cumulative_log_densities({r: e.log_prior for r, e in stages.items()})[self.image_size]
        latents = {r: e.latents for r, e in stages.items()}
        return CascadeEncoding(latents, logdet, log_prior, self.exact, stages)

    def cumulative_log_densities(self, stage_log_probs: dict[int, Tensor]) -> dict[int, Tensor]:
        """Stage densities -> {R: log P(x_R) minus x_R's bin log-volume} for every R whose
        stages up to R are all given (from the base up): each stage below R enters as its
        probability (density times bin volume, eq. 3.5), stage R as its density, so Glow's
        bits-per-dim formula turns the result into -log P(x_R) / (D_R log 2). A lower
        bound above the base. The one place the stages' bin volumes are added."""
        total, out = None, {}
        for resolution in self.resolutions:
            if resolution not in stage_log_probs:
                break
            if total is not None:
                total = total + self.bin_log_volume(resolution // 2) + stage_log_probs[resolution]
            else:
                total = stage_log_probs[resolution]
            out[resolution] = total
        return out

    def accumulate(self, stage_log_probs: dict[int, Tensor]) -> dict[int, Tensor]:
        """Stage densities -> {R: log P(x_R)} (nats, discrete), a lower bound above the base."""
        return {r: log_p + self.bin_log_volume(r) for r, log_p in self.cumulative_log_densities(stage_log_probs).items()}

    def log_likelihoods(self, x: Pyramid, cond: Condition = None) -> dict[int, Tensor]:
        """{R: log P(x_R)}: log P_0(x_0) + sum_{i <= R} log P_i(x_i | x_{i-1}), each term a
        stage's density times its bin volume (eq. 3.5 times p_0); a lower bound on the
        cascade's log-probability of x_R above the base."""
        return self.accumulate({r: self.encode_stage(r, x, cond).log_prob for r in self.resolutions})

    def stage_objectives(self, clean: Pyramid, noise: Pyramid, cond: Condition = None, *, n_bits: int,
                         resolutions: list[int] | None = None, latent_noise: dict[int, float] | None = None,
                         max_abs: float = 1.0) -> CascadeObjective:
        """The cascade's training objective, stage by stage (the whole walk of a batch
        through the model, so a module only weighs and logs it). ``clean``: the pyramid
        at its bin centres; ``noise``: the uniform dequantization draws per resolution;
        ``resolutions``: the stages to run (default all; a frozen stage is skipped in
        training). ``latent_noise``: {R: the std of the latent noise of variational
        training (sec. 3.2)}: the stage at R conditions on the previous stage's noisy
        reconstruction of its clean input (:meth:`variational_condition`) instead of the
        clean one, replaced where it fails (beyond ``max_abs``)."""
        cond = with_condition(cond, **{LOWRES: clean})
        stages, rates = {}, {}
        for resolution in resolutions or self.resolutions:
            stage_cond = cond
            std = (latent_noise or {}).get(resolution, 0.0)
            if std > 0:
                noisy = self.variational_condition(resolution, cond, std, max_abs)
                stage_cond = with_condition(cond, **{LOWRES: {**clean, resolution // 2: noisy.images}})
                rates[resolution] = noisy.failure_rate
            stages[resolution] = self.stage(resolution).training_loss(
                clean[resolution], self.stage_condition(resolution, stage_cond), n_bits=n_bits,
                noise=noise.get(resolution))
        log_densities = self.cumulative_log_densities({r: o.log_prob for r, o in stages.items()})
        # Exact up to R only if every stage's objective up to R is exact (a learned
        # dequantizer in any stage makes the product a bound).
        exact = {r: self.stage_exact(r) and all(o.exact for s, o in stages.items() if s <= r) for r in log_densities}
        return CascadeObjective(stages, log_densities, exact, rates)

    # --- latent groups: one per stage, highest resolution first -----------------------------
    def latent_groups(self, latents: dict[int, list]) -> list[int]:
        return sorted(latents, reverse=True)

    def latent_group_name(self, key: int) -> str:
        return f"{key}px stage"

    def without_groups(self, latents: dict[int, list], keys) -> dict[int, list]:
        keys = set(keys)
        return {k: ([None] * len(v) if k in keys else list(v)) for k, v in latents.items()}

    # --- decoding and sampling ------------------------------------------------------------
    def temperatures(self, temperature: float | list[float]) -> dict[int, float]:
        return dict(zip(self.resolutions, temperature_per_part(temperature, self.resolutions, "stage")))

    def decode(self, latents: dict[int, list], cond: Condition = None,
               temperature: float | list[float] = 1.0, n: int | None = None) -> Pyramid:
        """Coarse to fine: each stage decodes its latents (None entries drawn at its
        temperature) conditioned on the previous stage's output snapped to the grid.
        Returns the raw outputs, so decode(encode(x)) == x."""
        temps = self.temperatures(temperature)
        decode_cond = with_condition(cond)
        decode_cond.pop(LOWRES, None)  # conditions come from the stages' own outputs
        out: Pyramid = {}
        for resolution in self.resolutions:
            stage = self.stage(resolution)
            stage_cond = self.stage_condition(resolution, decode_cond, out)
            stage_latents = (latents or {}).get(resolution)
            if stage_latents is None or all(z is None for z in stage_latents):
                batch = n if n is not None else _batch_size(decode_cond, out)
                out[resolution] = stage.sample(batch, stage_cond, temps[resolution])
            else:
                out[resolution] = stage.decode(stage_latents, stage_cond, temps[resolution])
        return out

    @torch.no_grad()
    def sample(self, n: int, cond: Condition = None,
               temperature: float | list[float] = 1.0) -> Pyramid:
        """Sequential sampling, one temperature for all stages or one per stage.
        Returns {resolution: samples snapped to the data grid}."""
        num_classes = self.base.num_classes
        if num_classes and condition_value(cond, LABELS) is None:
            cond = with_condition(cond, **{LABELS: torch.randint(0, num_classes, (n,), device=self._device())})
        decoded = self.decode({}, cond, temperature, n)
        return {r: self.to_condition(x) for r, x in decoded.items()}

    # --- variational conditions and the failure probe -------------------------------------
    @torch.no_grad()
    def stage_reconstruction_with_latent_noise(self, resolution: int, x: Tensor, sigma: float,
                                               cond: Condition = None, max_abs: float = 1.0) -> NoisyReconstruction:
        """The stage at ``resolution``'s :meth:`FlowModel.reconstruct_with_latent_noise`
        of ``x`` under its condition from ``cond`` (:meth:`stage_condition`); failed above
        ``max_abs`` = 1 by default (variational training's replacement rule)."""
        return self.stage(resolution).reconstruct_with_latent_noise(
            x, self.stage_condition(resolution, cond), sigma, max_abs)

    def variational_condition(self, resolution: int, cond: Condition, sigma: float,
                              max_abs: float = 1.0) -> NoisyReconstruction:
        """The condition of the stage at ``resolution`` under variational training: the
        previous stage's noisy reconstruction of its clean input
        (``cond["lowres"][resolution // 2]``), snapped to the data grid."""
        previous = resolution // 2
        clean = condition_value(cond, LOWRES)[previous]
        recon = self.stage_reconstruction_with_latent_noise(previous, clean, sigma, cond, max_abs)
        return NoisyReconstruction(self.to_condition(recon.images), recon.failed)


def _batch_size(cond: Condition, decoded: Pyramid) -> int:
    if decoded:
        return next(iter(decoded.values())).shape[0]
    labels = condition_value(cond, LABELS)
    if labels is None:
        raise ValueError("pass n (or labels, or the base stage's latents) to fix the batch size")
    return labels.shape[0]
