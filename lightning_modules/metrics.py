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
with published ones, and every FID/KID printed, plotted, logged or written says which
features it is on (:func:`features_note`), flagging smoke-test features loudly.

Non-finite samples (any value NaN or infinite in model space) are counted per
resolution (:class:`Samples`), excluded from FID/KID and reported beside the score; a
FID of no finite samples is not computed (``None``, JSON ``null``). Every JSON file is
strict JSON (:func:`json_text`: non-finite floats become ``null``).

Seed 003's evaluation (sec. 5.2, Tables 5.2-5.4) differs in three ways, all available here:

* FID-192: FID on the 192-dim features of Inception's first pooling block
  (``FIDSettings(feature_layer="192")``) instead of the usual 2048-dim pool features.
  FID-192 values are not comparable with the usual FID (nor with other layers').
* MNIST FIDs on the features of a custom-trained MNIST classifier
  (``feature_extractor="mnist-lenet"``, ``feature_weights=<its export file>``; see
  ``lightning_modules/mnist_classifier.py`` and ``experiments/mnist_classifier.yaml``).
* Sampling time: seconds to draw 25 samples (:func:`time_sampling`, reported by
  ``TestMetrics`` as ``sampling_time_s``).
"""
from __future__ import annotations

import hashlib
import json
import math
import statistics
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from flows.quantization import reduce_bits

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_FILE)
# Feature extractors whose FIDs mean nothing beyond "the pipeline runs" (tests, offline smoke runs).
SMOKE_TEST_EXTRACTORS = frozenset({"random-conv"})
# FID and KID need at least this many (finite) samples: a covariance of one sample is undefined.
MIN_FID_SAMPLES = 2


@dataclass
class FIDSettings:
    """How sample quality is measured (the ``TestMetrics`` and ``ValidationFID`` callbacks).

    num_samples: generated images per resolution (seed 000 sec. 4.2: 50,000).
    temperature: one sampling temperature, or one per cascade stage (seed 000 sec. 4.4:
        0.8 for CelebA, 0.9 for CIFAR-10).
    feature_extractor: a torch-fidelity extractor name ("inception-v3-compat" for the
        reported numbers; "mnist-lenet" for seed 003's MNIST FIDs on a trained MNIST
        classifier; "random-conv" for tests and smoke runs).
    feature_layer: the extractor's feature layer for FID and KID (None: its default,
        "2048" for Inception; an int is read as its string). Seed 003 sec. 5.2.1 reports
        FID on the 192-dim Inception features ("192", "FID-192"), which is not comparable
        with the usual 2048-dim FID.
    inception_weights: local path of the extractor's weights: torch-fidelity's Inception
        file (``INCEPTION_FILE``), or the classifier file for "mnist-lenet".
    feature_weights: the same as ``inception_weights`` under a general name (wins when both
        are set).
    kid_subset_size: KID subset size (capped by the number of images).
    batch_size: images per sampling and feature-extraction batch.
    cache_dir: torch-fidelity's cache of real statistics (default: its own).
    sweep_temperatures: temperatures of the FID sweep of Fig. 4.4 (empty: no sweep).
    seed: seed of the sample noise, so evaluations are repeatable.
    reference_split: the data split whose images are the real side of FID/KID
        (``train``, ``val`` or ``test``); None: the module's ``fid_reference_split``
        (``test`` for seed 000's families, as its Tables 4.2/4.3; ``train`` for seed
        001's hierarchical flow, as its official code).
    reference_max_images: use at most this many reference images, the first of the
        split in its order (None: all; seed 001's official code: up to 30k).
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
    feature_layer: str | int | None = None
    feature_weights: str | None = None
    reference_split: Literal["train", "val", "test"] | None = None
    reference_max_images: int | None = None

    def __post_init__(self) -> None:
        if self.feature_layer is not None:  # YAML's `feature_layer: 192` is an int
            self.feature_layer = str(self.feature_layer)
        if self.reference_max_images is not None and self.reference_max_images < 1:
            from lightning_modules.errors import ConfigurationError
            raise ConfigurationError(f"fid.reference_max_images must be >= 1 or null (all images of the "
                                     f"reference split), got {self.reference_max_images}")

    @property
    def weights_path(self) -> str | None:
        """The extractor's weights file: ``feature_weights``, else ``inception_weights``."""
        return self.feature_weights or self.inception_weights

    @property
    def is_smoke_test(self) -> bool:
        """Are the features a smoke-test extractor's (``random-conv``), whose FIDs are not
        comparable with published ones?"""
        return self.feature_extractor in SMOKE_TEST_EXTRACTORS


def features_note(settings: FIDSettings) -> str:
    """Which features a FID/KID is on, for every line that prints one:
    ``random-conv features: smoke test, not comparable with published FIDs``,
    ``inception-v3-compat features``, ``inception-v3-compat features, layer 192``."""
    note = f"{settings.feature_extractor} features"
    if settings.feature_layer is not None:
        note += f", layer {settings.feature_layer}"
    if settings.is_smoke_test:
        note += ": smoke test, not comparable with published FIDs"
    return note


def features_label(settings: FIDSettings) -> str:
    """The features in a few words, for plot titles: ``random-conv smoke-test features``."""
    layer = f" layer-{settings.feature_layer}" if settings.feature_layer is not None else ""
    kind = " smoke-test" if settings.is_smoke_test else ""
    return f"{settings.feature_extractor}{layer}{kind} features"


def fid_log_names(settings: FIDSettings, stage: str, resolution: int) -> list[str]:
    """The names a FID at ``resolution`` is logged under: ``{stage}/fid_R`` (the name
    dashboards and checkpoint monitors know) and, on smoke-test features, also
    ``{stage}/fid_R_random-conv_smoke_test``, so a curve's name says what it is."""
    names = [f"{stage}/fid_{resolution}"]
    if settings.is_smoke_test:
        names.append(f"{stage}/fid_{resolution}_{settings.feature_extractor}_smoke_test")
    return names


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


def register_fidelity_extractor(name: str, build: Callable[[str | None], nn.Module],
                                layers: tuple[str, ...] = ("features",)) -> None:
    """Register a feature net with torch-fidelity under ``name`` (once).

    ``build(feature_extractor_weights_path)`` returns the net: uint8 [B, 3, H, W] images ->
    a tensor (the ``"features"`` layer) or a dict with every name in ``layers``. FID and
    KID read ``"features"``; the Inception score reads ``"logits"`` where it is given."""
    import torch_fidelity
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    if name in FEATURE_EXTRACTORS_REGISTRY:
        return

    class Extractor(FeatureExtractorBase):
        def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
            super().__init__(name, features_list)
            self.net = build(feature_extractor_weights_path)
            self.eval()

        @staticmethod
        def get_provided_features_list():
            return layers

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return "logits" if metric == "isc" and "logits" in layers else "features"

        @staticmethod
        def can_be_compiled():
            return False

        @staticmethod
        def get_dummy_input_for_compile():
            return torch.zeros(1, 3, 32, 32, dtype=torch.uint8)

        def forward(self, x):
            out = self.net(x)
            out = out if isinstance(out, dict) else {"features": out}
            return tuple(out[layer].double() for layer in self.features_list)

    Extractor.__name__ = Extractor.__qualname__ = f"TorchFidelity_{name.replace('-', '_')}"
    torch_fidelity.register_feature_extractor(name, Extractor)


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


def register_feature_extractors() -> None:
    """This project's torch-fidelity extractors: "random-conv" and "mnist-lenet"."""
    # metrics -> mnist_classifier, never back: the classifier knows nothing of torch-fidelity.
    from lightning_modules.mnist_classifier import FeaturesAndLogits, load_lenet_features

    register_fidelity_extractor("random-conv", lambda weights: RandomConvFeatures())
    register_fidelity_extractor("mnist-lenet", lambda weights: FeaturesAndLogits(load_lenet_features(weights)),
                                layers=("features", "logits"))


def _missing_weights(settings: FIDSettings, path: Path) -> FileNotFoundError:
    if settings.feature_extractor == "mnist-lenet":
        from lightning_modules.mnist_classifier import missing_weights_error

        return missing_weights_error(path)
    if settings.feature_extractor.startswith("inception"):
        return FileNotFoundError(f"inception_weights {str(path)!r} does not exist. Download {INCEPTION_URL} on a "
                                 "machine with internet and copy it there.")
    return FileNotFoundError(f"feature extractor weights {str(path)!r} ({settings.feature_extractor}) do not exist")


def resolved_feature_layer(settings: FIDSettings, metric: str = "fid") -> str:
    """The feature layer FID (or KID) uses: ``settings.feature_layer`` or the extractor's default."""
    if settings.feature_layer is not None:
        return str(settings.feature_layer)
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    register_feature_extractors()
    if settings.feature_extractor not in FEATURE_EXTRACTORS_REGISTRY:
        raise ValueError(f"unknown feature extractor {settings.feature_extractor!r}; torch-fidelity knows "
                         f"{sorted(FEATURE_EXTRACTORS_REGISTRY)}")
    return str(FEATURE_EXTRACTORS_REGISTRY[settings.feature_extractor].get_default_feature_layer_for_metric(metric))


def feature_cache_tag(settings: FIDSettings) -> str:
    """What the real-statistics cache name needs to know about the features: extractor,
    layer (a 2048 cache never serves FID-192) and, for trained extractors other than
    Inception, a digest of the weights file (another classifier, other statistics)."""
    parts = [settings.feature_extractor, resolved_feature_layer(settings, "fid")]
    kid_layer = resolved_feature_layer(settings, "kid")
    if kid_layer != parts[-1]:
        parts.append(f"kid{kid_layer}")
    weights = settings.weights_path
    if weights and not settings.feature_extractor.startswith("inception"):
        path = Path(weights).expanduser()
        if path.is_file():
            parts.append(hashlib.sha256(path.read_bytes()).hexdigest()[:12])
    return "-".join(parts)


def fidelity(fake: Dataset, real: Dataset, settings: FIDSettings, real_cache_name: str | None,
             cuda: bool) -> dict[str, float]:
    """FID and KID of two uint8 image datasets with torch-fidelity, on the features of
    ``settings.feature_extractor`` at ``settings.feature_layer`` (FID-192: "192")."""
    import torch_fidelity

    register_feature_extractors()
    kwargs = dict(input1=fake, input2=real, fid=True, kid=True, cuda=cuda, verbose=False,
                  feature_extractor=settings.feature_extractor, batch_size=settings.batch_size,
                  kid_subset_size=min(settings.kid_subset_size, len(fake), len(real)),
                  save_cpu_ram=True)
    if settings.feature_layer is not None:
        kwargs["feature_layer_fid"] = str(settings.feature_layer)
        kwargs["feature_layer_kid"] = str(settings.feature_layer)
    if settings.weights_path:
        path = Path(settings.weights_path).expanduser()
        if not path.is_file():
            raise _missing_weights(settings, path)
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
        if settings.feature_extractor.startswith("inception") and not settings.weights_path:
            raise RuntimeError(
                f"FID needs torch-fidelity's Inception weights and they could not be downloaded "
                f"({error}). Fetch {INCEPTION_URL} on a machine with internet, copy it here and "
                f"set inception_weights: /path/to/{INCEPTION_FILE} in the fid settings of the TestMetrics or "
                "ValidationFID callback (trainer.callbacks; or feature_extractor: random-conv for a smoke run).") from error
        raise
    return {"fid": float(metrics["frechet_inception_distance"]),
            "kid": float(metrics["kernel_inception_distance_mean"]),
            "kid_std": float(metrics["kernel_inception_distance_std"])}


def in_loop_fid(settings: FIDSettings):
    """A torchmetrics FID for validation curves, on the extractor (and Inception layer,
    ``feature_layer``) ``settings`` names. Real features are kept across resets (they are
    fixed for a run)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    layer = settings.feature_layer
    if settings.feature_extractor in ("random-conv", "mnist-lenet"):
        if layer not in (None, "features"):
            raise ValueError(f"in-loop FID on {settings.feature_extractor} uses its 'features' layer, "
                             f"not {layer!r}")
        if settings.feature_extractor == "random-conv":
            network = RandomConvFeatures()
        else:
            from lightning_modules.mnist_classifier import load_lenet_features

            network = load_lenet_features(settings.weights_path)
        return FrechetInceptionDistance(feature=network, reset_real_features=False)
    if not settings.feature_extractor.startswith("inception"):
        raise ValueError(f"in-loop FID supports inception-v3-compat, mnist-lenet and random-conv, not "
                         f"{settings.feature_extractor!r}")
    if layer is not None and not layer.isdigit():
        raise ValueError(f"in-loop FID on Inception takes a feature size (64, 192, 768, 2048), not {layer!r}")
    try:
        return FrechetInceptionDistance(feature=int(layer) if layer is not None else 2048,
                                        reset_real_features=False,
                                        feature_extractor_weights_path=settings.weights_path)
    except (OSError, RuntimeError) as error:
        raise RuntimeError(
            f"in-loop FID needs the Inception weights ({error}). Fetch {INCEPTION_URL} and set "
            f"inception_weights: /path/to/{INCEPTION_FILE} in ValidationFID's fid settings (trainer.callbacks)") from error


def finite_samples(images: Tensor) -> Tensor:
    """Per sample ([B] bool), True where every value of the model-space image is finite."""
    return torch.isfinite(images.reshape(images.shape[0], -1)).all(dim=1)


@dataclass(eq=False)
class Samples(Mapping):
    """Generated images per resolution: ``images`` uint8 [N, C, R, R] on the CPU (read it
    as a mapping: ``samples[R]``), and ``finite`` [N] bool, False for a sample any of
    whose values was NaN or infinite in model space (``to_uint8`` shows it grey, so it
    must be told apart here, from the float samples)."""

    images: dict[int, Tensor]
    finite: dict[int, Tensor]

    def __getitem__(self, resolution: int) -> Tensor:
        return self.images[resolution]

    def __iter__(self):
        return iter(self.images)

    def __len__(self) -> int:
        return len(self.images)

    def failed(self, resolution: int) -> Tensor:
        """[N] bool: the non-finite samples at ``resolution``."""
        return ~self.finite[resolution]

    def finite_images(self, resolution: int) -> Tensor:
        """The finite samples at ``resolution`` (what FID/KID score)."""
        return self.images[resolution][self.finite[resolution]]

    def nonfinite_count(self, resolution: int) -> dict[str, int]:
        """``{"count": non-finite samples, "of": samples}`` at ``resolution``."""
        return {"count": int(self.failed(resolution).sum()), "of": int(self.finite[resolution].numel())}


def generate_uint8(sample: Callable[[int], dict[int, Tensor]], num_samples: int, batch_size: int,
                   to_uint8: Callable[[Tensor], Tensor]) -> Samples:
    """Draw ``num_samples`` per resolution in batches, as uint8 on the CPU, with which
    samples were finite (:class:`Samples`)."""
    chunks: dict[int, list[Tensor]] = {}
    finite: dict[int, list[Tensor]] = {}
    remaining = num_samples
    while remaining > 0:
        n = min(batch_size, remaining)
        for resolution, images in sample(n).items():
            images = images.cpu()
            finite.setdefault(resolution, []).append(finite_samples(images))
            chunks.setdefault(resolution, []).append(to_uint8(images))
        remaining -= n
    return Samples({r: torch.cat(c) for r, c in chunks.items()}, {r: torch.cat(f) for r, f in finite.items()})


def time_sampling(sample_fn: Callable[[int], object], n: int, device: torch.device | str | None = None,
                  repeats: int = 1) -> float:
    """Seconds one ``sample_fn(n)`` call takes (seed 003 Tables 5.3/5.4: 25 samples): one
    warm-up call, then the median of ``repeats`` timed calls, with CUDA synchronized
    around each on a GPU ``device``."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    cuda = device is not None and torch.device(device).type == "cuda"

    def synchronize() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    sample_fn(n)
    times = []
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        sample_fn(n)
        synchronize()
        times.append(time.perf_counter() - start)
    return float(statistics.median(times))


def strict_json(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, +-inf; also NumPy's and 0-dim tensors')
    replaced by None, recursively through dicts, lists and tuples: JSON has no NaN."""
    if isinstance(value, dict):
        return {key: strict_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(item) for item in value]
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    if hasattr(value, "dtype") and hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        value = value.item()  # a NumPy scalar
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def json_text(value: Any) -> str:
    """Strict JSON text of ``value`` (non-finite floats as ``null``, :func:`strict_json`),
    indented, with a final newline: what every JSON file the project writes holds."""
    return json.dumps(strict_json(value), indent=2, sort_keys=False, allow_nan=False) + "\n"


def write_metrics_table(path: Path, table: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json_text(table))


def plot_temperature_sweep(path: Path, sweep: dict[str, dict[str, float | None]], title: str,
                           nonfinite: dict[str, dict[str, dict[str, int]]] | None = None) -> None:
    """FID against temperature, one line per resolution (Fig. 4.4). A FID that was not
    computed (None: no finite samples) is a gap; ``nonfinite`` ({T: {R: {"count", "of"}}})
    labels each point where samples were non-finite (and left out of its FID)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    temperatures = sorted(float(t) for t in sweep)
    resolutions = sorted({int(r) for row in sweep.values() for r in row})
    figure, axis = plt.subplots(figsize=(5, 3.5))
    for resolution in resolutions:
        values = [sweep[f"{t:g}"].get(str(resolution)) for t in temperatures]
        values = [math.nan if v is None else float(v) for v in values]
        axis.plot(temperatures, values, marker="o", label=f"{resolution}x{resolution}")
        for t, v in zip(temperatures, values):
            count = ((nonfinite or {}).get(f"{t:g}") or {}).get(str(resolution))
            if count and count["count"]:
                text = f"{count['count']}/{count['of']} non-finite" + (" (no FID)" if math.isnan(v) else "")
                axis.annotate(text, (t, 0.0 if math.isnan(v) else v), fontsize=7, textcoords="offset points",
                              xytext=(3, 3))
    axis.set_xlabel("temperature")
    axis.set_ylabel("FID")
    axis.set_title(title)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def settings_dict(settings: FIDSettings) -> dict:
    return asdict(settings)
