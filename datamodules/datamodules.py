"""LightningDataModules. Every batch is ``{"images": {resolution: uint8 [B,C,R,R]},
"label": int64 [B]}``; dequantization happens on the device, in the LightningModule.
"""
from __future__ import annotations

import os
import warnings
from typing import Literal

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from datamodules.pyramid import ImagePyramid, resize_uint8
from datamodules.sources import (DatasetNotFoundError, DataSettingsError, DigitImages, EmbeddedImages,
                                 ImageFolderSource, MNISTIdx, TransformedSource, center_square_crop,
                                 load_torchvision, mnist_split_files)


class ResumableSampler(DistributedSampler):
    """The training order: a permutation drawn from (seed, epoch) alone, split over the
    processes when torch.distributed is running. ``skip_next(n)`` makes the next
    epoch's iterator start after its first ``n`` indices, which is how a run resumed
    mid-epoch sees exactly the batches an uninterrupted run would have seen next.
    Being a DistributedSampler, Lightning keeps it under DDP instead of replacing it."""

    def __init__(self, dataset: Dataset, seed: int = 0) -> None:
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        replicas = torch.distributed.get_world_size() if distributed else 1
        rank = torch.distributed.get_rank() if distributed else 0
        super().__init__(dataset, num_replicas=replicas, rank=rank, shuffle=True, seed=seed)
        self._skip = 0

    def skip_next(self, num_indices: int) -> None:
        self._skip = num_indices

    def __iter__(self):
        indices = list(super().__iter__())
        start, self._skip = self._skip, 0
        return iter(indices[start:])


class PyramidDataset(Dataset):
    def __init__(self, source: Dataset, pyramid: ImagePyramid) -> None:
        self.source = source
        self.pyramid = pyramid

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int):
        image, label = self.source[index]
        return {"images": self.pyramid(image), "label": label, "index": index}


def stratified_split(labels: list[int], per_class: int, seed: int) -> tuple[list[int], list[int]]:
    """Hold out ``per_class`` examples of every class (seed 000 sec. 4.1: 500 per CIFAR-10
    class), chosen by a fixed seed; returns (train indices, held-out indices)."""
    labels_tensor = torch.as_tensor(labels)
    generator = torch.Generator().manual_seed(seed)
    held_out = []
    for label in labels_tensor.unique(sorted=True).tolist():
        indices = torch.nonzero(labels_tensor == label).flatten()
        if len(indices) <= per_class:
            raise DataSettingsError(f"class {label} has {len(indices)} examples; cannot hold out {per_class}")
        chosen = indices[torch.randperm(len(indices), generator=generator)[:per_class]]
        held_out.extend(chosen.tolist())
    held_out_set = set(held_out)
    train = [i for i in range(len(labels)) if i not in held_out_set]
    return train, sorted(held_out)


def random_split_indices(n: int, held_out_fraction: float, seed: int,
                         test_fraction: float = 0.0) -> tuple[list[int], list[int], list[int]]:
    """(train, held-out, test) indices from one fixed permutation: the first
    ``held_out_fraction`` of it, then the next ``test_fraction`` (none when 0), the rest
    trains. Adding a test split leaves the held-out split as it was."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=generator).tolist()
    n_held = max(1, int(round(n * held_out_fraction)))
    n_test = max(1, int(round(n * test_fraction))) if test_fraction > 0 else 0
    if n_held + n_test >= n:
        raise DataSettingsError(f"holding out {n_held} validation and {n_test} test images of {n} leaves "
                                "none to train on; lower data.init_args.val_fraction / test_fraction")
    return sorted(order[n_held + n_test:]), sorted(order[:n_held]), sorted(order[n_held:n_held + n_test])


class PyramidDataModule(pl.LightningDataModule):
    """Shared loader logic. Subclasses say where the images come from
    (:meth:`build_sources`) and how many channels / classes they have.

    Args:
        data_dir: where the dataset lives (torchvision layout).
        image_size: the size images are brought to before the pyramid is built.
        resolutions: the pyramid resolutions each batch carries (default: image_size only).
        batch_size: per-process training batch size.
        eval_batch_size: validation/test batch size (default: batch_size).
        num_workers: DataLoader worker processes.
        seed: seed of the train/val split.
        horizontal_flip: flip each training image left-right with probability 1/2 (every
            resolution of its pyramid alike; seed 001 App. G). The flips are drawn on the
            training process's RNG after the batch reaches the device, like the
            dequantization noise, so an exactly resumed run draws the same flips.
    """

    channels: int = 3
    num_classes: int = 0

    def __init__(self, data_dir: str = "data", image_size: int = 32,
                 resolutions: list[int] | None = None, batch_size: int = 64,
                 eval_batch_size: int | None = None, num_workers: int = 2, seed: int = 0,
                 horizontal_flip: bool = False) -> None:
        super().__init__()
        self.data_dir = data_dir
        self.image_size = image_size
        self.pyramid = ImagePyramid(image_size, resolutions or [image_size])
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.horizontal_flip = horizontal_flip
        self.datasets: dict[str, Dataset] = {}

    @property
    def resolutions(self) -> list[int]:
        return self.pyramid.resolutions

    def build_sources(self, stage: str) -> dict[str, Dataset]:
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        stage = stage or "fit"
        for split, source in self.build_sources(stage).items():
            self.datasets[split] = PyramidDataset(source, self.pyramid)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if split not in self.datasets:
            raise RuntimeError(f"the {split} split was not set up; call setup() with the right stage")
        dataset = self.datasets[split]
        batch_size = self.batch_size if shuffle else self.eval_batch_size
        if shuffle and len(dataset) < batch_size:
            raise DataSettingsError(f"the {split} split has {len(dataset)} images, fewer than one batch "
                             f"of {batch_size}; lower data.init_args.batch_size")
        # The loader's own generator seeds its workers, so creating an iterator never
        # draws from the global RNG (exact resume depends on that stream).
        generator = torch.Generator().manual_seed(self.seed)
        sampler = ResumableSampler(dataset, self.seed) if shuffle else None
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=shuffle,
                          num_workers=self.num_workers, pin_memory=torch.cuda.is_available(),
                          persistent_workers=self.num_workers > 0, generator=generator)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        if self.horizontal_flip and self.trainer is not None and self.trainer.training:
            images = batch["images"]
            first = next(iter(images.values()))
            flip = torch.rand(first.shape[0], device=first.device) < 0.5
            batch["images"] = {r: torch.where(flip[:, None, None, None], x.flip(-1), x) for r, x in images.items()}
        return batch

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)


CIFAR10_LAYOUT = """  {root}/cifar-10-batches-py/data_batch_1 ... data_batch_5
  {root}/cifar-10-batches-py/test_batch
  {root}/cifar-10-batches-py/batches.meta
(the extracted cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html)"""


class CIFAR10DataModule(PyramidDataModule):
    """CIFAR-10 (seed 000 sec. 4.1): 45k train / 5k val (500 per class, fixed seed),
    the official 10k test split, class labels. ``train_on_val`` adds the val images back
    to training, as the seed does for its final runs."""

    num_classes = 10

    def __init__(self, data_dir: str = "data", image_size: int = 32,
                 resolutions: list[int] | None = None, batch_size: int = 512,
                 eval_batch_size: int | None = None, num_workers: int = 4, seed: int = 0,
                 horizontal_flip: bool = False,
                 val_per_class: int = 500, train_on_val: bool = False, download: bool = True) -> None:
        super().__init__(data_dir, image_size, resolutions, batch_size, eval_batch_size, num_workers, seed,
                         horizontal_flip)
        self.val_per_class = val_per_class
        self.train_on_val = train_on_val
        self.download = download

    def _open(self, train: bool) -> Dataset:
        from torchvision.datasets import CIFAR10

        dataset = load_torchvision(CIFAR10, self.data_dir, self.download,
                                   CIFAR10_LAYOUT.format(root=self.data_dir), train=train)
        return TransformedSource(dataset, lambda image, _: resize_uint8(image, self.image_size))

    def build_sources(self, stage: str) -> dict[str, Dataset]:
        sources = {}
        if stage in ("fit", "validate"):
            full = self._open(train=True)
            train, val = stratified_split(full.dataset.targets, self.val_per_class, self.seed)
            sources["train"] = full if self.train_on_val else Subset(full, train)
            sources["val"] = Subset(full, val)
        if stage in ("test", "predict"):
            sources["test"] = self._open(train=False)
        return sources


CELEBA_LAYOUT = """  {root}/celeba/img_align_celeba/000001.jpg ...
  {root}/celeba/list_eval_partition.txt
  {root}/celeba/list_landmarks_align_celeba.txt
  {root}/celeba/list_attr_celeba.txt, identity_CelebA.txt, list_bbox_celeba.txt
(torchvision.datasets.CelebA's layout; files from https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html)"""


def landmark_crop(image: torch.Tensor, landmarks: torch.Tensor, side: int) -> torch.Tensor:
    """Square crop of ``side`` pixels centred on the mean of the five aligned-face
    landmarks (eyes, nose, mouth corners), shifted to stay inside the image."""
    h, w = image.shape[-2:]
    side = min(side, h, w)
    points = landmarks.reshape(5, 2).float()
    cx, cy = points[:, 0].mean().item(), points[:, 1].mean().item()
    left = int(round(min(max(cx - side / 2, 0), w - side)))
    top = int(round(min(max(cy - side / 2, 0), h - side)))
    return image[..., top:top + side, left:left + side]


class CelebADataModule(PyramidDataModule):
    """CelebA with the official train/valid/test partition.

    ``crop="landmark"`` (seed 000 sec. 4.1): a square crop centred on the face landmarks,
    resized to ``image_size`` (256 in the seed). The seed does not give the crop size;
    we use the full width of the aligned images (178 px), the largest square that keeps
    the whole face. ``crop="center148"``: the common 148-pixel centre crop.
    """

    def __init__(self, data_dir: str = "data", image_size: int = 256,
                 resolutions: list[int] | None = None, batch_size: int = 128,
                 eval_batch_size: int | None = None, num_workers: int = 4, seed: int = 0,
                 horizontal_flip: bool = False,
                 crop: Literal["landmark", "center148"] = "landmark",
                 landmark_crop_size: int = 178, download: bool = True) -> None:
        super().__init__(data_dir, image_size, resolutions, batch_size, eval_batch_size, num_workers, seed,
                         horizontal_flip)
        if crop not in ("landmark", "center148"):
            raise ValueError(f"crop must be 'landmark' or 'center148', got {crop!r}")
        self.crop = crop
        self.landmark_crop_size = landmark_crop_size
        self.download = download

    def _transform(self, image: torch.Tensor, landmarks) -> torch.Tensor:
        if self.crop == "landmark":
            image = landmark_crop(image, landmarks, self.landmark_crop_size)
        else:
            image = center_square_crop(image, 148)
        return resize_uint8(image, self.image_size)

    def _open(self, split: str) -> Dataset:
        from torchvision.datasets import CelebA

        dataset = load_torchvision(CelebA, self.data_dir, self.download,
                                   CELEBA_LAYOUT.format(root=self.data_dir), split=split,
                                   target_type="landmarks")
        return TransformedSource(dataset, self._transform, label=lambda _: 0)

    def build_sources(self, stage: str) -> dict[str, Dataset]:
        if stage in ("fit", "validate"):
            return {"train": self._open("train"), "val": self._open("valid")}
        return {"test": self._open("test")}


class MNISTDataModule(PyramidDataModule):
    """MNIST padded to 32x32, read from the idx files. Validation holds out
    ``val_per_class`` images per class of the training split. ``fit_split="test"``
    trains on the test split (for machines that only have it, like this project's
    shared data); the held-out part then comes from the test split too, and
    ``lightning test`` (which reads the test split) warns that it measures training
    images."""

    channels = 1
    num_classes = 10

    def __init__(self, data_dir: str = "data", image_size: int = 32,
                 resolutions: list[int] | None = None, batch_size: int = 256,
                 eval_batch_size: int | None = None, num_workers: int = 2, seed: int = 0,
                 horizontal_flip: bool = False,
                 val_per_class: int = 500, fit_split: Literal["train", "test"] = "train") -> None:
        super().__init__(data_dir, image_size, resolutions, batch_size, eval_batch_size, num_workers, seed,
                         horizontal_flip)
        self.val_per_class = val_per_class
        self.fit_split = fit_split

    def build_sources(self, stage: str) -> dict[str, Dataset]:
        if stage in ("fit", "validate"):
            if mnist_split_files(self.data_dir, self.fit_split) is None and self.fit_split == "train" \
                    and mnist_split_files(self.data_dir, "test") is not None:
                raise DatasetNotFoundError(
                    f"MNIST train files are missing under {os.path.abspath(self.data_dir)}/MNIST/raw "
                    "but the test split is there; add the train files, or set "
                    "data.init_args.fit_split: test to train on the test split.")
            full = MNISTIdx(self.data_dir, self.fit_split, self.image_size)
            train, val = stratified_split(full.targets, self.val_per_class, self.seed)
            return {"train": Subset(full, train), "val": Subset(full, val)}
        if self.fit_split == "test":
            warnings.warn("MNIST was set to train on its test split (fit_split: test), so this test "
                          "split holds the training images: its numbers are not held-out figures; "
                          "`lightning validate` gives the held-out ones", stacklevel=2)
        return {"test": MNISTIdx(self.data_dir, "test", self.image_size)}


class ImageFolderDataModule(PyramidDataModule):
    """Any folder of images (LSUN / FFHQ exports, your own): centre square crop, resized
    to ``image_size``. ``val_fraction`` of the files (fixed seed) is held out for
    validation. The test split is ``test_dir`` (a separate folder) or else
    ``test_fraction`` of the files, disjoint from train and validation (set it when
    training: it takes its files from the training split). With neither, ``lightning
    test`` measures the validation files again and warns that these are no held-out
    test figures.
    ``bad_images``: unreadable files stop the run with their list (``error``) or are left
    out with a warning (``skip``)."""

    def __init__(self, data_dir: str = "data", image_size: int = 64,
                 resolutions: list[int] | None = None, batch_size: int = 64,
                 eval_batch_size: int | None = None, num_workers: int = 4, seed: int = 0,
                 horizontal_flip: bool = False,
                 val_fraction: float = 0.05, test_dir: str | None = None, channels: int = 3,
                 labels_from_subfolders: bool = False, num_classes: int = 0,
                 bad_images: Literal["error", "skip"] = "error", test_fraction: float = 0.0) -> None:
        super().__init__(data_dir, image_size, resolutions, batch_size, eval_batch_size, num_workers, seed,
                         horizontal_flip)
        self.bad_images = bad_images
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.test_dir = test_dir
        self.channels = channels
        self.labels_from_subfolders = labels_from_subfolders
        self.num_classes = num_classes

    def _folder(self, root: str) -> ImageFolderSource:
        folder = ImageFolderSource(root, self.image_size, self.channels, self.labels_from_subfolders,
                                   self.bad_images)
        if self.labels_from_subfolders and len(folder.classes) != self.num_classes:
            raise DataSettingsError(f"{root} has {len(folder.classes)} class folders but num_classes is "
                             f"{self.num_classes}; set data.init_args.num_classes: {len(folder.classes)}")
        return folder

    def build_sources(self, stage: str) -> dict[str, Dataset]:
        if stage not in ("fit", "validate") and self.test_dir:
            return {"test": self._folder(self.test_dir)}
        full = self._folder(self.data_dir)
        train, held, test = random_split_indices(len(full), self.val_fraction, self.seed, self.test_fraction)
        if stage in ("fit", "validate"):
            return {"train": Subset(full, train), "val": Subset(full, held)}
        if not test:
            # Kept working rather than refused: `lightning test` also computes the FID the
            # hierarchical configs take against the training images (seed 001's code).
            warnings.warn(f"ImageFolderDataModule has no test split for {self.data_dir}: test/* are "
                          "measured on the validation files and repeat val/*; set data.init_args.test_dir "
                          "or data.init_args.test_fraction (at training time) for a held-out test", stacklevel=2)
            return {"test": Subset(full, held)}
        return {"test": Subset(full, test)}


class EmbeddedDataModule(PyramidDataModule):
    """Real images that ship inside pip packages (scikit-learn / scikit-image photos and
    the lfw_subset faces), cropped at random: needs no download, for quick starts,
    tests and smoke runs. Train, validation and test crops each come from their own
    photos and faces (``sources.EMBEDDED_SPLITS``), so ``lightning test`` reports on
    images that neither training nor validation saw. The crops are drawn, not carved
    out of a fixed pool, so the sizes do not take images from one another;
    ``test_size`` defaults to ``val_size``."""

    def __init__(self, data_dir: str = "data", image_size: int = 32,
                 resolutions: list[int] | None = None, batch_size: int = 64,
                 eval_batch_size: int | None = None, num_workers: int = 0, seed: int = 0,
                 horizontal_flip: bool = False,
                 train_size: int = 4096, val_size: int = 512, test_size: int | None = None,
                 channels: int = 3) -> None:
        super().__init__(data_dir, image_size, resolutions, batch_size, eval_batch_size, num_workers, seed,
                         horizontal_flip)
        self.train_size = train_size
        self.val_size = val_size
        self.test_size = val_size if test_size is None else test_size
        self.channels = channels

    def build_sources(self, stage: str) -> dict[str, Dataset]:
        def make(size: int, split: str) -> Dataset:
            return EmbeddedImages(size, self.image_size, self.channels, split, self.seed)

        if stage in ("fit", "validate"):
            return {"train": make(self.train_size, "train"), "val": make(self.val_size, "val")}
        return {"test": make(self.test_size, "test")}


class DigitsDataModule(PyramidDataModule):
    """scikit-learn's 1,797 handwritten digits (``sklearn.datasets.load_digits``: 8x8,
    17 grey levels, 10 classes), brought to ``image_size`` (16 by default, so a 2-scale
    Glow fits), 1 channel, labels 0..9: the quick start's data, small enough to learn on
    a CPU in minutes and recognisable in a sample grid. Ships with scikit-learn, nothing
    is downloaded. The splits are stratified and disjoint (``val_per_class`` and
    ``test_per_class`` of each digit held out, the rest trains; 180 / 180 / 1,437 by
    default), drawn from ``seed`` alone. No flips by default: a mirrored digit is not a
    digit."""

    channels = 1
    num_classes = 10

    def __init__(self, data_dir: str = "data", image_size: int = 16,
                 resolutions: list[int] | None = None, batch_size: int = 64,
                 eval_batch_size: int | None = None, num_workers: int = 0, seed: int = 0,
                 horizontal_flip: bool = False,
                 val_per_class: int = 18, test_per_class: int = 18) -> None:
        super().__init__(data_dir, image_size, resolutions, batch_size, eval_batch_size, num_workers, seed,
                         horizontal_flip)
        self.val_per_class = val_per_class
        self.test_per_class = test_per_class

    def build_sources(self, stage: str) -> dict[str, Dataset]:
        def make(split: str) -> Dataset:
            return DigitImages(split, self.image_size, self.val_per_class, self.test_per_class, self.seed)

        if stage in ("fit", "validate"):
            return {"train": make("train"), "val": make("val")}
        return {"test": make("test")}
