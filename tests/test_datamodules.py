"""Data: pyramids, quantization, and every loader on small fixtures in the real
on-disk layouts (torchvision's); the shared MNIST test split when it is present."""
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules import (CelebADataModule, CIFAR10DataModule, DatasetNotFoundError,
                         EmbeddedDataModule, ImageFolderDataModule, ImagePyramid,
                         MNISTDataModule)
from datamodules.datamodules import landmark_crop
from datamodules.pyramid import resize_uint8
from flows.quantization import bits_per_dim, dequantize, to_uint8
from tests.conftest import REPO, SHARED_DATA, write_idx


# --- pyramid and quantization --------------------------------------------------------

def test_pyramid_levels_are_successive_antialiased_downsamples():
    image = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    pyramid = ImagePyramid(32, [8, 32, 16])(image)
    assert sorted(pyramid) == [8, 16, 32]
    assert torch.equal(pyramid[32], image)
    assert torch.equal(pyramid[16], resize_uint8(pyramid[32], 16))
    assert torch.equal(pyramid[8], resize_uint8(pyramid[16], 8))
    # antialiased: a one-pixel checkerboard averages out instead of aliasing
    checker = ((torch.arange(32)[:, None] + torch.arange(32)[None]) % 2 * 200).to(torch.uint8)[None]
    small = resize_uint8(checker, 8).float()
    assert (small - 100).abs().max() <= 2


def test_pyramid_rejects_resolutions_that_are_not_power_of_two_fractions():
    with pytest.raises(ValueError, match="power of two"):
        ImagePyramid(32, [12])


@pytest.mark.parametrize("n_bits", [5, 8])
def test_dequantize_stays_in_the_pixel_bin(n_bits):
    image = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    x = dequantize(image, n_bits)
    assert x.min() >= -0.5 and x.max() <= 0.5
    bins = 2 ** n_bits
    level = torch.div(image.long(), 2 ** (8 - n_bits), rounding_mode="floor")
    assert torch.equal(torch.floor((x + 0.5) * bins).long().clamp(max=bins - 1), level)
    assert torch.equal(to_uint8(x, n_bits) // (256 // bins), level.to(torch.uint8))


def test_bits_per_dim_of_uniform_density_is_n_bits():
    # The uniform density on [-0.5, 0.5]^D has log p = 0: exactly n_bits bits per dim.
    assert torch.allclose(bits_per_dim(torch.zeros(3), 100, 5), torch.full((3,), 5.0))


# --- CIFAR-10 ----------------------------------------------------------------------

def write_cifar10(root, per_class_train=12, per_class_test=3):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), per_class_train)
    rng.shuffle(labels)
    chunks = np.array_split(np.arange(len(labels)), 5)
    for i, chunk in enumerate(chunks, start=1):
        batch = {"data": rng.integers(0, 256, (len(chunk), 3072), dtype=np.uint8),
                 "labels": labels[chunk].tolist()}
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump(batch, f)
    test = {"data": rng.integers(0, 256, (10 * per_class_test, 3072), dtype=np.uint8),
            "labels": np.repeat(np.arange(10), per_class_test).tolist()}
    with open(folder / "test_batch", "wb") as f:
        pickle.dump(test, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f)


@pytest.fixture
def no_checksums(monkeypatch):
    """Fixture files cannot match the real archives' md5 sums."""
    import torchvision.datasets.cifar as cifar
    from torchvision.datasets import CelebA

    monkeypatch.setattr(cifar, "check_integrity", lambda *args, **kwargs: True)
    monkeypatch.setattr(CelebA, "_check_integrity", lambda self: True)


def test_cifar10_split_holds_out_a_fixed_number_per_class(tmp_path, no_checksums):
    write_cifar10(tmp_path)
    dm = CIFAR10DataModule(str(tmp_path), resolutions=[32, 16, 8], batch_size=8,
                           val_per_class=2, num_workers=0, download=False)
    dm.setup("fit")
    train, val = dm.datasets["train"].source, dm.datasets["val"].source
    assert len(train) == 100 and len(val) == 20
    val_labels = [val[i][1] for i in range(len(val))]
    assert np.bincount(val_labels, minlength=10).tolist() == [2] * 10
    assert not set(train.indices) & set(val.indices)
    again = CIFAR10DataModule(str(tmp_path), val_per_class=2, download=False)
    again.setup("fit")
    assert again.datasets["val"].source.indices == val.indices  # fixed seed
    batch = next(iter(dm.train_dataloader()))
    assert {r: tuple(t.shape) for r, t in batch["images"].items()} == {
        32: (8, 3, 32, 32), 16: (8, 3, 16, 16), 8: (8, 3, 8, 8)}
    assert batch["images"][32].dtype == torch.uint8 and batch["label"].shape == (8,)
    dm.setup("test")
    assert len(dm.datasets["test"]) == 30


def test_missing_cifar10_names_the_expected_layout(tmp_path):
    dm = CIFAR10DataModule(str(tmp_path / "nothing"), download=False)
    with pytest.raises(DatasetNotFoundError, match="cifar-10-batches-py/data_batch_1"):
        dm.setup("fit")


# --- CelebA ------------------------------------------------------------------------

def write_celeba(root, n=9):
    folder = root / "celeba"
    images = folder / "img_align_celeba"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"{i + 1:06d}.jpg" for i in range(n)]
    for name in names:
        Image.fromarray(rng.integers(0, 256, (218, 178, 3), dtype=np.uint8)).save(images / name)
    (folder / "list_eval_partition.txt").write_text(
        "".join(f"{name} {i % 3}\n" for i, name in enumerate(names)))
    (folder / "identity_CelebA.txt").write_text("".join(f"{name} 1\n" for name in names))
    (folder / "list_attr_celeba.txt").write_text(
        f"{n}\nSmiling Young\n" + "".join(f"{name} 1 -1\n" for name in names))
    (folder / "list_bbox_celeba.txt").write_text(
        f"{n}\nimage_id x_1 y_1 width height\n" + "".join(f"{name} 0 0 178 218\n" for name in names))
    landmarks = "69 109 106 113 77 142 73 152 108 154"
    (folder / "list_landmarks_align_celeba.txt").write_text(
        f"{n}\nlefteye_x lefteye_y righteye_x righteye_y nose_x nose_y leftmouth_x "
        "leftmouth_y rightmouth_x rightmouth_y\n" + "".join(f"{name} {landmarks}\n" for name in names))


@pytest.mark.parametrize("crop", ["landmark", "center148"])
def test_celeba_official_splits_and_crops(tmp_path, no_checksums, crop):
    write_celeba(tmp_path)
    dm = CelebADataModule(str(tmp_path), image_size=64, resolutions=[64, 32], batch_size=2,
                          num_workers=0, crop=crop, download=False)
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 3 and len(dm.datasets["val"]) == 3
    item = dm.datasets["train"][0]
    assert item["images"][64].shape == (3, 64, 64) and item["images"][32].shape == (3, 32, 32)


def test_landmark_crop_centres_on_the_landmarks_and_stays_inside():
    image = torch.arange(218 * 178).reshape(1, 218, 178)
    landmarks = torch.tensor([69, 109, 106, 113, 77, 142, 73, 152, 108, 154])
    crop = landmark_crop(image, landmarks, 100)
    # centroid (86.6, 134): rows 84..183, columns 37..136
    assert crop.shape == (1, 100, 100)
    assert crop[0, 0, 0].item() == 84 * 178 + 37
    edge = landmark_crop(image, torch.tensor([170, 210] * 5), 100)
    assert edge[0, -1, -1].item() == 217 * 178 + 177


# --- MNIST -------------------------------------------------------------------------

def test_mnist_reads_idx_files_and_a_lone_test_split(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    images = np.random.default_rng(0).integers(0, 256, (40, 28, 28))
    labels = np.repeat(np.arange(10), 4)
    write_idx(raw / "t10k-images-idx3-ubyte.gz", images)
    write_idx(raw / "t10k-labels-idx1-ubyte.gz", labels)
    dm = MNISTDataModule(str(tmp_path), resolutions=[32, 16], batch_size=4, val_per_class=1)
    with pytest.raises(DatasetNotFoundError, match="fit_split: test"):
        dm.setup("fit")
    dm.setup("test")
    item = dm.datasets["test"][5]
    assert item["images"][32].shape == (1, 32, 32) and item["label"] == labels[5]
    assert torch.equal(item["images"][32][0, 2:30, 2:30], torch.from_numpy(images[5].astype(np.uint8)))
    dm = MNISTDataModule(str(tmp_path), resolutions=[32], batch_size=4, val_per_class=1, fit_split="test")
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 30 and len(dm.datasets["val"]) == 10


@pytest.mark.skipif(not (SHARED_DATA / "mnist" / "MNIST" / "raw").exists(),
                    reason="../shared/data/mnist is absent (a fresh clone has no shared data)")
def test_shared_mnist_test_split_loads():
    dm = MNISTDataModule(str(SHARED_DATA / "mnist"), resolutions=[32], batch_size=16)
    dm.setup("test")
    test = dm.datasets["test"]
    assert len(test) == 10_000
    assert np.bincount([int(l) for l in test.source.labels], minlength=10).sum() == 10_000
    assert test[0]["images"][32].shape == (1, 32, 32) and test[0]["label"] == 7


# --- folders and embedded data --------------------------------------------------------

def test_image_folder_with_class_subfolders(tmp_path):
    rng = np.random.default_rng(0)
    for cls in ("cats", "dogs"):
        (tmp_path / cls).mkdir()
        for i in range(5):
            Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    dm = ImageFolderDataModule(str(tmp_path), image_size=16, batch_size=2, val_fraction=0.2,
                               labels_from_subfolders=True, num_classes=2, num_workers=0)
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 8 and len(dm.datasets["val"]) == 2
    labels = sorted(dm.datasets["train"][i]["label"] for i in range(8))
    assert set(labels) <= {0, 1} and dm.datasets["train"][0]["images"][16].shape == (3, 16, 16)
    with pytest.raises(ValueError, match="num_classes: 2"):
        ImageFolderDataModule(str(tmp_path), labels_from_subfolders=True, num_classes=3).setup("fit")


def test_empty_image_folder_is_a_clear_error(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="no images"):
        ImageFolderDataModule(str(tmp_path)).setup("fit")


def test_embedded_data_needs_no_download_and_holds_out_validation():
    dm = EmbeddedDataModule(image_size=16, resolutions=[16, 8], train_size=64, val_size=16, batch_size=8)
    dm.setup("fit")
    train = dm.datasets["train"].source.images
    val = dm.datasets["val"].source.images
    assert train.shape == (64, 3, 16, 16) and val.shape == (16, 3, 16, 16)
    assert train.float().std() > 20  # real images, not a constant
    again = EmbeddedDataModule(image_size=16, train_size=64, val_size=16)
    again.setup("fit")
    assert torch.equal(again.datasets["train"].source.images, train)  # deterministic
    # no validation crop equals a training crop
    assert not (val[:, None] == train[None]).flatten(2).all(-1).any()


def same_images(a: torch.Tensor, b: torch.Tensor) -> int:
    """How many images of ``a`` equal one of ``b`` pixel for pixel."""
    return int((a[:, None] == b[None]).flatten(2).all(-1).any(1).sum())


def test_embedded_test_split_is_held_out_from_validation_and_training():
    from datamodules.sources import EMBEDDED_SPLITS, split_sources

    dm = EmbeddedDataModule(image_size=16, train_size=64, val_size=16, test_size=24, batch_size=8)
    dm.setup("fit")
    dm.setup("test")
    train, val, test = (dm.datasets[s].source.images for s in ("train", "val", "test"))
    assert test.shape == (24, 3, 16, 16)
    assert same_images(test, val) == 0 and same_images(test, train) == 0
    # Disjoint at the source: no photo or face of one split is a photo or face of
    # another (skimage's `cat` is its `chelsea`, so naming them apart is not enough).
    sources = {split: split_sources(split) for split in EMBEDDED_SPLITS}
    for first, second in [("train", "val"), ("train", "test"), ("val", "test")]:
        (photos_a, faces_a), (photos_b, faces_b) = sources[first], sources[second]
        assert not any(a.shape == b.shape and torch.equal(a, b) for a in photos_a for b in photos_b), (first, second)
        assert same_images(faces_a, faces_b) == 0, (first, second)


def test_image_folder_test_split_is_disjoint_or_says_it_repeats_validation(tmp_path):
    for i in range(20):
        Image.new("RGB", (20, 20), (i * 12, 0, 0)).save(tmp_path / f"{i:02d}.png")
    settings = dict(image_size=16, batch_size=2, val_fraction=0.2, num_workers=0)
    with pytest.warns(UserWarning, match="repeat val/.*test_fraction"):
        ImageFolderDataModule(str(tmp_path), **settings).setup("test")
    dm = ImageFolderDataModule(str(tmp_path), test_fraction=0.1, **settings)
    dm.setup("fit")
    dm.setup("test")
    train, val, test = (set(dm.datasets[s].source.indices) for s in ("train", "val", "test"))
    assert len(val) == 4 and len(test) == 2 and len(train) == 14
    assert not test & val and not test & train and not val & train
    before = ImageFolderDataModule(str(tmp_path), **settings)
    before.setup("fit")
    assert set(before.datasets["val"].source.indices) == val  # adding a test split keeps validation


def test_mnist_trained_on_its_test_split_warns_at_test(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    write_idx(raw / "t10k-images-idx3-ubyte.gz", np.zeros((20, 28, 28)))
    write_idx(raw / "t10k-labels-idx1-ubyte.gz", np.repeat(np.arange(10), 2))
    with pytest.warns(UserWarning, match="not held-out"):
        MNISTDataModule(str(tmp_path), batch_size=4, val_per_class=1, fit_split="test").setup("test")


# --- image decoding: the setup scan decodes what the loader decodes -----------------------

def jpeg_folder(root, n=6):
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(root / f"ok{i}.jpg")
    whole = (root / "ok0.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(whole[:len(whole) // 2])
    with Image.open(root / "truncated.jpg") as handle:
        handle.verify()  # the header check the old scan relied on passes it


def test_truncated_jpeg_is_reported_at_setup_or_left_out(tmp_path):
    from datamodules.sources import UnreadableImagesError

    jpeg_folder(tmp_path)
    settings = dict(image_size=16, resolutions=[16], batch_size=2, val_fraction=0.2, num_workers=0)
    with pytest.raises(UnreadableImagesError, match=r"truncated\.jpg \(OSError: image file is truncated") as error:
        ImageFolderDataModule(str(tmp_path), **settings).setup("fit")
    assert "1 of 7 files" in str(error.value) and "bad_images: skip" in str(error.value)
    dm = ImageFolderDataModule(str(tmp_path), bad_images="skip", **settings)
    with pytest.warns(UserWarning, match="leaving out 1 unreadable"):
        dm.setup("fit")
    folder = dm.datasets["train"].source.dataset
    assert [p.name for p in folder.files] == [f"ok{i}.jpg" for i in range(6)]
    batches = list(dm.train_dataloader()) + list(dm.val_dataloader())  # every remaining file loads
    assert sum(len(b["label"]) for b in batches) == 4 + 1  # 5 train (drop_last of batch 2) + 1 val


def test_a_file_broken_after_setup_meets_the_same_rule_in_the_loader(tmp_path):
    from datamodules.sources import ImageFolderSource, UnreadableImagesError

    jpeg_folder(tmp_path)
    (tmp_path / "truncated.jpg").unlink()
    strict = ImageFolderSource(str(tmp_path), 16)
    lenient = ImageFolderSource(str(tmp_path), 16, bad_images="skip")
    whole = (tmp_path / "ok2.jpg").read_bytes()
    (tmp_path / "ok2.jpg").write_bytes(whole[:len(whole) // 2])
    with pytest.raises(UnreadableImagesError, match="ok2.jpg"):
        strict[2]
    with pytest.warns(UserWarning, match="skipping unreadable image .*ok2.jpg"):
        image, _ = lenient[2]
    assert torch.equal(image, lenient[3][0])  # the next readable file instead


def write_png16(path, array):
    """A 16-bit PNG (grey [H, W] or RGB [H, W, 3]) written by hand: PIL cannot write 16-bit RGB."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    height, width = array.shape[:2]
    header = struct.pack(">IIBBBBB", width, height, 16, 2 if array.ndim == 3 else 0, 0, 0, 0)
    rows = b"".join(b"\0" + row.astype(">u2").tobytes() for row in array)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))


@pytest.mark.parametrize("channels", [1, 3])
def test_16_bit_pngs_load_at_their_8_bit_values(tmp_path, channels):
    from datamodules.sources import ImageFolderSource

    ramp = np.linspace(0, 65535, 32 * 32).round().astype(np.uint16).reshape(32, 32)
    expected = torch.from_numpy((ramp >> 8).astype(np.uint8))
    write_png16(tmp_path / "grey.png", ramp)
    write_png16(tmp_path / "rgb.png", np.stack([ramp, 65535 - ramp, ramp // 2], -1))
    with Image.open(tmp_path / "grey.png") as handle:
        assert handle.mode == "I;16"
    folder = ImageFolderSource(str(tmp_path), 32, channels=channels)
    grey, rgb = (folder[i][0] for i in range(2))  # sorted: grey.png, rgb.png
    assert torch.equal(grey, expected.expand(channels, 32, 32))
    assert (grey == 255).float().mean() < 0.01  # PIL's convert made 99.6 % of it white
    if channels == 3:
        assert torch.equal(rgb, torch.stack([expected, 255 - expected, (torch.from_numpy(ramp // 2 >> 8)).to(torch.uint8)]))


def test_floating_point_images_are_refused_by_name(tmp_path):
    from datamodules.sources import UnreadableImagesError

    Image.fromarray(np.ones((20, 20), dtype=np.float32)).save(tmp_path / "float.tif")
    Image.new("RGB", (20, 20)).save(tmp_path / "fine.png")
    with pytest.raises(UnreadableImagesError, match=r"float\.tif \(ValueError: floating-point"):
        ImageFolderDataModule(str(tmp_path), image_size=16, val_fraction=0.5).setup("fit")


# --- batch limits as the CLI reads them ------------------------------------------------

def test_an_integer_limit_batches_is_a_number_of_batches_on_the_command_line_and_in_yaml(tmp_path, monkeypatch):
    """Lightning: an int is a number of batches, a float a fraction. jsonargparse read
    ``1`` as ``1.0`` (the whole set) for the Trainer's float-first Union annotations."""
    import pytorch_lightning as pl

    from lightning_modules.cli import build_cli
    from tests.commands import TINY_QUICKSTART

    class CountValidationBatches(pl.Callback):
        batches = 0

        def on_validation_batch_end(self, *args, **kwargs):
            self.batches += 1

    monkeypatch.chdir(tmp_path)  # the YAML's logger and callbacks write under ./runs
    (tmp_path / "limits.yaml").write_text("trainer:\n  limit_val_batches: 1\n")
    common = ["--config", str(REPO / "experiments" / "quick_photos.yaml"), *TINY_QUICKSTART,
              "--data.init_args.eval_batch_size", "8", "--trainer.logger", "false",
              "--trainer.default_root_dir", str(tmp_path)]  # 32 validation images: 4 batches
    cli = build_cli([*common, "--trainer.limit_val_batches", "1"], run=False)
    counter = CountValidationBatches()
    cli.trainer.callbacks.append(counter)
    cli.trainer.validate(cli.model, datamodule=cli.datamodule)
    assert counter.batches == 1
    # in YAML too, and in the config W&B records (it showed limit_train_batches: 3.0)
    cli = build_cli([*common, "--config", str(tmp_path / "limits.yaml"), "--trainer.limit_train_batches", "3"],
                    run=False)
    assert (cli.trainer.limit_val_batches, cli.trainer.limit_train_batches) == (1, 3)
    assert type(cli.config.trainer.limit_val_batches) is int and type(cli.config.trainer.limit_train_batches) is int
    # a float is still a fraction: 1.0 the whole set
    cli = build_cli([*common, "--trainer.limit_val_batches", "1.0"], run=False)
    assert type(cli.trainer.limit_val_batches) is float and cli.trainer.limit_val_batches == 1.0
