"""The training-recipe options any family can use (lightning_modules/parts.py): AdamW with
decoupled weight decay, and a cosine decay to a floor after the warm-up, over the run's
length; apple/ml-tarflow's ``train.py`` and ``utils.CosineLRSchedule`` as the reference."""
from __future__ import annotations

import math

import pytest
import torch

from lightning_modules.errors import ConfigurationError
from lightning_modules.parts import OptimizerGroup, OptimizerSettings, build_optimizer, lr_factor


def tarflow_reference_lr(step: int, warmup: int, total: int, lr: float, floor: float) -> float:
    """ml-tarflow's CosineLRSchedule after ``step + 1`` calls of ``step()``, rewritten from
    its equations (warm-up from the floor; ours starts at 0: the first step differs by the
    floor alone)."""
    counter = step + 1
    if counter <= warmup:
        return floor + counter / warmup * (lr - floor)
    t = (counter - warmup) / (total - warmup)
    return floor + 0.5 * (1 + math.cos(math.pi * t)) * (lr - floor)


def test_cosine_decay_follows_the_warm_up_down_to_the_floor():
    lr, floor, warmup, total = 1e-4, 1e-6, 10, 110
    settings = OptimizerSettings(algorithm="adamw", lr=lr, warmup_steps=warmup, decay="cosine", lr_floor=floor)
    factor = lr_factor(settings, steps_per_epoch=lambda: 10, total_steps=lambda: total)
    rates = [lr * factor(step) for step in range(total)]
    assert rates[warmup - 1] == pytest.approx(lr)  # the warm-up's end: the full rate
    assert rates[-1] == pytest.approx(floor + 0.5 * (1 + math.cos(math.pi * (total - 1 - warmup) / (total - warmup)))
                                      * (lr - floor))
    assert lr * factor(total + 50) == pytest.approx(floor)  # past the end: the floor
    assert all(a >= b for a, b in zip(rates[warmup:], rates[warmup + 1:]))  # decreasing after the warm-up
    # ml-tarflow's schedule one call later (its counter starts at 1 after the first step)
    for step in range(warmup, total - 1):
        assert lr * factor(step + 1) == pytest.approx(tarflow_reference_lr(step, warmup, total, lr, floor), rel=1e-9)


def test_without_decay_the_schedule_is_unchanged():
    settings = OptimizerSettings(algorithm="adam", lr=1e-3, warmup_steps=4)
    factor = lr_factor(settings, steps_per_epoch=lambda: 10)
    assert [factor(s) for s in (0, 3, 100)] == [0.25, 1.0, 1.0]


def test_adamw_decays_the_weights_apart_from_the_gradient():
    """AdamW's decay is decoupled: with a zero gradient the weights shrink by lr * wd per
    step (Adam's L2 decay would pass through the moment estimates instead)."""
    weight = torch.nn.Parameter(torch.ones(3))
    settings = OptimizerSettings(algorithm="adamw", lr=0.1, betas=(0.9, 0.95), weight_decay=0.5, warmup_steps=0)
    built = build_optimizer([OptimizerGroup("model", [weight], settings)], lambda: 1)
    optimizer = built["optimizer"]
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.param_groups[0]["betas"] == (0.9, 0.95)
    weight.grad = torch.zeros(3)
    optimizer.step()
    assert torch.allclose(weight.detach(), torch.full((3,), 1 - 0.1 * 0.5))


def test_cosine_needs_the_runs_length_and_a_sane_floor():
    with pytest.raises(ConfigurationError, match="max_steps or max_epochs"):
        lr_factor(OptimizerSettings(decay="cosine"), steps_per_epoch=lambda: 10)
    with pytest.raises(ConfigurationError, match="lr_floor"):
        OptimizerSettings(lr=1e-4, lr_floor=1e-3, decay="cosine").validate()
    factor = lr_factor(OptimizerSettings(lr=1.0, warmup_steps=0, decay="cosine", decay_steps=20), lambda: 10)
    assert factor(10) == pytest.approx(0.5) and factor(20) == pytest.approx(0.0)


def test_a_module_decays_over_max_steps(tmp_path):
    """Under a Trainer the cosine runs over ``max_steps`` (the module passes the run's
    length): the last step's rate is the floor's neighbour, the middle one half-way."""
    from tests.conftest import tiny_data, tiny_module, trainer

    import pytorch_lightning as pl

    module = tiny_module(algorithm="adamw", lr=1e-3, warmup_steps=0, decay="cosine", lr_floor=1e-5,
                         weight_decay=1e-4)
    run = trainer(tmp_path, max_steps=8, limit_val_batches=0)
    rates = []

    class Rates(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            rates.append(trainer.optimizers[0].param_groups[0]["lr"])

    run.callbacks.append(Rates())
    run.fit(module, tiny_data())
    expected = [1e-5 + 0.5 * (1 + math.cos(math.pi * s / 8)) * (1e-3 - 1e-5) for s in range(8)]
    assert rates == pytest.approx(expected, rel=1e-6)
