"""Sample quality: FID and KID at every resolution a model generates (seed 000 sec. 4.2).

Each resolution's samples are compared with the evaluation split resized to that
resolution (the data module's pyramid), 50k samples by default. Reported numbers come
from torch-fidelity; the real images' statistics are cached by torch-fidelity under a
name that holds the dataset, split, resolution and feature extractor.

No machine here can download the Inception weights. ``inception_weights`` names a local
copy of torch-fidelity's file; without it torch-fidelity tries to download, and when
that fails the error names the file and where to put its path.

``random-conv`` is a small fixed, seeded random conv net registered as a torch-fidelity
feature extractor: for tests and offline smoke runs only. Its FIDs are not comparable
with published ones.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from flows.quantization import reduce_bits

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_FILE)


@dataclass
class FIDSettings:
    """How sample quality is measured (the ``TestMetrics`` and ``ValidationFID`` callbacks).

    num_samples: generated images per resolution (seed 000 sec. 4.2: 50,000).
    temperature: one sampling temperature, or one per cascade stage (seed 000 sec. 4.4:
        0.8 for CelebA, 0.9 for CIFAR-10).
    feature_extractor: a torch-fidelity extractor name ("inception-v3-compat" for the
        reported numbers; "random-conv" for tests and smoke runs).
    inception_weights: local path of torch-fidelity's Inception file (``INCEPTION_FILE``).
    kid_subset_size: KID subset size (capped by the number of images).
    batch_size: images per sampling and feature-extraction batch.
    cache_dir: torch-fidelity's cache of real statistics (default: its own).
    sweep_temperatures: temperatures of the FID sweep of Fig. 4.4 (empty: no sweep).
    seed: seed of the sample noise, so evaluations are repeatable.
    """

    num_samples: int = 50_000
    temperature: float | list[float] = 1.0
    feature_extractor: str = "inception-v3-compat"
    inception_weights: str | None = None
    kid_subset_size: int = 1000
    batch_size: int = 250
    cache_dir: str | None = None
    sweep_temperatures: list[float] = field(default_factory=list)
    seed: int = 2024


class RandomConvFeatures(nn.Module):
    """Fixed random features: four strided convs at a fixed input size, seeded."""

    def __init__(self, dims: int = 64, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        widths = [3, 16, 32, 64, dims]
        self.convs = nn.ModuleList()
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            conv = nn.Conv2d(c_in, c_out, 3, stride=2, padding=1)
            with torch.no_grad():
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) / math.sqrt(9 * c_in))
                conv.bias.zero_()
            self.convs.append(conv)
        self.requires_grad_(False)

    def forward(self, images_uint8: Tensor) -> Tensor:
        x = F.interpolate(images_uint8.float() / 127.5 - 1.0, size=(32, 32), mode="bilinear",
                          align_corners=False)
        for conv in self.convs:
            x = F.leaky_relu(conv(x), 0.2)
        return x.mean(dim=(2, 3)).double()


def _register_random_conv() -> None:
    import torch_fidelity
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    if "random-conv" in FEATURE_EXTRACTORS_REGISTRY:
        return

    class TorchFidelityRandomConv(FeatureExtractorBase):
        def __init__(self, name, features_list, **kwargs):
            super().__init__(name, features_list)
            self.net = RandomConvFeatures()
            self.eval()

        @staticmethod
        def get_provided_features_list():
            return ("features",)

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return "features"

        @staticmethod
        def can_be_compiled():
            return False

        @staticmethod
        def get_dummy_input_for_compile():
            return torch.zeros(1, 3, 32, 32, dtype=torch.uint8)

        def forward(self, x):
            return (self.net(x),)

    torch_fidelity.register_feature_extractor("random-conv", TorchFidelityRandomConv)


class ImagesAtResolution(Dataset):
    """uint8 [3, R, R] images at one resolution of the pyramid (grey images repeated to RGB, as
    Inception wants three channels)."""

    def __init__(self, pyramid_dataset: Dataset, resolution: int, n_bits: int = 8) -> None:
        self.dataset = pyramid_dataset
        self.resolution = resolution
        self.n_bits = n_bits

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Tensor:
        return as_rgb(reduce_bits(self.dataset[index]["images"][self.resolution], self.n_bits))


class TensorImages(Dataset):
    def __init__(self, images: Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> Tensor:
        return as_rgb(self.images[index])


def as_rgb(image: Tensor) -> Tensor:
    return image.expand(3, -1, -1) if image.shape[0] == 1 else image


def fidelity(fake: Dataset, real: Dataset, settings: FIDSettings, real_cache_name: str | None,
             cuda: bool) -> dict[str, float]:
    """FID and KID of two uint8 image datasets with torch-fidelity."""
    import torch_fidelity

    _register_random_conv()
    kwargs = dict(input1=fake, input2=real, fid=True, kid=True, cuda=cuda, verbose=False,
                  feature_extractor=settings.feature_extractor, batch_size=settings.batch_size,
                  kid_subset_size=min(settings.kid_subset_size, len(fake), len(real)),
                  save_cpu_ram=True)
    if settings.inception_weights:
        path = Path(settings.inception_weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"inception_weights {str(path)!r} does not exist. Download {INCEPTION_URL} on a "
                "machine with internet and copy it there.")
        kwargs["feature_extractor_weights_path"] = str(path)
    if settings.cache_dir:
        kwargs["cache_root"] = settings.cache_dir
    if real_cache_name:
        kwargs["input2_cache_name"] = real_cache_name
    else:
        kwargs["cache"] = False
    try:
        metrics = torch_fidelity.calculate_metrics(**kwargs)
    except (OSError, RuntimeError) as error:  # urllib's URLError is an OSError
        if settings.feature_extractor.startswith("inception") and not settings.inception_weights:
            raise RuntimeError(
                f"FID needs torch-fidelity's Inception weights and they could not be downloaded "
                f"({error}). Fetch {INCEPTION_URL} on a machine with internet, copy it here and "
                f"set evaluation.inception_weights: /path/to/{INCEPTION_FILE} in the model config "
                "(or feature_extractor: random-conv for a smoke run).") from error
        raise
    return {"fid": float(metrics["frechet_inception_distance"]),
            "kid": float(metrics["kernel_inception_distance_mean"]),
            "kid_std": float(metrics["kernel_inception_distance_std"])}


def in_loop_fid(settings: FIDSettings):
    """A torchmetrics FID for validation curves, on the extractor ``settings`` names.
    Real features are kept across resets (they are fixed for a run)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    if settings.feature_extractor == "random-conv":
        return FrechetInceptionDistance(feature=RandomConvFeatures(), reset_real_features=False)
    if not settings.feature_extractor.startswith("inception"):
        raise ValueError(f"in-loop FID supports inception-v3-compat and random-conv, not "
                         f"{settings.feature_extractor!r}")
    try:
        return FrechetInceptionDistance(feature=2048, reset_real_features=False,
                                        feature_extractor_weights_path=settings.inception_weights)
    except (OSError, RuntimeError) as error:
        raise RuntimeError(
            f"in-loop FID needs the Inception weights ({error}). Fetch {INCEPTION_URL} and set "
            f"evaluation.inception_weights: /path/to/{INCEPTION_FILE}") from error


def generate_uint8(sample: Callable[[int], dict[int, Tensor]], num_samples: int, batch_size: int,
                   to_uint8: Callable[[Tensor], Tensor]) -> dict[int, Tensor]:
    """Draw ``num_samples`` per resolution in batches, as uint8 on the CPU."""
    chunks: dict[int, list[Tensor]] = {}
    remaining = num_samples
    while remaining > 0:
        n = min(batch_size, remaining)
        for resolution, images in sample(n).items():
            chunks.setdefault(resolution, []).append(to_uint8(images.cpu()))
        remaining -= n
    return {r: torch.cat(c) for r, c in chunks.items()}


def write_metrics_table(path: Path, table: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(table, indent=2, sort_keys=False) + "\n")


def plot_temperature_sweep(path: Path, sweep: dict[str, dict[str, float]], title: str) -> None:
    """FID against temperature, one line per resolution (Fig. 4.4)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    temperatures = sorted(float(t) for t in sweep)
    resolutions = sorted({int(r) for row in sweep.values() for r in row})
    figure, axis = plt.subplots(figsize=(5, 3.5))
    for resolution in resolutions:
        axis.plot(temperatures, [sweep[f"{t:g}"][str(resolution)] for t in temperatures],
                  marker="o", label=f"{resolution}x{resolution}")
    axis.set_xlabel("temperature")
    axis.set_ylabel("FID")
    axis.set_title(title)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def settings_dict(settings: FIDSettings) -> dict:
    return asdict(settings)
