"""Image sources: each yields ``(uint8 tensor [C, image_size, image_size], label)``.

Real loaders use torchvision's on-disk layouts. When data are missing (and cannot be
downloaded here), a :class:`DatasetNotFoundError` names the expected layout.
"""
from __future__ import annotations

import gzip
import os
import warnings
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from datamodules.pyramid import resize_uint8

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


class DatasetNotFoundError(FileNotFoundError):
    """A dataset is not on disk (and could not be downloaded)."""


class DataSettingsError(ValueError):
    """Data settings that cannot work with the data at hand (the CLI prints the message
    as one paragraph)."""


def pil_to_uint8(image) -> Tensor:
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def center_square_crop(image: Tensor, side: int | None = None) -> Tensor:
    h, w = image.shape[-2:]
    side = min(h, w) if side is None else min(side, h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return image[..., top:top + side, left:left + side]


def set_channels(image: Tensor, channels: int) -> Tensor:
    if image.shape[0] == channels:
        return image
    if image.shape[0] == 1:
        return image.expand(channels, -1, -1).contiguous()
    if channels == 1:  # ITU-R 601 luma
        weights = torch.tensor([0.299, 0.587, 0.114])[:, None, None]
        return (image[:3].float() * weights).sum(0, keepdim=True).round().clamp(0, 255).to(torch.uint8)
    return image[:channels]


class TransformedSource(Dataset):
    """Applies a uint8-tensor transform to a torchvision-style (PIL, target) dataset."""

    def __init__(self, dataset, transform: Callable[[Tensor, object], Tensor],
                 label: Callable[[object], int] | None = None) -> None:
        self.dataset = dataset
        self.transform = transform
        self.label = label or (lambda target: int(target))

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        image, target = self.dataset[index]
        return self.transform(pil_to_uint8(image), target), self.label(target)


def load_torchvision(factory: Callable[..., Dataset], root: str, download: bool,
                     layout: str, **kwargs) -> Dataset:
    """Open a torchvision dataset from disk, downloading only when allowed and needed.
    Any failure becomes one clear error that says which folder layout is expected."""
    try:
        return factory(root=root, download=False, **kwargs)
    except (RuntimeError, FileNotFoundError, OSError) as missing:
        first_error = missing
    if download:
        try:
            return factory(root=root, download=True, **kwargs)
        except Exception as failed:  # network errors come in many types
            first_error = failed
    raise DatasetNotFoundError(
        f"{factory.__name__} not found under {os.path.abspath(root)!r}"
        f"{' and could not be downloaded' if download else ' (download disabled)'} "
        f"({type(first_error).__name__}: {first_error}).\nExpected layout:\n{layout}\n"
        "Put the files there (or set data.init_args.data_dir to where they are).")


# --- MNIST: read the idx files directly, so a split can exist alone ---------------

MNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
               "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
MNIST_LAYOUT = ("  {root}/MNIST/raw/train-images-idx3-ubyte[.gz]\n"
                "  {root}/MNIST/raw/train-labels-idx1-ubyte[.gz]\n"
                "  {root}/MNIST/raw/t10k-images-idx3-ubyte[.gz]\n"
                "  {root}/MNIST/raw/t10k-labels-idx1-ubyte[.gz]\n"
                "(the files of torchvision.datasets.MNIST; each split can be present alone)")


def read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    if data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte idx file")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def mnist_split_files(root: str, split: Literal["train", "test"]) -> tuple[Path, Path] | None:
    raw = Path(root) / "MNIST" / "raw"
    found = []
    for name in MNIST_FILES[split]:
        candidates = [raw / name, raw / (name + ".gz")]
        existing = [c for c in candidates if c.exists()]
        if not existing:
            return None
        found.append(existing[0])
    return found[0], found[1]


class MNISTIdx(Dataset):
    """One MNIST split read from its idx files, padded to ``image_size`` (32 by default,
    so the multi-scale flow can halve it)."""

    def __init__(self, root: str, split: Literal["train", "test"] = "train",
                 image_size: int = 32) -> None:
        files = mnist_split_files(root, split)
        if files is None:
            raise DatasetNotFoundError(
                f"MNIST {split} split not found under {os.path.abspath(root)!r}. Expected:\n"
                + MNIST_LAYOUT.format(root=root)
                + "\nDownload from the MNIST site or with torchvision.datasets.MNIST(root, download=True).")
        self.images = torch.from_numpy(read_idx(files[0]).copy())
        self.labels = torch.from_numpy(read_idx(files[1]).astype(np.int64))
        if len(self.images) != len(self.labels):
            raise ValueError(f"MNIST {split}: {len(self.images)} images but {len(self.labels)} labels")
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        image = self.images[index].unsqueeze(0)
        pad = self.image_size - image.shape[-1]
        if pad > 0:
            image = torch.nn.functional.pad(image, (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2))
        elif pad < 0:
            image = resize_uint8(image, self.image_size)
        return image, int(self.labels[index])

    @property
    def targets(self) -> list[int]:
        return self.labels.tolist()


# --- Any folder of images (LSUN / FFHQ exports) --------------------------------------

class UnreadableImagesError(DatasetNotFoundError):
    """Files in an image folder that are not readable images."""


def scan_images(files: list[Path], image_size: int) -> tuple[list[Path], list[Path]]:
    """(unreadable files, files whose centre square is smaller than ``image_size``),
    from each file's header (PIL's verify), without decoding the pixels."""
    from PIL import Image

    unreadable, small = [], []
    for path in files:
        try:
            with Image.open(path) as handle:
                width, height = handle.size
                handle.verify()
        except Exception:  # PIL raises many types for broken files
            unreadable.append(path)
            continue
        if min(width, height) < image_size:
            small.append(path)
    return unreadable, small


class ImageFolderSource(Dataset):
    """All images under ``root`` (recursively). With ``labels_from_subfolders`` the
    first-level folder names are the classes (sorted), as torchvision's ImageFolder.

    Every file is checked once here, not when a DataLoader worker first draws it:
    unreadable files stop the run with their list (``bad_images: error``) or are left
    out with a warning (``skip``); images smaller than ``image_size`` are upscaled, with
    one warning that counts them."""

    def __init__(self, root: str, image_size: int, channels: int = 3,
                 labels_from_subfolders: bool = False,
                 bad_images: Literal["error", "skip"] = "error") -> None:
        root_path = Path(root)
        if not root_path.is_dir():
            raise DatasetNotFoundError(
                f"image folder {os.path.abspath(root)!r} does not exist. Expected a folder of "
                f"images ({', '.join(IMAGE_EXTENSIONS)}), flat or one subfolder per class.")
        self.files = sorted(p for p in root_path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not self.files:
            raise DatasetNotFoundError(
                f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {os.path.abspath(root)!r}")
        unreadable, small = scan_images(self.files, image_size)
        if unreadable:
            listed = ", ".join(str(p) for p in unreadable[:10]) + (" ..." if len(unreadable) > 10 else "")
            if bad_images == "error":
                raise UnreadableImagesError(
                    f"{len(unreadable)} of {len(self.files)} files under {os.path.abspath(root)!r} are not "
                    f"readable images: {listed}. Remove or repair them, or set "
                    "data.init_args.bad_images: skip to leave them out.")
            warnings.warn(f"leaving out {len(unreadable)} unreadable images under {root}: {listed}", stacklevel=2)
            unreadable_set = set(unreadable)
            self.files = [p for p in self.files if p not in unreadable_set]
        if small:
            warnings.warn(f"{len(small)} of {len(self.files)} images under {root} are smaller than "
                          f"{image_size}x{image_size} and are upscaled (e.g. {small[0]})", stacklevel=2)
        self.classes = sorted({p.relative_to(root_path).parts[0] for p in self.files
                               if len(p.relative_to(root_path).parts) > 1})
        self.labels_from_subfolders = labels_from_subfolders
        self.root = root_path
        self.image_size = image_size
        self.channels = channels

    def __len__(self) -> int:
        return len(self.files)

    def label_of(self, path: Path) -> int:
        if not self.labels_from_subfolders:
            return 0
        return self.classes.index(path.relative_to(self.root).parts[0])

    @property
    def targets(self) -> list[int]:
        return [self.label_of(p) for p in self.files]

    def __getitem__(self, index: int):
        from PIL import Image

        path = self.files[index]
        with Image.open(path) as handle:
            image = pil_to_uint8(handle.convert("RGB" if self.channels == 3 else "L"))
        image = resize_uint8(center_square_crop(image), self.image_size)
        return image, self.label_of(path)


# --- Embedded images shipped in pip packages (no download) ---------------------------

TRAIN_PHOTOS = ("china", "astronaut", "chelsea", "rocket", "hubble_deep_field",
                "immunohistochemistry", "retina", "colorwheel")
HELD_OUT_PHOTOS = ("flower", "coffee", "cat")


def load_photo(name: str) -> Tensor:
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        return pil_to_uint8(load_sample_image(f"{name}.jpg"))
    from skimage import data

    return pil_to_uint8(getattr(data, name)()[..., :3])


def load_lfw_subset() -> Tensor:
    """scikit-image's lfw_subset: 100 faces then 100 non-faces, 25x25, floats in [0, 1]."""
    from skimage import data

    faces = torch.from_numpy(data.lfw_subset()).float()
    return (faces * 255).round().clamp(0, 255).to(torch.uint8).unsqueeze(1)


class EmbeddedImages(Dataset):
    """Random crops of the photos shipped with scikit-learn and scikit-image, plus the
    lfw_subset faces; no download needed. ``held_out`` selects disjoint source photos
    and faces, so validation measures generalization to unseen images."""

    def __init__(self, size: int, image_size: int = 32, channels: int = 3,
                 held_out: bool = False, seed: int = 0, face_fraction: float = 0.25) -> None:
        generator = torch.Generator().manual_seed(seed + (1_000_003 if held_out else 0))
        photos = [load_photo(n) for n in (HELD_OUT_PHOTOS if held_out else TRAIN_PHOTOS)]
        faces = load_lfw_subset()
        faces = torch.cat([faces[80:100], faces[180:200]]) if held_out else torch.cat([faces[:80], faces[100:180]])
        images = []
        for _ in range(size):
            if torch.rand((), generator=generator) < face_fraction:
                image = faces[torch.randint(len(faces), (), generator=generator)]
            else:
                photo = photos[torch.randint(len(photos), (), generator=generator)]
                h, w = photo.shape[-2:]
                low, high = max(image_size, min(h, w) // 12), max(image_size + 1, min(h, w) // 3)
                side = int(torch.randint(low, high, (), generator=generator))
                top = int(torch.randint(0, h - side + 1, (), generator=generator))
                left = int(torch.randint(0, w - side + 1, (), generator=generator))
                image = photo[:, top:top + side, left:left + side]
            if torch.rand((), generator=generator) < 0.5:
                image = image.flip(-1)
            images.append(set_channels(resize_uint8(image, image_size), channels))
        self.images = torch.stack(images)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return self.images[index], 0
