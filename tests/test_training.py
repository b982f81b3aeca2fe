"""The shared FlowModule training logic, exercised through a real Trainer."""
import math

import pytest
import pytorch_lightning as pl
import torch

from lightning_modules import SampleGrids
from tests.conftest import tiny_data, tiny_module, trainer


class RecordLR(pl.Callback):
    def __init__(self):
        self.lrs = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def test_linear_warmup_then_milestone_decay(tmp_path):
    record = RecordLR()
    module = tiny_module(warmup_steps=4, lr_milestones=[6], lr_gamma=0.5)
    trainer(tmp_path, max_steps=8, callbacks=[record], limit_val_batches=0).fit(module, tiny_data())
    expected = [1e-3 * min(1.0, (k + 2) / 4) * (0.5 if k + 1 >= 6 else 1.0) for k in range(8)]
    assert record.lrs == pytest.approx(expected)


def test_warmup_epochs_count_optimizer_steps_per_epoch(tmp_path):
    record = RecordLR()
    module = tiny_module(warmup_steps=None, warmup_epochs=2.0)  # 8 batches/epoch -> 16 steps
    trainer(tmp_path, max_steps=3, callbacks=[record], limit_val_batches=0).fit(module, tiny_data())
    assert record.lrs == pytest.approx([1e-3 * (k + 2) / 16 for k in range(3)])


def test_non_finite_loss_skips_the_step_and_is_counted(tmp_path):
    module = tiny_module()
    original = module.compute_losses
    calls = {"n": 0}
    snapshots = []

    def sometimes_nan(batch):
        calls["n"] += 1
        out = original(batch)
        if module.training and calls["n"] == 2:
            snapshots.append([p.detach().clone() for p in module.parameters()])
            out.loss = out.loss * float("nan")
        return out

    module.compute_losses = sometimes_nan

    class CheckUnchanged(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == 1:
                after = list(pl_module.parameters())
                assert all(torch.equal(a, b) for a, b in zip(snapshots[0], after))

    trainer(tmp_path, max_steps=3, limit_val_batches=0, callbacks=[CheckUnchanged()]).fit(module, tiny_data())
    assert int(module.skipped_steps) == 1
    assert module.trainer.global_step == 3  # skipped steps do not count as optimizer steps
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_validation_logs_bpd_per_resolution_and_writes_sample_grids(tmp_path):
    module = tiny_module()
    sample_grids = SampleGrids(temperatures=[0.5, 1.0], num_samples=4)
    t = trainer(tmp_path, max_epochs=1, limit_train_batches=2, limit_val_batches=2, callbacks=[sample_grids])
    t.fit(module, tiny_data())
    bpd = t.callback_metrics["val/bpd_8"].item()
    assert math.isfinite(bpd) and 0 < bpd < 10
    grids = sorted((tmp_path / "samples").glob("*.png"))
    assert [g.name.split("_", 1)[1] for g in grids] == ["res8_t0.5.png", "res8_t1.png"]
    from PIL import Image

    # 4 samples of 8x8 in a 2x2 grid with 1-pixel padding
    assert Image.open(grids[0]).size == (2 * 9 + 1, 2 * 9 + 1)
    # Grids use their own fixed-seed noise: the training RNG stream is untouched and a
    # second draw gives the same pictures.
    first = [g.read_bytes() for g in grids]
    rng_state = torch.get_rng_state()
    again = sample_grids.draw(t, module)
    assert torch.equal(torch.get_rng_state(), rng_state)
    assert [g.read_bytes() for g in sorted(again)] == first


def test_model_and_data_mismatch_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="data.init_args.resolutions"):
        trainer(tmp_path, max_steps=1).fit(tiny_module(resolution=8), tiny_data(resolutions=[4]))
