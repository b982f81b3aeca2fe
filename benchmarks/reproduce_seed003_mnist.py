"""Seed 003's MNIST comparison (Table 5.4, with Table 5.2's MNIST row) at reduced compute,
on the MNIST files at hand, in one command:

    python -m benchmarks.reproduce_seed003_mnist                  # ../shared/data/mnist, CPU
    python -m benchmarks.reproduce_seed003_mnist --steps 3000 --out runs/seed003_mnist

What it does:

1. **Data**: the MNIST *test* split only (the training files are not on this machine),
   split by ``MNISTDataModule(fit_split="test", val_per_class=100)``: 9,000 images to
   train, 1,000 held out (100 per class, a fixed permutation, seed 0), padded to 32x32.
   Where the folder is absent it says so and exits 0.
2. **FID features**: ``experiments/mnist_classifier.yaml`` trains the LeNet classifier on
   the 9,000 training images (``--classifier-epochs``); its penultimate features are the
   ``mnist-lenet`` extractor of every FID here. FIDs on it compare with each other, not
   with Inception FIDs nor with the seed's (its classifier is not described).
3. **Models**: the pixel DDPM, NSF, Diffused-Flows and the project's Glow, each from its
   shipped config (``experiments/{pixel_ddpm,nsf,diffusion_flow,glow}_mnist.yaml``) with
   only size and step budget changed (:data:`SIZE` and :func:`budget`, printed with the
   table and written beside each derived config in ``--out``): the same number of
   steps and batch size for all, Adam as shipped, warm-ups and EMA decays shortened
   to fit the budget, 8-bit images for all (the Glow config models 5 bits; bits per dim
   of 8-bit data are comparable only at 8 bits). The number of diffusion steps T stays
   as shipped (DDPM 1000, Diffused-Flows 500): sampling time depends on it.
   Cost: on CPU the DDPMs' evaluation dominates (the bound is T denoiser passes per
   image, 25 ancestral samples T passes, each FID sample 50 DDIM passes): on a 2-core
   VM the defaults did not fit in 90 minutes beside other work (the first attempt spent
   over 15 minutes on the pixel DDPM's bound alone): lower ``--bound-images`` and
   ``--fid-samples`` there. Trainings and evaluation run on the CPU (a GPU device
   option is still to come).
4. **Per model**: held-out bits per dim of the 8-bit images: exact for the flows (all
   1,000 images), an upper bound (the full T-step bound, labelled) for the two DDPMs on
   ``--bound-images`` of them; FID of ``--fid-samples`` samples (temperature 1; the DDPMs
   with DDIM, 50 steps) against the 1,000 held-out images; seconds to sample 25 images
   (the DDPMs both ancestrally over all T steps and with DDIM 50); a 5x5 sample grid
   (``docs/figures/seed003_mnist_<model>.png`` with ``--figures``).

Output: one markdown table (date, machine, command) on stdout, in ``--out/table.md``,
and the raw numbers in ``--out/results.json``. ``--retime`` measures the sampling times
of that run again from its checkpoints (for a run that shared the CPU), and says so;
``--resume`` goes on with a run that stopped (the models finished so far are kept in
``results.partial.json``; an unfinished one trains again). ``--smoke`` runs the whole path at toy
sizes in about a minute (the test suite runs it on a fake MNIST folder). Not a test.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "mnist"

# Seed 003 Table 5.4 (MNIST; loss, FID, seconds for 25 samples) and Table 5.2's MNIST row
# (NLL 0.93, FID 1.85 for Diffused-Flows, the same model).
SEED_TABLE = {
    "pixel_ddpm": {"name": "DDPM", "seed_loss": "0.029 (MSE)", "seed_fid": "1.05", "seed_seconds": "28.97"},
    "nsf": {"name": "NSF", "seed_loss": "1.03 (NLL)", "seed_fid": "2.58", "seed_seconds": "0.21"},
    "diffused_flows": {"name": "Diffused-Flows", "seed_loss": "0.93 (NLL)", "seed_fid": "1.85",
                       "seed_seconds": "15.12"},
    "glow": {"name": "Glow (this project)", "seed_loss": "-", "seed_fid": "-", "seed_seconds": "-"},
}
SEED_NOTE = ("The seed's NLL values (0.93 MNIST and 0.58 CelebA for Diffused-Flows, 1.03 and 2.86 for NSF) "
             "state no units and no bound. As bits per dim of 8-bit images they are not plausible: 0.58 on "
             "CelebA is far below any published CelebA likelihood (about 2 bits/dim and more at 64x64), and "
             "0.93 on MNIST would beat the best published flows on 28x28 MNIST (about 0.97-1.05 bits/dim) "
             "with a fraction of their size; a per-pixel loss in nats, a 5-bit or padded-image figure, or a "
             "training-loss value would all fit. They are quoted here, not compared with our bits/dim. The "
             "DDPM's loss is its L_simple (a squared error), not a likelihood.")

CONFIGS = {"pixel_ddpm": "experiments/pixel_ddpm_mnist.yaml", "nsf": "experiments/nsf_mnist.yaml",
           "diffused_flows": "experiments/diffusion_flow_mnist.yaml", "glow": "experiments/glow_mnist.yaml"}
MODULES = {"pixel_ddpm": "PixelDiffusionModule", "nsf": "GlowModule", "diffused_flows": "DiffusionFlowModule",
           "glow": "GlowModule"}

# Size reductions: (dotted path under model.init_args, value). Everything else is shipped.
UNET = "model.init_args.denoiser.init_args"
DF_UNET = "flow.init_args.joint_prior.init_args.denoiser.init_args"
SIZE = {
    "pixel_ddpm": [(f"{UNET}.base_channels", 16), (f"{UNET}.num_res_blocks", 1)],
    "nsf": [("flow.init_args.steps_per_scale", 4), ("flow.init_args.coupling_net.init_args.num_blocks", 1)],
    "diffused_flows": [("flow.init_args.steps_per_scale", 2),
                       ("flow.init_args.coupling_net.init_args.num_blocks", 1),
                       (f"{DF_UNET}.base_channels", 16), (f"{DF_UNET}.num_res_blocks", 1)],
    "glow": [("flow.init_args.steps_per_scale", 4), ("flow.init_args.hidden_channels", 128),
             ("n_bits", 8)],
}
SMOKE_SIZE = {
    "pixel_ddpm": [(f"{UNET}.base_channels", 8), (f"{UNET}.num_res_blocks", 1), ("model.init_args.timesteps", 20)],
    "nsf": [("flow.init_args.steps_per_scale", 1), ("flow.init_args.hidden_channels", 8),
            ("flow.init_args.coupling_net.init_args.num_blocks", 1)],
    "diffused_flows": [("flow.init_args.steps_per_scale", 1), ("flow.init_args.hidden_channels", 8),
                       ("flow.init_args.coupling_net.init_args.num_blocks", 1), (f"{DF_UNET}.base_channels", 8),
                       (f"{DF_UNET}.num_res_blocks", 1), ("flow.init_args.joint_prior.init_args.timesteps", 10)],
    "glow": [("flow.init_args.steps_per_scale", 1), ("flow.init_args.hidden_channels", 8), ("n_bits", 8)],
}
DDIM_STEPS = 50
PARTIAL = "results.partial.json"  # the models finished so far (``--resume`` keeps them)
CHILD_ENVIRONMENT: dict[str, str] = {}  # extra environment of the training subprocesses


def set_path(tree: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    for key in keys[:-1]:
        if key not in tree:
            raise KeyError(f"{dotted}: {key!r} is not in the shipped config; the config changed, update SIZE")
        tree = tree[key]
    tree[keys[-1]] = value


def budget(config: dict, args, run_dir: Path) -> dict:
    """The same step budget for every model, and what a short run needs (no W&B, no
    in-run sampling or FID, the last checkpoint only)."""
    config = copy.deepcopy(config)
    config["ckpt_path"] = None
    trainer = config["trainer"]
    trainer.update({"accelerator": "cpu", "devices": 1, "max_epochs": -1, "max_steps": args.steps,
                    "default_root_dir": str(run_dir), "limit_val_batches": 0, "num_sanity_val_steps": 0,
                    "log_every_n_steps": 50, "enable_progress_bar": False,
                    "logger": {"class_path": "pytorch_lightning.loggers.CSVLogger",
                               "init_args": {"save_dir": str(run_dir), "name": "log"}}})
    callbacks = [{"class_path": "lightning_modules.ModelCheckpoint",
                  "init_args": {"save_last": True, "monitor": None}}]
    # EMA as shipped, but with a time constant (1 / (1 - decay)) of a tenth of the run.
    for callback in trainer.get("callbacks", []):
        if isinstance(callback, dict) and callback.get("class_path", "").endswith("EMAWeights"):
            decay = callback.get("init_args", {}).get("decay", 0.999)
            callbacks.append({"class_path": "lightning_modules.EMAWeights",
                              "init_args": {"decay": max(0.0, min(decay, 1.0 - 10.0 / args.steps))}})
    trainer["callbacks"] = callbacks
    model = config["model"]["init_args"]
    for key in ("optimizer", "flow_optimizer", "diffusion_optimizer"):
        settings = model.get(key)
        if isinstance(settings, dict):  # warm-up: at most a tenth of the run
            if "warmup_steps" in settings:
                settings["warmup_steps"] = min(settings["warmup_steps"], args.steps // 10)
            if settings.get("warmup_epochs"):
                settings.pop("warmup_epochs")
                settings["warmup_steps"] = args.steps // 10
    data = config["data"]["init_args"]
    data.update({"data_dir": str(args.data_dir), "fit_split": "test", "val_per_class": args.val_per_class,
                 "batch_size": args.batch, "eval_batch_size": 250, "num_workers": 1})
    return config


def derived_config(name: str, args, run_dir: Path) -> dict:
    with open(ROOT / CONFIGS[name]) as handle:
        config = budget(yaml.safe_load(handle), args, run_dir)
    for path, value in (SMOKE_SIZE if args.smoke else SIZE)[name]:
        set_path(config["model"]["init_args"], path, value)
    if name == "glow":  # the module's n_bits follows the model's 8 bits
        config["model"]["init_args"]["n_bits"] = 8
    return config


def run(command: list[str], log: Path) -> float:
    started = time.perf_counter()
    with open(log, "w") as handle:
        result = subprocess.run(command, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT,
                                env={**os.environ, "WANDB_MODE": "disabled", **CHILD_ENVIRONMENT})
    if result.returncode != 0:
        tail = log.read_text().splitlines()[-25:]
        raise RuntimeError(f"{' '.join(command)} failed (exit {result.returncode}); the end of {log}:\n"
                           + "\n".join(tail))
    return time.perf_counter() - started


def train_classifier(args, out: Path) -> Path:
    weights = out / "mnist_lenet.pt"
    with open(ROOT / "experiments/mnist_classifier.yaml") as handle:
        config = yaml.safe_load(handle)
    run_dir = out / "mnist_classifier"
    config["trainer"].update({"accelerator": "cpu", "max_epochs": args.classifier_epochs,
                              "default_root_dir": str(run_dir), "enable_progress_bar": False,
                              "limit_train_batches": 2 if args.smoke else 1.0,
                              "logger": {"class_path": "pytorch_lightning.loggers.CSVLogger",
                                         "init_args": {"save_dir": str(run_dir), "name": "log"}}})
    config["model"]["init_args"]["export_path"] = str(weights)
    config["data"]["init_args"].update({"data_dir": str(args.data_dir), "fit_split": "test",
                                        "val_per_class": args.val_per_class, "num_workers": 1})
    if args.smoke:
        config["data"]["init_args"]["batch_size"] = args.batch
    path = out / "mnist_classifier.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    run([sys.executable, "-m", "lightning_modules.cli", "fit", "--config", str(path)], out / "mnist_classifier.log")
    accuracy = classifier_accuracy(run_dir)
    print(f"classifier: held-out accuracy {accuracy}", flush=True)
    return weights


def classifier_accuracy(run_dir: Path) -> float | None:
    import csv
    for metrics in sorted(run_dir.rglob("metrics.csv")):
        rows = [row for row in csv.DictReader(open(metrics)) if row.get("val/acc")]
        if rows:
            return float(rows[-1]["val/acc"])
    return None


@torch.no_grad()
def evaluate(name: str, config: dict, checkpoint: Path, weights: Path, args, figures: Path | None) -> dict:
    import lightning_modules
    from datamodules import MNISTDataModule
    from flows.quantization import bits_per_dim, to_uint8
    from lightning_modules.metrics import FIDSettings, ImagesAtResolution, TensorImages, fidelity
    from torchvision.utils import save_image

    module = getattr(lightning_modules, MODULES[name]).load_from_checkpoint(str(checkpoint), map_location="cpu")
    module.eval()
    diffusion = getattr(module.model, "joint_prior", None) or getattr(module.model, "diffusion", None)
    limit = args.bound_images if diffusion is not None else None
    settings = dict(config["data"]["init_args"])
    if limit:  # batches no larger than the images the T-step bound is computed on
        settings["eval_batch_size"] = min(limit, 50)
    data = MNISTDataModule(**settings)
    data.setup("fit")
    held_out = data.val_dataloader()
    print(f"{name}: evaluating ({'the T-step bound on ' + str(limit) if limit else 'all'} held-out images, "
          f"{args.fid_samples} samples for FID)", flush=True)
    bpd, seen = [], 0
    started = time.perf_counter()
    for index, batch in enumerate(held_out):
        torch.manual_seed(module.evaluation_seed + 7919 * index)
        out = module.evaluate_batch(module.prepare_batch(batch, noise=True))
        values = bits_per_dim(out.log_prob[32], out.dims[32], module.n_bits)
        bpd.append(values[: (limit - seen) if limit else None])
        seen += len(bpd[-1])
        if limit and seen >= limit:
            break
    bpd = torch.cat(bpd)
    exact = out.exact.get(32, True)
    evaluation_seconds = time.perf_counter() - started

    def sample(n: int) -> torch.Tensor:
        return module.sample_images(n, 1.0)[32]

    result = {"held_out_bpd": bpd.mean().item(), "held_out_bpd_standard_error": (bpd.std() / math.sqrt(len(bpd))).item(),
              "bpd_images": len(bpd), "bpd_is_bound": not exact, "bpd_seconds": evaluation_seconds,
              "parameters_millions": sum(p.numel() for p in module.parameters()) / 1e6}
    times, grid = sampling_times(module, diffusion)
    result.update(times)
    fake = []
    for start in range(0, args.fid_samples, 250):
        fake.append(to_uint8(sample(min(250, args.fid_samples - start)).cpu(), 8))
    settings = FIDSettings(num_samples=args.fid_samples, feature_extractor="mnist-lenet",
                           feature_weights=str(weights), batch_size=250)
    real = ImagesAtResolution(data.datasets["val"], 32)
    result["fid"] = fidelity(TensorImages(torch.cat(fake)), real, settings, None, cuda=False)["fid"]
    if figures is not None:
        figures.mkdir(parents=True, exist_ok=True)
        save_image(to_uint8(grid.cpu(), 8).float() / 255.0, figures / f"seed003_mnist_{name}.png", nrow=5, padding=1)
    return result


@torch.no_grad()
def sampling_times(module, diffusion) -> tuple[dict, torch.Tensor]:
    """Seconds for 25 samples (seed 003 Table 5.4) and the 25 samples of the grid: the
    DDPMs over all T steps (one call: its T denoiser passes warm themselves up) and with
    DDIM (after a warm-up call); the flows after a warm-up call. Leaves a DDPM sampling
    with DDIM (as the FID samples are drawn)."""
    def sample(n: int) -> torch.Tensor:
        return module.sample_images(n, 1.0)[32]

    torch.manual_seed(2024)
    result = {}
    if diffusion is not None:
        full_steps = diffusion.timesteps
        diffusion.sampling_steps = None
        started = time.perf_counter()
        sample(25)
        result["sampling_seconds_25"] = time.perf_counter() - started
        diffusion.sampling_steps = min(DDIM_STEPS, full_steps)
        result["timesteps"] = full_steps
    sample(25)  # warm-up
    started = time.perf_counter()
    grid = sample(25)
    result["sampling_seconds_25_ddim" if diffusion is not None else "sampling_seconds_25"] = \
        time.perf_counter() - started
    return result, grid


def retime(args, parser) -> int:
    """``--retime``: the sampling times of an earlier run in ``--out`` measured again from
    its checkpoints (run it with nothing else on the machine), every other number kept;
    the table is rewritten and says so."""
    import lightning_modules

    path = args.out / "results.json"
    if not path.is_file():
        raise SystemExit(f"--retime needs an earlier run's {path}; run the command without --retime first")
    saved = json.loads(path.read_text())
    for name, row in saved["results"].items():
        checkpoint = next((args.out / name).rglob("last.ckpt"))
        module = getattr(lightning_modules, MODULES[name]).load_from_checkpoint(str(checkpoint), map_location="cpu")
        module.eval()
        diffusion = getattr(module.model, "joint_prior", None) or getattr(module.model, "diffusion", None)
        row.update(sampling_times(module, diffusion)[0])
        print(f"{name}: {row['sampling_seconds_25']:.2f} s for 25 samples"
              + (f", DDIM {row['sampling_seconds_25_ddim']:.2f} s" if "sampling_seconds_25_ddim" in row else ""),
              flush=True)
    saved["sampling_retimed"] = time.strftime("%Y-%m-%d %H:%M")
    # The run's settings, read back from its results (the table states them).
    run = argparse.Namespace(**{key: int(value) for key, value in saved["args"].items()
                                if key in ("steps", "batch", "fid_samples", "train_images", "held_out_images")})
    argv = saved.get("argv") or [f"--{key.replace('_', '-')} {value}" for key, value in saved["args"].items()
                                 if key not in ("out", "data_dir", "train_images", "held_out_images")
                                 and str(parser.get_default(key)) != value and value not in ("False", "None")]
    text = table(saved["results"], run, saved["fid_floor"], saved["classifier_accuracy"], argv,
                 retimed=saved["sampling_retimed"])
    print(text)
    (args.out / "table.md").write_text(text + "\n")
    path.write_text(json.dumps(saved, indent=1))
    return 0


@torch.no_grad()
def data_floor(args, weights: Path) -> float:
    """FID of 1,000 *training* images against the held-out 1,000: what a perfect model
    would score at this sample size on these features."""
    from datamodules import MNISTDataModule
    from lightning_modules.metrics import FIDSettings, ImagesAtResolution, fidelity
    from torch.utils.data import Subset

    data = MNISTDataModule(data_dir=str(args.data_dir), image_size=32, resolutions=[32], fit_split="test",
                           val_per_class=args.val_per_class, num_workers=0)
    data.setup("fit")
    train, held_out = data.datasets["train"], data.datasets["val"]
    args.train_images, args.held_out_images = len(train), len(held_out)
    n = min(args.fid_samples, len(train))
    settings = FIDSettings(num_samples=n, feature_extractor="mnist-lenet", feature_weights=str(weights),
                           batch_size=250)
    return fidelity(ImagesAtResolution(Subset(train, range(n)), 32), ImagesAtResolution(held_out, 32), settings,
                    None, cuda=False)["fid"]


def table(results: dict, args, floor: float | None, accuracy: float | None, argv: list[str],
          retimed: str | None = None) -> str:
    lines = [f"Seed 003 Table 5.4 at reduced compute: {time.strftime('%Y-%m-%d')}, {platform.node()} "
             f"({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads), torch "
             f"{torch.__version__}.",
             f"Command: `python -m benchmarks.reproduce_seed003_mnist {' '.join(argv)}`",
             f"Budget: {args.steps} steps of batch {args.batch} for every model ({args.train_images:,} training "
             f"images, {args.steps * args.batch / args.train_images:.1f} epochs), CPU. FID: {args.fid_samples} samples at temperature 1 "
             f"vs the {args.held_out_images:,} held-out images on the mnist-lenet features (the LeNet trained on the "
             f"same training images; held-out accuracy {accuracy if accuracy is not None else 'n/a'}); training images score "
             f"{floor:.2f} at this size (the floor)." if floor is not None else "",
             "",
             "| model | params (M) | held-out bits/dim | FID (mnist-lenet) | 25 samples, s | train min | "
             "seed 003: loss | FID | 25 samples, s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, row in results.items():
        seed = SEED_TABLE[name]
        kind = f"<= {row['held_out_bpd']:.3f} (bound, {row['bpd_images']} imgs)" if row["bpd_is_bound"] \
            else f"{row['held_out_bpd']:.3f} (exact)"
        seconds = f"{row['sampling_seconds_25']:.2f}"
        if "sampling_seconds_25_ddim" in row:
            seconds = f"{seconds} (T={row['timesteps']}); {row['sampling_seconds_25_ddim']:.2f} (DDIM {DDIM_STEPS})"
        lines.append(f"| {seed['name']} | {row['parameters_millions']:.2f} | {kind} | {row['fid']:.2f} | {seconds} | "
                     f"{row['train_seconds'] / 60:.1f} | {seed['seed_loss']} | {seed['seed_fid']} | "
                     f"{seed['seed_seconds']} |")
    if retimed:
        lines += ["", f"Sampling times measured again on {retimed} from the run's checkpoints with nothing else "
                      "running (`--retime`): the run's own timings shared the CPU with other work."]
    lines += ["", SEED_NOTE]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "seed003_mnist")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--fid-samples", type=int, default=1000)
    parser.add_argument("--bound-images", type=int, default=100,
                        help="held-out images for the DDPMs' T-step bound (the flows use all)")
    parser.add_argument("--classifier-epochs", type=int, default=3)
    parser.add_argument("--val-per-class", type=int, default=100)
    parser.add_argument("--models", default="pixel_ddpm,nsf,diffused_flows,glow")
    parser.add_argument("--figures", type=Path, default=None, help="write the sample grids here (docs/figures)")
    parser.add_argument("--smoke", action="store_true", help="toy sizes: checks the path, numbers mean nothing")
    parser.add_argument("--resume", action="store_true",
                        help="go on with a run in --out that stopped: keep its classifier and finished models "
                             f"({PARTIAL}), train and evaluate the others")
    parser.add_argument("--retime", action="store_true",
                        help="measure the sampling times of the run in --out again from its checkpoints (with "
                             "nothing else running) and rewrite its table")
    args = parser.parse_args(argv)
    raw = args.data_dir / "MNIST" / "raw"
    if not any((raw / f"t10k-images-idx3-ubyte{ext}").is_file() for ext in ("", ".gz")):
        print(f"skipped: no MNIST test split under {raw} (t10k-images-idx3-ubyte[.gz]); pass --data-dir "
              "to the folder that holds MNIST/raw")
        return 0
    if args.smoke:
        args.fid_samples, args.bound_images = min(args.fid_samples, 40), min(args.bound_images, 4)
    threads = torch.get_num_threads()
    try:
        if args.smoke:  # one thread: tiny ops on a shared 2-core machine stall with more
            torch.set_num_threads(1)
            CHILD_ENVIRONMENT["OMP_NUM_THREADS"] = "1"
        return retime(args, parser) if args.retime else reproduce(args, parser, argv)
    finally:  # the caller's process (a test session) keeps its settings
        torch.set_num_threads(threads)
        CHILD_ENVIRONMENT.pop("OMP_NUM_THREADS", None)


def reproduce(args, parser, argv) -> int:
    names = [name.strip() for name in args.models.split(",")]
    unknown = [name for name in names if name not in CONFIGS]
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {', '.join(CONFIGS)}")
    partial = args.out / PARTIAL
    if args.resume and partial.is_file():  # a run that stopped: its finished models are kept
        done = json.loads(partial.read_text())
        print(f"resuming {args.out}: {', '.join(done) or 'no model'} done", flush=True)
    else:
        done = {}
        if args.out.exists():
            shutil.rmtree(args.out)
        args.out.mkdir(parents=True)
    weights = args.out / "mnist_lenet.pt"
    if not (args.resume and weights.is_file()):
        weights = train_classifier(args, args.out)
    accuracy = classifier_accuracy(args.out / "mnist_classifier")
    floor = data_floor(args, weights)
    results = {}
    for name in names:
        if name in done:
            results[name] = done[name]
            continue
        run_dir = args.out / name
        if run_dir.exists():  # an unfinished model trains again from the start
            shutil.rmtree(run_dir)
        config = derived_config(name, args, run_dir)
        path = args.out / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        print(f"{name}: training ({CONFIGS[name]} with {SMOKE_SIZE[name] if args.smoke else SIZE[name]})", flush=True)
        seconds = run([sys.executable, "-m", "lightning_modules.cli", "fit", "--config", str(path)],
                      args.out / f"{name}.log")
        checkpoint = next(run_dir.rglob("last.ckpt"))
        results[name] = {"train_seconds": seconds, "config": CONFIGS[name],
                         "size_changes": SMOKE_SIZE[name] if args.smoke else SIZE[name],
                         **evaluate(name, config, checkpoint, weights, args, args.figures)}
        print(f"{name}: {json.dumps(results[name])}", flush=True)
        partial.write_text(json.dumps(results, indent=1))
    text = table(results, args, floor, accuracy, sys.argv[1:] if argv is None else argv)
    print(text)
    (args.out / "table.md").write_text(text + "\n")
    (args.out / "results.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                       "argv": sys.argv[1:] if argv is None else argv,
                                                       "fid_floor": floor, "classifier_accuracy": accuracy,
                                                       "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
