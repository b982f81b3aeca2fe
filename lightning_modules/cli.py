"""The `lightning` command (and its alias `msflows`): LightningCLI in subclass mode for
the model and the data, e.g. ``lightning fit --config experiments/quickstart.yaml``.

Cluster behaviour (README "Running on a cluster"):
* ``fit`` takes the folder's :class:`RunLock` (one live run per ``default_root_dir``) and
  removes the temporary files of killed checkpoint writes.
* ``ckpt_path: auto`` resumes from the newest readable of ``hpc_ckpt_*.ckpt`` (SLURM
  requeue) and every ``last*.ckpt`` under ``trainer.default_root_dir`` (a broken one is
  moved aside), or starts fresh when none exists.
* The config the user wrote wins over a checkpoint's saved hyper-parameters: a
  checkpoint that does not fit the configured model fails before training starts
  (LightningCLI would otherwise build the checkpoint's model instead).
* ``--trainer.default_root_dir DIR`` on the command line moves the whole run (lock,
  ``ckpt_path: auto``, W&B id, and the loggers' ``save_dir``: checkpoints, logs, samples)
  to DIR (:func:`follow_default_root_dir`).
* Errors a user can fix (``errors.py``, a missing dataset, a constructor argument that
  cannot work, a full or read-only disk) print one paragraph and exit with status 2; so
  does a bad argument, its cause first (:class:`MsflowsArgumentParser`).
* Checkpoints are written atomically (:class:`AtomicCheckpointIO`).
* Every run gets the :class:`~lightning_modules.exact_resume.ExactResume` callback (RNG
  states in checkpoints, mid-epoch resume), whether or not the config lists it.
* Every run gets :class:`~lightning_modules.signals.SignalCheckpoint`: SIGTERM, Ctrl-C and
  the SLURM requeue signal save a checkpoint at the end of the current step (and requeue),
  then the process exits with status 128 + signal number.
* A WandbLogger without an ``id`` gets the one stored in
  ``default_root_dir/wandb_run_id.txt`` (created on the first launch), so a requeued job
  continues the same W&B run; the resolved config is logged to W&B.
"""
from __future__ import annotations

import difflib
import importlib
import inspect
import os
import re
import signal
import sys
from pathlib import Path

import pytorch_lightning as pl
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from jsonargparse import Namespace
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.utilities.exceptions import SIGTERMException

from datamodules import PyramidDataModule
from datamodules.sources import DatasetNotFoundError, DataSettingsError
from lightning_modules.evaluation import RunSummary
from lightning_modules.exact_resume import ExactResume
from lightning_modules.checkpoint_files import AtomicCheckpointIO, storage_error
from lightning_modules.run_folder import RunLock, persistent_wandb_id, remove_stale_temporaries, resume_checkpoint
from lightning_modules.errors import ConfigurationError, UsageError
from lightning_modules.lightning_internals import ConfigOverCheckpointCLI
from lightning_modules.signals import SignalCheckpoint


def is_launch_process() -> bool:
    """True in the process a user or srun started as rank 0; False in the other ranks."""
    for variable in ("RANK", "LOCAL_RANK", "SLURM_PROCID"):
        if os.environ.get(variable, "0") != "0":
            return False
    return True


class SaveConfigToLoggers(SaveConfigCallback):
    """Writes config.yaml to the log folder (Lightning's behaviour) and logs the resolved
    config to W&B."""

    def save_config(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                resolved = self.parser.dump(self.config, skip_none=False, format="json")
                import json

                logger.experiment.config.update({"resolved_config": json.loads(resolved)},
                                                allow_val_change=True)


def constructor_reason(message: str) -> str:
    """When a constructor refuses an argument, jsonargparse wraps its message in a page
    about union subtypes and the whole resolved namespace: keep the constructor's words."""
    lines = message.splitlines()
    if "Errors:" in lines:
        for line in lines[lines.index("Errors:") + 1:]:
            if line.strip().startswith("- ") and not line.strip().startswith("- Expected a"):
                return line.strip()[2:]
    return lines[0] if lines else message


_PARSER_NOISE = ("Does not validate against", "Subtypes:", "Errors:", "Given value", "Expected a <class 'NoneType'>",
                 "Expected a path but", "Not a valid subclass of", "Parser key", "Problem with given class_path")
_PARSER_CONTEXT = (re.compile(r'\s*(?:- )?Parser key "([^"]+)"'),
                   re.compile(r"\s*(?:- )?Problem with given class_path '([^']+)'"))


def parser_cause(message: str) -> str:
    """jsonargparse reports a bad value as a tree (every union alternative it tried, the
    whole value, 20 to 60 lines, the cause near the end): keep the deepest cause with the
    keys and class paths above it, on one line."""
    lines = message.splitlines()

    def indent(line: str) -> int:
        return len(line) - len(line.lstrip())

    cause, skip_below = None, None
    for i, line in enumerate(lines):
        text = line.strip().removeprefix("- ")
        if skip_below is not None and indent(line) > skip_below:
            continue  # the list of forms a class may take, not a cause
        skip_below = indent(line) if text.startswith("Subclass types expect") else None
        if text and not text.startswith(_PARSER_NOISE) and skip_below is None:
            if cause is None or indent(line) > indent(lines[cause]):
                cause = i
    if cause is None:
        return next((line.strip() for line in lines if line.strip()), message)
    context, level = [], indent(lines[cause])
    for line in reversed(lines[:cause]):
        match = next((m for m in (p.match(line) for p in _PARSER_CONTEXT) if m), None)
        if match and indent(line) < level:
            context.insert(0, match.group(1))
            level = indent(line)
    text = re.sub(r"<class '([\w.]+)'>", r"\1", lines[cause].strip().removeprefix("- "))
    given = next((line.strip()[len("Given value: "):] for line in lines[cause + 1:]
                  if line.strip().startswith("Given value: ") and indent(line) <= indent(lines[cause])), None)
    if given is not None and "Got value" not in text and given not in context:
        text += f", got {given}"
    option = re.match(r"Option '(\w+)[.\w]*' is not accepted", text)
    owner = next((c for c in reversed(context) if "." in c), None)
    if option and owner and not accepts(owner, option.group(1)):
        # A setting for an argument the class does not have at all (a dequantizer for a
        # model without one): name the argument, not the nested option jsonargparse tried.
        module, _, name = owner.rpartition(".")
        try:
            arguments = [p for p in inspect.signature(getattr(importlib.import_module(module), name)).parameters
                         if p not in ("self", "args", "kwargs")]
        except (ImportError, AttributeError, ValueError, TypeError):
            arguments = []
        text = (f"{owner} has no argument {option.group(1)!r}, so this config cannot set it there"
                + (f" (its arguments: {', '.join(arguments)})" if arguments else ""))
        return ": ".join([*context, text])
    missing = re.match(r"module '([\w.]+)' has no attribute '(\w+)'", text)
    if missing:  # a misspelt class path: name the closest one
        try:
            names = dir(importlib.import_module(missing.group(1)))
        except ImportError:
            names = []
        close = difflib.get_close_matches(missing.group(2), names, n=1)
        if close:
            text += f" (did you mean {missing.group(1)}.{close[0]}?)"
    return ": ".join([*context, text])


class MsflowsArgumentParser(LightningArgumentParser):
    """Reports a bad argument in one paragraph, the cause first, instead of the usage
    page and jsonargparse's tree (``MSFLOWS_TRACEBACK=1`` or ``JSONARGPARSE_DEBUG=1``:
    the full report)."""

    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error or os.environ.get("MSFLOWS_TRACEBACK") or os.environ.get("JSONARGPARSE_DEBUG"):
            return super().error(message, ex)  # nested parses catch the ArgumentError this raises
        self._logger.error(message)
        prog = (getattr(ex, "subcommand_parser", None) or self).prog.replace(" [options]", "")
        sys.stderr.write(f"error: {parser_cause(message)}. Run `{prog} --help` for the options "
                         "(MSFLOWS_TRACEBACK=1 prints the parser's full report).\n")
        self.exit(2)


def given_on_command_line(argv: list[str], key: str) -> bool:
    """True when ``--key``, ``--key=...`` or a key below it (``--key.x``) is an argument,
    or a value given to ``--key``'s parent (e.g. ``--trainer.logger '{...}'``) names it."""
    flag = f"--{key}"
    if any(a == flag or a.startswith((f"{flag}=", f"{flag}.")) for a in argv):
        return True
    parent, _, leaf = key.rpartition(".")
    return any(a.startswith(f"--{parent}") and leaf in " ".join(argv[i:i + 2]) for i, a in enumerate(argv))


def accepts(class_path: str, argument: str) -> bool:
    module, _, name = class_path.rpartition(".")
    try:
        return argument in inspect.signature(getattr(importlib.import_module(module), name)).parameters
    except (ImportError, AttributeError, ValueError, TypeError):
        return False


def follow_default_root_dir(config: Namespace, argv: list[str]) -> None:
    """``--trainer.default_root_dir DIR`` on the command line moves the whole run there.
    The configs' loggers name their own ``save_dir`` (where checkpoints, logs and samples
    go), while the run lock, ``ckpt_path: auto`` and the W&B id look in
    ``default_root_dir``: so every logger's ``save_dir``, and a ModelCheckpoint
    ``dirpath`` below a logger's old folder, follow DIR, unless the command line sets the
    logger's ``save_dir`` itself."""
    if not given_on_command_line(argv, "trainer.default_root_dir"):
        return
    if given_on_command_line(argv, "trainer.logger.init_args.save_dir") or \
            given_on_command_line(argv, "trainer.logger.save_dir"):
        return
    root = config.trainer.default_root_dir
    loggers = config.trainer.logger
    moved = []
    for logger in loggers if isinstance(loggers, list) else [loggers]:
        class_path = getattr(logger, "class_path", "") or ""
        init_args = getattr(logger, "init_args", None)
        if init_args is None or not accepts(class_path, "save_dir"):
            continue
        old = init_args.get("save_dir")
        if old is not None and os.path.normpath(str(old)) != os.path.normpath(root):
            moved.append(Path(old))
        init_args["save_dir"] = root
    callbacks = config.trainer.get("callbacks")
    for callback in callbacks if isinstance(callbacks, list) else [callbacks] if callbacks else []:
        init_args = getattr(callback, "init_args", None)
        dirpath = init_args.get("dirpath") if init_args is not None else None
        for old in moved if dirpath else []:
            if Path(dirpath).is_relative_to(old):
                init_args["dirpath"] = str(Path(root) / Path(dirpath).relative_to(old))
                break


def check_trainer_accumulation(config: Namespace) -> None:
    """``trainer.accumulate_grad_batches`` with a module that optimizes manually (every
    flow family) is refused by Lightning with a traceback at fit start: say where the
    setting lives instead, before anything is built."""
    k = config.trainer.get("accumulate_grad_batches") or 1
    if k == 1:
        return
    class_path = getattr(config.get("model"), "class_path", "") or ""
    module, _, name = class_path.rpartition(".")
    try:
        from lightning_modules.base import FlowModule

        manual = issubclass(getattr(importlib.import_module(module), name), FlowModule)
    except (ImportError, AttributeError, TypeError, ValueError):
        manual = False
    if manual:
        raise ConfigurationError(
            f"trainer.accumulate_grad_batches is {k}, but {name} optimizes manually, where Lightning's "
            f"accumulation does not apply: set model.init_args.accumulate_grad_batches: {k} instead "
            f"(--model.init_args.accumulate_grad_batches {k}) and leave the trainer's at 1")


def check_config_files(argv: list[str]) -> None:
    """A config file that is not valid YAML: name the file, the cause and the line, in one
    paragraph (jsonargparse gives only "line 38, column 17")."""
    import yaml

    paths = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a in ("--config", "-c")]
    paths += [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    for path in paths:
        if not os.path.isfile(path):
            continue  # jsonargparse reports a missing file itself
        try:
            with open(path) as handle:
                yaml.safe_load(handle)
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "somewhere"
            line = ""
            if mark:
                lines = Path(path).read_text().splitlines()
                line = f": `{lines[mark.line].rstrip()}`" if mark.line < len(lines) else ""
            problem = getattr(error, "problem", None) or str(error).splitlines()[0]
            context = getattr(error, "context", None)
            raise ConfigurationError(
                f"{path} is not valid YAML: {problem}{' (' + context + ')' if context else ''} at {where}{line}. "
                "Check the indentation and the quoting there (a value with ': ' or a leading '{', '[' or '*' "
                "needs quotes)") from None


def evaluation_logs_in_run_folder(config: Namespace, subcommand: str) -> None:
    """``lightning test`` / ``validate`` / ``predict`` of ``<run>/checkpoints/X.ckpt``: the
    CSV / TensorBoard logger records into ``<run>/<subcommand>_X/`` instead of opening a
    near-empty ``version_N`` beside the run (metrics.json and the analyses already go to
    ``<run>``). Left alone: other loggers (W&B opens its own run), a checkpoint outside a
    ``checkpoints/`` folder, a run folder that cannot be written."""
    ckpt = config.get("ckpt_path")
    if not ckpt or not os.path.isfile(str(ckpt)):
        return
    folder = Path(str(ckpt)).resolve().parent
    if folder.name != "checkpoints" or not os.access(folder.parent, os.W_OK):
        return
    loggers = config.trainer.logger
    for logger in loggers if isinstance(loggers, list) else [loggers]:
        class_path = getattr(logger, "class_path", "") or ""
        init_args = getattr(logger, "init_args", None)
        if init_args is None or not class_path.endswith(("CSVLogger", "TensorBoardLogger")):
            continue
        init_args["save_dir"] = str(folder.parent)
        init_args["name"] = ""
        init_args["version"] = f"{subcommand}_{Path(str(ckpt)).stem}"


class MsflowsCLI(ConfigOverCheckpointCLI):
    run_lock: RunLock | None = None

    command_line: list[str] = []

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        # What the command line itself set (not a config file) decides follow_default_root_dir.
        listed = sys.argv[1:] if args is None else args if isinstance(args, (list, tuple)) else []
        self.command_line = [str(a) for a in listed]
        super().parse_arguments(parser, args)

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        check_trainer_accumulation(config)
        follow_default_root_dir(config, self.command_line)
        root = config.trainer.default_root_dir or "."
        if self.subcommand == "fit" and is_launch_process():
            MsflowsCLI.run_lock = RunLock(root).acquire()
            for path in remove_stale_temporaries(root):
                print(f"removed {path}, left by a checkpoint write that was cut short", file=sys.stderr)
        if self.subcommand in ("test", "validate", "predict"):
            evaluation_logs_in_run_folder(config, self.subcommand)
        loggers = config.trainer.logger
        for logger in loggers if isinstance(loggers, list) else [loggers]:
            class_path = getattr(logger, "class_path", "") or ""
            if class_path.endswith("WandbLogger") and not logger.init_args.get("id"):
                logger.init_args["id"] = persistent_wandb_id(root)
        if config.get("ckpt_path") == "auto":
            newest = resume_checkpoint(root, move_aside=is_launch_process())
            config.ckpt_path = str(newest) if newest else None
            print(f"ckpt_path auto: {'resuming from ' + str(newest) if newest else 'no checkpoint, starting fresh'}",
                  file=sys.stderr)

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except ValueError as error:  # a constructor refused an argument: say it in one paragraph
            if isinstance(error, UsageError):
                raise
            raise ConfigurationError(constructor_reason(str(error))) from error

    def instantiate_trainer(self, **kwargs) -> pl.Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        if not any(isinstance(c, ExactResume) for c in trainer.callbacks):
            trainer.callbacks.append(ExactResume())
        if not any(isinstance(c, RunSummary) for c in trainer.callbacks):
            trainer.callbacks.append(RunSummary())  # where the files are, at the start and the end
        if not any(isinstance(c, SignalCheckpoint) for c in trainer.callbacks):
            trainer.callbacks.append(SignalCheckpoint())  # SIGTERM / Ctrl-C / SLURM requeue: save, then stop
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer


def main(args=None) -> None:
    """Console-script entry (returns None, so the exit status is 0 on success). Errors a
    user can fix print one paragraph and exit with 2 (MSFLOWS_TRACEBACK=1: the traceback)."""
    try:
        check_config_files(sys.argv[1:] if args is None else [str(a) for a in args])
        build_cli(args)
    except (UsageError, DatasetNotFoundError, DataSettingsError) as error:
        if os.environ.get("MSFLOWS_TRACEBACK"):
            raise
        # The message says what was expected and how to fix it; a traceback would bury it.
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except SIGTERMException:
        # Lightning's SIGTERM handler, before training started (SignalCheckpoint takes
        # over from the first step): nothing new to save, but the run did not finish.
        print("stopped by SIGTERM before the first training step; nothing new to save (exit status 143)",
              file=sys.stderr)
        raise SystemExit(128 + signal.SIGTERM) from None
    except OSError as error:
        # A disk fault outside the checkpoint and lock writes (a logger's file, a figure).
        problem = storage_error(error, str(error.filename or "a file of the run"))
        if problem is None or os.environ.get("MSFLOWS_TRACEBACK"):
            raise
        print(f"error: {problem}", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        if MsflowsCLI.run_lock is not None:
            MsflowsCLI.run_lock.release()
            MsflowsCLI.run_lock = None


def integers_first(function) -> None:
    """Make every ``int``-or-``float`` parameter of ``function`` try ``int`` first, as its
    source says (``limit_val_batches: Optional[Union[int, float]]``: an int is a number
    of batches, a float a fraction). Python < 3.14 caches ``typing.Union`` by equality,
    and ``Union[int, float] == Union[float, int]``: lightning_fabric creates
    ``Optional[Union[float, int]]`` first, so the Trainer's annotations come out
    float-first and jsonargparse, trying the members in order, reads ``1`` as ``1.0``
    (all batches; issue 23 item 10). ``int | float`` (types.UnionType) is not cached."""
    import functools
    import operator
    import typing

    annotations = getattr(function, "__annotations__", {})
    for name, annotation in list(annotations.items()):
        members = typing.get_args(annotation)
        if typing.get_origin(annotation) is typing.Union and int in members and float in members \
                and members.index(float) < members.index(int):
            ordered = (int, float, *(m for m in members if m not in (int, float)))
            annotations[name] = functools.reduce(operator.or_, ordered)


# Lightning's lines on every run that a user of this project cannot act on (matched by the
# start of the message, so the project's own warnings and Lightning's other ones still show):
THIRD_PARTY_NOISE = (
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",  # Lightning's own call into torch's pytree
    # `lightning test` and resumes: the checkpoint's ModelCheckpoint is not in the test config
    # (the configs choose the callbacks; a resume restores the ones configured).
    r"Be aware that when using `ckpt_path`, callbacks used to create the checkpoint need to be provided",
    r"Checkpoint directory .* exists and is not empty",  # a resume or a test in its run's folder
)
THIRD_PARTY_TIPS = ("\N{ELECTRIC LIGHT BULB} Tip:",)  # litlogger / litmodels adverts (logged, not warned)


class _DropTips:
    def filter(self, record) -> bool:
        return not str(record.msg).startswith(THIRD_PARTY_TIPS)


_DROP_TIPS = _DropTips()


def silence_third_party_noise() -> None:
    import warnings

    import lightning_utilities.core.rank_zero as rank_zero

    for message in THIRD_PARTY_NOISE:
        warnings.filterwarnings("ignore", message=message)
    rank_zero.log.addFilter(_DROP_TIPS)  # the logger rank_zero_info writes to (adds it once)


def build_cli(args=None, run: bool = True) -> LightningCLI:
    integers_first(pl.Trainer.__init__)
    silence_third_party_noise()
    return MsflowsCLI(pl.LightningModule, PyramidDataModule, subclass_mode_model=True,
                      parser_class=MsflowsArgumentParser,
                      subclass_mode_data=True,
                      # A requeued job relaunches into the same folder: overwrite the saved config.
                      save_config_callback=SaveConfigToLoggers,
                      save_config_kwargs={"overwrite": True},
                      # Each family configures its own optimizer and schedule (seed settings).
                      auto_configure_optimizers=False,
                      # Any LightningModule: the flow families (FlowModule) and the RRDB
                      # pre-training (RRDBPretrainModule).
                      args=args, run=run)


if __name__ == "__main__":
    main()
