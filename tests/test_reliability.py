"""Bad input and faults: each case gets one paragraph that says what to do, and loses
no work (issue: reliability)."""
import errno
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from lightning_modules.checkpoint_files import AtomicCheckpointIO, load_checkpoint_file
from lightning_modules.run_folder import RunLock, remove_stale_temporaries, resume_checkpoint
from tests.conftest import REPO
from tests.commands import (QUICKSTART, TINY_CASCADE, assert_same_training_state, fit_capturing, main_quiet,
                            run_main, signal_at, uninterrupted_last_checkpoint)

def one_paragraph_error(stderr: str) -> str:
    """The error line(s) the command printed; there must be no traceback."""
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def glow_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("glow")
    code = main_quiet(*QUICKSTART, "--trainer.default_root_dir", str(root))
    assert code == 0
    return next(root.rglob("last.ckpt"))


# --- 1. the config the user wrote wins over --ckpt_path -----------------------------------------
def test_ckpt_path_of_another_family_is_refused_before_training(glow_checkpoint, tmp_path, capsys):
    code, err = run_main(capsys, "fit", *TINY_CASCADE, "--trainer.default_root_dir", str(tmp_path),
                         "--ckpt_path", str(glow_checkpoint))
    assert code == 2
    message = one_paragraph_error(err)
    assert "GlowModule" in message and "CascadeModule" in message and "Glow8-SRF16-SRF32" in message
    assert not list(tmp_path.rglob("*.ckpt"))  # nothing trained


def test_ckpt_path_of_another_width_is_refused_not_silently_used(glow_checkpoint, tmp_path, capsys):
    code, err = run_main(capsys, "fit", *QUICKSTART, "--model.init_args.flow.init_args.hidden_channels", "16",
                         "--trainer.default_root_dir", str(tmp_path), "--ckpt_path", str(glow_checkpoint))
    assert code == 2
    assert "does not fit" in one_paragraph_error(err)


def test_test_time_settings_on_the_command_line_are_honoured(glow_checkpoint, tmp_path, capsys):
    fid = tmp_path / "fid.yaml"
    fid.write_text("trainer:\n  callbacks:\n    - class_path: lightning_modules.TestMetrics\n      init_args:\n"
                   "        fid: {num_samples: 16, feature_extractor: random-conv, batch_size: 16,"
                   f" kid_subset_size: 8, cache_dir: {tmp_path / 'cache'}}}\n")
    code, err = run_main(capsys, "test", *QUICKSTART, "--config", str(fid), "--trainer.default_root_dir",
                         str(tmp_path), "--ckpt_path", str(glow_checkpoint))
    assert code == 0, err[-3000:]
    import json

    table = json.loads((glow_checkpoint.parent.parent / "metrics.json").read_text())  # beside the checkpoint
    assert table["evaluation"]["num_samples"] == 16 and set(table["fid"]) == {"16"}


# --- 2. a diverged run ends, with what to try ------------------------------------------------------
def test_a_diverged_run_stops_after_max_skipped_steps(tmp_path, capsys):
    code, err = run_main(capsys, "fit", *QUICKSTART, "--model.init_args.optimizer.lr", "1e3",
                         "--model.init_args.max_skipped_steps", "5", "--trainer.max_epochs", "-1",
                         "--trainer.default_root_dir", str(tmp_path))
    assert code == 2
    message = one_paragraph_error(err)
    assert "5 optimizer steps in a row were skipped" in message
    for hint in ("last good checkpoint", "lower learning rate", "grad_clip_norm", "trainer.precision"):
        assert hint in message
    assert "non-finite" in err and "in a row" in err  # reported as they happened


# --- 3. one live run per folder ----------------------------------------------------------------------
def test_a_second_live_run_in_the_same_folder_refuses_to_start(tmp_path, capsys):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from lightning_modules.run_folder import RunLock; "
                               f"RunLock({str(tmp_path)!r}).acquire(); print('held', flush=True); time.sleep(120)"],
        cwd=REPO, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "held"
        code, err = run_main(capsys, "fit", *QUICKSTART, "--trainer.default_root_dir", str(tmp_path))
        assert code == 2
        message = one_paragraph_error(err)
        assert f"pid {holder.pid}" in message and "default_root_dir" in message
        assert not (tmp_path / "wandb_run_id.txt").exists() and not list(tmp_path.rglob("*.ckpt"))
    finally:
        holder.kill()
        holder.wait()
    # The owner is gone: its lock is stale and the next run takes it over.
    with pytest.warns(UserWarning, match="taking over"):
        lock = RunLock(tmp_path).acquire()
    assert lock.holder()["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / "msflows.lock").exists()


def test_a_lock_from_another_host_is_live_only_while_its_heartbeat_is_fresh(tmp_path):
    lock = RunLock(tmp_path, stale_after_s=60)
    lock.path.write_text('{"pid": 1, "host": "elsewhere", "slurm_job_id": null, "started": 0}')
    assert lock.holder_is_live(lock.holder())
    old = time.time() - 600
    os.utime(lock.path, (old, old))
    assert not lock.holder_is_live(lock.holder())


# --- 4. ckpt_path auto skips a broken newest checkpoint -------------------------------------------
def test_auto_resume_skips_a_truncated_newest_checkpoint_and_keeps_it_aside(glow_checkpoint, tmp_path):
    good = tmp_path / "version_0" / "checkpoints" / "last.ckpt"
    good.parent.mkdir(parents=True)
    good.write_bytes(glow_checkpoint.read_bytes())
    broken = tmp_path / "version_1" / "checkpoints" / "last.ckpt"
    broken.parent.mkdir(parents=True)
    broken.write_bytes(glow_checkpoint.read_bytes()[:5000])
    empty = tmp_path / "hpc_ckpt_3.ckpt"
    empty.write_bytes(b"")
    os.utime(good, (1, 1))
    orphan = good.parent / ".last.ckpt.4242.tmp"
    orphan.write_bytes(b"partial")
    with pytest.warns(UserWarning, match="skipping it"):  # a rank other than the launcher leaves files alone
        assert resume_checkpoint(tmp_path, move_aside=False) == good
    assert broken.exists() and empty.exists()
    with pytest.warns(UserWarning, match="moved it aside"):
        assert resume_checkpoint(tmp_path) == good
    assert not broken.exists() and len(list(broken.parent.glob("last.ckpt.broken-*"))) == 1
    assert not empty.exists() and len(list(tmp_path.glob("hpc_ckpt_3.ckpt.broken-*"))) == 1
    assert remove_stale_temporaries(tmp_path) == [orphan] and not orphan.exists()


# --- 5. bad values: one paragraph before the first step ------------------------------------------
@pytest.mark.parametrize("args, expected", [
    (["--model.init_args.optimizer.lr", "-1"], "lr must be a positive number"),
    (["--model.init_args.n_bits", "9"], "n_bits must be in [1, 8]"),
    (["--model.init_args.flow.init_args.scales", "0"], "scales >= 1"),
    (["--model.init_args.flow.init_args.scales", "5"], "not divisible by 2**scales"),
    (["--trainer.callbacks.init_args.fid.temperature", "[0.5, 0.5]"], "one per stage"),
    (["--data.init_args.batch_size", "64"], "fewer than one batch"),
    (["--data.init_args.image_size", "8", "--data.init_args.resolutions", "[8]"], "set data.init_args.image_size: 16"),
])
def test_bad_values_give_one_paragraph_before_training(args, expected, tmp_path, capsys):
    base = QUICKSTART
    if "temperature" in args[0]:  # a per-stage list one short, for a 3-stage cascade
        evaluation = tmp_path / "evaluation.yaml"
        evaluation.write_text("trainer:\n  callbacks:\n    - class_path: lightning_modules.TestMetrics\n"
                              "      init_args: {fid: {feature_extractor: random-conv}}\n")
        base, args = TINY_CASCADE, ["--config", str(evaluation), *args]
    code, err = run_main(capsys, "fit", *base, *args, "--trainer.default_root_dir", str(tmp_path))
    assert code == 2
    assert expected in one_paragraph_error(err)
    assert not list(tmp_path.rglob("*.ckpt"))


# --- 6. smaller cases ------------------------------------------------------------------------------
def test_an_empty_checkpoint_names_the_file(tmp_path, capsys):
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    code, err = run_main(capsys, "fit", *QUICKSTART, "--trainer.default_root_dir", str(tmp_path),
                         "--ckpt_path", str(empty))
    assert code == 2
    message = one_paragraph_error(err)
    assert str(empty) in message and "0 bytes" in message


def test_a_full_disk_says_so_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(2)}}, path)
    good = path.read_bytes()

    def full_disk(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 4160 vs 4054")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match=f"no space left on device writing {path}") as error:
        io.save_checkpoint({"state_dict": {"w": torch.zeros(2)}}, path)
    assert error.value.errno == errno.ENOSPC
    assert path.read_bytes() == good and sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    assert torch.equal(load_checkpoint_file(path)["state_dict"]["w"], torch.ones(2))


def test_unreadable_and_small_images_are_found_at_setup(tmp_path):
    from PIL import Image

    from datamodules import ImageFolderDataModule
    from datamodules.sources import UnreadableImagesError

    for i in range(6):
        Image.new("RGB", (40, 40) if i else (8, 8), (i * 30, 0, 0)).save(tmp_path / f"ok{i}.png")
    (tmp_path / "broken.png").write_bytes(b"not an image at all")
    data = ImageFolderDataModule(data_dir=str(tmp_path), image_size=16, resolutions=[16], batch_size=2)
    with pytest.raises(UnreadableImagesError, match="broken.png") as error:
        data.setup("fit")
    assert "bad_images: skip" in str(error.value)
    skipping = ImageFolderDataModule(data_dir=str(tmp_path), image_size=16, resolutions=[16], batch_size=2,
                                     bad_images="skip")
    with pytest.warns(UserWarning) as warned:
        skipping.setup("fit")
    messages = [str(w.message) for w in warned]
    assert any("leaving out 1 unreadable" in m for m in messages)
    assert any(m.startswith("1 of 6 images") and "upscaled" in m for m in messages)
    assert len(skipping.datasets["train"]) + len(skipping.datasets["val"]) == 6


def test_a_checkpoint_loads_and_samples_from_python_as_the_readme_says(glow_checkpoint):
    from flows.quantization import to_uint8
    from lightning_modules import GlowModule

    module = GlowModule.load_from_checkpoint(glow_checkpoint, map_location="cpu").eval()
    torch.manual_seed(0)
    x = module.model.sample(8, None, 1.0)
    assert x.shape == (8, 3, 16, 16) and torch.isfinite(x).all()
    # Model space is not clamped (the exact inverse); to_uint8 clamps into the data range.
    images = to_uint8(x, module.n_bits)
    assert images.dtype == torch.uint8
    step = 256 // 2 ** module.n_bits  # the outermost bin centres are step / 2 and 256 - step / 2
    assert int(images.min()) >= step // 2 and int(images.max()) <= 256 - step // 2


# --- signals, requeue, diverged runs, step checkpoints (issue 23: 2, 6, 7, 8, 12) ----------------
# QUICKSTART has 4 steps per epoch; two epochs validate (and save last.ckpt) at steps 4 and 8.
@pytest.fixture(scope="module")
def sigterm_run(tmp_path_factory):
    """SIGTERM in step 6 of a run of 8 steps per epoch (no validation yet) that saves
    every 4 steps."""
    root = tmp_path_factory.mktemp("sigterm")
    code, err = fit_capturing(root, "--data.init_args.train_size", "64",
                              "--trainer.callbacks.every_n_train_steps", "4", signal_at(5, "SIGTERM"))
    return root, code, err


def test_sigterm_saves_at_the_step_end_and_exits_non_zero(sigterm_run):
    root, code, err = sigterm_run
    assert code == 128 + signal.SIGTERM, err[-3000:]
    saved = root / "checkpoints" / "last-interrupted.ckpt"
    assert f"SIGTERM: saved {saved} at step 6" in err and "ckpt_path: auto" in err
    assert load_checkpoint_file(saved)["global_step"] == 6  # the steps since the last periodic save are kept
    assert resume_checkpoint(root) == saved


def test_last_checkpoint_follows_every_n_train_steps_before_the_first_validation(sigterm_run):
    root, code, err = sigterm_run
    last = root / "checkpoints" / "last.ckpt"
    assert last.is_file(), sorted(p.name for p in root.rglob("*.ckpt"))
    assert load_checkpoint_file(last)["global_step"] == 4
    assert not (root / "checkpoints" / "best.ckpt").exists()  # top-k waits for val/bpd_16


@pytest.fixture(scope="module")
def sigint_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("sigint")
    code, err = fit_capturing(root, signal_at(5, "SIGINT"))
    return root, code, err


def test_ctrl_c_saves_the_interrupted_step_and_exits_non_zero(sigint_run):
    root, code, err = sigint_run
    assert code == 128 + signal.SIGINT, err[-3000:]
    saved = root / "checkpoints" / "last-interrupted.ckpt"
    assert f"SIGINT: saved {saved} at step 6" in err
    assert load_checkpoint_file(saved)["global_step"] == 6


@pytest.mark.slow
def test_the_ctrl_c_checkpoint_resumes_to_the_uninterrupted_run(sigint_run, tmp_path_factory):
    root, code, _ = sigint_run
    assert code == 128 + signal.SIGINT
    code, err = fit_capturing(root, "--ckpt_path", "auto")
    assert code == 0, err[-3000:]
    assert f"resuming from {root / 'checkpoints' / 'last-interrupted.ckpt'}" in err
    assert_same_training_state(root / "checkpoints" / "last.ckpt", uninterrupted_last_checkpoint(tmp_path_factory))


def test_a_run_whose_every_step_is_skipped_does_not_end_with_status_0(tmp_path):
    # 4 steps per epoch, fewer than max_skipped_steps (100): the in-step rule never fires.
    code, err = fit_capturing(tmp_path, "--model.init_args.optimizer.lr", "1e3")
    assert code == 2, err[-3000:]
    message = one_paragraph_error(err)
    assert "training ended diverged" in message and "lower learning rate" in message
    assert "The best checkpoint is none" in message
    for path in tmp_path.rglob("*.ckpt"):
        state = next(v for k, v in load_checkpoint_file(path)["callbacks"].items() if "ModelCheckpoint" in k)
        assert state["best_model_path"] == "", (path, state)  # nan is never best
    assert not (tmp_path / "checkpoints" / "best.ckpt").exists()


# --- issue 23 items 9 and 17: disk faults and bad input, one paragraph, status 2 ------------------
def test_a_read_only_default_root_dir_is_one_paragraph_with_status_2(tmp_path, capsys, monkeypatch):
    from pathlib import Path

    root = tmp_path / "read-only"
    root.mkdir()
    # Tests run as root here, where chmod does not stop writes: the file system's answer instead.
    for method in ("write_text", "write_bytes", "touch", "mkdir"):
        original = getattr(Path, method)

        def refuse(self, *args, _original=original, **kwargs):
            if Path(self).resolve().is_relative_to(root):
                raise OSError(errno.EROFS, "Read-only file system", str(self))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(Path, method, refuse)
    code, err = run_main(capsys, "fit", *QUICKSTART, "--trainer.default_root_dir", str(root))
    assert code == 2
    message = one_paragraph_error(err)
    assert "read-only file system" in message and str(root / "msflows.lock") in message
    assert "--trainer.default_root_dir" in message


def test_a_full_disk_during_training_is_one_paragraph_with_status_2(tmp_path, capsys, monkeypatch):
    def full_disk(*args, **kwargs):  # what torch's zip writer says when the disk fills
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 77120 vs 77008")

    monkeypatch.setattr(torch, "save", full_disk)
    code, err = run_main(capsys, "fit", *QUICKSTART, "--trainer.default_root_dir", str(tmp_path))
    assert code == 2
    message = one_paragraph_error(err)
    assert "no space left on device writing" in message and ".ckpt" in message and "free space" in message
    assert not list(tmp_path.rglob("*.tmp"))


def test_a_directory_as_ckpt_path_is_named_a_directory_with_its_checkpoints(glow_checkpoint, capsys, tmp_path):
    run = glow_checkpoint.parent.parent
    code, err = run_main(capsys, "fit", *QUICKSTART, "--trainer.default_root_dir", str(tmp_path),
                         "--ckpt_path", str(run))
    assert code == 2
    message = one_paragraph_error(err)
    assert "is a directory" in message and "checkpoints/last.ckpt" in message and "does not exist" not in message


@pytest.mark.parametrize("content, expected", [
    ("cascade", "written by GlowModule"),  # a file of another family
    ("truncated", "cannot read checkpoint"), ("text", "cannot read checkpoint"), ("directory", "is a directory")])
def test_load_from_checkpoint_of_a_wrong_file_is_a_checkpoint_error(content, expected, glow_checkpoint, tmp_path):
    from lightning_modules import CascadeModule, GlowModule
    from lightning_modules.errors import CheckpointError

    path = {"cascade": glow_checkpoint, "truncated": tmp_path / "cut.ckpt", "text": tmp_path / "notes.ckpt",
            "directory": glow_checkpoint.parent}[content]
    if content == "truncated":
        path.write_bytes(glow_checkpoint.read_bytes()[:5000])
    if content == "text":
        path.write_text("hello, this is not a checkpoint\n")
    module = CascadeModule if content == "cascade" else GlowModule
    with pytest.raises(CheckpointError, match=expected) as error:
        module.load_from_checkpoint(path)
    if content == "cascade":
        assert "CascadeModule" in str(error.value) and "GlowModule.load_from_checkpoint" in str(error.value)


def test_the_resolution_mismatch_advice_works_when_followed():
    from types import SimpleNamespace

    from datamodules import EmbeddedDataModule
    from flows import Glow
    from lightning_modules import GlowModule
    from lightning_modules.errors import ConfigurationError

    module = GlowModule(flow=Glow(image_size=16, scales=2, steps_per_scale=1, hidden_channels=8), n_bits=5)
    module._trainer = SimpleNamespace(datamodule=EmbeddedDataModule(image_size=8, resolutions=[8]))
    with pytest.raises(ConfigurationError) as error:
        module.setup("fit")
    message = str(error.value)
    assert "add [16] to data.init_args.resolutions" not in message  # a pyramid cannot add a larger size
    with pytest.raises(ValueError):
        EmbeddedDataModule(image_size=8, resolutions=[8, 16])
    assert "set data.init_args.image_size: 16 and data.init_args.resolutions: [16]" in message
    module._trainer = SimpleNamespace(datamodule=EmbeddedDataModule(image_size=16, resolutions=[16]))
    module.setup("fit")  # the advice, followed


def parser_error(err: str) -> str:
    """A bad argument: one line, the cause first, no usage page and no tree of alternatives."""
    lines = [line for line in err.split("\n--- stdout ---")[0].splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-3000:]
    return lines[0]


def test_a_per_stage_temperature_list_in_sample_grids_is_one_line(tmp_path, capsys):
    grids = tmp_path / "grids.yaml"
    grids.write_text("trainer:\n  callbacks:\n    - class_path: lightning_modules.SampleGrids\n"
                     "      init_args: {temperatures: [[0.8, 0.8, 0.8]]}\n")
    code, err = run_main(capsys, "fit", *TINY_CASCADE, "--config", str(grids), "--trainer.default_root_dir",
                         str(tmp_path))
    assert code == 2
    line = parser_error(err)
    assert line.startswith("error: trainer.callbacks: lightning_modules.SampleGrids: temperatures: Expected a float")
    assert "[0.8, 0.8, 0.8]" in line


def test_a_misspelt_class_path_names_the_cause_first(tmp_path, capsys):
    code, err = run_main(capsys, "fit", *QUICKSTART, "--model", "lightning_modules.GlowModul",
                         "--trainer.default_root_dir", str(tmp_path))
    assert code == 2
    line = parser_error(err)
    assert line.startswith("error: model: lightning_modules.GlowModul: module 'lightning_modules' has no "
                           "attribute 'GlowModul' (did you mean lightning_modules.GlowModule?)")
