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


# PIL's modes for one-channel 16-bit data (PNG, TIFF); "I" is 32-bit, which older PIL
# versions give 16-bit PNGs: read as 16-bit while its values fit in 0..65535.
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def read_image(path: Path):
    """The whole file decoded (PIL's ``load()``, so a truncated JPEG or PNG fails here, not
    only its header), as a PIL image in an 8-bit mode.

    16-bit images keep their look: one-channel 16-bit modes are brought to 8 bits as
    ``value >> 8``, the rule PIL itself applies when it opens 16-bit RGB(A) PNGs as
    ``RGB``, so the grey and colour versions of an image load alike (PIL's ``convert``
    would clip every value above 255 to white). Modes without a known 8-bit range
    (floating point ``F``, 32-bit values above 65535) raise ValueError naming the mode."""
    from PIL import Image

    with Image.open(path) as handle:
        handle.load()
        if handle.mode in SIXTEEN_BIT_MODES:
            values = np.asarray(handle).astype(np.int64)
            if values.size and (values.min() < 0 or values.max() > 65535):
                raise ValueError(f"mode {handle.mode} with values in {values.min()}..{values.max()}, "
                                 "outside the 16-bit range")
            return Image.fromarray((values >> 8).astype(np.uint8), mode="L")
        if handle.mode == "F":
            raise ValueError("floating-point pixels (mode F) have no defined 8-bit range")
        return handle.copy()  # still usable once the file is closed


def decode_image(path: Path, channels: int) -> Tensor:
    """uint8 ``[channels, H, W]`` of the file, read by :func:`read_image`."""
    return pil_to_uint8(read_image(path).convert("RGB" if channels == 3 else "L"))


def scan_images(files: list[Path], image_size: int) -> tuple[list[tuple[Path, str]], list[Path]]:
    """((unreadable file, reason) pairs, files whose centre square is smaller than
    ``image_size``), each file decoded in full with :func:`read_image`, the loader's
    own decoding, so a file that passes here also loads in a DataLoader worker.

    Cost: one full decode per file, linear in the pixels of the folder, on a thread
    per CPU core (PIL releases the GIL while decoding). Roughly the time of one pass
    over the data without training: on one core about 1 ms for a 256x256 JPEG, so a
    minute per 60k such files, shared out over the cores; repeated at every setup
    (each ``fit``/``test`` and each DDP process)."""
    from concurrent.futures import ThreadPoolExecutor

    def check(path: Path) -> tuple[str | None, int]:
        try:
            image = read_image(path)
        except Exception as error:  # PIL raises many types for broken files
            return f"{type(error).__name__}: {error}", 0
        return None, min(image.size)

    results = []
    with ThreadPoolExecutor(max_workers=max(1, min(32, os.cpu_count() or 1))) as pool:
        for start in range(0, len(files), 4096):  # blocks: a million files need not be a million futures
            results.extend(pool.map(check, files[start:start + 4096]))
    unreadable = [(path, reason) for path, (reason, _) in zip(files, results) if reason is not None]
    small = [path for path, (reason, side) in zip(files, results) if reason is None and side < image_size]
    return unreadable, small


def unreadable_message(unreadable: list[tuple[Path, str]], total: int, root: str) -> str:
    listed = ", ".join(f"{path} ({reason})" for path, reason in unreadable[:10])
    return (f"{len(unreadable)} of {total} files under {os.path.abspath(root)!r} are not readable images: "
            f"{listed}{' ...' if len(unreadable) > 10 else ''}. Remove or repair them, or set "
            "data.init_args.bad_images: skip to leave them out.")


class ImageFolderSource(Dataset):
    """All images under ``root`` (recursively). With ``labels_from_subfolders`` the
    first-level folder names are the classes (sorted), as torchvision's ImageFolder.

    Every file is decoded in full once here (:func:`scan_images`, its cost is given
    there), not first when a DataLoader worker draws it: unreadable files (a truncated
    JPEG included) stop the run with their list (``bad_images: error``) or are left out
    with a warning (``skip``); images smaller than ``image_size`` are upscaled, with one
    warning that counts them. 16-bit images are scaled to 8 bits (:func:`decode_image`)."""

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
            if bad_images == "error":
                raise UnreadableImagesError(unreadable_message(unreadable, len(self.files), root))
            listed = ", ".join(str(path) for path, _ in unreadable[:10]) + (" ..." if len(unreadable) > 10 else "")
            warnings.warn(f"leaving out {len(unreadable)} unreadable images under {root}: {listed}", stacklevel=2)
            unreadable_set = {path for path, _ in unreadable}
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
        self.bad_images = bad_images

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
        # A file that changed on disk after the setup scan meets the same rule here:
        # ``error`` names it; ``skip`` warns and serves the next file that decodes.
        for offset in range(len(self.files)):
            path = self.files[(index + offset) % len(self.files)]
            try:
                image = decode_image(path, self.channels)
            except Exception as error:  # PIL raises many types for broken files
                reason = [(path, f"{type(error).__name__}: {error}; it was readable at setup")]
                if self.bad_images == "error":
                    raise UnreadableImagesError(unreadable_message(reason, len(self.files), str(self.root))) from None
                warnings.warn(f"skipping unreadable image {path} ({error})", stacklevel=2)
                continue
            return resize_uint8(center_square_crop(image), self.image_size), self.label_of(path)
        raise UnreadableImagesError(f"no file under {os.path.abspath(self.root)!r} is readable any more; "
                                    "check the disk or the folder")


# --- Embedded images shipped in pip packages (no download) ---------------------------

# Each split's own source photos and lfw_subset indices (faces 0-99, non-faces 100-199),
# so validation and test measure generalization to images never trained on. (skimage's
# ``cat`` is ``chelsea``: it cannot be held out while chelsea trains.)
EMBEDDED_SPLITS = {
    "train": (("china", "astronaut", "chelsea", "rocket", "hubble_deep_field",
               "immunohistochemistry", "retina", "colorwheel"), [*range(0, 80), *range(100, 180)]),
    "val": (("flower", "coffee"), [*range(80, 90), *range(180, 190)]),
    "test": (("motorcycle",), [*range(90, 100), *range(190, 200)]),
}


def load_photo(name: str) -> Tensor:
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        return pil_to_uint8(load_sample_image(f"{name}.jpg"))
    from skimage import data

    if name == "motorcycle":
        return pil_to_uint8(data.stereo_motorcycle()[0])  # the left view of the stereo pair
    return pil_to_uint8(getattr(data, name)()[..., :3])


def load_lfw_subset() -> Tensor:
    """scikit-image's lfw_subset: 100 faces then 100 non-faces, 25x25, floats in [0, 1]."""
    from skimage import data

    faces = torch.from_numpy(data.lfw_subset()).float()
    return (faces * 255).round().clamp(0, 255).to(torch.uint8).unsqueeze(1)


def split_sources(split: Literal["train", "val", "test"]) -> tuple[list[Tensor], Tensor]:
    """(the split's photos, its lfw_subset images) from :data:`EMBEDDED_SPLITS`."""
    names, face_indices = EMBEDDED_SPLITS[split]
    return [load_photo(n) for n in names], load_lfw_subset()[face_indices]


class EmbeddedImages(Dataset):
    """Random crops of the photos shipped with scikit-learn and scikit-image, plus the
    lfw_subset faces; no download needed. Each ``split`` crops its own source photos
    and faces (:data:`EMBEDDED_SPLITS`), so no val or test image shares a pixel with a
    training image, nor a test image with a validation one."""

    def __init__(self, size: int, image_size: int = 32, channels: int = 3,
                 split: Literal["train", "val", "test"] = "train", seed: int = 0,
                 face_fraction: float = 0.25) -> None:
        offset = {"train": 0, "val": 1_000_003, "test": 2_000_006}[split]
        generator = torch.Generator().manual_seed(seed + offset)
        photos, faces = split_sources(split)
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


# --- scikit-learn's 8x8 handwritten digits (embedded, labelled) ----------------------

DIGITS_LEVELS = 16  # the source's pixels are counts 0..16 (of a 4x4 block of a 32x32 bitmap)


def load_digit_images() -> tuple[Tensor, Tensor]:
    """All 1,797 images of ``sklearn.datasets.load_digits`` as uint8 ``[N, 1, 8, 8]`` on
    0..255 (the source's 0..16 scaled by 255/16 and rounded: 0 stays black, 16 becomes
    255) and their int64 labels 0..9. Ships with scikit-learn; nothing is downloaded."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    values = torch.from_numpy(digits.images.astype(np.float64))
    images = (values * (255 / DIGITS_LEVELS)).round().clamp(0, 255).to(torch.uint8).unsqueeze(1)
    return images, torch.from_numpy(digits.target.astype(np.int64))


def digits_split_indices(labels: Tensor, val_per_class: int, test_per_class: int,
                         seed: int) -> dict[str, list[int]]:
    """Stratified, disjoint ``train`` / ``val`` / ``test`` indices: each class's indices in
    an order drawn from ``seed`` alone (its own generator, not the global RNG), the first
    ``val_per_class`` to validation, the next ``test_per_class`` to test, the rest to
    training. (The 1,797 digits hold no two equal images, so disjoint indices are
    disjoint images.)"""
    generator = torch.Generator().manual_seed(seed)
    splits: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for label in labels.unique(sorted=True).tolist():
        indices = torch.nonzero(labels == label).flatten()
        if len(indices) <= val_per_class + test_per_class:
            raise DataSettingsError(f"digit {label} has {len(indices)} images; holding out {val_per_class} "
                                    f"for validation and {test_per_class} for test leaves none to train on")
        order = indices[torch.randperm(len(indices), generator=generator)].tolist()
        splits["val"] += order[:val_per_class]
        splits["test"] += order[val_per_class:val_per_class + test_per_class]
        splits["train"] += order[val_per_class + test_per_class:]
    return {name: sorted(split) for name, split in splits.items()}


class DigitImages(Dataset):
    """One split of scikit-learn's 8x8 digits, brought to ``image_size`` (bicubic, as every
    other source here, so an upsampled digit has smooth strokes rather than 2x2 blocks),
    1 channel, with its label. ``index_in_source`` maps each item to its row of
    ``load_digits()``."""

    def __init__(self, split: Literal["train", "val", "test"] = "train", image_size: int = 16,
                 val_per_class: int = 18, test_per_class: int = 18, seed: int = 0) -> None:
        images, labels = load_digit_images()
        indices = digits_split_indices(labels, val_per_class, test_per_class, seed)[split]
        self.index_in_source = torch.tensor(indices, dtype=torch.int64)
        self.images = resize_uint8(images[self.index_in_source], image_size)
        self.labels = labels[self.index_in_source]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.images[index], int(self.labels[index])

    @property
    def targets(self) -> list[int]:
        return self.labels.tolist()
