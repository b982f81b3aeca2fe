"""A small training job the resume tests run in a subprocess, so it can be killed with
SIGKILL like a preempted cluster job:

    python -m tests.resume_job FAMILY ROOT MAX_STEPS [--kill-at STEP] [--kill-in-write N] [--resume]
                               [--train-size N] [--ema {msflows,lightning}] [--save-at {steps,epochs,validation}]

``--kill-in-write N`` kills the job halfway through its N-th checkpoint write (a
partial temporary file is on disk). ``--resume`` follows ``ckpt_path: auto``: stale
temporaries are removed and the newest readable checkpoint is resumed.
``--train-size`` sets the batches per epoch (batch 8); ``--save-at epochs`` writes
the checkpoints at epoch ends (in on_train_epoch_end, after validation) instead of
every 3 steps, ``--save-at validation`` at the validation ends; ``--ema``
adds an EMA of the weights (``msflows``: lightning_modules.EMAWeights, ``lightning``:
Lightning's EMAWeightAveraging, to show what it loses). ``final.pt`` also holds the
epoch every training step saw and the live (training) weights after the last step,
before an EMA callback puts the averaged ones in the model (:class:`EpochTrace`);
``after_fit.ckpt`` is ``trainer.save_checkpoint`` after ``fit``.
"""
import argparse
import os
import signal
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from datamodules import EmbeddedDataModule
from flows import Glow, SRFlow
from lightning_modules import (CascadeModule, ExactResume, GlowModule, GlowStage, OptimizerSettings,
                               SRFlowStage)
from lightning_modules.checkpoint_files import AtomicCheckpointIO
from lightning_modules.run_folder import remove_stale_temporaries, resume_checkpoint


FAMILIES = ["glow", "cascade", "hierarchical", "diffusion_flow", "pixel_diffusion", "tarflow"]


def build(family: str, train_size: int = 128):
    optimizer = OptimizerSettings(lr=2e-3, warmup_steps=3)
    if family == "hierarchical":
        from flows import HierarchicalFlow
        from lightning_modules import HierarchicalModule
        from tests.builders import tiny_levels

        # Epoch-driven schedules on: the encoders freeze at epoch 2 and every group's
        # rate decays per epoch (seed 001 Table 2's rules, at toy epochs).
        groups = [OptimizerSettings(algorithm="adam", lr=lr, betas=(0.9, 0.999), weight_decay=0.0,
                                    warmup_epochs=0.0, epoch_decay=0.5) for lr in (5e-4, 2e-3, 5e-3)]
        module = HierarchicalModule(flow=HierarchicalFlow(levels=tiny_levels(), skip_channels=3),
                                    encoder_optimizer=groups[0], decoder_optimizer=groups[1],
                                    flow_optimizer=groups[2], freeze_encoders_at_epoch=2, n_bits=5)
        resolutions = [8]
    elif family == "diffusion_flow":
        # The DDPM prior's importance sampler keeps a history of losses per t: a resume
        # must bring it back, or the t draws (and every later step) differ.
        from flows import DiffusionPrior
        from lightning_modules import DiffusionFlowModule
        from tests.builders import tiny_unet
        flow = Glow(image_size=8, scales=2, steps_per_scale=1, hidden_channels=8,
                    joint_prior=lambda shape: DiffusionPrior(shape, tiny_unet, timesteps=4, schedule="cosine"))
        module = DiffusionFlowModule(flow=flow, flow_optimizer=optimizer, diffusion_optimizer=optimizer, n_bits=5)
        resolutions = [8]
    elif family == "pixel_diffusion":
        from flows import PixelDiffusion
        from lightning_modules import PixelDiffusionModule
        from tests.builders import tiny_unet
        module = PixelDiffusionModule(model=PixelDiffusion(in_channels=3, image_size=8, n_bits=5, denoiser=tiny_unet,
                                                           timesteps=4, schedule="cosine"),
                                      optimizer=optimizer, n_bits=5)
        resolutions = [8]
    elif family == "tarflow":
        # Noise augmentation: the Gaussian noise draws continue the same stream.
        from functools import partial

        from flows.dequantization import GaussianNoiseDequantizer
        from flows.tarflow import TarFlow
        module = GlowModule(flow=TarFlow(in_channels=3, image_size=8, patch_size=2, channels=16, blocks=2,
                                         layers_per_block=1, head_channels=8,
                                         dequantizer=partial(GaussianNoiseDequantizer, noise_std=0.05)),
                            optimizer=optimizer, n_bits=5)
        resolutions = [8]
    elif family == "glow":
        module = GlowModule(flow=Glow(image_size=8, scales=2, steps_per_scale=2, hidden_channels=16),
                            optimizer=optimizer, n_bits=5)
        resolutions = [8]
    elif family == "cascade":
        module = CascadeModule(
            base=GlowStage(flow=Glow(image_size=8, scales=2, steps_per_scale=1, hidden_channels=8),
                           optimizer=optimizer),
            sr_stages=[SRFlowStage(sigma=0.2, flow=SRFlow(image_size=16, scales=2, steps_per_scale=1,
                                                          hidden_channels=8, rrdb_features=8, rrdb_blocks=2,
                                                          rrdb_growth=4),
                                   freeze_encoder_steps=5,
                                   optimizer=OptimizerSettings(lr=2e-3, betas=(0.9, 0.99), weight_decay=0.0,
                                                               warmup_epochs=0.0, lr_milestones=[12]))],
            failure_probe_every_n_steps=4, n_bits=5)
        resolutions = [16, 8]
    data = EmbeddedDataModule(image_size=resolutions[0], resolutions=resolutions, train_size=train_size,
                              val_size=16, batch_size=8)
    return module, data


class KilledMidWrite(AtomicCheckpointIO):
    def __init__(self, write: int) -> None:
        super().__init__()
        self.write, self.count = write, 0

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        self.count += 1
        if self.count == self.write:
            path = Path(path)
            with open(path.with_name(f".{path.name}.{os.getpid()}.tmp"), "wb") as handle:
                handle.write(b"PK\x03\x04 half a checkpoint")
                handle.flush()
                os.kill(os.getpid(), signal.SIGKILL)
        super().save_checkpoint(checkpoint, path, storage_options)


class KillAt(pl.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class SignalAt(pl.Callback):
    """Sends the process ``signal`` (a name: SIGTERM, SIGINT, SIGUSR1) once, in the middle
    of the optimizer step that ends at ``step + 1``: after the loss, its noise draws and
    the backward pass, before the parameters move (as a signal from outside arrives)."""

    def __init__(self, step: int, signal: str = "SIGTERM") -> None:
        self.step, self.signal, self.sent = step, signal, False

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step == self.step and not self.sent:
            self.sent = True
            os.kill(os.getpid(), getattr(signal, self.signal))


class EpochTrace(pl.Callback):
    """Records, at every training step, the epoch the module's schedules see (the
    freezes read ``current_epoch``) and the sampler's epoch (the batch order); and the
    weights after the last step."""

    def __init__(self) -> None:
        self.epochs: dict[int, tuple[int, int]] = {}
        self.live: dict = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        sampler = getattr(trainer.train_dataloader, "sampler", None)
        self.epochs[trainer.global_step] = (pl_module.current_epoch, getattr(sampler, "epoch", -1))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.live = {name: value.detach().clone() for name, value in pl_module.state_dict().items()}


def ema_callback(kind: str) -> pl.Callback:
    if kind == "lightning":
        from pytorch_lightning.callbacks import EMAWeightAveraging
        return EMAWeightAveraging(decay=0.9)
    from lightning_modules import EMAWeights
    return EMAWeights(decay=0.9)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("family", choices=FAMILIES)
    parser.add_argument("root")
    parser.add_argument("max_steps", type=int)
    parser.add_argument("--kill-at", type=int)
    parser.add_argument("--kill-in-write", type=int)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--train-size", type=int, default=128)
    parser.add_argument("--ema", choices=["msflows", "lightning"])
    parser.add_argument("--save-at", choices=["steps", "epochs", "validation"], default="steps")
    args = parser.parse_args()
    root = Path(args.root)
    pl.seed_everything(0)
    module, data = build(args.family, args.train_size)
    schedule = {"steps": {"every_n_train_steps": 3}, "epochs": {"every_n_epochs": 1},
                "validation": {"every_n_epochs": 1, "save_on_train_epoch_end": False}}[args.save_at]
    callbacks = [ModelCheckpoint(dirpath=root / "checkpoints", **schedule, save_last=True, save_top_k=-1),
                 ExactResume()]
    trace = EpochTrace()
    callbacks.append(trace)
    if args.ema:  # before ModelCheckpoint, as in the configs (the order Lightning calls them in)
        callbacks.insert(0, ema_callback(args.ema))
    if args.kill_at:
        callbacks.append(KillAt(args.kill_at))
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=args.max_steps, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1,
                         default_root_dir=str(root), callbacks=callbacks,
                         plugins=[KilledMidWrite(args.kill_in_write) if args.kill_in_write else AtomicCheckpointIO()])
    ckpt_path = None
    if args.resume:
        remove_stale_temporaries(root)
        ckpt_path = resume_checkpoint(root)
    trainer.fit(module, data, ckpt_path=str(ckpt_path) if ckpt_path else None)
    torch.save({"state_dict": module.state_dict(), "global_step": trainer.global_step,
                "resumed_from": str(ckpt_path), "epochs": trace.epochs, "live_state_dict": trace.live,
                "current_epoch": trainer.current_epoch}, root / "final.pt")
    trainer.save_checkpoint(root / "after_fit.ckpt")


if __name__ == "__main__":
    main()
