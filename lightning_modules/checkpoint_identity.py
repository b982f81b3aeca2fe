"""Which module wrote a checkpoint, with which settings, and whether it fits the
module that loads it: a checkpoint of another family, width or run setting is refused
with the difference named, before any training (:func:`check_fits`,
:func:`check_settings`, :class:`CheckpointIdentity`).
"""
from __future__ import annotations

import inspect
import os
from collections.abc import Mapping

import torch

from lightning_modules.checkpoint_files import load_checkpoint_file, state_dict_mismatch, upgrade_state_dict
from lightning_modules.errors import CheckpointError
from lightning_modules.lightning_internals import hyperparameters_from_cli

MODEL_KEY = "msflows_model"  # {"class": the LightningModule, "name": its model_name}


def written_by(module_class: str, model_name: str) -> dict:
    return {"class": module_class, "name": model_name}


def check_written_by(checkpoint: dict, module_class: str, source: str) -> None:
    """Fail with a paragraph (not Lightning's advice to import another family's module)
    when ``checkpoint`` was written by another LightningModule class."""
    author = checkpoint.get(MODEL_KEY, {})
    if author and author.get("class") != module_class:
        raise CheckpointError(
            f"{source!r} was written by {author.get('class')} {author.get('name', '')!r}, not by a "
            f"{module_class}: load it with lightning_modules.{author.get('class')}.load_from_checkpoint")


def check_fits(checkpoint: dict, module_class: str, model_name: str, state_dict: dict) -> None:
    """Fail with a message, not deep inside load_state_dict, on a checkpoint of another
    module class or of another configuration (tensors missing, unexpected or reshaped)."""
    author = checkpoint.get(MODEL_KEY, {})
    ours = f"{module_class} {model_name!r}"
    theirs = f"{author.get('class', 'an unknown model')} {author.get('name', '')!r}"
    if author and author.get("class") != module_class:
        raise CheckpointError(f"this checkpoint was written by {theirs}, but this run builds {ours}; "
                              "pass a checkpoint of this model, or the config that wrote it")
    missing, unexpected, mismatched = state_dict_mismatch(state_dict, checkpoint["state_dict"])
    if missing or unexpected or mismatched:
        raise CheckpointError(
            f"this checkpoint ({theirs}) does not fit this run's {ours}: {len(missing)} tensors "
            f"missing, {len(unexpected)} unexpected, {len(mismatched)} of another shape (e.g. "
            f"{(mismatched + missing + unexpected)[:3]}). The architecture settings differ from "
            "the run that wrote it; use its config (saved as config.yaml in its log folder).")


# Settings that never change what the weights mean or the likelihood a checkpoint gives:
# how it is optimized, sampled, evaluated or run. They may differ between the run that
# wrote a checkpoint and one that resumes or tests it (a new learning rate, a guidance
# weight, DDIM steps); any other difference is refused (:func:`check_settings`).
RUN_SETTINGS = frozenset({
    "optimizer", "flow_optimizer", "diffusion_optimizer", "encoder_optimizer", "decoder_optimizer",
    "grad_clip_norm", "grad_clip_relative", "evaluation_seed", "channels_last", "compile", "compile_sampling",
    "max_skipped_steps",
    "accumulate_grad_batches", "class_loss_weight", "loss_mode", "vlb_weight", "bound_estimator", "loss",
    "label_dropout", "guidance", "sampling_steps", "eta", "clip_denoised", "denoise_samples", "memory_efficient",
    "activation_checkpointing", "train_stages", "init_checkpoint", "freeze_encoders_at_epoch", "train_noise_std",
    "failure_probe_sigmas", "failure_probe_every_n_steps", "max_reconstruction_abs", "accept_changed_settings",
    "_instantiator",
})


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) \
            and not isinstance(b, bool):
        return float(a) == float(b)
    return a == b


def setting_differences(saved, current, path: str = "") -> list[tuple[str, object, object]]:
    """(dotted key, saved value, current value) for every setting of ``current`` that
    ``saved`` holds with another value. A key only one side has is not a difference (an
    argument added or removed since); :data:`RUN_SETTINGS` are skipped; a component of
    another ``class_path`` differs as a whole."""
    def mapping(value):
        if isinstance(value, Mapping):
            return value
        if hasattr(value, "__dict__") and type(value).__name__ == "Namespace":
            return vars(value)
        return None

    a, b = mapping(saved), mapping(current)
    if a is None or b is None:
        return [] if _same(saved, current) else [(path, saved, current)]
    if "class_path" in a and "class_path" in b and a["class_path"] != b["class_path"]:
        return [(f"{path}.class_path" if path else "class_path", a["class_path"], b["class_path"])]
    differences = []
    for key in a.keys() & b.keys():
        if key in RUN_SETTINGS:
            continue
        differences += setting_differences(a[key], b[key], f"{path}.{key}" if path else str(key))
    return sorted(differences, key=lambda d: d[0])


def check_settings(saved: Mapping | None, current: Mapping | None, accepted=()) -> None:
    """Refuse a checkpoint whose saved model settings differ from this run's config where
    the tensors still fit (``scale_fn: glow`` tested as ``squish``: the same shapes, other
    numbers, and a metrics.json that overwrites the run's own). ``accepted``: dotted keys
    (or their last part) allowed to differ, ``"*"`` for all (the module's
    ``accept_changed_settings``)."""
    if not saved or not current or "*" in accepted:
        return
    differences = [d for d in setting_differences(saved, current)
                   if d[0] not in accepted and d[0].rsplit(".", 1)[-1] not in accepted]
    if differences:
        listed = "; ".join(f"model.init_args.{key}: {old!r} in the checkpoint, {new!r} here"
                           for key, old, new in differences[:6])
        more = f" (and {len(differences) - 6} more)" if len(differences) > 6 else ""
        leaves = sorted({key.rsplit(".", 1)[-1] for key, _, _ in differences})
        raise CheckpointError(
            f"this checkpoint was written with other model settings than this run's config: {listed}{more}. Its "
            "weights would load and give other numbers. Use the config that wrote it (config.yaml in its run folder), "
            f"or, to load it anyway, pass --model.init_args.accept_changed_settings '[{', '.join(leaves)}]'")


class CheckpointIdentity:
    """LightningModule hooks (``FlowModule`` mixes them in): a checkpoint names the module
    class and the model that wrote it, and loads only into a module that fits it, after
    the keys of earlier versions are mapped. Needs ``self.model_name``."""

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[MODEL_KEY] = written_by(type(self).__name__, self.model_name)

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, *args, **kwargs):
        """Lightning's, after reading the file through :func:`load_checkpoint_file`: an
        unreadable file (truncated, text, a directory) or one of another family fails with
        a CheckpointError paragraph, not a raw PytorchStreamReader error or Lightning's
        advice to import the other family's module."""
        if isinstance(checkpoint_path, (str, os.PathLike)):
            check_written_by(load_checkpoint_file(checkpoint_path), cls.__name__, str(checkpoint_path))
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Runs before Lightning loads the state dict."""
        checkpoint["state_dict"] = upgrade_state_dict(checkpoint.get("state_dict", {}),
                                                      checkpoint.get("hyper_parameters") or {})
        check_fits(checkpoint, type(self).__name__, self.model_name, self.state_dict())
        check_settings(checkpoint.get("hyper_parameters"), dict(self.hparams),
                       getattr(self, "accept_changed_settings", ()))


def save_constructor_arguments(module, frame) -> None:
    """Record the arguments of the constructor running in ``frame`` as ``module``'s
    hyper-parameters. Under the CLI they are the parsed config (models given by
    class_path stay dicts); built in Python, the arguments that are modules (or hold
    them) are left out, since the checkpoint's state dict already has their weights."""
    if hyperparameters_from_cli():
        module.save_hyperparameters(frame=frame)
        return
    arguments = inspect.getargvalues(frame).locals
    module.save_hyperparameters(ignore=[name for name, value in arguments.items()
                                        if name != "self" and _holds_module(value)], frame=frame)


def _holds_module(value) -> bool:
    if isinstance(value, torch.nn.Module):
        return True
    if isinstance(value, (list, tuple)):
        return any(_holds_module(v) for v in value)
    if hasattr(value, "__dataclass_fields__"):
        return any(_holds_module(getattr(value, name)) for name in value.__dataclass_fields__)
    return False
