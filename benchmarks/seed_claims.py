"""The seeds' claims tested where the models have converged: one study on the MNIST data
at hand (issue 33), in one command, model by model:

    python -m benchmarks.seed_claims                      # ../shared/data/mnist, CPU, ~3 h on 2 cores
    python -m benchmarks.seed_claims --only glow,cascade  # some models (the table keeps the others')
    python -m benchmarks.seed_claims --resume             # go on after a kill: finished models kept,
                                                          # an unfinished one resumes from last.ckpt
    python -m benchmarks.seed_claims --figures docs/figures   # also the README's plot and grids

What it does:

1. **Data**: the MNIST *test* split (the training files are not on this machine): 9,000
   images to train, 1,000 held out (100 per class, a fixed permutation, seed 0), resized
   to ``--resolution`` (16 by default: 28 -> 16 bilinear, 8-bit). Every model sees the same
   images and is scored by the same code. Where the folder is absent it says so and
   exits 0.
2. **FID features**: ``experiments/mnist_classifier.yaml`` trains the LeNet on the same
   9,000 training images at the study's resolution; its penultimate features are the
   ``mnist-lenet`` extractor of every FID and KID here. The **floor** is computed, not
   typed: the FID of 1,000 *training* images against the 1,000 held-out ones, what a
   perfect model scores at this sample size on these features.
3. **Models** (:data:`MODELS`): each derived from its shipped config with only its size
   (:attr:`Model.size`) and its budget changed (steps, batch, schedules scaled to the
   run: :func:`budget`), both printed with the table and written beside each derived
   config in ``--out``. Every model trains until it has **converged**: its held-out
   figure (the shipped checkpoint monitor: exact bits/dim, the bound, or the noisy data's
   figure) changes by less than ``--tolerance`` (0.02) between 80 % and 100 % of its
   steps; if not, it trains on (``--extensions`` times, each adding half the steps) and
   the table marks a model that never got there.
4. **Per model**, from the checkpoint its validation picked as best: parameters, steps,
   CPU minutes, held-out bits/dim of every resolution it models (exact, or the bound,
   labelled; a noise-augmented model in its own units), FID and KID of ``--fid-samples``
   samples with a bootstrap interval over samples (the FID of resampled sample sets,
   2.5-97.5 %), seconds for 25 samples (the DDPMs over all T steps and with DDIM), the
   fraction of non-finite and of out-of-range samples at every reported temperature, a
   labelled 5x5 grid and the learning curve.
5. **Claims** (:data:`CLAIMS`): each as its seed states it, judged on the FID intervals:
   *holds* where the intervals are apart the stated way, *does not hold* where they are
   apart the other way, *inconclusive* where they overlap (then ``--second-seed`` trains
   both models again with seed 1 and the verdict uses the two seeds' intervals).

Output: ``--out/table.md`` (date, machine, command, the table, the claims), the raw
numbers in ``--out/results.json``, ``--out/curves.png`` and ``--out/grids.png`` (copied
to ``--figures``). ``--smoke`` runs the whole path at toy sizes (the test suite runs it
on a fake MNIST folder). Not a test.
"""
from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "mnist"
DDIM_STEPS = 50
STATE = "results.partial.json"  # the models finished so far (``--resume`` keeps them)
CHILD_ENVIRONMENT: dict[str, str] = {}  # extra environment of the training subprocesses


@dataclass(frozen=True)
class Phase:
    """One fit of a model trained in phases: ``changes`` to ``model.init_args`` (the
    string ``PREVIOUS`` stands for the previous phase's best checkpoint) and the held-out
    figure that picks its best checkpoint."""

    name: str
    changes: tuple
    monitor: str


PREVIOUS = "<the previous phase's best checkpoint>"


@dataclass(frozen=True)
class Model:
    """One row of the study: a shipped config and what the study changes in it.

    ``size``: (dotted path under ``model.init_args``, value) pairs, the only model changes.
    ``overlays``: shipped configs applied on top (as ``--config a --config b``).
    ``pyramid``: the lower resolutions the data module must also give (a cascade).
    ``temperatures``: the sampling temperatures reported (the first is the FID's).
    ``steps_factor``: its step budget relative to ``--steps`` (a model the seed trains
    longer). ``monitor``: the held-out figure to pick the best checkpoint by, where an
    overlay changes what the shipped config monitors (noise augmentation). ``phases``:
    a model trained in several fits, each a :class:`Phase` (a cascade's stages, the
    previous one finished and frozen); each phase gets the model's steps."""


    label: str
    config: str
    size: tuple = ()
    smoke: tuple = ()
    overlays: tuple = ()
    pyramid: tuple = ()
    temperatures: tuple = (1.0,)
    steps_factor: float = 1.0
    seed_numbers: str = "-"
    monitor: str | None = None  # the checkpoint monitor where the overlays change it
    phases: tuple = ()


UNET = "model.init_args.denoiser.init_args"
DF_UNET = "flow.init_args.joint_prior.init_args.denoiser.init_args"
GLOW_SMOKE = (("flow.init_args.steps_per_scale", 1), ("flow.init_args.hidden_channels", 8))


def hierarchical_levels(resolution: int, hidden: int) -> list[dict]:
    """Seed 001 Config A's ladder (quick_hierarchical.yaml) for a 1-channel image of side
    ``resolution``: the image, a half-resolution level, a 4x4 level and the two 1x1 levels;
    each level's loss weight is its config's numerator over its dimensions, as there. A
    1-channel level has no channel coupling (C), so the image level uses checkerboard
    couplings (S2) only."""
    half = resolution // 2
    return [
        {"resolution": resolution, "channels": 1, "couplings": ["S2", "S2", "S2", "S2"], "coupling_hidden": hidden,
         "cond_channels": 16, "loss_weight": 1.0 / (resolution * resolution), "decoder_hidden": hidden},
        {"resolution": half, "channels": 4, "couplings": ["C", "C", "S2", "S2", "S4", "S4"], "coupling_hidden": hidden,
         "cond_channels": 16, "alpha_flow": 0.4, "alpha_decoder": 0.4, "loss_weight": 10.0 / (half * half * 4),
         "conditioning_unet": True, "encoder_hidden": hidden, "decoder_hidden": hidden},
        {"resolution": 4, "channels": 8, "couplings": ["C", "C", "C", "C"], "coupling_hidden": hidden,
         "cond_channels": 32, "alpha_flow": 0.05, "alpha_decoder": 0.05, "loss_weight": 1.0 / (4 * 4 * 8),
         "encoder_hidden": hidden, "decoder_hidden": hidden},
        {"resolution": 1, "channels": 28, "couplings": ["C", "C", "C", "C"], "coupling_hidden": hidden,
         "cond_channels": 16, "alpha_flow": 0.05, "alpha_decoder": 0.075, "loss_weight": 1.0 / 2 ** 7,
         "invconv": "unitary", "encoder_hidden": hidden, "decoder_hidden": hidden},
        {"resolution": 1, "channels": 4, "couplings": ["C", "C", "C", "C"], "coupling_hidden": hidden,
         "alpha_flow": 0.05, "alpha_decoder": 0.075, "loss_weight": 1.0 / 2 ** 7, "invconv": "unitary"},
    ]


def srflow_stage(resolution: int, hidden: int, steps: int, rrdb: int) -> dict:
    """celeba_cascade.yaml's first SR stage (SRF32(0.02): squish, affine injector, the
    seed's sigma 0.02 of sec. 3.2) at ``resolution`` from half of it; no pre-trained RRDB
    here, so the encoder trains from the start (``freeze_encoder_steps: 0``)."""
    return {"sigma": 0.02, "flow": {"class_path": "flows.SRFlow", "init_args": {
        "image_size": resolution, "in_channels": 1, "scales": 2, "steps_per_scale": steps, "hidden_channels": hidden,
        "scale_fn": "squish", "squish_alpha": 0.5, "affine_injector": True, "rrdb_blocks": rrdb,
        "rrdb_features": 32, "rrdb_growth": 16}},
        "encoder_checkpoint": None, "freeze_encoder_steps": 0,
        "optimizer": {"lr": 2.5e-4, "betas": [0.9, 0.99], "weight_decay": 0.0, "warmup_epochs": 0.0,
                      "lr_milestones": [100000, 150000, 180000, 190000]}}


def models(resolution: int) -> dict[str, Model]:
    """The study's rows at ``resolution``. Sizes chosen by measurement on the 2-core CPU so
    the whole study fits in about 3 hours (README "The seeds' claims"); the Glow and the
    cascade have about the same parameters (seed 000's comparison)."""
    low = resolution // 2
    return {
        "glow": Model(
            "Glow", "experiments/glow_mnist.yaml",
            size=(("flow.init_args.image_size", resolution), ("flow.init_args.scales", 2),
                  ("flow.init_args.steps_per_scale", 8), ("flow.init_args.hidden_channels", 224), ("n_bits", 8)),
            smoke=GLOW_SMOKE + (("flow.init_args.image_size", resolution), ("flow.init_args.scales", 2),
                                ("n_bits", 8)),
            temperatures=(1.0, 0.8), seed_numbers="seed 000 Table 4.2 CelebA 64: Glow FID 34.5 (Inception)"),
        "cascade": Model(
            f"Glow{low}-SRF{resolution}(0.02)", "experiments/celeba_cascade.yaml",
            size=(("base.flow.init_args.image_size", low), ("base.flow.init_args.in_channels", 1),
                  ("base.flow.init_args.scales", 2), ("base.flow.init_args.steps_per_scale", 6),
                  ("base.flow.init_args.hidden_channels", 96),
                  ("sr_stages", [srflow_stage(resolution, 48, 4, 2)])),
            smoke=(("base.flow.init_args.image_size", low), ("base.flow.init_args.in_channels", 1),
                   ("base.flow.init_args.scales", 1), ("base.flow.init_args.steps_per_scale", 1),
                   ("base.flow.init_args.hidden_channels", 8), ("sr_stages", [srflow_stage(resolution, 8, 1, 1)])),
            pyramid=(low,), temperatures=(0.8, 1.0),  # sec. 4.4: the cascade samples at 0.8
            # sec. 3.2: a variational stage trains against the finished, frozen stage below
            phases=(Phase(f"base{low}", (("train_stages", [low]),), f"val/bpd_{low}"),
                    Phase(f"srf{resolution}", (("train_stages", [resolution]), ("init_checkpoint", PREVIOUS)),
                          f"val/bpd_bound_{resolution}")),
            seed_numbers="seed 000 Table 4.2 CelebA 64: Glow16-SRF32-SRF64 FID 19.8 vs Glow 34.5"),
        "hierarchical": Model(
            "Hierarchical (seed 001)", "experiments/quick_hierarchical.yaml",
            size=(("flow.init_args.levels", hierarchical_levels(resolution, 32)),
                  ("flow.init_args.var_batch_size", 4), ("n_bits", 8)),
            smoke=(("flow.init_args.levels", hierarchical_levels(resolution, 8)), ("n_bits", 8)),
            temperatures=(0.7, 1.0),  # Fig. 4: 0.7 above resolution 1
            seed_numbers="seed 001 Table 5 / Fig. 7b: FID well below Glow's with fewer parameters"),
        "nsf": Model(
            "NSF", "experiments/nsf_mnist.yaml",
            size=(("flow.init_args.image_size", resolution), ("flow.init_args.scales", 2),
                  ("flow.init_args.steps_per_scale", 4), ("flow.init_args.coupling_net.init_args.num_blocks", 1)),
            smoke=(("flow.init_args.image_size", resolution), ("flow.init_args.scales", 2),
                   ("flow.init_args.steps_per_scale", 1), ("flow.init_args.hidden_channels", 8),
                   ("flow.init_args.coupling_net.init_args.num_blocks", 1)),
            seed_numbers="seed 003 Table 5.4 MNIST: NSF FID 2.58, 0.21 s / 25 samples"),
        "diffused_flows": Model(
            "Diffused-Flows", "experiments/diffusion_flow_mnist.yaml",
            size=(("flow.init_args.image_size", resolution), ("flow.init_args.scales", 2),
                  ("flow.init_args.steps_per_scale", 2), ("flow.init_args.coupling_net.init_args.num_blocks", 1),
                  (f"{DF_UNET}.attention_resolutions", [resolution // 2]),
                  (f"{DF_UNET}.base_channels", 32), (f"{DF_UNET}.num_res_blocks", 1)),
            smoke=(("flow.init_args.image_size", resolution), ("flow.init_args.scales", 2),
                   ("flow.init_args.steps_per_scale", 1), ("flow.init_args.hidden_channels", 8),
                   ("flow.init_args.coupling_net.init_args.num_blocks", 1), (f"{DF_UNET}.base_channels", 8),
                   (f"{DF_UNET}.num_res_blocks", 1), ("flow.init_args.joint_prior.init_args.timesteps", 10)),
            seed_numbers="seed 003 Table 5.4 MNIST: FID 1.85, 15.12 s / 25 samples"),
        "pixel_ddpm": Model(
            "DDPM", "experiments/pixel_ddpm_mnist.yaml",
            # attention at the middle level of the three, as shipped (16 of 32)
            size=(("model.init_args.image_size", resolution), (f"{UNET}.attention_resolutions", [resolution // 2]),
                  (f"{UNET}.base_channels", 32), (f"{UNET}.num_res_blocks", 1)),
            smoke=(("model.init_args.image_size", resolution), (f"{UNET}.attention_resolutions", [resolution // 2]),
                   (f"{UNET}.base_channels", 8), (f"{UNET}.num_res_blocks", 1), ("model.init_args.timesteps", 20)),
            seed_numbers="seed 003 Table 5.4 MNIST: FID 1.05, 28.97 s / 25 samples"),
        "tarflow": Model(
            "TarFlow (noise aug., denoised)", "experiments/tarflow_imagenet64.yaml",
            overlays=("experiments/noise_augmentation.yaml",), monitor="val/noisy_data_nll_bits_64",
            size=(("flow.init_args.image_size", resolution), ("flow.init_args.in_channels", 1),
                  ("flow.init_args.patch_size", 2), ("flow.init_args.channels", 128), ("flow.init_args.blocks", 4),
                  ("flow.init_args.layers_per_block", 2), ("flow.init_args.head_channels", 32)),
            smoke=(("flow.init_args.image_size", resolution), ("flow.init_args.in_channels", 1),
                   ("flow.init_args.patch_size", 4), ("flow.init_args.channels", 16), ("flow.init_args.blocks", 2),
                   ("flow.init_args.layers_per_block", 1), ("flow.init_args.head_channels", 8)),
            seed_numbers="Zhai et al. 2024 Table 3 ImageNet 64: 2.99 bits/dim; better FIDs than Glow-type flows"),
    }


@dataclass(frozen=True)
class Claim:
    """``better`` should score a lower FID than ``worse`` (by the intervals); ``also``:
    what else the seed states, checked and printed beside."""

    key: str
    statement: str
    better: str
    worse: str
    also: str = ""


CLAIMS = [
    Claim("seed000", "seed 000 Tables 4.2/4.3: a cascade (low-resolution Glow + SRFlow stage, variational "
          "sigma, temperature 0.8) has a better FID than a single Glow of about the same parameters and steps",
          "cascade", "glow", "parameters"),
    Claim("seed001", "seed 001 Fig. 7b / Table 5: the hierarchical conditional flow has a much better FID than "
          "Glow, with fewer parameters", "hierarchical", "glow", "fewer_parameters"),
    Claim("seed003_nsf", "seed 003 Tables 5.2/5.4: Diffused-Flows has a better FID than NSF", "diffused_flows",
          "nsf"),
    Claim("seed003_ddpm", "seed 003 Table 5.4: Diffused-Flows' FID is close to the pixel DDPM's (within its "
          "interval, or better)", "diffused_flows", "pixel_ddpm", "close"),
    Claim("tarflow", "Zhai et al. 2024: TarFlow (noise augmentation, denoised samples) has a better FID than "
          "Glow", "tarflow", "glow"),
]


def set_path(tree: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    for key in keys[:-1]:
        if key not in tree:
            raise KeyError(f"{dotted}: {key!r} is not in the shipped config; the config changed, update "
                           "benchmarks/seed_claims.py")
        tree = tree[key]
    tree[keys[-1]] = value


def merge(base: dict, overlay: dict) -> dict:
    """``overlay`` on ``base`` as LightningCLI merges two --config files (dicts merge,
    anything else replaces)."""
    out = copy.deepcopy(base)
    for key, value in overlay.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) \
            else copy.deepcopy(value)
    return out


def shipped_config(model: Model) -> dict:
    config = yaml.safe_load((ROOT / model.config).read_text())
    for overlay in model.overlays:
        config = merge(config, yaml.safe_load((ROOT / overlay).read_text()))
    return config


def checkpoint_monitor(config: dict) -> str:
    """The shipped ModelCheckpoint's monitor: the figure the config calls its best."""
    for callback in config["trainer"].get("callbacks", []):
        if isinstance(callback, dict) and callback["class_path"].endswith("ModelCheckpoint"):
            monitor = callback.get("init_args", {}).get("monitor")
            if monitor:
                return monitor
    raise ValueError("the shipped config has no ModelCheckpoint monitor")


def at_resolution(metric: str, resolution: int) -> str:
    stem, _, _ = metric.rpartition("_")
    return f"{stem}_{resolution}"


def scale_schedules(model_args: dict, fraction: float, epochs: float, shipped_epochs: float,
                    planned: int | None = None) -> None:
    """The shipped schedules squeezed into the study's run (budget, not model): step
    milestones, warm-ups and encoder freezes at the same fraction of the run, an
    epoch-wise decay reaching the same total factor in the study's epochs, a cosine
    decay ending at the ``planned`` step."""
    optimizers = [settings for key, settings in model_args.items() if isinstance(settings, dict)
                  and key.endswith("optimizer")]
    optimizers += [stage["optimizer"] for stage in model_args.get("sr_stages") or [] if "optimizer" in stage]
    if isinstance(model_args.get("base"), dict) and "optimizer" in model_args["base"]:
        optimizers.append(model_args["base"]["optimizer"])
    for settings in optimizers:
        scale_optimizer(settings, fraction, epochs, shipped_epochs, planned)
    for stage in model_args.get("sr_stages") or []:
        stage["freeze_encoder_steps"] = int(stage.get("freeze_encoder_steps", 0) * fraction)
    if "freeze_encoders_at_epoch" in model_args and shipped_epochs:
        model_args["freeze_encoders_at_epoch"] = max(1, round(model_args["freeze_encoders_at_epoch"]
                                                              * epochs / shipped_epochs))


def scale_optimizer(settings: dict, fraction: float, epochs: float, shipped_epochs: float | None,
                    planned: int | None = None) -> None:
    if settings.get("decay") == "cosine" and planned:  # ends at the planned step, not a longer run's
        settings["decay_steps"] = planned
    if settings.get("lr_milestones"):
        settings["lr_milestones"] = [max(1, int(m * fraction)) for m in settings["lr_milestones"]]
    if settings.get("warmup_steps"):
        settings["warmup_steps"] = int(settings["warmup_steps"] * fraction)
    if settings.get("warmup_epochs") and shipped_epochs:
        settings["warmup_epochs"] = settings["warmup_epochs"] * epochs / shipped_epochs
    if settings.get("epoch_decay") and shipped_epochs and epochs > 0:
        settings["epoch_decay"] = float(settings["epoch_decay"] ** (shipped_epochs / max(epochs, 1.0)))


def budget(name: str, model: Model, args, run_dir: Path, steps: int, seed: int,
           phase: Phase | None = None, previous: Path | None = None, planned: int | None = None) -> dict:
    """The shipped config of ``model`` with the study's size, data and budget: MNIST at
    the study's resolution, ``steps`` steps of ``--batch``, validation ``--evaluations``
    times per run on the held-out images, the shipped checkpoint monitor, EMA decays with
    a time constant of at most a tenth of the run, CSV logs, no W&B, no in-run FID.

    The schedules are fitted to the ``planned`` run (default ``steps``): an extension
    raises ``max_steps`` only, so the model settings stay the checkpoint's (a resume
    checks them) and no schedule jumps mid-run; a cosine decay ends at the planned step
    and stays at its floor after it."""
    planned = planned or steps
    config = shipped_config(model)
    monitor = model.monitor or checkpoint_monitor(config)
    trainer = config["trainer"]
    shipped_steps = trainer.get("max_steps") or None
    shipped_epochs = trainer.get("max_epochs") if not shipped_steps else None
    train_images = 10 * (1000 - args.val_per_class) if not args.smoke else 10 * (12 - args.val_per_class)
    epochs = planned * args.batch / max(1, train_images)
    config_batch = config["data"]["init_args"]["batch_size"]
    if shipped_steps is None:  # the shipped run's length in steps on these images
        shipped_steps = max(1, int(shipped_epochs * train_images / config_batch))
    fraction = min(1.0, planned / shipped_steps)
    resolution = args.resolution
    monitor = phase.monitor if phase is not None else at_resolution(monitor, args.resolution)
    callbacks = [{"class_path": "benchmarks.seed_claims.HeldOutCurve",
                  "init_args": {"path": str(run_dir / "curve.jsonl"), "metric": monitor}},
                 {"class_path": "lightning_modules.ModelCheckpoint", "init_args": {"monitor": monitor, "save_last": True}}]
    for callback in trainer.get("callbacks", []):
        if isinstance(callback, dict) and callback.get("class_path", "").endswith("EMAWeights"):
            decay = callback.get("init_args", {}).get("decay", 0.999)
            callbacks.insert(0, {"class_path": "lightning_modules.EMAWeights",
                                 "init_args": {"decay": max(0.0, min(decay, 1.0 - 10.0 / planned))}})
    bound = "nll_bpd" in monitor  # the DDPMs' T-step bound: a few held-out batches per validation
    config["trainer"] = {
        "accelerator": "cpu", "devices": 1, "max_epochs": -1, "max_steps": steps, "precision": 32,
        "default_root_dir": str(run_dir), "val_check_interval": max(1, steps // args.evaluations),
        "check_val_every_n_epoch": None, "num_sanity_val_steps": 0, "log_every_n_steps": 50,
        "limit_val_batches": args.bound_batches if bound else 1.0, "enable_progress_bar": False,
        "logger": {"class_path": "pytorch_lightning.loggers.CSVLogger",
                   "init_args": {"save_dir": str(run_dir), "name": "log"}},  # a version per fit call
        "callbacks": callbacks}
    config["ckpt_path"] = "auto"  # a killed run goes on from its last.ckpt (--resume)
    config["seed_everything"] = seed
    model_args = config["model"]["init_args"]
    for dotted, value in (model.smoke if args.smoke else model.size):
        set_path(model_args, dotted, copy.deepcopy(value))  # the catalogue's values stay unscaled
    for dotted, value in (phase.changes if phase is not None else ()):
        set_path(model_args, dotted, str(previous) if value == PREVIOUS else copy.deepcopy(value))
    if "n_bits" in model_args:
        model_args["n_bits"] = 8
    scale_schedules(model_args, fraction, epochs,
                    shipped_epochs or shipped_steps * config_batch / max(1, train_images), planned)
    config["data"] = {"class_path": "datamodules.MNISTDataModule", "init_args": {
        "data_dir": str(args.data_dir), "image_size": resolution, "resolutions": [resolution, *model.pyramid],
        "fit_split": "test", "val_per_class": args.val_per_class, "batch_size": args.batch,
        "eval_batch_size": args.bound_batch_size if bound else 250, "num_workers": 0, "seed": 0}}
    return config


def run(command: list[str], log: Path) -> float:
    started = time.perf_counter()
    with open(log, "a") as handle:
        result = subprocess.run(command, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT,
                                env={**os.environ, "WANDB_MODE": "disabled", **CHILD_ENVIRONMENT})
    if result.returncode != 0:
        tail = log.read_text().splitlines()[-25:]
        raise RuntimeError(f"{' '.join(command)} failed (exit {result.returncode}); the end of {log}:\n"
                           + "\n".join(tail))
    return time.perf_counter() - started


def fit(config: dict, path: Path, log: Path) -> float:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return run([sys.executable, "-m", "lightning_modules.cli", "fit", "--config", str(path)], log)


# --- the classifier and the floor ---------------------------------------------------------

def train_classifier(args, out: Path, reuse: bool) -> tuple[Path, float | None]:
    """The LeNet of the FID features (kept from an earlier run in ``out`` when ``reuse``)
    and its held-out accuracy."""
    weights = out / "mnist_lenet.pt"
    run_dir = out / "mnist_classifier"
    if not (reuse and weights.is_file()):
        config = yaml.safe_load((ROOT / "experiments/mnist_classifier.yaml").read_text())
        config["trainer"].update({"accelerator": "cpu", "max_epochs": args.classifier_epochs,
                                  "default_root_dir": str(run_dir), "enable_progress_bar": False,
                                  "limit_train_batches": 2 if args.smoke else 1.0,
                                  "logger": {"class_path": "pytorch_lightning.loggers.CSVLogger",
                                             "init_args": {"save_dir": str(run_dir), "name": "log"}}})
        config["model"]["init_args"].update({"export_path": str(weights), "resolution": args.resolution})
        config["data"]["init_args"].update({"data_dir": str(args.data_dir), "fit_split": "test",
                                            "image_size": args.resolution, "resolutions": [args.resolution],
                                            "val_per_class": args.val_per_class, "num_workers": 0})
        if args.smoke:
            config["data"]["init_args"]["batch_size"] = args.batch
        fit(config, out / "mnist_classifier.yaml", out / "mnist_classifier.log")
    accuracy = None
    for metrics in sorted(run_dir.rglob("metrics.csv")):
        rows = [row for row in csv.DictReader(open(metrics)) if row.get("val/acc")]
        if rows:
            accuracy = float(rows[-1]["val/acc"])
    return weights, accuracy


def study_data(args):
    from datamodules import MNISTDataModule

    data = MNISTDataModule(data_dir=str(args.data_dir), image_size=args.resolution, resolutions=[args.resolution],
                           fit_split="test", val_per_class=args.val_per_class, num_workers=0, seed=0)
    data.setup("fit")
    return data


def dataset_uint8(dataset, resolution: int, n: int | None = None) -> torch.Tensor:
    """The first ``n`` images of a data split at ``resolution``, uint8 [N, 1, R, R]."""
    count = len(dataset) if n is None else min(n, len(dataset))
    return torch.stack([dataset[i]["images"][resolution] for i in range(count)])


@torch.no_grad()
def lenet_features(images: torch.Tensor, weights: Path) -> torch.Tensor:
    """The penultimate features of the study's LeNet (the ``mnist-lenet`` extractor) of
    uint8 images, float64 [N, F]."""
    from lightning_modules.mnist_classifier import load_lenet_features

    net = load_lenet_features(weights)
    return torch.cat([net.features(chunk) for chunk in images.split(250)]).double()


def fid(fake: torch.Tensor, real: torch.Tensor) -> float:
    """torch-fidelity's FID of two feature sets."""
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

    return float(fid_statistics_to_metric(fid_features_to_statistics(fake), fid_features_to_statistics(real),
                                          verbose=False)["frechet_inception_distance"])


def kid(fake: torch.Tensor, real: torch.Tensor, subset: int = 200, subsets: int = 100) -> tuple[float, float]:
    """torch-fidelity's KID of two feature sets: the mean and standard deviation over
    ``subsets`` random subsets of ``subset`` samples (its own spread; a subset as large as
    the sample set would repeat one number and report no spread at all)."""
    from torch_fidelity.metric_kid import kid_features_to_metric

    size = min(subset, len(fake) // 2, len(real) // 2)
    out = kid_features_to_metric(fake, real, kid_subset_size=size, kid_subsets=subsets, verbose=False, rng_seed=0)
    return float(out["kernel_inception_distance_mean"]), float(out["kernel_inception_distance_std"])


def bootstrap(fake: torch.Tensor, real: torch.Tensor, draws: int, seed: int = 0) -> dict:
    """FID with a 95 % interval over resampled sample sets (the real side fixed: the
    spread a model's score has from its finite sample), and KID with torch-fidelity's
    spread over subsets. A resampled set repeats samples, which inflates its FID; the
    interval is the 2.5-97.5 % percentiles of the resampled FIDs shifted down by that
    inflation (their mean minus the point FID), so it is centred on the point FID."""
    point = fid(fake, real)
    rng = np.random.default_rng(seed)
    fids = [fid(fake[torch.from_numpy(rng.integers(0, len(fake), len(fake)))], real) for _ in range(draws)]
    interval = [point, point]
    if fids:
        shift = float(np.mean(fids)) - point
        interval = [min(point, float(np.percentile(fids, 2.5)) - shift),
                    max(point, float(np.percentile(fids, 97.5)) - shift)]
    kid_mean, kid_std = kid(fake, real)
    return {"fid": point, "fid_interval": interval, "kid": kid_mean, "kid_std": kid_std}


def data_floor(args, weights: Path) -> dict:
    """FID/KID of 1,000 *training* images against the held-out 1,000 on the study's
    features: what a perfect model scores at this sample size (computed, not typed)."""
    data = study_data(args)
    real = lenet_features(dataset_uint8(data.datasets["val"], args.resolution), weights)
    train = lenet_features(dataset_uint8(data.datasets["train"], args.resolution, args.fid_samples), weights)
    args.train_images, args.held_out_images = len(data.datasets["train"]), len(data.datasets["val"])
    return bootstrap(train, real, args.bootstrap)


# --- one model -------------------------------------------------------------------------------

class HeldOutCurve(pl.Callback):
    """Appends (optimizer step, held-out figure) to ``path`` after every validation: the
    learning curve, exact in steps across resumes and extensions (a CSV logger's step
    column is the logging step, and a resumed run logs into a new folder)."""

    def __init__(self, path: str, metric: str) -> None:
        self.path, self.metric = Path(path), metric

    def on_validation_end(self, trainer, pl_module) -> None:
        value = trainer.callback_metrics.get(self.metric)
        if value is not None and not trainer.sanity_checking and trainer.is_global_zero:
            with open(self.path, "a") as handle:
                handle.write(json.dumps([trainer.global_step, float(value)]) + "\n")


def curve(run_dir: Path) -> list[tuple[int, float]]:
    """(step, held-out figure) of every validation of the run, in step order (a step
    validated twice, before and after a kill, keeps its last value)."""
    path = run_dir / "curve.jsonl"
    points = dict(json.loads(line) for line in path.read_text().splitlines() if line) if path.is_file() else {}
    return sorted(points.items())


def converged(points: list[tuple[int, float]], steps: int, tolerance: float) -> tuple[bool, float]:
    """Whether the figure moved by less than ``tolerance`` over the last 20 % of the run
    (the last validation against the last one at or before 80 % of ``steps``), and by
    how much."""
    before = [point for point in points[:-1] if point[0] <= 0.8 * steps]
    if not before:
        return False, math.inf
    change = abs(points[-1][1] - before[-1][1])
    return change < tolerance, change


def best_checkpoint(run_dir: Path) -> Path:
    """The checkpoint the monitor picked: the ``best_model_path`` the ModelCheckpoint
    recorded in the newest last.ckpt of the run."""
    lasts = sorted(run_dir.rglob("last.ckpt"), key=lambda path: path.stat().st_mtime)
    if not lasts:
        raise FileNotFoundError(f"no last.ckpt under {run_dir}: did the run start?")
    states = torch.load(lasts[-1], map_location="cpu", weights_only=False).get("callbacks", {})
    for key, state in states.items():
        if "ModelCheckpoint" in str(key) and state.get("best_model_path"):
            path = Path(state["best_model_path"])
            if path.is_file():
                return path
    raise FileNotFoundError(f"{lasts[-1]} records no best checkpoint that exists: did validation run?")


def load_module(path: Path, class_path: str):
    """The LightningModule of ``class_path`` (the shipped config's) from ``path``, in eval mode."""
    import importlib

    module_name, _, class_name = class_path.rpartition(".")
    module_class = getattr(importlib.import_module(module_name), class_name)
    return module_class.load_from_checkpoint(str(path), map_location="cpu").eval()


def diffusion_of(module):
    return getattr(module.model, "joint_prior", None) or getattr(module.model, "diffusion", None)


@torch.no_grad()
def held_out_figures(module, args, resolutions: list[int], bound: bool) -> dict:
    """Held-out figures of every resolution the model scores: exact bits/dim, the bound,
    or the noisy data's figure, each labelled; the DDPMs' bound on ``--bound-images``."""
    from datamodules import MNISTDataModule
    from flows.quantization import bits_per_dim
    from lightning_modules.family import NOISY_DATA_METRIC
    from lightning_modules.rng_states import seeded_rng

    data = MNISTDataModule(data_dir=str(args.data_dir), image_size=args.resolution, resolutions=resolutions,
                           fit_split="test", val_per_class=args.val_per_class, num_workers=0, seed=0,
                           eval_batch_size=args.bound_batch_size if bound else 250)
    data.setup("fit")
    limit = args.bound_images if bound else None
    values: dict[int, list] = {}
    exact, continuous, seen = {}, set(), 0
    started = time.perf_counter()
    for index, batch in enumerate(data.val_dataloader()):
        with seeded_rng(module.evaluation_seed + 7919 * index, torch.device("cpu")):
            out = module.evaluate_batch(module.prepare_batch(batch, noise=True))
        for resolution, log_prob in out.log_prob.items():
            values.setdefault(resolution, []).append(bits_per_dim(log_prob, out.dims[resolution], module.n_bits))
        exact.update({r: out.exact.get(r, True) for r in out.log_prob})
        continuous |= set(out.continuous)
        seen += len(batch["index"])
        if limit and seen >= limit:
            break
    figures = {}
    for resolution, chunks in values.items():
        bpd = torch.cat(chunks)[:limit]
        kind = NOISY_DATA_METRIC if resolution in continuous else ("bpd" if exact[resolution] else "bpd_bound")
        figures[str(resolution)] = {"value": bpd.mean().item(), "standard_error": (bpd.std() / math.sqrt(len(bpd))).item(),
                                    "images": len(bpd), "kind": kind}
    return {"held_out": figures, "held_out_seconds": time.perf_counter() - started}


@torch.no_grad()
def sample_batches(module, n: int, temperature: float, resolution: int) -> torch.Tensor:
    """``n`` samples in model space ([-0.5, 0.5]) at ``resolution``, float."""
    out = []
    for start in range(0, n, 250):
        out.append(module.sample_images(min(250, n - start), temperature)[resolution].float().cpu())
    return torch.cat(out)


def sample_quality(samples: torch.Tensor, n_bits: int = 8, gross: float = 0.1) -> dict:
    """Counted, never hidden by the quantizer's clamp: the fraction of samples with a
    non-finite value; of finite samples with a pixel more than ``gross`` (a tenth of the
    data range) outside [-0.5, 0.5]; and of finite pixels outside it by more than a bin
    (a density model's tails put a few there)."""
    per_sample = samples.flatten(1)
    finite = torch.isfinite(per_sample).all(dim=1)
    excess = (per_sample[finite].abs() - 0.5).clamp(min=0)
    gross_samples = (excess > gross).any(dim=1).sum().item() if finite.any() else 0
    pixels = (excess > 1.0 / 2 ** n_bits).float().mean().item() if finite.any() else 0.0
    return {"non_finite": finite.logical_not().float().mean().item(), "out_of_range": gross_samples / len(samples),
            "pixels_out_of_range": pixels}


@torch.no_grad()
def sampling_times(module) -> dict:
    """Seconds for 25 samples (seed 003 Table 5.4): the DDPMs over all T steps and with
    DDIM (after a warm-up call); the flows after a warm-up call.
    Leaves a DDPM sampling with DDIM (as the FID samples are drawn)."""
    diffusion = diffusion_of(module)
    torch.manual_seed(2024)
    result = {}
    if diffusion is not None:
        full_steps = diffusion.timesteps
        diffusion.sampling_steps = None
        started = time.perf_counter()
        module.sample_images(25, 1.0)
        result["sampling_seconds_25"] = time.perf_counter() - started
        diffusion.sampling_steps = min(DDIM_STEPS, full_steps)
        result["timesteps"] = full_steps
    module.sample_images(25, 1.0)  # warm-up
    started = time.perf_counter()
    module.sample_images(25, 1.0)
    result["sampling_seconds_25_ddim" if diffusion is not None else "sampling_seconds_25"] = \
        time.perf_counter() - started
    return result


def evaluate(name: str, model: Model, run_dir: Path, weights: Path, real: torch.Tensor, args, bound: bool) -> dict:
    from flows.quantization import to_uint8

    best = best_checkpoint(run_dir / model.phases[-1].name if model.phases else run_dir)
    module = load_module(best, shipped_config(model)["model"]["class_path"])
    result = {"parameters_millions": sum(p.numel() for p in module.parameters()) / 1e6,
              "best_checkpoint": str(best.relative_to(run_dir))}
    print(f"{name}: held-out figures ({'the bound on ' + str(args.bound_images) if bound else 'all'} images)",
          flush=True)
    result.update(held_out_figures(module, args, [args.resolution, *model.pyramid], bound))
    result.update(sampling_times(module))
    result["temperatures"] = {}
    grids = {}
    for temperature in model.temperatures:
        torch.manual_seed(1234)
        samples = sample_batches(module, args.fid_samples, temperature, args.resolution)
        quality = sample_quality(samples)
        images = to_uint8(torch.nan_to_num(samples, nan=0.0), 8)  # NaN counted above, never scored as grey
        finite = torch.isfinite(samples.flatten(1)).all(dim=1)
        fake = lenet_features(images[finite], weights) if finite.any() else None
        scores = bootstrap(fake, real, args.bootstrap) if fake is not None and len(fake) > 1 else \
            {"fid": math.inf, "fid_interval": [math.inf, math.inf], "kid": math.inf, "kid_std": math.inf}
        result["temperatures"][str(temperature)] = {**quality, **scores, "finite_samples": int(finite.sum())}
        grids[temperature] = images[:25]
        print(f"{name}: T={temperature}: FID {scores['fid']:.2f} {scores['fid_interval']}, {quality}", flush=True)
    torch.save(grids, run_dir / "grids.pt")
    return result


def train_until_converged(name: str, model: Model, args, run_dir: Path, seed: int) -> dict:
    """Train ``name`` (each of its phases in turn, in ``run_dir/<phase>``) for its steps;
    while the held-out figure still moves by more than the tolerance over the last 20 %
    of the steps, go on (``--extensions`` times, half the steps more each). A killed run
    goes on from its last.ckpt (``ckpt_path: auto``). The row's curve, figure and
    convergence are the last phase's; every phase's are kept under ``phases``."""
    if not model.phases:
        return train_phase(name, model, args, run_dir, seed)
    phases, previous = [], None
    for phase in model.phases:
        phase_dir = run_dir / phase.name
        phase_dir.mkdir(parents=True, exist_ok=True)
        phases.append(dict(train_phase(name, model, args, phase_dir, seed, phase, previous), phase=phase.name))
        previous = best_checkpoint(phase_dir)
    row = dict(phases[-1])
    row.update(steps=sum(p["steps"] for p in phases), train_seconds=sum(p["train_seconds"] for p in phases),
               converged=all(p["converged"] for p in phases), phases=phases,
               last_change=max(p["last_change"] for p in phases))
    return row


def train_phase(name: str, model: Model, args, run_dir: Path, seed: int, phase: Phase | None = None,
                previous: Path | None = None) -> dict:
    steps = planned = max(2, int(args.steps * model.steps_factor))
    seconds = 0.0
    timing = run_dir / "train_seconds.json"
    if timing.is_file():
        seconds = json.loads(timing.read_text())["seconds"]
    extensions = 0
    label = name if phase is None else f"{name}/{phase.name}"
    while True:
        config = budget(name, model, args, run_dir, steps, seed, phase, previous, planned)
        metric = config["trainer"]["callbacks"][-1]["init_args"]["monitor"]
        print(f"{label}: training to step {steps} ({model.config} with "
              f"{model.smoke if args.smoke else model.size}{'' if phase is None else ', ' + str(phase.changes)})",
              flush=True)
        seconds += fit(config, run_dir / "config.yaml", run_dir / "train.log")
        timing.write_text(json.dumps({"seconds": seconds}))
        points = curve(run_dir)
        done, change = converged(points, steps, args.tolerance)
        if done or extensions >= args.extensions:
            break
        extensions += 1
        steps = int(steps * 1.5)
        print(f"{label}: {metric} moved {change:.3f} over the last 20 % (tolerance {args.tolerance}): "
              f"training on to {steps} steps", flush=True)
    return {"steps": steps, "batch": args.batch, "train_seconds": seconds, "metric": metric, "curve": points,
            "converged": done, "last_change": change, "extensions": extensions, "seed": seed}


# --- claims ------------------------------------------------------------------------------------

def fid_row(row: dict) -> dict:
    return next(iter(row["temperatures"].values()))


def verdict(claim: Claim, results: dict) -> dict:
    """holds / does not hold / inconclusive, from the FID intervals of the first reported
    temperature (and of the second seed where there is one)."""
    if claim.better not in results or claim.worse not in results:
        return {"verdict": "not run"}
    better, worse = fid_row(results[claim.better]), fid_row(results[claim.worse])
    low_b, high_b = better["fid_interval"]
    low_w, high_w = worse["fid_interval"]
    for key in (claim.better, claim.worse):  # a second seed widens each interval to both runs'
        second = results[key].get("second_seed")
        if second:
            low, high = fid_row(second)["fid_interval"]
            if key == claim.better:
                low_b, high_b = min(low_b, low), max(high_b, high)
            else:
                low_w, high_w = min(low_w, low), max(high_w, high)
    margin = worse["fid"] - better["fid"]
    if claim.also == "close":  # close: better's interval reaches the worse's, or better
        outcome = "holds" if low_b <= high_w else "does not hold"
    elif high_b < low_w:
        outcome = "holds"
    elif high_w < low_b:
        outcome = "does not hold"
    else:
        outcome = "inconclusive"
    out = {"verdict": outcome, "fid_margin": margin, "better_interval": [low_b, high_b],
           "worse_interval": [low_w, high_w]}
    params_b, params_w = results[claim.better]["parameters_millions"], results[claim.worse]["parameters_millions"]
    if claim.also == "fewer_parameters":
        out["parameters"] = f"{params_b:.2f} M vs {params_w:.2f} M ({'fewer' if params_b < params_w else 'more'})"
        if params_b >= params_w and outcome == "holds":
            out["verdict"] = "does not hold (FID better, but with more parameters)"
    elif claim.also == "parameters":
        out["parameters"] = f"{params_b:.2f} M vs {params_w:.2f} M"
    return out


# --- output ------------------------------------------------------------------------------------

def held_out_text(row: dict) -> str:
    parts = []
    for resolution, figure in sorted(row["held_out"].items(), key=lambda item: -int(item[0])):
        value = f"{figure['value']:.3f}"
        if figure["kind"] == "bpd":
            parts.append(f"{value} exact @{resolution}")
        elif figure["kind"] == "bpd_bound":
            parts.append(f"<= {value} bound @{resolution} ({figure['images']} imgs)")
        else:
            parts.append(f"{value} noisy-data bits @{resolution}")
    return "; ".join(parts)


def quality(scores: dict) -> str:
    return (f"{scores['non_finite']:.3f} / {scores['out_of_range']:.3f} / "
            f"{scores.get('pixels_out_of_range', 0.0):.4f}")


def table(results: dict, args, floor: dict, accuracy: float | None, argv: list[str], catalogue: dict) -> str:
    lines = [f"Seeds' claims on MNIST {args.resolution}x{args.resolution}: {time.strftime('%Y-%m-%d')}, "
             f"{platform.node()} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads), "
             f"torch {torch.__version__}.",
             f"Command: `python -m benchmarks.seed_claims {' '.join(argv)}`",
             f"Data: MNIST test split, {args.train_images:,} training / {args.held_out_images:,} held-out images "
             f"({args.val_per_class} per class), 8-bit, {args.resolution}x{args.resolution}. Batch {args.batch}, CPU. FID/KID: "
             f"{args.fid_samples} samples vs the held-out images on the study's LeNet features (held-out accuracy "
             f"{accuracy if accuracy is not None else 'n/a'}), 95 % bootstrap intervals over samples "
             f"({args.bootstrap} draws). Floor ({min(args.fid_samples, args.train_images):,} training images vs held-out, computed): FID "
             f"{floor['fid']:.2f} [{floor['fid_interval'][0]:.2f}, {floor['fid_interval'][1]:.2f}], KID "
             f"{floor['kid']:.4f} ± {floor['kid_std']:.4f}. Converged: the held-out figure moved < {args.tolerance} over the last 20 % "
             "of the steps.", "",
             "| model | params (M) | steps | train min | converged (change) | held-out | T | FID [95 %] | KID ± sd | "
             "samples non-finite / out of range by > 0.1; pixels out by > a bin | 25 samples, s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, row in results.items():
        seconds = f"{row['sampling_seconds_25']:.2f}"
        if "sampling_seconds_25_ddim" in row:
            seconds = f"{seconds} (T={row['timesteps']}); {row['sampling_seconds_25_ddim']:.2f} (DDIM {DDIM_STEPS})"
        mark = "yes" if row["converged"] else "**no**"
        for index, (temperature, scores) in enumerate(row["temperatures"].items()):
            first = index == 0
            lines.append(
                f"| {catalogue[name].label if first else ''} | {row['parameters_millions']:.2f} | {row['steps']} | "
                f"{row['train_seconds'] / 60:.0f} | {mark} ({row['last_change']:.3f}) | {held_out_text(row)} | "
                f"{temperature} | {scores['fid']:.2f} [{scores['fid_interval'][0]:.2f}, {scores['fid_interval'][1]:.2f}] "
                f"| {scores['kid']:.4f} ± {scores['kid_std']:.4f} | {quality(scores)} | {seconds} |"
                if first else
                f"| | | | | | | {temperature} | {scores['fid']:.2f} [{scores['fid_interval'][0]:.2f}, "
                f"{scores['fid_interval'][1]:.2f}] | {scores['kid']:.4f} ± {scores['kid_std']:.4f} | {quality(scores)} | |")
    lines += ["", "| claim | verdict | FID margin (worse - better) | intervals (better; worse) | also |",
              "|---|---|---|---|---|"]
    for claim in CLAIMS:
        out = verdict(claim, results)
        if out["verdict"] == "not run":
            lines.append(f"| {claim.statement} | not run | | | |")
            continue
        b, w = out["better_interval"], out["worse_interval"]
        lines.append(f"| {claim.statement} | **{out['verdict']}** | {out['fid_margin']:.2f} | "
                     f"[{b[0]:.2f}, {b[1]:.2f}]; [{w[0]:.2f}, {w[1]:.2f}] | {out.get('parameters', '')} |")
    lines += ["", "The seeds' own numbers (their data, their units; not comparable with the rows above): "
              + "; ".join(f"{catalogue[name].label}: {catalogue[name].seed_numbers}" for name in results) + "."]
    return "\n".join(lines)


def draw_curves(results: dict, path: Path, catalogue: dict) -> None:
    """Each model's held-out curve (its own figure and units) in its own panel, drawn
    with PIL (no plotting dependency)."""
    from PIL import Image, ImageDraw

    names = [name for name in results if results[name]["curve"]]
    width, height, columns = 320, 200, 3
    rows = max(1, math.ceil(len(names) / columns))
    canvas = Image.new("RGB", (width * columns, height * rows), "white")
    draw = ImageDraw.Draw(canvas)
    for index, name in enumerate(names):
        row = results[name]
        x0, y0 = (index % columns) * width, (index // columns) * height
        steps, values = zip(*row["curve"])
        low, high = min(values), max(values)
        high = high if high > low else low + 1e-6
        box = (x0 + 45, y0 + 30, x0 + width - 10, y0 + height - 25)
        draw.rectangle(box, outline="black")
        points = [(box[0] + (box[2] - box[0]) * s / max(steps), box[3] - (box[3] - box[1]) * (v - low) / (high - low))
                  for s, v in zip(steps, values)]
        if len(points) > 1:
            draw.line(points, fill="blue", width=2)
        for point in points:
            draw.ellipse((point[0] - 2, point[1] - 2, point[0] + 2, point[1] + 2), fill="blue")
        mark = box[0] + (box[2] - box[0]) * 0.8
        draw.line([(mark, box[1]), (mark, box[3])], fill="grey")
        draw.text((x0 + 5, y0 + 5), f"{catalogue[name].label}: {row['metric']}", fill="black")
        draw.text((x0 + 5, y0 + 16), "converged" if row["converged"] else "NOT converged", fill="black")
        draw.text((x0 + 2, box[1]), f"{high:.2f}", fill="black")
        draw.text((x0 + 2, box[3] - 10), f"{low:.2f}", fill="black")
        draw.text((box[2] - 60, box[3] + 5), f"step {max(steps)}", fill="black")
    canvas.save(path)


def draw_grids(results: dict, out: Path, path: Path, catalogue: dict) -> None:
    """Each model's 5x5 grid at each reported temperature, upscaled (nearest) and labelled."""
    from PIL import Image, ImageDraw

    tiles = []
    for name in results:
        grids = torch.load(out / name / "grids.pt", weights_only=False)
        for temperature, images in grids.items():
            n, _, size, _ = images.shape
            scale = max(1, 96 // size)
            grid = torch.zeros(5 * size + 4, 5 * size + 4, dtype=torch.uint8)
            for i in range(min(n, 25)):
                r, c = divmod(i, 5)
                grid[r * (size + 1):r * (size + 1) + size, c * (size + 1):c * (size + 1) + size] = images[i, 0]
            tile = Image.fromarray(grid.numpy()).resize(((5 * size + 4) * scale,) * 2, Image.NEAREST).convert("RGB")
            labelled = Image.new("RGB", (tile.width, tile.height + 24), "white")
            labelled.paste(tile, (0, 24))
            ImageDraw.Draw(labelled).text((2, 2), f"{catalogue[name].label}, T={temperature}", fill="black")
            tiles.append(labelled)
    if not tiles:
        return
    columns = min(4, len(tiles))
    width, height = max(t.width for t in tiles), max(t.height for t in tiles)
    canvas = Image.new("RGB", (columns * (width + 6), math.ceil(len(tiles) / columns) * (height + 6)), "white")
    for index, tile in enumerate(tiles):
        canvas.paste(tile, ((index % columns) * (width + 6), (index // columns) * (height + 6)))
    canvas.save(path)


# --- the command -------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "seed_claims")
    parser.add_argument("--resolution", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3000, help="each model's first step budget")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--evaluations", type=int, default=10, help="validations per run (the learning curve)")
    parser.add_argument("--tolerance", type=float, default=0.02, help="convergence: held-out change over 20 %%")
    parser.add_argument("--extensions", type=int, default=2, help="times an unconverged model trains on (x1.5)")
    parser.add_argument("--fid-samples", type=int, default=1000)
    parser.add_argument("--bootstrap", type=int, default=200, help="bootstrap draws of the FID interval")
    parser.add_argument("--bound-images", type=int, default=200, help="held-out images of the DDPMs' T-step bound")
    parser.add_argument("--bound-batches", type=int, default=1, help="held-out batches per in-run DDPM validation")
    parser.add_argument("--bound-batch-size", type=int, default=50)
    parser.add_argument("--classifier-epochs", type=int, default=5)
    parser.add_argument("--val-per-class", type=int, default=100)
    parser.add_argument("--only", default=None, help="comma-separated models (default: all)")
    parser.add_argument("--second-seed", action="store_true",
                        help="train both models of an inconclusive claim again with seed 1")
    parser.add_argument("--figures", type=Path, default=None, help="copy curves.png and grids.png here")
    parser.add_argument("--smoke", action="store_true", help="toy sizes: checks the path, numbers mean nothing")
    parser.add_argument("--resume", action="store_true",
                        help=f"go on with the run in --out: finished models kept ({STATE}), an unfinished one "
                             "resumes from its last.ckpt")
    args = parser.parse_args(argv)
    raw = args.data_dir / "MNIST" / "raw"
    if not any((raw / f"t10k-images-idx3-ubyte{ext}").is_file() for ext in ("", ".gz")):
        print(f"skipped: no MNIST test split under {raw} (t10k-images-idx3-ubyte[.gz]); pass --data-dir "
              "to the folder that holds MNIST/raw")
        return 0
    threads = torch.get_num_threads()
    try:
        if args.smoke:  # one thread: tiny ops on a shared 2-core machine stall with more
            torch.set_num_threads(1)
            CHILD_ENVIRONMENT["OMP_NUM_THREADS"] = "1"
        return study(args, parser, sys.argv[1:] if argv is None else argv)
    finally:  # the caller's process (a test session) keeps its settings
        torch.set_num_threads(threads)
        CHILD_ENVIRONMENT.pop("OMP_NUM_THREADS", None)


def study(args, parser, argv: list[str]) -> int:
    catalogue = models(args.resolution)
    names = list(catalogue) if args.only is None else [name.strip() for name in args.only.split(",")]
    unknown = [name for name in names if name not in catalogue]
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {', '.join(catalogue)}")
    state = args.out / STATE
    keep = args.resume or args.only is not None
    done = json.loads(state.read_text()) if keep and state.is_file() else {}
    if not keep and args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True, exist_ok=True)
    weights, accuracy = train_classifier(args, args.out, reuse=keep)
    floor = data_floor(args, weights)
    real = lenet_features(dataset_uint8(study_data(args).datasets["val"], args.resolution), weights)
    for name in names:
        if name in done and args.resume:  # --only without --resume trains the named models again
            continue
        model = catalogue[name]
        run_dir = args.out / name
        if not args.resume and run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        bound = "nll_bpd" in checkpoint_monitor(shipped_config(model))
        row = train_until_converged(name, model, args, run_dir, seed=0)
        row.update(config=model.config, overlays=list(model.overlays),
                   size_changes=[list(change) for change in (model.smoke if args.smoke else model.size)],
                   **evaluate(name, model, run_dir, weights, real, args, bound))
        done[name] = row
        state.write_text(json.dumps(done, indent=1))
        print(f"{name}: done", flush=True)
    if args.second_seed:
        for claim in CLAIMS:
            if verdict(claim, done).get("verdict") != "inconclusive":
                continue
            for name in (claim.better, claim.worse):
                if done[name].get("second_seed"):
                    continue
                run_dir = args.out / f"{name}_seed1"
                run_dir.mkdir(parents=True, exist_ok=True)
                model = catalogue[name]
                bound = "nll_bpd" in checkpoint_monitor(shipped_config(model))
                second = train_until_converged(name, model, args, run_dir, seed=1)
                second.update(evaluate(name, model, run_dir, weights, real, args, bound))
                done[name]["second_seed"] = second
                state.write_text(json.dumps(done, indent=1))
    results = {name: done[name] for name in catalogue if name in done}
    text = table(results, args, floor, accuracy, argv, catalogue)
    print(text)
    (args.out / "table.md").write_text(text + "\n")
    (args.out / "results.json").write_text(json.dumps(
        {"argv": argv, "fid_floor": floor, "classifier_accuracy": accuracy, "results": results,
         "claims": {claim.key: verdict(claim, results) for claim in CLAIMS}}, indent=1, default=str))
    draw_curves(results, args.out / "curves.png", catalogue)
    draw_grids(results, args.out, args.out / "grids.png", catalogue)
    if args.figures is not None:
        args.figures.mkdir(parents=True, exist_ok=True)
        for picture in ("curves.png", "grids.png"):
            if (args.out / picture).is_file():
                shutil.copy(args.out / picture, args.figures / f"seed_claims_{picture}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
