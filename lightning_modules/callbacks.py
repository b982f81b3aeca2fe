"""Lightning callbacks any module can use, switched on in YAML under
``trainer.callbacks`` (or ``--trainer.callbacks+=...``):

* :class:`SampleGrids`: sample grids per resolution and temperature after validation,
  saved as PNG and sent to every logger (W&B, TensorBoard).
* :class:`ValidationFID`: ``val/fid_R`` curves (torchmetrics) during training.
* :class:`TestMetrics`: at ``lightning test``, the metrics table ``metrics.json``
  (model name, bits per dim per resolution, exact or bound, the time to draw 25
  samples) and, given FID settings, FID/KID per resolution (torch-fidelity) and the
  FID-vs-temperature sweep.
* :class:`ExactResume`: RNG states of every process in each checkpoint, a run
  resumed mid-epoch continues with the batches an uninterrupted run would draw, and
  one resumed from an end-of-epoch checkpoint with the uninterrupted run's epoch
  number. The ``lightning`` command adds it to every run.

The sampling callbacks need ``pl_module.sample_images(n, temperature)`` (a dict of
model-space images per resolution) and ``pl_module.n_bits``; what "temperature" means
is the module's business (one per cascade stage, for instance).

Non-finite samples (a NaN or infinite value anywhere in model space) are counted per
resolution and temperature (``nonfinite_samples`` in ``metrics.json``,
``val/nonfinite_samples_R`` / ``test/nonfinite_samples_R`` in the loggers), left out of
FID/KID and painted red wherever an image of them is shown (:func:`mark_failed`, the one
marking every grid and analysis figure uses).
"""
from __future__ import annotations

import math
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset

from datamodules.datamodules import PyramidDataset, ResumableSampler
from flows.quantization import reduce_bits, to_uint8
from lightning_modules.checkpointing import RNG_KEY, gather_rng_states, restore_rng_states, seeded_rng
from lightning_modules.errors import ConfigurationError
from lightning_modules.family import family_of
from lightning_modules.lightning_internals import rewind_epoch_end_checkpoint
from lightning_modules.metrics import (MIN_FID_SAMPLES, FIDSettings, ImagesAtResolution, Samples, TensorImages, as_rgb,
                                       feature_cache_tag, features_label, features_note, fid_log_names, fidelity,
                                       generate_uint8, in_loop_fid, plot_temperature_sweep, settings_dict,
                                       time_sampling, write_metrics_table)

# How every figure of this project shows a failed (non-finite) sample: a flat tile of this
# colour, which to_uint8's mid-grey for NaN is not.
FAILED_RGB = (255, 0, 0)
FAILED_LEGEND = "red = non-finite sample"


def mark_failed(images_uint8: Tensor, failed: Tensor | None) -> Tensor:
    """uint8 [N, C, H, W] images (C = 1 or 3) as RGB [N, 3, H, W] on the CPU, each image
    where ``failed`` ([N] bool) is True painted ``FAILED_RGB`` (red): the one marking of
    a failed sample in sample grids and analysis figures (legend: ``FAILED_LEGEND``)."""
    images = images_uint8.cpu()
    shown = (images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images).clone()
    if failed is not None:
        shown[failed.to(torch.bool).cpu()] = torch.tensor(FAILED_RGB, dtype=torch.uint8)[:, None, None]
    return shown


def log_dir(trainer: pl.Trainer) -> Path:
    """A run's folder, where its tables, sweeps, analyses and sample grids go; printed the
    first time. One rule for every logger, Lightning's for checkpoints:

    * training: the folder that holds ``checkpoints/``, ``<save_dir>/<name>/<version>``
      of the first logger (CSV and TensorBoard ``<name>/version_N``, W&B
      ``<project>/<run id>``), ``default_root_dir`` without a logger;
    * ``lightning test`` / ``validate`` / ``predict`` of a checkpoint: beside it, in its
      run folder for ``<run>/checkpoints/<file>`` (not the new ``version_N`` a logger
      opens for the test), unless that folder cannot be written.

    Without Trainer.log_dir's broadcast, which would deadlock when only process 0 asks."""
    from pytorch_lightning.trainer.states import TrainerFn

    directory = None
    if trainer.state.fn != TrainerFn.FITTING and trainer.ckpt_path and Path(trainer.ckpt_path).is_file():
        tested = Path(trainer.ckpt_path).resolve().parent
        tested = tested.parent if tested.name == "checkpoints" else tested
        directory = tested if os.access(tested, os.W_OK) else None
    if directory is None and trainer.loggers:
        first = trainer.loggers[0]
        version = first.version if isinstance(first.version, str) else f"version_{first.version}"
        directory = Path(first.save_dir or trainer.default_root_dir) / str(first.name) / version
    directory = Path(directory or trainer.default_root_dir)
    announced = trainer.__dict__.setdefault("_msflows_announced_log_dirs", set())
    if directory not in announced and trainer.is_global_zero:
        announced.add(directory)
        print(f"outputs of this run ({trainer.state.fn.value}): {directory}", file=sys.stderr)
    return directory


def check_temperatures(callback: pl.Callback, pl_module: pl.LightningModule, temperatures) -> None:
    """Fail before the first step, not at the first validation end, on a temperature the
    module cannot sample at (e.g. a per-stage list of the wrong length)."""
    family = family_of(pl_module, type(callback).__name__)
    for temperature in temperatures:
        try:
            family.check_temperature(temperature)
        except ValueError as error:
            raise ConfigurationError(f"{type(callback).__name__}: temperature {temperature!r} does not fit "
                                     f"{family.model_name}: {error}") from error


@contextmanager
def sampling_mode(pl_module: pl.LightningModule, seed: int):
    """Eval mode and a forked RNG seeded with ``seed``: the training RNG stream is
    untouched and draws repeat; the module's mode is restored afterwards."""
    was_training = pl_module.training
    pl_module.eval()
    try:
        with seeded_rng(seed, pl_module.device):
            yield
    finally:
        pl_module.train(was_training)


@torch.no_grad()
def draw_samples(pl_module: pl.LightningModule, n: int, temperature, seed: int,
                 batch_size: int | None = None) -> Samples:
    """n uint8 samples per resolution (CPU), with which of them were finite in model
    space (:class:`~lightning_modules.metrics.Samples`), in eval mode, from a forked RNG
    seeded with ``seed`` (:func:`sampling_mode`)."""
    sample = family_of(pl_module, "drawing samples").sample_images
    with sampling_mode(pl_module, seed):
        return generate_uint8(lambda k: sample(k, temperature), n, batch_size or n,
                              lambda x: to_uint8(x, pl_module.n_bits))


def send_image(trainer: pl.Trainer, key: str, grid: Tensor, caption: str | None = None) -> None:
    from pytorch_lightning.loggers import TensorBoardLogger, WandbLogger

    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            extra = {"caption": [caption]} if caption else {}
            logger.log_image(key=key, images=[grid.permute(1, 2, 0).numpy()], step=trainer.global_step, **extra)
        elif isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(key, grid, trainer.global_step)


def save_uint8_png(image: Tensor, path: Path) -> None:
    from PIL import Image

    array = image.permute(1, 2, 0).numpy()
    Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array).save(path)


def grid_prefix(trainer: pl.Trainer) -> str:
    """``stepXXXXXXXX`` in a fit; outside one (``lightning validate`` of a checkpoint) also
    the checkpoint's name, so that validating two checkpoints of a run (both at the step
    they were saved, or 0 for weights loaded in Python) writes two grids, not one."""
    from pytorch_lightning.trainer.states import TrainerFn

    prefix = f"step{trainer.global_step:08d}"
    if trainer.state.fn != TrainerFn.FITTING:
        name = Path(trainer.ckpt_path).stem if trainer.ckpt_path else "weights"
        prefix = f"{trainer.state.fn.value}_{name}_{prefix}"
    return prefix


class SampleGrids(pl.Callback):
    """A grid per resolution and temperature every ``every_n_epochs`` validation epochs,
    saved as ``samples/stepXXXXXXXX_resR_tT.png`` in the log folder and sent to the
    loggers. The noise comes from ``seed``, so grids of successive epochs compare.
    Non-finite samples are red tiles (:func:`mark_failed`), counted in the loggers as
    ``val/nonfinite_samples_R_tT`` and printed when there are any."""

    def __init__(self, temperatures: list[float] | None = None, num_samples: int = 64,
                 every_n_epochs: int = 1, seed: int = 1234) -> None:
        self.temperatures = list(temperatures if temperatures is not None else [0.7, 0.8, 1.0])
        self.num_samples = num_samples
        self.every_n_epochs = every_n_epochs
        self.seed = seed

    def setup(self, trainer, pl_module, stage: str) -> None:
        check_temperatures(self, pl_module, self.temperatures)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        every = self.every_n_epochs
        if trainer.sanity_checking or not every or trainer.current_epoch % every:
            return
        if trainer.is_global_zero:
            self.draw(trainer, pl_module)

    def draw(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[Path]:
        from torchvision.utils import make_grid

        saved = []
        counts: dict[str, int] = {}
        out_dir = log_dir(trainer) / "samples"
        out_dir.mkdir(parents=True, exist_ok=True)
        for temperature in self.temperatures:
            samples = draw_samples(pl_module, self.num_samples, temperature, self.seed)
            for resolution, images in samples.items():
                failed = samples.failed(resolution)
                shown = mark_failed(images, failed)
                grid = make_grid(shown, nrow=int(math.ceil(math.sqrt(images.shape[0]))), padding=1)
                path = out_dir / f"{grid_prefix(trainer)}_res{resolution}_t{temperature:g}.png"
                save_uint8_png(grid, path)
                saved.append(path)
                bad = int(failed.sum())
                counts[f"val/nonfinite_samples_{resolution}_t{temperature:g}"] = bad
                caption = f"{bad} of {len(failed)} samples non-finite ({FAILED_LEGEND})" if bad else None
                if bad:
                    pl_module.print(f"sample grid {resolution}px, temperature {temperature:g}: {caption}: {path}")
                send_image(trainer, f"samples/res{resolution}_t{temperature:g}", grid, caption)
        for logger in trainer.loggers:
            logger.log_metrics(counts, step=trainer.global_step)
        return saved


class ValidationFID(pl.Callback):
    """``val/fid_R`` every ``every_n_validations`` validation runs (torchmetrics, on the
    feature extractor of ``fid``). The real statistics come from the first validation
    run's images and are kept; ``num_samples`` samples (split over the processes) are
    drawn each time at ``fid.temperature``. For curves, not for tables.

    Non-finite samples are left out of the FID and counted, ``val/nonfinite_samples_R``
    (summed over the processes); with fewer than two finite samples the FID is not
    computed (logged as NaN, and printed). On smoke-test features (``random-conv``) the
    FID is also logged as ``val/fid_R_random-conv_smoke_test`` and a warning printed."""

    def __init__(self, fid: FIDSettings | None = None, every_n_validations: int = 1,
                 num_samples: int = 5000) -> None:
        self.fid = fid or FIDSettings()
        self.every_n_validations = every_n_validations
        self.num_samples = num_samples
        # A plain dict outside the module: the Inception weights stay out of the
        # model's state_dict, checkpoints and optimizer.
        self.metrics: dict | None = None
        self.has_real = False
        self.validation_runs = 0

    def setup(self, trainer, pl_module, stage: str) -> None:
        check_temperatures(self, pl_module, [self.fid.temperature])

    def _metrics(self, pl_module) -> dict:
        if self.metrics is None:
            self.metrics = {r: in_loop_fid(self.fid).to(pl_module.device) for r in pl_module.resolutions}
        return self.metrics

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if trainer.sanity_checking or self.has_real:
            return
        for resolution, metric in self._metrics(pl_module).items():
            real = batch["images"][resolution]
            metric.update(torch.stack([as_rgb(reduce_bits(x, pl_module.n_bits)) for x in real]), real=True)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        # Counted in validation runs, which also works for step-based validation.
        if self.validation_runs % self.every_n_validations == 0:
            if self.validation_runs == 0 and self.fid.is_smoke_test:
                pl_module.print(f"WARNING: val/fid_R is on {features_note(self.fid)} (logged also as "
                                f"{fid_log_names(self.fid, 'val', 'R')[-1]})")
            per_process = max(1, self.num_samples // max(1, trainer.world_size))
            fakes = draw_samples(pl_module, per_process, self.fid.temperature,
                                 self.fid.seed + trainer.global_rank, self.fid.batch_size)
            for resolution, metric in self._metrics(pl_module).items():
                counted = fakes.nonfinite_count(resolution)
                pl_module.log(f"val/nonfinite_samples_{resolution}",
                              torch.tensor(float(counted["count"]), device=pl_module.device),
                              sync_dist=True, reduce_fx="sum")
                finite = fakes.finite_images(resolution)
                if finite.shape[0] >= MIN_FID_SAMPLES:
                    metric.update(torch.stack([as_rgb(x) for x in finite]).to(pl_module.device), real=False)
                    fid = metric.compute().float()
                    metric.reset()  # fake features only: reset_real_features=False
                else:
                    fid = torch.tensor(math.nan, device=pl_module.device)
                    pl_module.print(f"val/fid_{resolution} not computed: {counted['count']} of {counted['of']} "
                                    f"samples non-finite")
                if counted["count"] and finite.shape[0] >= MIN_FID_SAMPLES:
                    pl_module.print(f"val/fid_{resolution}: {counted['count']} of {counted['of']} samples "
                                    f"non-finite, left out of the FID")
                for name in fid_log_names(self.fid, "val", resolution):
                    pl_module.log(name, fid, sync_dist=False)
        self.validation_runs += 1
        self.has_real = True  # one full validation run of real images


class TestMetrics(pl.Callback):
    """At the end of ``lightning test``: ``metrics.json`` in the log folder with the
    model name, the test bits per dim per resolution (``bpd`` exact, ``bpd_bound`` where
    the likelihood is a lower bound; ``noisy_data_nll_bits`` for a model of noisy data)
    and every test metric; with ``fid`` settings also
    FID and KID per resolution against a reference split at that resolution (seed 000
    sec. 4.2: the test split; seed 001's official code: the training images, up to 30k;
    ``fid.reference_split`` chooses, the count goes in ``fid_reference_images``; samples
    split over the processes, scored once) and, with
    ``fid.sweep_temperatures``, the FID-vs-temperature sweep of seed 000 Fig. 4.4
    (``temperature_sweep.json`` and ``.png``).

    Beside the scores: ``fid_features`` (the extractor) and ``fid_is_smoke_test`` (True
    for ``random-conv``, whose FIDs are not comparable with published ones; every printed
    FID says which features it is on); ``nonfinite_samples`` ({R: {"count", "of"}}: the
    samples with a NaN/inf value, left out of FID/KID; per sweep temperature in
    ``temperature_sweep_nonfinite_samples``); where no two samples were finite the FID
    and KID are ``null`` and ``fid_not_computed`` says why.

    ``sampling_time_samples``: time one ``sample_images(n, temperature)`` call for that
    many samples after a warm-up call (seed 003 Tables 5.3/5.4: seconds for 25 samples),
    at ``fid.temperature`` (1.0 without fid settings), on process 0; printed, logged as
    ``test/sampling_time_s`` and written as ``sampling_time_s`` (None: not timed)."""

    def __init__(self, fid: FIDSettings | None = None, sampling_time_samples: int | None = 25) -> None:
        self.fid = fid
        self.sampling_time_samples = sampling_time_samples

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.fid is not None:
            check_temperatures(self, pl_module, [self.fid.temperature, *self.fid.sweep_temperatures])

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        table: dict = {}
        family = family_of(pl_module, type(self).__name__)
        name = family.model_name
        if self.fid is not None:
            results = self.sample_quality(trainer, pl_module, self.fid.temperature)
            swept = {f"{t:g}": self.sample_quality(trainer, pl_module, t) for t in self.fid.sweep_temperatures}
            table = {"evaluation": settings_dict(self.fid),
                     "fid_features": self.fid.feature_extractor,
                     "fid_feature_layer": self.fid.feature_layer,
                     "fid_is_smoke_test": self.fid.is_smoke_test,
                     "fid_features_note": features_note(self.fid),
                     "fid_reference_split": next((row["reference_split"] for row in results.values()), None),
                     "fid_reference_images": {str(r): row["reference_images"] for r, row in results.items()},
                     "fid": {str(r): row["fid"] for r, row in results.items()},
                     "kid": {str(r): row["kid"] for r, row in results.items()},
                     "kid_std": {str(r): row["kid_std"] for r, row in results.items()},
                     "nonfinite_samples": {str(r): row["nonfinite_samples"] for r, row in results.items()}}
            not_computed = {str(r): row["not_computed"] for r, row in results.items() if row.get("not_computed")}
            if not_computed:
                table["fid_not_computed"] = not_computed
            if swept:
                table["temperature_sweep"] = {t: {str(r): row["fid"] for r, row in rows.items()}
                                              for t, rows in swept.items()}
                table["temperature_sweep_nonfinite_samples"] = {
                    t: {str(r): row["nonfinite_samples"] for r, row in rows.items()} for t, rows in swept.items()}
        if not trainer.is_global_zero:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
        bound = f"test/{family.bound_metric}_"
        noisy = f"test/{family.continuous_metric}_"
        table = {"model": name, "n_bits": family.n_bits,
                 "bpd": {k[len("test/bpd_"):]: v for k, v in metrics.items()
                         if k.startswith("test/bpd_") and not k.startswith("test/bpd_bound_")},
                 "bpd_bound": {k[len(bound):]: v for k, v in metrics.items() if k.startswith(bound)},
                 family.continuous_metric: {k[len(noisy):]: v for k, v in metrics.items() if k.startswith(noisy)},
                 "test_metrics": metrics, **table}
        if self.sampling_time_samples:
            n = self.sampling_time_samples
            seconds = self.sampling_time(pl_module, n)
            table["sampling_time_s"] = seconds
            table["sampling_time_samples"] = n
            pl_module.print(f"sampling time for {n} samples: {seconds:.4g} s")
            for logger in trainer.loggers:
                logger.log_metrics({"test/sampling_time_s": seconds}, step=trainer.global_step)
        out_dir = log_dir(trainer)
        if "temperature_sweep" in table:
            write_metrics_table(out_dir / "temperature_sweep.json", table["temperature_sweep"])
            plot_temperature_sweep(out_dir / "temperature_sweep.png", table["temperature_sweep"],
                                   f"{name}: FID ({features_label(self.fid)}) vs temperature",
                                   table["temperature_sweep_nonfinite_samples"])
        if "fid" in table:
            flat = {f"test/{kind}_{r}": v for kind in ("kid", "fid_reference_images")
                    for r, v in table[kind].items() if v is not None}
            flat.update({key: v for r, v in table["fid"].items() if v is not None
                         for key in fid_log_names(self.fid, "test", r)})
            flat.update({f"test/nonfinite_samples_{r}": row["count"] for r, row in table["nonfinite_samples"].items()})
            flat.update({f"test/nonfinite_samples_{r}_t{t}": row["count"]
                         for t, rows in table.get("temperature_sweep_nonfinite_samples", {}).items()
                         for r, row in rows.items()})
            for logger in trainer.loggers:
                logger.log_metrics(flat, step=trainer.global_step)
        write_metrics_table(out_dir / "metrics.json", table)
        pl_module.print(f"metrics table: {out_dir / 'metrics.json'}")

    @torch.no_grad()
    def sampling_time(self, pl_module: pl.LightningModule, n: int) -> float:
        """Seconds for one ``sample_images(n, temperature)`` call (after a warm-up call), in
        eval mode and on a forked RNG (the test's random stream is left as it was)."""
        temperature = self.fid.temperature if self.fid is not None else 1.0
        sample = family_of(pl_module, type(self).__name__).sample_images
        with sampling_mode(pl_module, self.fid.seed if self.fid is not None else 0):
            return time_sampling(lambda k: sample(k, temperature), n, pl_module.device)

    @torch.no_grad()
    def generate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, temperature) -> Samples:
        """``fid.num_samples`` uint8 samples per resolution and which were finite, split
        over the processes (each with its own seed) and gathered: the full set on every
        process."""
        settings = self.fid
        world, rank = trainer.world_size, trainer.global_rank
        share = math.ceil(settings.num_samples / world)
        fakes = draw_samples(pl_module, share, temperature, settings.seed + rank, settings.batch_size)
        if world > 1:
            def gather(x: Tensor) -> Tensor:
                return pl_module.all_gather(x.to(pl_module.device)).flatten(0, 1)[:settings.num_samples].cpu()

            fakes = Samples({r: gather(x) for r, x in fakes.images.items()},
                            {r: gather(f.to(torch.uint8)).bool() for r, f in fakes.finite.items()})
        return fakes

    def reference(self, datamodule, pl_module: pl.LightningModule) -> tuple[str, Dataset]:
        """The real images of FID/KID: ``fid.reference_split`` (else the module's
        ``fid_reference_split``, else ``test``), built from the data module when the
        running stage did not set it up (the training images at ``lightning test``),
        capped at ``fid.reference_max_images`` (the first images, in the split's order)."""
        split = self.fid.reference_split or family_of(pl_module, type(self).__name__).fid_reference_split
        dataset = datamodule.datasets.get(split)
        if dataset is None and hasattr(datamodule, "build_sources"):
            source = datamodule.build_sources("test" if split == "test" else "fit").get(split)
            dataset = None if source is None else PyramidDataset(source, datamodule.pyramid)
        if dataset is None:
            raise ConfigurationError(f"FID compares with the {split!r} split of the data (fid.reference_split), "
                                     f"but {type(datamodule).__name__} has none here; set fid.reference_split "
                                     "to a split it has (train, val or test), and run `lightning test`")
        cap = self.fid.reference_max_images
        if cap is not None and len(dataset) > cap:
            dataset = Subset(dataset, range(cap))
        return split, dataset

    def sample_quality(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                       temperature) -> dict[int, dict]:
        """FID and KID at every resolution against the reference images
        (:meth:`reference`) at that resolution, of the finite samples only; each row also
        names the reference split and its image count, and counts the non-finite samples
        (``nonfinite_samples``: {"count", "of"}). With fewer than two finite samples FID
        and KID are None and ``not_computed`` says why. Collective: every process calls
        it; process 0 returns the scores."""
        settings = self.fid
        datamodule = trainer.datamodule
        split, real_split = self.reference(datamodule, pl_module)
        fakes = self.generate(trainer, pl_module, temperature)
        if not trainer.is_global_zero:
            return {}
        results = {}
        n_bits = pl_module.n_bits
        features = feature_cache_tag(settings)  # extractor, layer (FID-192 vs 2048), weights
        note = features_note(settings)
        for resolution in fakes:
            cache_name = "-".join(str(part) for part in (
                type(datamodule).__name__, Path(str(datamodule.data_dir)).name or "data",
                datamodule.image_size, getattr(datamodule, "seed", 0), split, len(real_split),
                resolution, n_bits, features))
            counted = fakes.nonfinite_count(resolution)
            finite = fakes.finite_images(resolution)
            head = f"{family_of(pl_module, type(self).__name__).model_name} at {resolution}px, temperature {temperature}: "
            excluded = (f"; {counted['count']} of {counted['of']} samples non-finite, left out"
                        if counted["count"] else "")
            if finite.shape[0] >= MIN_FID_SAMPLES:
                row = fidelity(TensorImages(finite), ImagesAtResolution(real_split, resolution, n_bits),
                               settings, cache_name, cuda=pl_module.device.type == "cuda")
                pl_module.print(f"{head}FID {row['fid']:.2f}, KID {row['kid']:.4f} [{note}] "
                                f"(against {len(real_split)} {split} images{excluded})")
            else:
                reason = (f"{counted['count']} of {counted['of']} samples non-finite "
                          f"(FID/KID need at least {MIN_FID_SAMPLES} finite samples)")
                row = {"fid": None, "kid": None, "kid_std": None, "not_computed": reason}
                pl_module.print(f"{head}FID and KID not computed: {reason} [{note}]")
            row.update(reference_split=split, reference_images=len(real_split), nonfinite_samples=counted)
            results[resolution] = row
        return results


def _as_saved_at_the_last_batch(fit_loop_state: dict, max_epochs: int | None) -> None:
    """Rewrite, in place, the fit-loop progress of a checkpoint written in
    ``on_train_epoch_end`` (ModelCheckpoint's epoch-end save when validation runs at the
    epoch end) into that of one written at the end of the epoch's last batch, whose
    resume Lightning (2.6) gets right: it goes on with the next epoch under the next
    number. From the former, in a ``max_steps`` run, it runs the finished epoch's end
    again and counts it twice: the next epoch trains with the batch order of the epoch
    after it. (A checkpoint written at a validation end after the last batch resumes
    right as it is.)"""
    epochs, batches = fit_loop_state["epoch_progress"], fit_loop_state["epoch_loop.batch_progress"]
    e, b = epochs["current"], batches["current"]
    batches_done = b["ready"] == b["started"] == b["processed"] == b["completed"] > 0
    # The last epoch's checkpoint is left alone: Lightning sees the run finished.
    finished = max_epochs not in (None, -1) and e["processed"] >= max_epochs
    if e["ready"] == e["started"] == e["processed"] == e["completed"] + 1 and batches_done and not finished:
        # The epoch is already counted as processed, and the logging step has already
        # advanced past its last batch (Lightning adds that step back on this resume).
        rewind_epoch_end_checkpoint(fit_loop_state)


class ExactResume(pl.Callback):
    """What an exact resume needs beyond Lightning's own state: the RNG states of every
    process (dequantization and variational noise continue the same stream); a run
    resumed mid-epoch continues with the batches an uninterrupted run would draw next
    (the sampler's order depends on seed and epoch only); and a run resumed from a
    checkpoint written at the end of an epoch goes on with the next epoch, numbered as
    in the uninterrupted run (``current_epoch``, the sampler's epoch, the epoch-driven
    freezes and decays), whichever hook wrote it. The finished epoch's remaining end
    work (its validation, when the checkpoint was written before it) is not redone."""

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint[RNG_KEY] = gather_rng_states()

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        if RNG_KEY in checkpoint:
            restore_rng_states(checkpoint[RNG_KEY], trainer.global_rank)
        # Callbacks load before the loops do: the loops then read the rewritten progress.
        from pytorch_lightning.trainer.states import TrainerFn

        fit_loop_state = (checkpoint.get("loops") or {}).get("fit_loop")
        if trainer.state.fn == TrainerFn.FITTING and fit_loop_state and "epoch_progress" in fit_loop_state:
            _as_saved_at_the_last_batch(fit_loop_state, trainer.max_epochs)

    def on_train_start(self, trainer, pl_module) -> None:
        # Lightning does not call on_train_epoch_start for the resumed epoch;
        # on_train_start runs after the restore and before that epoch's iterator exists.
        loop = trainer.fit_loop.epoch_loop
        if not loop.restarting:
            return
        done = loop.batch_progress.current.processed
        if done >= trainer.num_training_batches:
            # Saved after the epoch's last batch: Lightning counted that epoch in
            # FitLoop.reset and begins the next one afresh (nothing to skip; a skip would
            # empty the next epoch), but leaves its ready/started counters one behind an
            # uninterrupted run's, which would make a mid-epoch checkpoint of this epoch
            # look like one written between epochs.
            progress = trainer.fit_loop.epoch_progress
            if loop.restarted_on_train_batch_end and progress.current.ready == progress.current.processed:
                progress.increment_ready()
                progress.increment_started()
            return
        loader = trainer.train_dataloader
        sampler = getattr(loader, "sampler", None)
        if done and isinstance(sampler, ResumableSampler):
            sampler.skip_next(done * loader.batch_size)


class RunSummary(pl.Callback):
    """Where a run's files are, said twice on process 0: the run folder before the first
    progress bar, and a short summary on a line of its own when the run ends (the
    monitored metric's best and last values and their checkpoints, the last
    validation's figures, the sample grids; for ``lightning test`` the test figures and
    ``metrics.json``). The ``lightning`` command adds it to every run."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        log_dir(trainer)  # announced before any progress bar draws

    @staticmethod
    def _figures(trainer: pl.Trainer, split: str) -> str:
        figures = {k: float(v) for k, v in trainer.callback_metrics.items()
                   if k.startswith(f"{split}/") and getattr(v, "numel", lambda: 1)() == 1}
        return ", ".join(f"{k} = {v:.4g}" for k, v in sorted(figures.items())) or "none logged"

    def on_fit_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        folder = log_dir(trainer)
        lines = [f"run finished at step {trainer.global_step}: {folder}"]
        for checkpoint in trainer.checkpoint_callbacks:
            monitor = getattr(checkpoint, "monitor", None)
            best, score = getattr(checkpoint, "best_model_path", ""), getattr(checkpoint, "best_model_score", None)
            if monitor and best:
                shown = f"{float(score):.4g}" if score is not None else "?"
                lines.append(f"  best:  {best} ({monitor} = {shown}, measured on these weights)")
            last = getattr(checkpoint, "last_model_path", "")
            if last:
                lines.append(f"  last:  {last}")
        lines.append(f"  last validation: {self._figures(trainer, 'val')}")
        samples = folder / "samples"
        if samples.is_dir():
            lines.append(f"  samples: {samples} ({len(list(samples.glob('*.png')))} grids)")
        print("\n" + "\n".join(lines), file=sys.stderr, flush=True)

    def on_test_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        folder = log_dir(trainer)
        lines = [f"test finished: {trainer.ckpt_path or 'the weights in memory'}",
                 f"  {self._figures(trainer, 'test')}"]
        if (folder / "metrics.json").is_file():
            lines.append(f"  metrics table: {folder / 'metrics.json'}")
        print("\n" + "\n".join(lines), file=sys.stderr, flush=True)
