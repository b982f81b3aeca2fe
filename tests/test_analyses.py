"""The analysis callbacks (lightning_modules/analyses.py): each property a bug would break."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from flows import Glow
from flows.model import Encoding, FlowModel
from lightning_modules import (GlowModule, LatentInterpolation, LatentZeroing, NearestNeighbours, NoiseSweep,
                               ResamplingMaps, TestMetrics)
from lightning_modules.analyses import (cumulative_zeroing, interpolate, labelled_figure, nearest_neighbours,
                                        resampling_std)
from tests.builders import cascade_module, pyramid_batch, pyramid_data, split_grid, tiny_cascade, tiny_glow
from tests.conftest import trainer


def test_interpolation_endpoints_decode_to_the_two_inputs():
    model, x = tiny_glow()
    for spherical in (False, True):
        frames = interpolate(model, x[:3], None, x[3:], None, steps=5, spherical=spherical)
        assert len(frames) == 5
        assert (frames[0] - x[:3]).abs().max() < 1e-4 and (frames[-1] - x[3:]).abs().max() < 1e-4
        assert (frames[2] - x[:3]).abs().max() > 1e-2  # the middle is neither
    cascade = tiny_cascade()
    images, clean, _ = pyramid_batch(batch=2)
    pick = lambda i: {r: v[i:i + 1] for r, v in images.items()}  # noqa: E731
    frames = interpolate(cascade, pick(0), None, pick(1), None, steps=3)
    for r in (8, 16, 32):
        assert (frames[0][r] - images[r][:1]).abs().max() < 1e-4 and (frames[-1][r] - images[r][1:]).abs().max() < 1e-4


def test_zeroing_every_scale_gives_the_decoded_prior_mean():
    model, x = tiny_glow()
    columns = cumulative_zeroing(model, x, None)
    assert len(columns) == 1 + len(model.latent_shapes)
    assert (columns[0] - x).abs().max() < 1e-4  # the reconstruction first
    torch.manual_seed(7)
    assert torch.allclose(columns[-1], model.sample(x.shape[0], None, 0.0), atol=1e-5)
    assert not torch.allclose(columns[1], columns[0], atol=1e-3)  # zeroing the finest scale changes the image


class IgnoresItsFinestLatent(FlowModel):
    """A two-scale stand-in whose decoding does not depend on its first latent."""

    in_channels, image_size = 1, 4

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(2.0))

    def encode(self, x, cond=None):
        return Encoding([x[:, :, :2], x[:, :, 2:]], torch.zeros(x.shape[0]), torch.zeros(x.shape[0]))

    def decode(self, latents, cond=None, temperature=1.0):
        coarse = latents[1] if latents[1] is not None else temperature * torch.randn(latents[0].shape)
        return torch.cat([torch.zeros_like(coarse), self.scale * coarse], dim=2)


def test_the_resampling_map_of_an_ignored_scale_is_zero():
    model = IgnoresItsFinestLatent()
    x = torch.rand(3, 1, 4, 4)
    images_of = lambda decoded: {4: decoded}  # noqa: E731
    ignored = resampling_std(model, x, None, 0, samples=8, images_of=images_of)[4]
    used = resampling_std(model, x, None, 1, samples=8, images_of=images_of)[4]
    assert torch.equal(ignored, torch.zeros(3, 4, 4))
    assert (used[:, 2:] > 0.5).all() and torch.equal(used[:, :2], torch.zeros(3, 2, 4))


def test_nearest_neighbour_of_a_training_image_is_itself():
    training = torch.randint(0, 256, (50, 3, 8, 8), dtype=torch.uint8)
    queries = training[[7, 31]]
    distances, indices = nearest_neighbours(queries, training.split(16), k=3)
    assert indices[:, 0].tolist() == [7, 31] and torch.equal(distances[:, 0], torch.zeros(2))
    assert (distances[:, 1:] > 0).all() and (distances.diff(dim=1) >= 0).all()


def test_the_noise_sweep_at_sigma_zero_reproduces_the_input():
    module = GlowModule(flow=tiny_glow()[0], n_bits=5)
    cascade = cascade_module(sr_stages=None)
    data = pyramid_data(top=16)
    data.setup("fit")
    batch = next(iter(data.val_dataloader()))
    for m in (module, cascade):
        m.eval()
        prepared = m.prepare_batch({"images": batch["images"], "label": batch["label"]}, noise=False)
        for r, recon in m.noisy_reconstructions(prepared, 0.0).items():
            assert (recon.images - prepared.images[r]).abs().max() < 1e-4, (type(m).__name__, r)
            assert recon.failure_rate == 0


def test_variance_reading_of_sigma_uses_its_square_root():
    assert cascade_module(sigma_is="variance").noise_std(0.25) == pytest.approx(0.5)
    assert cascade_module().noise_std(0.25) == 0.25


def test_a_labelled_figure_upscales_its_tiles_and_draws_each_label():
    tiles = [torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8) for _ in range(2)]
    rows, columns = ["sigma=0", "sigma=0.25"], ["test 0", "test 1", "test 2"]
    figure, layout = labelled_figure(tiles, rows, columns, "a title")
    assert layout.factor == 12  # 8-px tiles to 96 px, nearest neighbour
    assert figure.shape[1] > 2 * 8 * 12 and figure.shape[2] > 3 * 8 * 12  # the raw grid is 2 x 3 tiles of 8 px
    for i in range(2):
        for j in range(3):
            left, top, right, bottom = layout.tile_box(i, j)
            expected = tiles[i][j].repeat_interleave(12, 1).repeat_interleave(12, 2)
            assert torch.equal(figure[:, top:bottom, left:right], expected), (i, j)
    strips = []
    for box in [layout.row_label_box(i) for i in range(2)] + [layout.column_label_box(j) for j in range(3)]:
        left, top, right, bottom = box
        strips.append(figure[:, top:bottom, left:right])
        assert (strips[-1] < 128).any(), box  # ink: the label is drawn
    assert not torch.equal(strips[0], strips[1])  # two different labels look different
    with pytest.raises(ValueError, match="1 row and 3 column labels"):
        labelled_figure(tiles, rows[:1], columns)


ALL = lambda: [TestMetrics(), LatentInterpolation(pairs=2, steps=4), LatentZeroing(images=2),  # noqa: E731
               ResamplingMaps(images=2, samples=4), NearestNeighbours(samples=3, k=2, test_images=8),
               NoiseSweep(images=3)]


@pytest.mark.parametrize("family", ["glow", "cascade"])
def test_lightning_test_writes_every_figure_and_its_numbers(family, tmp_path):
    module = GlowModule(flow=Glow(image_size=16, scales=2, steps_per_scale=1, hidden_channels=8), n_bits=5) \
        if family == "glow" else cascade_module()
    run = trainer(tmp_path, limit_test_batches=1, callbacks=ALL())
    run.test(module, pyramid_data(top=16))
    out = tmp_path / "analyses"
    resolutions = [16] if family == "glow" else [8, 16]
    for name in ("interpolation", "zeroing", "resampling", "noise_sweep"):
        assert {p.name for p in out.glob(f"{name}_res*.png")} == {f"{name}_res{r}.png" for r in resolutions}
        assert json.loads((out / f"{name}.json").read_text())
    assert (out / "nearest_neighbours_res16.png").exists()
    nn = json.loads((out / "nearest_neighbours.json").read_text())
    assert nn["samples"]["count"] == 3 and nn["test_images"]["count"] == 8 and nn["test_images"]["mean"] > 0
    interpolation = json.loads((out / "interpolation.json").read_text())
    assert max(interpolation["endpoint_max_abs_error"].values()) < 1e-3
    sweep = json.loads((out / "noise_sweep.json").read_text())
    assert all(rates["0"] == 0.0 for rates in sweep["failure_rate"].values())
    zeroing = json.loads((out / "zeroing.json").read_text())
    assert zeroing["scales_finest_first"] == (["0", "1"] if family == "glow" else ["16", "8"])
    # The noise sweep's figure: one row per sigma of the family's list, labelled with it, and
    # the raw grid's tiles upscaled: rebuilt from the raw grid with these labels, pixel for pixel.
    sigmas = module.noise_sweep_sigmas
    assert sweep["sigmas"] == sigmas
    for r in resolutions:
        rows = [f"sigma={s:g}\nfailed {sweep['failure_rate'][str(r)][f'{s:g}']:.0%}" for s in sigmas]
        columns = ["test 0", "test 1", "test 2"]
        assert sweep["figures"][f"res{r}"]["rows"] == rows and sweep["figures"][f"res{r}"]["columns"] == columns
        tiles = split_grid(out / "raw" / f"noise_sweep_res{r}.png", len(sigmas), 3)
        expected, layout = labelled_figure(tiles, rows, columns, sweep["figures"][f"res{r}"]["title"])
        shown = torch.from_numpy(np.asarray(Image.open(out / f"noise_sweep_res{r}.png").convert("RGB")).copy())
        assert layout.factor * r >= 64 and torch.equal(shown.permute(2, 0, 1), expected)
