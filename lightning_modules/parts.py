"""Parts: the pieces of a module's model that train on their own terms.

A LightningModule names its parts (:meth:`FlowModule.parts`); the base does the rest
for every family:

* one optimizer parameter group per trainable part, with the part's own
  :class:`OptimizerSettings` (Adamax or Adam, linear warm-up, step decay);
* loading a part from a checkpoint (``Part.checkpoint``, or a module-wide
  ``init_checkpoint`` that feeds every part it holds), and sub-modules from their own
  checkpoints when the part itself is not loaded (``Part.initial_weights``: an SR
  stage's RRDB encoder from its L1 pre-training);
* freezing: a part with ``trainable=False`` has no gradients, no optimizer state and
  stays in eval mode (a frozen stage, a frozen Glow under a DDPM prior);
* :class:`Freeze` schedules for sub-modules: frozen for the first N optimizer steps
  (the RRDB encoder, seed 000 sec. 4.3.2) or from an epoch on (seed 001's encoders).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, Literal

import torch
from torch import nn

from lightning_modules.checkpoint_files import read_state_dict, state_dict_mismatch
from lightning_modules.errors import ConfigurationError


@dataclass
class OptimizerSettings:
    """Settings of one parameter group. Defaults: seed 000 sec. 4.3.2 for Glow (Adamax
    5e-4, betas (0.9, 0.999), weight decay 5e-5, linear warm-up over 5 epochs).

    ``warmup_steps`` overrides ``warmup_epochs`` when set; the learning rate is
    multiplied by ``lr_gamma`` at each of ``lr_milestones`` (optimizer steps) and by
    ``epoch_decay`` (seed 001 Table 2: 0.92 for the encoders, 0.95 for the decoders and
    flows) at the end of every epoch e (counted from 1) that is a multiple of
    ``epoch_decay_every`` and later than ``epoch_decay_after``. The defaults (1, 0) decay
    after every epoch; seed 001's official code on one GPU (``hflow/utils.py``) decays
    every second epoch after epoch 10 (2, 10), on several GPUs (``model.py``) every
    second epoch from the start (2, 0).

    ``algorithm: adamw`` is Adam with decoupled weight decay (Loshchilov & Hutter;
    apple/ml-tarflow's ``train.py``: AdamW, betas (0.9, 0.95), weight decay 1e-4).
    ``decay: cosine`` follows the warm-up with a half cosine from ``lr`` down to
    ``lr_floor`` at the run's last optimizer step (``trainer.max_steps``, else
    ``max_epochs`` epochs; ``decay_steps`` fixes it instead): ml-tarflow's
    ``CosineLRSchedule`` (floor 1e-6). The warm-up there starts at the floor, here at 0
    (a difference of 1e-6 in the first step's rate)."""

    algorithm: Literal["adamax", "adam", "adamw"] = "adamax"
    lr: float = 5e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 5e-5
    warmup_epochs: float = 5.0
    warmup_steps: int | None = None
    lr_milestones: list[int] = field(default_factory=list)
    lr_gamma: float = 0.5
    epoch_decay: float = 1.0
    epoch_decay_every: int = 1
    epoch_decay_after: int = 0
    decay: Literal["none", "cosine"] = "none"
    lr_floor: float = 0.0
    decay_steps: int | None = None

    @classmethod
    def adam(cls, lr: float, **changes) -> "OptimizerSettings":
        """Adam (0.9, 0.999) without weight decay or warm-up, the preset of every family
        that does not use Glow's Adamax (DDPM 2e-4, seed 001 Table 2, SRFlow's RRDB
        2e-4); ``changes`` set the other fields (e.g. ``epoch_decay``)."""
        return cls(**{"algorithm": "adam", "lr": lr, "betas": (0.9, 0.999), "weight_decay": 0.0,
                      "warmup_epochs": 0.0, **changes})

    def validate(self, name: str = "optimizer") -> None:
        """Raise ConfigurationError on settings that cannot train. Called when a module is
        built (not at parse time, where jsonargparse would bury the message)."""
        problems = []
        if not (math.isfinite(self.lr) and self.lr > 0):
            problems.append(f"lr must be a positive number, got {self.lr}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            problems.append(f"betas must be two numbers in [0, 1), got {list(self.betas)}")
        if not self.weight_decay >= 0:
            problems.append(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not self.warmup_epochs >= 0 or (self.warmup_steps is not None and self.warmup_steps < 0):
            problems.append(f"warm-up must be >= 0, got warmup_epochs={self.warmup_epochs}, "
                            f"warmup_steps={self.warmup_steps}")
        if any(m < 0 for m in self.lr_milestones) or not self.lr_gamma > 0:
            problems.append(f"lr_milestones must be >= 0 and lr_gamma > 0, got {self.lr_milestones}, "
                            f"{self.lr_gamma}")
        if not 0.0 < self.epoch_decay <= 1.0:
            problems.append(f"epoch_decay must lie in (0, 1], got {self.epoch_decay}")
        if self.epoch_decay_every < 1 or self.epoch_decay_after < 0:
            problems.append(f"epoch_decay_every must be >= 1 and epoch_decay_after >= 0, got "
                            f"{self.epoch_decay_every}, {self.epoch_decay_after}")
        if not 0.0 <= self.lr_floor <= self.lr:
            problems.append(f"lr_floor must lie in [0, lr], got {self.lr_floor} with lr {self.lr}")
        if self.decay_steps is not None and self.decay_steps < 1:
            problems.append(f"decay_steps must be >= 1 (or null: the run's length), got {self.decay_steps}")
        if problems:
            raise ConfigurationError(f"{name}: " + "; ".join(problems) + ".")


class RelativeGradientClipping:
    """Clip the global gradient norm to ``factor`` times its running average.

    An absolute threshold (``grad_clip_norm``) has to be tuned per model size: the
    gradient norm of a mean bits/dim loss grows with the number of parameters, and a
    threshold below the typical norm clips every step and slows learning
    (``benchmarks/learning_curves.py``: "+ grad clip" vs "+ grad clip (loose)"). A
    threshold relative to the norm's own exponential moving average (``decay``) only
    cuts the outliers that start loss spikes, at any model size. The average is updated
    with the clipped norm, so a spike does not raise the threshold for the steps after
    it; the first step sets it and is not clipped. ``state`` goes into checkpoints, so
    a resumed run clips exactly as the uninterrupted one would."""

    def __init__(self, factor: float, decay: float = 0.99) -> None:
        if not factor > 1.0 or not 0.0 < decay < 1.0:
            raise ConfigurationError(f"relative gradient clipping needs factor > 1 and decay in (0, 1), got "
                                     f"{factor}, {decay}")
        self.factor, self.decay = factor, decay
        self.average: float | None = None

    def threshold(self) -> float:
        return math.inf if self.average is None else self.factor * self.average

    def update(self, grad_norm: float) -> None:
        """Record one finite (pre-clipping) gradient norm."""
        clipped = min(grad_norm, self.threshold())
        self.average = clipped if self.average is None else self.decay * self.average + (1 - self.decay) * clipped

    def state(self) -> dict:
        return {"average": self.average}

    def load_state(self, state: dict | None) -> None:
        self.average = (state or {}).get("average")


@dataclass
class Freeze:
    """``module`` has no gradients before optimizer step ``before_step`` and from epoch
    ``from_epoch`` on (None: never)."""

    module: nn.Module
    before_step: int = 0
    from_epoch: int | None = None

    def frozen(self, step: int, epoch: int) -> bool:
        return step < self.before_step or (self.from_epoch is not None and epoch >= self.from_epoch)


@dataclass
class InitialWeights:
    """Weights for ``module`` (a sub-module of a part) from ``checkpoint``, found under
    the first of ``prefixes`` present there; ``what`` names it in messages."""

    module: nn.Module
    checkpoint: str
    prefixes: list[str]
    what: str


@dataclass
class Part:
    """``name``: shown in the optimizer groups and the logs. ``prefixes``: where the part
    lives in a checkpoint's state dict, the first found is used (this module's own key
    first). ``checkpoint``: load the part from there."""

    name: str
    module: nn.Module
    optimizer: OptimizerSettings
    prefixes: list[str]
    trainable: bool = True
    checkpoint: str | None = None
    initial_weights: list[InitialWeights] = field(default_factory=list)
    freezes: list[Freeze] = field(default_factory=list)


@dataclass
class OptimizerGroup:
    name: str
    params: list
    settings: OptimizerSettings


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
                "Use the same settings as the run that wrote it.")
        module.load_state_dict(sub)
        return
    raise ValueError(f"{what}: checkpoint {source!r} holds no tensors under {prefixes}; "
                     "is it a checkpoint of this kind of model?")


def load_and_freeze(parts: list[Part], init_checkpoint: str | None = None) -> set[str]:
    """Load every part from ``init_checkpoint`` (those it holds) and from its own
    checkpoint, sub-modules from theirs when their part was not loaded, then freeze the
    parts that do not train. Each file is read once. Returns the loaded parts' names."""
    states: dict[str, dict] = {}

    def state_of(path: str, what: str) -> dict:
        if path not in states:
            states[path] = read_state_dict(path, what)
        return states[path]

    for part in parts:
        part.optimizer.validate("optimizer" if part.name == "model" else f"optimizer of {part.name}")
    loaded: set[str] = set()
    if init_checkpoint:
        state = state_of(init_checkpoint, "init_checkpoint")
        for part in parts:
            if any(k.startswith(part.prefixes[0]) for k in state):
                load_submodule(part.module, state, part.prefixes[:1], part.name, init_checkpoint)
                loaded.add(part.name)
        if not loaded:
            raise ValueError(f"init_checkpoint {init_checkpoint!r} holds none of this module's parts "
                             f"({[p.name for p in parts]}); give a checkpoint written by the same kind of module")
    for part in parts:
        if part.checkpoint:
            load_submodule(part.module, state_of(part.checkpoint, part.name), part.prefixes, part.name,
                           part.checkpoint)
            loaded.add(part.name)
        if part.name not in loaded:
            for initial in part.initial_weights:
                load_submodule(initial.module, state_of(initial.checkpoint, initial.what), initial.prefixes,
                               initial.what, initial.checkpoint)
        if not part.trainable:
            if part.name not in loaded:
                warnings.warn(f"{part.name} is frozen but no checkpoint holds it: it stays at its random "
                              "initialization", stacklevel=3)
            part.module.requires_grad_(False).eval()
    return loaded


def epoch_decays(epoch: int, every: int = 1, after: int = 0) -> int:
    """How many epoch decays apply during ``epoch`` (0-based): the completed epochs
    e = 1..epoch that are multiples of ``every`` and greater than ``after`` (the official
    code's ``x % 2 == 0 and x != 0 and x > LEARNING_RATE_DECAY_START`` for a
    MultiplicativeLR stepped once per epoch)."""
    if epoch <= after:
        return 0
    return epoch // every - after // every


def lr_factor(settings: OptimizerSettings, steps_per_epoch: Callable[[], int],
              total_steps: Callable[[], int] | None = None) -> Callable[[int], float]:
    """The learning-rate multiplier at an optimizer step: linear warm-up, then a factor
    ``lr_gamma`` per milestone passed and ``epoch_decay`` per decaying epoch completed
    (:func:`epoch_decays`), and with ``decay: cosine`` the half cosine from 1 to
    ``lr_floor / lr`` between the warm-up's end and the last step (``total_steps``: the
    run's optimizer steps). ``steps_per_epoch`` counts optimizer steps (micro-batches
    accumulated into one step count once)."""
    warmup = settings.warmup_steps
    if warmup is None:
        warmup = int(round(settings.warmup_epochs * steps_per_epoch())) if settings.warmup_epochs else 0
    if settings.decay == "cosine":  # the multiplier after the warm-up: the cosine, or 1
        if settings.decay_steps is None and total_steps is None:
            raise ConfigurationError("decay: cosine needs the run's length: set trainer.max_steps or max_epochs, "
                                     "or the optimizer's decay_steps")
        end = settings.decay_steps if settings.decay_steps is not None else total_steps()
        floor = settings.lr_floor / settings.lr

        def shape(step: int) -> float:
            t = min(1.0, max(0.0, (step - warmup) / max(1, end - warmup)))
            return floor + 0.5 * (1.0 + math.cos(math.pi * t)) * (1.0 - floor)
    else:
        def shape(step: int) -> float:
            return 1.0
    milestones = sorted(settings.lr_milestones or [])
    gamma = settings.lr_gamma
    epoch_decay = settings.epoch_decay
    epoch_steps = steps_per_epoch() if epoch_decay != 1.0 else 1
    every, after = settings.epoch_decay_every, settings.epoch_decay_after

    def factor(step: int) -> float:
        ramp = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
        decays = epoch_decays(step // epoch_steps, every, after)
        return ramp * shape(step) * gamma ** sum(1 for m in milestones if step >= m) * epoch_decay ** decays

    return factor


def build_optimizer(groups: list[OptimizerGroup], steps_per_epoch: Callable[[], int],
                    total_steps: Callable[[], int] | None = None) -> dict:
    """One optimizer over the groups (they share an algorithm) and a per-step schedule
    (``total_steps``: the run's optimizer steps, for a cosine decay)."""
    groups = [g for g in groups if g.params]
    if not groups:
        raise ValueError("nothing to train: every part is frozen")
    algorithms = {g.settings.algorithm for g in groups}
    if len(algorithms) > 1:
        raise ValueError(f"the parts ask for different optimizers {sorted(algorithms)}; use one algorithm")
    optimizer_class = {"adamax": torch.optim.Adamax, "adam": torch.optim.Adam,
                       "adamw": torch.optim.AdamW}[algorithms.pop()]
    optimizer = optimizer_class(
        [{"params": g.params, "lr": g.settings.lr, "betas": tuple(g.settings.betas),
          "weight_decay": g.settings.weight_decay, "name": g.name} for g in groups])
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, [lr_factor(g.settings, steps_per_epoch, total_steps) for g in groups])
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def total_steps(trainer) -> int:
    """The run's optimizer steps: ``max_steps`` when set, else ``max_epochs`` epochs."""
    if trainer.max_steps is not None and trainer.max_steps > 0:
        return int(trainer.max_steps)
    if trainer.max_epochs is None or trainer.max_epochs < 0:
        raise ConfigurationError("decay: cosine needs the run's length: set trainer.max_steps or max_epochs, or the "
                                 "optimizer's decay_steps")
    return int(trainer.max_epochs) * steps_per_epoch(trainer)


def steps_per_epoch(trainer) -> int:
    """Optimizer steps per epoch: batches per process, over the module's
    ``accumulate_grad_batches`` (a partial group at the end of an epoch is one step)."""
    datamodule = getattr(trainer, "datamodule", None)
    if datamodule is None:
        raise ValueError("warmup_epochs needs a datamodule to count steps; set warmup_steps")
    batches = math.ceil(len(datamodule.train_dataloader()) / max(1, trainer.world_size))
    accumulate = getattr(getattr(trainer, "lightning_module", None), "accumulate_grad_batches", 1)
    return max(1, math.ceil(batches / max(1, int(accumulate))))


class TrainableParts:
    """LightningModule hooks for parts (``FlowModule`` mixes them in): by default one
    part, the whole model with the module's ``optimizer_settings``; a family with parts
    overrides :meth:`parts` and calls :meth:`load_parts` at the end of ``__init__``."""

    def parts(self) -> list[Part]:
        return [Part("model", self.model, getattr(self, "optimizer_settings", OptimizerSettings()), ["model."])]

    def load_parts(self, init_checkpoint: str | None = None) -> None:
        """Load and freeze the parts."""
        load_and_freeze(self.parts(), init_checkpoint)

    def train(self, mode: bool = True):
        super().train(mode)
        for part in self.parts():  # frozen parts never leave eval mode
            if not part.trainable:
                part.module.eval()
        return self

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        for part in self.parts():
            if part.trainable:
                for freeze in part.freezes:
                    freeze.module.requires_grad_(not freeze.frozen(self.global_step, self.current_epoch))

    def optimizer_groups(self) -> list[OptimizerGroup]:
        return [OptimizerGroup(part.name, list(part.module.parameters()), part.optimizer)
                for part in self.parts() if part.trainable]
