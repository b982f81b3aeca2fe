"""The MNIST classifier whose features replace Inception's in MNIST FIDs (seed 003
sec. 5.2.1: "a custom-trained MNIST classifier was utilized in place of the inception
network").

* :class:`LeNetFeatures`: a LeNet-style CNN (conv-pool-conv-pool-fc-fc-fc). Its
  ``forward`` returns the penultimate layer (the FID features, ``num_features`` wide);
  :meth:`LeNetFeatures.logits` the 10 class scores.
* :class:`MNISTClassifierModule`: trains it with cross-entropy and Adam on
  MNISTDataModule batches (``experiments/mnist_classifier.yaml``) and exports the feature
  net's ``state_dict`` to ``export_path`` (a plain ``torch.save`` file) after every
  validation run and at the end of training.
* torch-fidelity feature extractor ``"mnist-lenet"`` (registered by
  ``metrics.register_feature_extractors``, which ``metrics.fidelity`` calls): features
  ``"features"`` (penultimate, the FID/KID default) and ``"logits"``, weights from
  ``feature_extractor_weights_path``, i.e. ``FIDSettings(feature_extractor="mnist-lenet",
  feature_weights=<export_path>)``.

FIDs on these features are only comparable between runs that use the same classifier
file, and never with Inception FIDs.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

MNIST_CLASSIFIER_CONFIG = "experiments/mnist_classifier.yaml"
DEFAULT_EXPORT_PATH = "runs/mnist_classifier/mnist_lenet.pt"


class LeNetFeatures(nn.Module):
    """LeNet-style CNN on 1x32x32 images (conv5-pool-conv5-pool-fc-fc-fc).

    Inputs: [B, C, H, W], uint8 in [0, 255] or float in [-0.5, 0.5] (the model space of
    this project), C = 1 or 3 (RGB is averaged back to grey: the FID code repeats grey
    images to RGB). 28x28 images are zero-padded to 32x32 like MNISTDataModule pads
    them; other sizes are resized bilinearly.
    """

    def __init__(self, feature_dims: int = 128, num_classes: int = 10, widths: tuple[int, int] = (32, 64),
                 hidden: int = 256) -> None:
        super().__init__()
        self.num_features = feature_dims  # torchmetrics' FID reads the feature size from here
        self.conv1 = nn.Conv2d(1, widths[0], 5, padding=2)
        self.conv2 = nn.Conv2d(widths[0], widths[1], 5, padding=2)
        self.fc1 = nn.Linear(widths[1] * 8 * 8, hidden)
        self.fc2 = nn.Linear(hidden, feature_dims)
        self.head = nn.Linear(feature_dims, num_classes)

    @classmethod
    def from_state_dict(cls, state_dict: dict[str, Tensor]) -> "LeNetFeatures":
        """The net a saved ``state_dict`` belongs to (sizes read from its shapes)."""
        net = cls(feature_dims=state_dict["fc2.weight"].shape[0], num_classes=state_dict["head.weight"].shape[0],
                  widths=(state_dict["conv1.weight"].shape[0], state_dict["conv2.weight"].shape[0]),
                  hidden=state_dict["fc1.weight"].shape[0])
        net.load_state_dict(state_dict)
        return net

    @staticmethod
    def prepare(images: Tensor) -> Tensor:
        """[B, 1, 32, 32] float in [-0.5, 0.5] from any accepted input."""
        if images.dim() == 3:
            images = images.unsqueeze(1)
        x = images.float()
        if x.shape[1] != 1:  # exact for grey repeated to RGB: a mean of equal integers
            x = x.mean(dim=1, keepdim=True)
        if images.dtype == torch.uint8:
            x = x / 255.0 - 0.5
        if tuple(x.shape[-2:]) == (28, 28):
            x = F.pad(x, (2, 2, 2, 2), value=-0.5)
        elif tuple(x.shape[-2:]) != (32, 32):
            x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
        return x

    def features(self, images: Tensor) -> Tensor:
        x = F.max_pool2d(F.relu(self.conv1(self.prepare(images))), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.fc1(x.flatten(1)))
        return F.relu(self.fc2(x))

    def forward(self, images: Tensor) -> Tensor:
        return self.features(images)

    def logits(self, images: Tensor) -> Tensor:
        return self.head(self.features(images))


def missing_weights_error(path: str | os.PathLike | None) -> FileNotFoundError:
    """The error for a classifier file that is not there: which config makes it."""
    where = "no feature_weights path was given" if path is None else f"{str(path)!r} does not exist"
    return FileNotFoundError(
        f"The mnist-lenet FID features need the weights of the MNIST classifier, and {where}. "
        f"Train it with `lightning fit --config {MNIST_CLASSIFIER_CONFIG}` (it writes "
        f"model.init_args.export_path, {DEFAULT_EXPORT_PATH} by default) and set "
        "evaluation.feature_weights (FIDSettings.feature_weights) to that file.")


def load_lenet_features(path: str | os.PathLike | None) -> LeNetFeatures:
    """The exported classifier, frozen and in eval mode. A missing file is a
    FileNotFoundError that says which config makes it."""
    if path is None or not Path(path).expanduser().is_file():
        raise missing_weights_error(path)
    state_dict = torch.load(Path(path).expanduser(), map_location="cpu", weights_only=True)
    net = LeNetFeatures.from_state_dict(state_dict)
    net.requires_grad_(False)
    return net.eval()


class FeaturesAndLogits(nn.Module):
    """The classifier as torch-fidelity reads it (``metrics.register_feature_extractors``
    registers it as ``"mnist-lenet"``): penultimate features and logits."""

    def __init__(self, net: LeNetFeatures) -> None:
        super().__init__()
        self.net = net

    def forward(self, images_uint8: Tensor) -> dict[str, Tensor]:
        features = self.net.features(images_uint8)
        return {"features": features, "logits": self.net.head(features)}


class MNISTClassifierModule(pl.LightningModule):
    """Trains :class:`LeNetFeatures` on MNISTDataModule batches (cross-entropy, Adam) and
    writes its ``state_dict`` to ``export_path`` (process 0; after each validation run and
    at the end of training), the file the ``mnist-lenet`` FID features load.

    Args:
        export_path: where the feature net's weights go.
        resolution: which resolution of the batch's pyramid to classify (default: the largest).
        feature_dims: width of the penultimate (FID feature) layer.
        lr: Adam learning rate.
    """

    def __init__(self, export_path: str = DEFAULT_EXPORT_PATH, resolution: int | None = None,
                 feature_dims: int = 128, lr: float = 1e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.export_path = export_path
        self.resolution = resolution
        self.lr = lr
        self.net = LeNetFeatures(feature_dims=feature_dims)

    def _images(self, batch: dict) -> Tensor:
        images = batch["images"]
        return images[self.resolution if self.resolution is not None else max(images)]

    def _step(self, batch: dict, split: str) -> Tensor:
        logits = self.net.logits(self._images(batch))
        labels = batch["label"]
        loss = F.cross_entropy(logits, labels)
        accuracy = (logits.argmax(dim=1) == labels).float().mean()
        on_step = split == "train"
        self.log(f"{split}/loss", loss, on_step=on_step, on_epoch=True, prog_bar=on_step)
        self.log(f"{split}/acc", accuracy, on_step=on_step, on_epoch=True, prog_bar=True)
        return loss

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._step(batch, "test")

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)

    def export(self) -> Path:
        """Write the feature net's weights to ``export_path`` (atomically)."""
        path = Path(self.export_path).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(path.name + ".tmp")
        torch.save({k: v.detach().cpu() for k, v in self.net.state_dict().items()}, temporary)
        os.replace(temporary, path)
        return path

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking and self.trainer.is_global_zero:
            self.export()

    def on_train_end(self) -> None:
        if self.trainer.is_global_zero:
            path = self.export()
            self.print(f"MNIST classifier features written to {path}")
