"""The seeds' analyses as callbacks that run at ``lightning test`` and work for every
family through the model contract (``encode``/``decode``/``sample``):

* :class:`LatentInterpolation`: encode two test images, interpolate their latents
  linearly (or spherically), decode (seed 004 sec. 5, seed 001 sec. 3.1).
* :class:`LatentZeroing`: set the latents to their prior mean cumulatively from the
  finest scale to the coarsest and decode (seed 001 Fig. 6 and 8).
* :class:`ResamplingMaps`: resample one scale's latent from its prior (no truncation),
  keep the others, and show the pixel-wise standard deviation (seed 001 Fig. 5).
* :class:`NearestNeighbours`: the K L2-closest training images of each sample, and the
  nearest distances of samples vs held-out test images (seed 001 Fig. 9).
* :class:`NoiseSweep`: f^-1(f(x) + sigma eps) over a grid of sigma, with the failure
  rate per sigma (seed 000 Fig. 4.1, 4.2 and sec. 4.4.2).

A model's "scales" are the groups of its latents: a Glow's split-off latents (finest
first) and its top latent; a cascade's stages (finest first). A prior mean is what the
prior samples at temperature 0. Each callback writes PNGs and a JSON of its numbers to
``<log dir>/analyses/`` and sends the images to every logger. The PNGs are labelled
figures (title, row and column labels, tiles upscaled by nearest neighbour to at least
``MIN_TILE_PX``); ``analyses/raw/`` keeps the bare grids at 1:1. A failed tile (a
non-finite decoding or sample) is red in every figure (``sample_grids.mark_failed``, the
title then says "red = non-finite sample"), and the JSONs are strict JSON (a non-finite
number is ``null``). Switch them on under ``trainer.callbacks``
(``experiments/analyses.yaml`` lists all of them).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Subset

from flows.model import batch_size_of, map_latents
from flows.quantization import reduce_bits, to_uint8
from lightning_modules.run_folder import log_dir
from lightning_modules.sample_grids import FAILED_LEGEND, mark_failed, sampling_mode, save_uint8_png, send_image
from lightning_modules.metrics import finite_samples, json_text

Latents = Any  # a list of tensors (one model) or {resolution: list} (a cascade); None = draw from the prior


# --- latent groups (the model's: FlowModel.latent_groups) ----------------------------------
def group_shapes(model, latents: Latents) -> str:
    """``z0 6x16x16, z1 ...``: channels x height x width of each group that is one tensor
    ('' where the groups are lists of tensors, as a cascade's stages)."""
    return ", ".join(f"{model.latent_group_name(key)} {'x'.join(map(str, latents[key].shape[1:]))}"
                     for key in model.latent_groups(latents) if isinstance(latents[key], Tensor))


def slerp(a: Tensor, b: Tensor, t: float) -> Tensor:
    """Spherical interpolation per sample (falls back to linear for parallel vectors)."""
    flat_a, flat_b = a.flatten(1), b.flatten(1)
    cos = (flat_a * flat_b).sum(1) / (flat_a.norm(dim=1) * flat_b.norm(dim=1)).clamp_min(1e-12)
    omega = torch.arccos(cos.clamp(-1.0, 1.0))
    sin = torch.sin(omega)
    linear = sin.abs() < 1e-6
    wa = torch.where(linear, torch.full_like(sin, 1 - t), torch.sin((1 - t) * omega) / sin.where(~linear, 1.0))
    wb = torch.where(linear, torch.full_like(sin, t), torch.sin(t * omega) / sin.where(~linear, 1.0))
    shape = (-1,) + (1,) * (a.dim() - 1)
    return wa.view(shape) * a + wb.view(shape) * b


# --- the analyses as functions of a model --------------------------------------------------
@torch.no_grad()
def interpolate(model, x_a, cond_a, x_b, cond_b, steps: int, spherical: bool = False) -> list:
    """Decodings at ``steps`` points from x_a's latents to x_b's (endpoints included)."""
    z_a, z_b = model.encode(x_a, cond_a).latents, model.encode(x_b, cond_b).latents
    out = []
    for t in torch.linspace(0, 1, steps).tolist():
        mix = (lambda a, b: slerp(a, b, t)) if spherical else (lambda a, b: (1 - t) * a + t * b)
        out.append(model.decode(map_latents(mix, z_a, z_b), cond_a, 0.0))
    return out


def decode_or_sample(model, latents: Latents, cond, temperature: float, n: int):
    """``model.decode``; with every latent None (nothing fixes the batch size) the same
    as ``model.sample(n)``."""
    leaves = []
    map_latents(leaves.append, latents)
    if not leaves:
        return model.sample(n, cond, temperature)
    return model.decode(latents, cond, temperature)


@torch.no_grad()
def cumulative_zeroing(model, x, cond) -> list:
    """[reconstruction, then the scales set to their prior mean one by one, finest
    first]; the last entry has every latent at its prior mean."""
    latents = model.encode(x, cond).latents
    keys = model.latent_groups(latents)
    n = batch_size_of(x)
    return [decode_or_sample(model, model.without_groups(latents, keys[:k]), cond, 0.0, n)
            for k in range(len(keys) + 1)]


@torch.no_grad()
def resampling_std(model, x, cond, key, samples: int, images_of: Callable,
                   latents: Latents | None = None) -> dict[int, Tensor]:
    """Pixel-wise std ([B, H, W], averaged over channels) of ``samples`` decodings with
    the scale ``key`` drawn from its prior at temperature 1 and the others kept
    (``latents``: x's encoding, when the caller already has it)."""
    latents = model.without_groups(model.encode(x, cond).latents if latents is None else latents, [key])
    n = batch_size_of(x)
    draws = [images_of(decode_or_sample(model, latents, cond, 1.0, n)) for _ in range(samples)]
    return {r: torch.stack([d[r].float() for d in draws]).std(dim=0).mean(dim=1) for r in draws[0]}


@torch.no_grad()
def nearest_neighbours(queries: Tensor, references: Iterable[Tensor], k: int) -> tuple[Tensor, Tensor]:
    """(distances [Q, k], indices [Q, k]) of the k L2-closest references of each query,
    streaming the references in batches (uint8 or float images, compared as float)."""
    queries = queries.flatten(1).float()
    best_d = torch.full((queries.shape[0], 0), math.inf, device=queries.device)
    best_i = torch.zeros((queries.shape[0], 0), dtype=torch.long, device=queries.device)
    offset = 0
    for batch in references:
        batch = batch.to(queries.device).flatten(1).float()
        distances = torch.cdist(queries, batch)
        indices = torch.arange(offset, offset + batch.shape[0], device=queries.device).expand_as(distances)
        best_d, order = torch.cat([best_d, distances], 1).sort(dim=1)
        best_i = torch.cat([best_i, indices], 1).gather(1, order)
        best_d, best_i = best_d[:, :k], best_i[:, :k]
        offset += batch.shape[0]
    return best_d, best_i


# --- labelled figures ----------------------------------------------------------------------
# Tiles are upscaled (nearest neighbour, whole factors) to at least this many pixels, so
# a 32-px (or 8-px) crop reads at 1:1 and leaves room for a column label.
MIN_TILE_PX = 96
FONT_SIZE = 12  # Pillow's default font (no file to ship); ASCII only, it has no Greek
MARGIN, GAP = 4, 2  # px around labels / between tiles


def upscale_factor(tile_px: int, min_px: int = MIN_TILE_PX) -> int:
    return max(1, math.ceil(min_px / tile_px))


def _font():
    from PIL import ImageFont

    return ImageFont.load_default(size=FONT_SIZE)


def text_size(text: str) -> tuple[int, int]:
    """(width, height) in px of ``text`` (lines split at newlines) in the figure font."""
    from PIL import Image, ImageDraw

    if not text:
        return 0, 0
    left, top, right, bottom = ImageDraw.Draw(Image.new("L", (1, 1))).multiline_textbbox(
        (0, 0), text, font=_font(), spacing=2)
    return right, bottom


def wrap(text: str, width: int) -> str:
    """``text`` with newlines between words so that no line is wider than ``width`` px."""
    lines: list[str] = []
    for word in text.split():
        if lines and text_size(f"{lines[-1]} {word}")[0] <= width:
            lines[-1] += f" {word}"
        else:
            lines.append(word)
    return "\n".join(lines)


class FigureLayout:
    """Where a labelled figure puts its title, labels and tiles (all boxes are
    (left, top, right, bottom) in px): a title over the whole figure, column labels over
    the columns, row labels left of the rows, and the tiles upscaled by ``factor``."""

    def __init__(self, rows: list[str], columns: list[str], title: str, tile_hw: tuple[int, int]) -> None:
        self.factor = upscale_factor(min(tile_hw))
        self.tile_h, self.tile_w = (s * self.factor for s in tile_hw)
        self.row_labels, self.column_labels = rows, columns
        self.label_w = max(text_size(t)[0] for t in rows) + 2 * MARGIN if any(rows) else 0
        self.pitch_x = max(self.tile_w, max(text_size(t)[0] for t in columns) + 2 * MARGIN) + GAP
        self.pitch_y = max(self.tile_h, max(text_size(t)[1] for t in rows) + 2 * MARGIN) + GAP
        grid_w = self.label_w + len(columns) * self.pitch_x
        self.title = wrap(title, max(grid_w, 480) - 2 * MARGIN)
        self.title_h = text_size(self.title)[1] + 2 * MARGIN if title else 0
        self.header_h = max(text_size(t)[1] for t in columns) + 2 * MARGIN if any(columns) else 0
        self.width = max(grid_w, text_size(self.title)[0] + 2 * MARGIN)
        self.height = self.title_h + self.header_h + len(rows) * self.pitch_y

    def tile_box(self, i: int, j: int) -> tuple[int, int, int, int]:
        left = self.label_w + j * self.pitch_x + (self.pitch_x - GAP - self.tile_w) // 2
        top = self.title_h + self.header_h + i * self.pitch_y + (self.pitch_y - GAP - self.tile_h) // 2
        return left, top, left + self.tile_w, top + self.tile_h

    def row_label_box(self, i: int) -> tuple[int, int, int, int]:
        top = self.title_h + self.header_h + i * self.pitch_y
        return 0, top, self.label_w, top + self.pitch_y - GAP

    def column_label_box(self, j: int) -> tuple[int, int, int, int]:
        left = self.label_w + j * self.pitch_x
        return left, self.title_h, left + self.pitch_x - GAP, self.title_h + self.header_h


def labelled_figure(tiles: list[Tensor], rows: list[str], columns: list[str],
                    title: str = "") -> tuple[Tensor, FigureLayout]:
    """A figure ([3, H, W] uint8) of ``tiles`` (one uint8 [columns, C, h, w] tensor per
    row, C = 1 or 3) upscaled by nearest neighbour, each row and column labelled, with
    ``title`` wrapped over it; and its layout."""
    from PIL import Image, ImageDraw

    if len(tiles) != len(rows) or any(t.shape[0] != len(columns) for t in tiles):
        raise ValueError(f"{len(rows)} row and {len(columns)} column labels for a grid of "
                         f"{[t.shape[0] for t in tiles]} tiles per row")
    layout = FigureLayout(rows, columns, title, tuple(tiles[0].shape[-2:]))
    canvas = Image.new("RGB", (layout.width, layout.height), "white")
    draw = ImageDraw.Draw(canvas)
    font = _font()
    if title:
        draw.multiline_text((MARGIN, MARGIN), layout.title, fill="black", font=font, spacing=2)
    for j, text in enumerate(columns):  # centred over the column, at the bottom of the header
        left, top, right, bottom = layout.column_label_box(j)
        draw.multiline_text(((left + right) // 2, bottom - MARGIN), text, fill="black", font=font,
                            anchor="md", align="center", spacing=2)
    for i, text in enumerate(rows):  # right-aligned next to the row, vertically centred
        left, top, right, bottom = layout.row_label_box(i)
        draw.multiline_text((right - MARGIN, (top + bottom) // 2), text, fill="black", font=font,
                            anchor="rm", align="right", spacing=2)
    for i, row in enumerate(tiles):
        row = row.cpu().expand(-1, 3, -1, -1) if row.shape[1] == 1 else row.cpu()
        big = row.repeat_interleave(layout.factor, dim=2).repeat_interleave(layout.factor, dim=3)
        for j, tile in enumerate(big):
            canvas.paste(Image.fromarray(tile.permute(1, 2, 0).numpy()), layout.tile_box(i, j)[:2])
    return torch.from_numpy(np.asarray(canvas).copy()).permute(2, 0, 1), layout


# --- the callbacks -------------------------------------------------------------------------
def collate_test_images(trainer: pl.Trainer, pl_module, indices: list[int]):
    """A Batch of the test split's images ``indices`` at their bin centres."""
    dataset = trainer.datamodule.datasets["test"]
    items = [dataset[i] for i in indices]
    batch = {"images": {r: torch.stack([it["images"][r] for it in items]).to(pl_module.device)
                        for r in items[0]["images"]},
             "label": torch.tensor([int(it["label"]) for it in items], device=pl_module.device)}
    return pl_module.prepare_batch(batch, noise=False)


class Analysis(pl.Callback):
    """Runs :meth:`analyse` once at the end of ``lightning test`` on process 0, in eval
    mode, from a forked RNG seeded with ``seed``."""

    name = "analysis"

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self.figures: dict[str, dict] = {}

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        with sampling_mode(pl_module, self.seed):
            self.figures: dict[str, dict] = {}  # tag -> the labels save_grid drew
            numbers = self.analyse(trainer, pl_module)
        self.write_json(trainer, numbers)

    def analyse(self, trainer, pl_module) -> dict:
        raise NotImplementedError

    def out_dir(self, trainer) -> Path:
        path = log_dir(trainer) / "analyses"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def save_grid(self, trainer, pl_module, rows: list[Tensor], tag: str, row_labels: list[str],
                  column_labels: list[str], title: str, failed: list[Tensor] | None = None) -> Path:
        """``rows``: [columns, C, H, W] model-space images (or uint8), one grid row each.
        Writes the labelled figure (``<name>_<tag>.png``, also sent to the loggers), the
        bare grid at 1:1 (``raw/<name>_<tag>.png``, for composing one's own figure), and
        records the labels (and the count of failed tiles) for the JSON. A tile is failed,
        and painted red (:func:`mark_failed`), where ``failed`` (one [columns] bool per
        row) says so or where a model-space tile has a non-finite value; the title then
        carries the legend."""
        from torchvision.utils import make_grid

        marks = []
        for i, row in enumerate(rows):
            mark = torch.zeros(row.shape[0], dtype=torch.bool)
            if failed is not None:
                mark |= failed[i].to(torch.bool).cpu()
            if row.dtype != torch.uint8:
                mark |= ~finite_samples(row.cpu())
            marks.append(mark)
        rows = [mark_failed((r if r.dtype == torch.uint8 else to_uint8(r.cpu(), pl_module.n_bits)), m)
                for r, m in zip(rows, marks)]
        failed_tiles = int(sum(int(m.sum()) for m in marks))
        if failed_tiles and FAILED_LEGEND not in title:
            title = f"{title}; {FAILED_LEGEND}"
        figure, _ = labelled_figure(rows, row_labels, column_labels, title)
        path = self.out_dir(trainer) / f"{self.name}_{tag}.png"
        save_uint8_png(figure, path)
        (path.parent / "raw").mkdir(exist_ok=True)
        save_uint8_png(make_grid(torch.cat(rows), nrow=rows[0].shape[0], padding=1), path.parent / "raw" / path.name)
        send_image(trainer, f"analyses/{self.name}_{tag}", figure)
        self.figures[tag] = {"title": title, "rows": row_labels, "columns": column_labels,
                             "failed_tiles": failed_tiles}
        return path

    def write_json(self, trainer, numbers: dict) -> None:
        """``<name>.json``: the analysis's numbers and its figures' labels, strict JSON
        (a non-finite number is ``null``)."""
        path = self.out_dir(trainer) / f"{self.name}.json"
        path.write_text(json_text({**numbers, "figures": self.figures}))


class LatentInterpolation(Analysis):
    """``pairs`` rows of ``steps`` decodings between test images 2i and 2i+1 (linear, or
    spherical with ``spherical: true``), one grid per resolution."""

    name = "interpolation"

    def __init__(self, pairs: int = 4, steps: int = 8, spherical: bool = False, seed: int = 0) -> None:
        super().__init__(seed)
        self.pairs, self.steps, self.spherical = pairs, steps, spherical

    def analyse(self, trainer, pl_module) -> dict:
        batch = collate_test_images(trainer, pl_module, list(range(2 * self.pairs)))
        x, cond = pl_module.model_input(batch)
        pick = lambda value, start: map_latents(lambda t: t[start::2], value)  # noqa: E731 - even or odd images
        frames = interpolate(pl_module.model, pick(x, 0), pick(cond, 0), pick(x, 1), pick(cond, 1),
                             self.steps, self.spherical)
        frames = [pl_module.images_of(f) for f in frames]
        targets = pl_module.images_of(x)
        errors = {}
        kind = "spherical" if self.spherical else "linear"
        for r in frames[0]:
            rows = [torch.stack([f[r][i] for f in frames]) for i in range(self.pairs)]
            self.save_grid(trainer, pl_module, rows, f"res{r}",
                           [f"test {2 * i} -> {2 * i + 1}" for i in range(self.pairs)],
                           [f"t={t:.2g}" for t in torch.linspace(0, 1, self.steps).tolist()],
                           f"Decodings (T=0) of {kind} interpolations between the latents of two test images, "
                           f"{r}x{r} (seed 004 sec. 5)")
            errors[str(r)] = max(float((frames[0][r] - targets[r][0::2]).abs().max()),
                                 float((frames[-1][r] - targets[r][1::2]).abs().max()))
        return {"pairs": self.pairs, "steps": self.steps, "spherical": self.spherical,
                "endpoint_max_abs_error": errors}


class LatentZeroing(Analysis):
    """One row per test image: its reconstruction, then the scales set to their prior
    mean cumulatively from the finest to the coarsest (the last column is the decoded
    prior mean)."""

    name = "zeroing"

    def __init__(self, images: int = 4, seed: int = 0) -> None:
        super().__init__(seed)
        self.images = images

    def analyse(self, trainer, pl_module) -> dict:
        batch = collate_test_images(trainer, pl_module, list(range(self.images)))
        x, cond = pl_module.model_input(batch)
        columns = [pl_module.images_of(d) for d in cumulative_zeroing(pl_module.model, x, cond)]
        model = pl_module.model
        latents = model.encode(x, cond).latents
        names = [model.latent_group_name(key) for key in model.latent_groups(latents)]
        # Column k has the k finest scales at their prior mean: "z0+z1 at mean".
        labels = ["reconstruction"] + ["+".join(names[:k]) + "\nat mean" for k in range(1, len(names) + 1)]
        labels[-1] = "all at mean\n(prior mean)"
        shapes = group_shapes(model, latents)
        for r in columns[0]:
            self.save_grid(trainer, pl_module, [torch.stack([c[r][i] for c in columns]) for i in range(self.images)],
                           f"res{r}", [f"test {i}" for i in range(self.images)], labels,
                           f"Latents set to their prior mean cumulatively, finest scale first, {r}x{r} "
                           f"(seed 001 Fig. 6)" + (f"; latents {shapes}" if shapes else ""))
        return {"images": self.images, "scales_finest_first": [str(k) for k in model.latent_groups(latents)]}


class ResamplingMaps(Analysis):
    """For each test image: the image, then per scale the pixel-wise std of ``samples``
    decodings with that scale resampled from its prior (temperature 1) and the others
    kept, on one brightness scale per image (white = the image's largest std). A map with
    a non-finite value (some decoding failed) is a red tile, counted in
    ``nonfinite_maps`` and left out of ``mean_pixel_std`` (``null`` where every map is)."""

    name = "resampling"

    def __init__(self, images: int = 4, samples: int = 16, seed: int = 0) -> None:
        super().__init__(seed)
        self.images, self.samples = images, samples

    def analyse(self, trainer, pl_module) -> dict:
        batch = collate_test_images(trainer, pl_module, list(range(self.images)))
        x, cond = pl_module.model_input(batch)
        model = pl_module.model
        latents = model.encode(x, cond).latents
        keys = model.latent_groups(latents)
        maps = {key: resampling_std(pl_module.model, x, cond, key, self.samples, pl_module.images_of, latents)
                for key in keys}
        originals = pl_module.images_of(x)
        numbers, nonfinite = {}, {}
        for r, image in originals.items():
            stds = torch.stack([maps[key][r] for key in keys], dim=1).cpu()  # [B, scales, H, W]
            failed = ~finite_samples(stds.flatten(0, 1)).view(stds.shape[:2])  # [B, scales]
            stds = torch.where(torch.isfinite(stds), stds, torch.zeros_like(stds))
            peak = stds.flatten(1).amax(1).clamp_min(1e-8)[:, None, None, None]
            shown = (stds / peak * 255).round().clamp(0, 255).to(torch.uint8)
            shown = shown[:, :, None].expand(-1, -1, 3 if image.shape[1] == 3 else 1, -1, -1)
            rows = [torch.cat([to_uint8(image[i:i + 1].cpu(), pl_module.n_bits), shown[i]]) for i in range(self.images)]
            marks = [torch.cat([torch.zeros(1, dtype=torch.bool), failed[i]]) for i in range(self.images)]
            self.save_grid(trainer, pl_module, rows, f"res{r}", [f"test {i}" for i in range(self.images)],
                           ["test image"] + [f"std, {model.latent_group_name(key)}\nresampled" for key in keys],
                           f"Pixel-wise std of {self.samples} decodings with one scale resampled from its prior "
                           f"(T=1) and the others kept, {r}x{r}; white = the row's largest std (seed 001 Fig. 5)",
                           failed=marks)
            numbers[str(r)], nonfinite[str(r)] = {}, {}
            for j, key in enumerate(keys):
                kept = maps[key][r].cpu()[~failed[:, j]]
                numbers[str(r)][str(key)] = float(kept.mean()) if kept.numel() else None
                nonfinite[str(r)][str(key)] = {"count": int(failed[:, j].sum()), "of": int(failed.shape[0])}
        return {"samples": self.samples, "scales_finest_first": [str(k) for k in keys],
                "mean_pixel_std": numbers, "nonfinite_maps": nonfinite}


class NearestNeighbours(Analysis):
    """For ``samples`` samples at ``temperature``: the ``k`` L2-closest training images
    (the whole training split, streamed in batches on the module's device), at the top
    resolution. Also the distance of every sample and of ``test_images`` held-out test
    images to their nearest training image: samples much closer to the training set
    than unseen real images are a sign of memorization. A non-finite sample is a red
    tile, counted (``samples.nonfinite``) and left out of the distance statistics."""

    name = "nearest_neighbours"

    def __init__(self, samples: int = 16, k: int = 5, temperature: float = 1.0, test_images: int = 256,
                 batch_size: int = 256, seed: int = 0) -> None:
        super().__init__(seed)
        self.samples, self.k, self.temperature = samples, k, temperature
        self.test_images, self.batch_size = test_images, batch_size

    def analyse(self, trainer, pl_module) -> dict:
        resolution = max(pl_module.resolutions)
        drawn = pl_module.sample_images(self.samples, self.temperature)[resolution].cpu()
        failed = ~finite_samples(drawn)
        samples = to_uint8(drawn, pl_module.n_bits)
        datamodule = trainer.datamodule
        train, test = datamodule.datasets.get("train"), datamodule.datasets["test"]
        if train is None:
            datamodule.setup("fit")
            train = datamodule.datasets["train"]

        def images(dataset):
            loader = DataLoader(dataset, batch_size=self.batch_size, shuffle=False)
            return (reduce_bits(b["images"][resolution], pl_module.n_bits) for b in loader)

        distances, indices = nearest_neighbours(samples.to(pl_module.device), images(train), self.k)
        held_out = Subset(test, range(min(self.test_images, len(test))))
        test_queries = torch.cat(list(images(held_out)))
        test_distances, _ = nearest_neighbours(test_queries.to(pl_module.device), images(train), 1)
        rows = [torch.cat([samples[i:i + 1].cpu(), torch.stack([reduce_bits(train[int(j)]["images"][resolution],
                                                                            pl_module.n_bits) for j in indices[i]])])
                for i in range(self.samples)]
        scale = math.sqrt(samples[0].numel())  # RMS distance per dimension, in uint8 levels
        all_nn, test_nn = distances[:, 0].cpu() / scale, test_distances[:, 0].cpu() / scale
        sample_nn = all_nn[~failed]
        marks = [torch.cat([failed[i:i + 1], torch.zeros(self.k, dtype=torch.bool)]) for i in range(self.samples)]
        self.save_grid(trainer, pl_module, rows, f"res{resolution}",
                       [f"sample {i}\n" + ("non-finite" if failed[i] else f"d={float(d):.1f}")
                        for i, d in enumerate(all_nn)],
                       ["sample"] + [f"neighbour {j + 1}" for j in range(self.k)],
                       f"Samples (T={self.temperature:g}) and their {self.k} L2-nearest training images, "
                       f"{resolution}x{resolution} (seed 001 Fig. 9); d = RMS distance to neighbour 1 in 8-bit "
                       f"levels (median over {len(test_nn)} test images: {float(test_nn.median()):.1f})",
                       failed=marks)
        some = sample_nn.numel() > 0
        return {"resolution": resolution, "k": self.k, "temperature": self.temperature,
                "unit": "root-mean-square difference per dimension, in 8-bit levels",
                "samples": {"count": self.samples, "nonfinite": int(failed.sum()),
                            "mean": float(sample_nn.mean()) if some else None,
                            "median": float(sample_nn.median()) if some else None},
                "test_images": {"count": len(test_nn), "mean": float(test_nn.mean()), "median": float(test_nn.median())},
                "samples_closer_than_median_test_image":
                    float((sample_nn < test_nn.median()).float().mean()) if some else None}


class NoiseSweep(Analysis):
    """f^-1(f(x) + sigma eps) of ``images`` test images for each sigma (one row per
    sigma; default: the module's ``noise_sweep_sigmas``, 0 to 0.25 for Glow, 0 to 1 for
    SR stages as in seed 000 Fig. 4.1 / 4.2), with the share of non-finite
    reconstructions per sigma (sec. 4.4.2). sigma means what the module's variational
    training means by it (``sigma_is``)."""

    name = "noise_sweep"

    def __init__(self, sigmas: list[float] | None = None, images: int = 8, seed: int = 0) -> None:
        super().__init__(seed)
        self.sigmas, self.images = sigmas, images

    def analyse(self, trainer, pl_module) -> dict:
        batch = collate_test_images(trainer, pl_module, list(range(self.images)))
        sigmas = self.sigmas if self.sigmas is not None else pl_module.noise_sweep_sigmas
        rows: dict[int, list[Tensor]] = {}
        failed: dict[int, list[Tensor]] = {}
        failure: dict[str, dict[str, float]] = {}
        for sigma in sigmas:
            for r, recon in pl_module.noisy_reconstructions(batch, sigma).items():
                rows.setdefault(r, []).append(to_uint8(recon.images.cpu(), pl_module.n_bits))
                failed.setdefault(r, []).append(recon.failed.cpu())
                failure.setdefault(str(r), {})[f"{sigma:g}"] = float(recon.failure_rate)
        sigma_is = pl_module.sigma_is
        symbol = "sigma^2" if sigma_is == "variance" else "sigma"  # the default font has no Greek
        for r, grid_rows in rows.items():
            self.save_grid(trainer, pl_module, grid_rows, f"res{r}",
                           [f"{symbol}={s:g}\nfailed {failure[str(r)][f'{s:g}']:.0%}" for s in sigmas],
                           [f"test {i}" for i in range(self.images)],
                           f"Reconstructions f^-1(f(x) + sigma eps), eps ~ N(0, I), sigma the noise {sigma_is}, "
                           f"one row per sigma, {r}x{r}; {FAILED_LEGEND} (a failed reconstruction: non-finite "
                           f"or beyond the allowed magnitude) (seed 000 Fig. 4.1, 4.2)", failed=failed[r])
        return {"sigmas": list(sigmas), "sigma_is": sigma_is, "failure_rate": failure}
