"""CSRFlow as a LightningModule: a base Glow and SRFlow levels trained on the
resolutions of one pyramid batch (seed 000 ch. 3-4).

Every level trains on its own resolution of the same batch, with its own seed
optimizer settings (one Adamax parameter group per level). Levels can be loaded from
checkpoints and frozen (``train: false``), so a cluster can train the levels as
parallel jobs and a variational level can train against a frozen, finished previous
level, as the seed does. The model is named as in Tables 4.2 and 4.3, e.g.
``Glow16-SRF32(0.02)-SRF64(0.50)``.

Logged figures (resolution in every name):
  ``bpd_R``            the cascade's exact bits/dim of the images at R,
                       -log P(x_R) / (D_R log 2) with log P(x_R) the sum of the levels'
                       log-probabilities up to R (flows/cascade.py);
  ``bpd_R_given_R/2``  a super-resolution level's own conditional bits/dim;
  ``replacement_rate_R``  share of a variational level's noisy conditions replaced
                       by clean ones (sec. 4.4);
  ``failure_rate_R_sigmaS``  share of images whose reconstruction with latent noise
                       S through the level at R is non-finite (sec. 4.4.2, Fig. 4.3).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from datamodules.pyramid import bits_per_dim, dequantize
from flows.cascade import Cascade
from flows.glow import Glow
from flows.srflow import SRFlow
from lightning_modules.base import FlowModule, LossOutput, OptimizerGroup, OptimizerSettings
from lightning_modules.checkpointing import read_state_dict, state_dict_mismatch
from lightning_modules.metrics import FIDSettings

SRFLOW_MILESTONES = [100_000, 150_000, 180_000, 190_000]


@dataclass
class GlowLevel:
    """The cascade's base Glow. Defaults: seed 000 sec. 4.3.1 (L=3, K=32, 512 hidden,
    no squishing) and 4.3.2 (Adamax 5e-4, betas (0.9, 0.999), weight decay 5e-5,
    linear warm-up over 5 epochs).

    ``checkpoint``: a cascade or Glow checkpoint to load this level from (overrides
    the module's ``init_checkpoint`` for this level)."""

    levels: int = 3
    steps_per_level: int = 32
    hidden_channels: int = 512
    invconv: str = "lu"
    coupling: str = "affine"
    scale_fn: str = "glow"
    squish_alpha: float = 0.5
    learn_top_prior: bool = True
    lr: float = 5e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 5e-5
    warmup_epochs: float = 5.0
    warmup_steps: int | None = None
    lr_milestones: list[int] = field(default_factory=list)
    lr_gamma: float = 0.5
    checkpoint: str | None = None


@dataclass
class SRFlowLevel:
    """One 2x super-resolution level. Defaults: seed 000 sec. 4.3.1 (L=4, K=16, 64
    hidden, affine injectors, squishing a=0.5, 23-block RRDB with 64 features) and
    4.3.2 (Adamax 2.5e-4, betas (0.9, 0.99), no weight decay, lr halved at 100k, 150k,
    180k and 190k steps; RRDB frozen for the first 100k steps, then fine-tuned).

    ``sigma``: > 0 trains the level variationally against the previous level (sec. 3.2).
    ``encoder_checkpoint``: an RRDB L1 pre-training checkpoint (RRDBPretrainModule).
    ``freeze_encoder_steps``: optimizer steps during which the RRDB is frozen.
    ``checkpoint``: as for :class:`GlowLevel`."""

    sigma: float = 0.0
    levels: int = 4
    steps_per_level: int = 16
    hidden_channels: int = 64
    invconv: str = "lu"
    coupling: str = "affine"
    scale_fn: str = "squish"
    squish_alpha: float = 0.5
    affine_injector: bool = True
    learn_top_prior: bool = True
    rrdb_features: int = 64
    rrdb_blocks: int = 23
    rrdb_growth: int = 32
    rrdb_feature_blocks: list[int] | None = None
    encoder_checkpoint: str | None = None
    freeze_encoder_steps: int = 100_000
    lr: float = 2.5e-4
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.0
    warmup_epochs: float = 0.0
    warmup_steps: int | None = None
    lr_milestones: list[int] = field(default_factory=lambda: list(SRFLOW_MILESTONES))
    lr_gamma: float = 0.5
    checkpoint: str | None = None


def optimizer_settings(level: GlowLevel | SRFlowLevel) -> OptimizerSettings:
    return OptimizerSettings(level.lr, tuple(level.betas), level.weight_decay, level.warmup_epochs,
                             level.warmup_steps, list(level.lr_milestones), level.lr_gamma)


def load_submodule(module: nn.Module, state: dict, prefixes: list[str], what: str, source: str) -> None:
    """Load ``module`` from the first of ``prefixes`` found in ``state`` (a checkpoint's
    state dict read from ``source``), with a message that says what did not match."""
    for prefix in prefixes:
        sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if not sub:
            continue
        missing, unexpected, mismatched = state_dict_mismatch(module.state_dict(), sub)
        if missing or unexpected or mismatched:
            raise ValueError(
                f"{what}: checkpoint {source!r} (prefix {prefix!r}) does not match the configured "
                f"architecture: {len(missing)} missing, {len(unexpected)} unexpected, "
                f"{len(mismatched)} shape-mismatched tensors (e.g. "
                f"{(missing + unexpected + mismatched)[:3]}). "
                "Use the same level settings as the run that wrote it.")
        module.load_state_dict(sub)
        return
    raise ValueError(f"{what}: checkpoint {source!r} holds no tensors under {prefixes}; "
                     "is it a checkpoint of this kind of model?")


class CascadeModule(FlowModule):
    """Glow{r0}-SRF{2 r0}-SRF{4 r0}... trained on one pyramid.

    Args:
        base_resolution: r0, the base Glow's resolution.
        base: the base Glow's settings.
        sr_levels: one SRFlow level per doubling, in order of resolution.
        train_levels: the resolutions to train (default: all). The others are frozen:
            loaded from ``init_checkpoint`` or their own ``checkpoint``, kept in eval
            mode, left out of the optimizer. This is how the seed's staged runs go
            (a variational level trains against a finished previous level) and how
            levels train as parallel jobs.
        init_checkpoint: a cascade checkpoint; every level found in it is loaded.
        in_channels: colour channels.
        num_classes: > 0 makes every level class-conditional (GlowCC / SRFCC).
        class_loss_weight: lambda_c of each level's class-logits cross-entropy.
        max_reconstruction_abs: a variational reconstruction with a value beyond this
            magnitude counts as failed (data lie in [-0.5, 0.5]).
        failure_probe_sigmas: latent noise levels of the sample-failure probe.
        failure_probe_every_n_steps: how often the probe runs (0: never).
    The remaining args (n_bits, clipping, sampling, evaluation) are :class:`FlowModule`'s; the
    optimizer settings live in each level.
    """

    def __init__(self, base_resolution: int = 16, base: GlowLevel | None = None,
                 sr_levels: list[SRFlowLevel] | None = None,
                 train_levels: list[int] | None = None, init_checkpoint: str | None = None,
                 in_channels: int = 3,
                 num_classes: int = 0, class_loss_weight: float = 0.01,
                 max_reconstruction_abs: float = 1.0,
                 failure_probe_sigmas: list[float] | None = None,
                 failure_probe_every_n_steps: int = 100, n_bits: int = 8,
                 grad_clip_norm: float | None = None,
                 sample_temperatures: list[float] | None = None, num_samples: int = 64,
                 sample_every_n_epochs: int = 1, sample_seed: int = 1234,
                 evaluation: FIDSettings | None = None, channels_last: bool = False,
                 compile: bool = False) -> None:
        # The optimizer settings are per level (GlowLevel / SRFlowLevel), so the base's
        # single-group ones are not exposed here.
        super().__init__(n_bits=n_bits, grad_clip_norm=grad_clip_norm,
                         sample_temperatures=sample_temperatures, num_samples=num_samples,
                         sample_every_n_epochs=sample_every_n_epochs, sample_seed=sample_seed,
                         evaluation=evaluation, channels_last=channels_last, compile=compile)
        self.base_config = base or GlowLevel()
        self.sr_configs = list(sr_levels if sr_levels is not None else [SRFlowLevel()])
        self.num_classes = num_classes
        self.class_loss_weight = class_loss_weight
        self.max_reconstruction_abs = max_reconstruction_abs
        self.failure_probe_sigmas = list(failure_probe_sigmas if failure_probe_sigmas is not None
                                         else [0.5, 1.0])
        self.failure_probe_every_n_steps = failure_probe_every_n_steps
        b = self.base_config
        base_model = Glow(in_channels, base_resolution, b.levels, b.steps_per_level, b.hidden_channels,
                          b.invconv, b.coupling, b.scale_fn, b.squish_alpha, b.learn_top_prior, num_classes)
        sr_models, size = [], base_resolution
        for config in self.sr_configs:
            size *= 2
            sr_models.append(SRFlow(in_channels, size, config.levels, config.steps_per_level,
                                    config.hidden_channels, config.invconv, config.coupling,
                                    config.scale_fn, config.squish_alpha, config.affine_injector,
                                    config.learn_top_prior, num_classes, config.rrdb_features,
                                    config.rrdb_blocks, config.rrdb_growth, config.rrdb_feature_blocks))
        self.model = Cascade(base_model, sr_models, self.n_bits)
        if train_levels is None:
            train_levels = self.model.resolutions
        unknown = [r for r in train_levels if r not in self.model.resolutions]
        if unknown:
            raise ValueError(f"train_levels {unknown} are not levels of this cascade "
                             f"(resolutions {self.model.resolutions})")
        self.train_levels = sorted(set(train_levels))
        self.init_checkpoint = init_checkpoint
        self._check_variational_levels()
        self._load_and_freeze()

    # --- configuration --------------------------------------------------------------
    def level_config(self, resolution: int) -> GlowLevel | SRFlowLevel:
        index = self.model.resolutions.index(resolution)
        return self.base_config if index == 0 else self.sr_configs[index - 1]

    @property
    def trained_resolutions(self) -> list[int]:
        return [r for r in self.model.resolutions if self.is_trained(r)]

    def is_trained(self, resolution: int) -> bool:
        return resolution in self.train_levels

    def _check_variational_levels(self) -> None:
        for resolution in self.model.resolutions[1:]:
            sigma = self.level_config(resolution).sigma
            if sigma < 0:
                raise ValueError(f"the level at {resolution}px has sigma {sigma}; sigma must be >= 0")
            if sigma > 0 and self.is_trained(resolution) and self.is_trained(resolution // 2):
                warnings.warn(
                    f"the level at {resolution}px trains variationally (sigma={sigma}) while the "
                    f"level at {resolution // 2}px trains too. The seed (sec. 3.2) trains against a "
                    f"finished, frozen previous level: train the {resolution // 2}px level first, "
                    f"then set train_levels: [{resolution}] and init_checkpoint. (The noisy "
                    "conditions never pass gradients to the previous level either way.)", stacklevel=3)

    def _load_and_freeze(self) -> None:
        base_prefixes = ["model.base.", "model."]  # a cascade's base, or a GlowModule
        states: dict[str, dict] = {}  # each file is read once, however many levels it feeds

        def state_of(path: str, what: str) -> dict:
            if path not in states:
                states[path] = read_state_dict(path, what)
            return states[path]

        loaded = set()
        if self.init_checkpoint:
            loaded = self._load_all_levels(state_of(self.init_checkpoint, "init_checkpoint"))
        for resolution in self.model.resolutions:
            config = self.level_config(resolution)
            level = self.model.model(resolution)
            is_base = level is self.model.base
            if not is_base and config.encoder_checkpoint and resolution not in loaded:
                what = f"RRDB encoder of SRF{resolution}"
                load_submodule(level.encoder, state_of(config.encoder_checkpoint, what), ["encoder."],
                               what, config.encoder_checkpoint)
            if config.checkpoint:
                prefixes = base_prefixes if is_base else [f"model.levels.{resolution}."]
                what = self.level_name(resolution)
                load_submodule(level, state_of(config.checkpoint, what), prefixes, what, config.checkpoint)
                loaded.add(resolution)
            if not self.is_trained(resolution):
                if resolution not in loaded:
                    warnings.warn(f"the level at {resolution}px is frozen but no checkpoint holds it: "
                                  "it stays at its random initialization", stacklevel=3)
                level.requires_grad_(False).eval()

    def _load_all_levels(self, state: dict) -> set[int]:
        loaded = set()
        for resolution in self.model.resolutions:
            prefix = "model.base." if resolution == self.model.base.image_size else f"model.levels.{resolution}."
            if any(k.startswith(prefix) for k in state):
                load_submodule(self.model.model(resolution), state, [prefix], self.level_name(resolution),
                               self.init_checkpoint)
                loaded.add(resolution)
        if not loaded:
            raise ValueError(f"init_checkpoint {self.init_checkpoint!r} holds no level of a cascade; "
                             "give a checkpoint written by a CascadeModule run")
        return loaded

    def train(self, mode: bool = True):
        super().train(mode)
        for resolution in self.model.resolutions:  # frozen levels never leave eval mode
            if not self.is_trained(resolution):
                self.model.model(resolution).eval()
        return self

    def optimizer_groups(self) -> list[OptimizerGroup]:
        groups = []
        for resolution in self.trained_resolutions:
            name = self.level_name(resolution)
            params = list(self.model.model(resolution).parameters())
            groups.append(OptimizerGroup(name, params, optimizer_settings(self.level_config(resolution))))
        return groups

    def level_name(self, resolution: int) -> str:
        cc = "CC" if self.num_classes else ""
        if resolution == self.model.base.image_size:
            return f"Glow{cc}{resolution}"
        sigma = self.level_config(resolution).sigma
        return f"SRF{cc}{resolution}" + (f"({sigma:.2f})" if sigma > 0 else "")

    @property
    def model_name(self) -> str:
        """Tables 4.2 / 4.3 naming, e.g. Glow16-SRF32(0.02)-SRF64(0.50)."""
        return "-".join(self.level_name(r) for r in self.model.resolutions)

    @property
    def resolutions(self) -> list[int]:
        return self.model.resolutions

    @property
    def in_channels(self) -> int:
        return self.model.base.in_channels

    # --- the encoder freeze schedule -------------------------------------------------
    def encoder_frozen(self, resolution: int) -> bool:
        config = self.level_config(resolution)
        return not self.is_trained(resolution) or self.global_step < config.freeze_encoder_steps

    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        for resolution in self.trained_resolutions:
            if resolution != self.model.base.image_size:
                encoder = self.model.model(resolution).encoder
                encoder.requires_grad_(not self.encoder_frozen(resolution))

    # --- losses ------------------------------------------------------------------------
    def prepare_batch(self, batch: dict, noise: bool = True) -> tuple[dict[int, Tensor], Tensor]:
        images, labels = super().prepare_batch(batch, noise)
        # The images at their bin centres, taken from the uint8 batch (not by rounding
        # the noisy ones): a level's clean condition is the one at half its resolution
        # (flows/cascade.py). compute_losses always runs right after prepare_batch.
        self._clean_images = {int(r): dequantize(batch["images"][r], self.n_bits, noise=False)
                              for r in self.model.resolutions}
        return images, labels

    def _level_log_prob(self, resolution: int, x: Tensor, condition: Tensor | None,
                        y: Tensor | None):
        model = self.model.model(resolution)
        labels = y if self.num_classes else None
        if model is self.model.base:
            return model.encode(x, labels)
        if self.encoder_frozen(resolution):
            with torch.no_grad():
                features = model.features(condition)
            return model.encode(x, condition, labels, features=features)
        return model.encode(x, condition, labels)

    def compute_losses(self, images: dict[int, Tensor], labels: Tensor) -> LossOutput:
        clean = self._clean_images
        conditions = {r: clean[r // 2] for r in self.model.resolutions[1:]}
        extra: dict[str, Tensor] = {}
        training = self.training
        # While training, frozen levels are skipped (they cost compute and have no loss);
        # evaluation computes every level, so the cascade's bpd is exact.
        resolutions = self.trained_resolutions if training else self.model.resolutions
        level_log_probs: dict[int, Tensor] = {}
        loss = images[self.model.resolutions[0]].new_zeros(())
        for resolution in resolutions:
            config = self.level_config(resolution)
            condition = conditions.get(resolution)
            if training and resolution != self.model.base.image_size and config.sigma > 0:
                noisy = self.model.variational_condition(resolution, conditions, config.sigma,
                                                         labels, self.max_reconstruction_abs)
                condition = noisy.images
                extra[f"replacement_rate_{resolution}"] = noisy.failure_rate
            grad_context = torch.enable_grad() if self.is_trained(resolution) else torch.no_grad()
            with grad_context:
                encoding = self._level_log_prob(resolution, images[resolution], condition, labels)
            log_prob = encoding.log_prob
            level_log_probs[resolution] = log_prob
            dims = self.model.model(resolution).dims
            level_loss = -log_prob.mean() / (dims * math.log(2.0)) + self.n_bits
            if self.num_classes:
                class_bits = self.model.model(resolution).class_loss(encoding, labels) / math.log(2.0)
                level_loss = level_loss + self.class_loss_weight * class_bits.mean()
                extra[f"class_bits_{resolution}"] = class_bits.mean()
            if resolution != self.model.base.image_size:
                extra[f"bpd_{resolution}_given_{resolution // 2}"] = \
                    bits_per_dim(log_prob.detach(), dims, self.n_bits).mean()
            if self.is_trained(resolution):
                loss = loss + level_loss
        if training and self.failure_probe_every_n_steps and \
                self.global_step % self.failure_probe_every_n_steps == 0:
            extra.update(self._failure_probe(clean, conditions, labels))
        # The cascade's exact log-likelihood at each resolution whose levels all ran,
        # log P(x_R) (flows/cascade.py), handed to the base as the equivalent density of
        # x_R (log P(x_R) minus x_R's bin volume) so its bpd formula gives
        # -log P(x_R) / (D_R log 2). Empty while training with a frozen base: then
        # only the levels' own figures are logged.
        cumulative = {r: log_p - self.model.bin_log_volume(r)
                      for r, log_p in self.model.accumulate(level_log_probs).items()}
        dims = {r: self.model.model(r).dims for r in cumulative}
        batch_size = images[self.model.resolutions[0]].shape[0]
        return LossOutput(loss, cumulative, dims, extra, batch_size)

    @torch.no_grad()
    def _failure_probe(self, clean, conditions, labels) -> dict[str, Tensor]:
        """Sample failure rate (seed 000 sec. 4.4.2): the share of training images whose
        reconstruction through the level, after adding sigma noise to every latent, has
        a non-finite value."""
        out = {}
        for resolution in self.trained_resolutions:
            for sigma in self.failure_probe_sigmas:
                recon = self.model.reconstruct_with_latent_noise(
                    resolution, clean[resolution], sigma, conditions.get(resolution), labels, max_abs=math.inf)
                out[f"failure_rate_{resolution}_sigma{sigma:g}"] = recon.failure_rate
        return out

    def sample_images(self, n: int, temperature: float | list[float]) -> dict[int, Tensor]:
        y = None
        if self.num_classes:
            y = torch.arange(n, device=self.device) % self.num_classes
        return self.model.sample(n, temperature, y)
