"""DDP on CPU (gloo) for the tests: ``python -m tests.ddp_job {ddp,single} OUT``.
Saves every rank's parameters after the first step and at the end, and the validation
metrics of the untrained model."""
import sys
from pathlib import Path

import pytorch_lightning as pl
import torch

from lightning_modules import ExactResume, FIDSettings, TestMetrics
from tests.resume_job import build


class SaveParameters(pl.Callback):
    def __init__(self, out: Path) -> None:
        self.out = out

    def _save(self, trainer, pl_module, tag):
        state = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}
        torch.save(state, self.out / f"rank{trainer.global_rank}_{tag}.pt")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 1:
            self._save(trainer, pl_module, "step1")

    def on_validation_end(self, trainer, pl_module):
        if trainer.global_rank == 0 and trainer.state.fn == "validate":
            torch.save({k: float(v) for k, v in trainer.callback_metrics.items()}, self.out / "validate.pt")

    def on_train_end(self, trainer, pl_module):
        self._save(trainer, pl_module, "end")


def main() -> None:
    mode, out = sys.argv[1], Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(0)
    module, data = build("cascade")
    data.eval_batch_size = 4
    ddp = mode == "ddp"
    trainer = pl.Trainer(accelerator="cpu", devices=2 if ddp else 1,
                         strategy="ddp_spawn_find_unused_parameters_true" if ddp else "auto", max_steps=3, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(out),
                         num_sanity_val_steps=0,
                         callbacks=[SaveParameters(out), ExactResume(),
                                    TestMetrics(FIDSettings(num_samples=12, feature_extractor="random-conv",
                                                            batch_size=4, kid_subset_size=4,
                                                            cache_dir=str(out / "fid_cache")))])
    trainer.validate(module, data, verbose=False)
    trainer.fit(module, data)
    trainer.test(module, data, verbose=False)


if __name__ == "__main__":
    main()
