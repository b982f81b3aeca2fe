"""What a run measured, as callbacks any module can use (switched on in YAML under
``trainer.callbacks``):

* :class:`ValidationFID`: ``val/fid_R`` curves (torchmetrics) during training.
* :class:`TestMetrics`: at ``lightning test``, the metrics table ``metrics.json``
  (model name, bits per dim per resolution, exact or bound, the time to draw 25
  samples) and, given FID settings, FID/KID per resolution (torch-fidelity) and the
  FID-vs-temperature sweep. Non-finite samples are counted (``nonfinite_samples``) and
  left out of FID/KID, never scored as grey.
* :class:`RunSummary`: where the run's files are and what its best checkpoint measured
  (the ``lightning`` command adds it to every run).
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset

from datamodules.datamodules import PyramidDataset
from flows.quantization import reduce_bits
from lightning_modules.errors import ConfigurationError
from lightning_modules.family import family_of
from lightning_modules.metrics import (MIN_FID_SAMPLES, FIDSettings, ImagesAtResolution, Samples, TensorImages, as_rgb,
                                       feature_cache_tag, features_label, features_note, fid_log_names, fidelity,
                                       in_loop_fid, plot_temperature_sweep, settings_dict, time_sampling,
                                       write_metrics_table)
from lightning_modules.run_folder import log_dir
from lightning_modules.sample_grids import check_temperatures, draw_samples, sampling_mode


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
