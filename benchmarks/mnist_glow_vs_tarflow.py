"""Glow against TarFlow on the MNIST data at hand, side by side, in one command:

    python -m benchmarks.mnist_glow_vs_tarflow                          # ../shared/data/mnist, CPU
    python -m benchmarks.mnist_glow_vs_tarflow --steps 1500 --figures docs/figures

What it does:

1. **Data**: the MNIST test split (the only one here), as in
   ``benchmarks/seed_claims.py``: 9,000 images to train, 1,000 held out
   (100 per class), padded to 32x32, 8 bits. Where the folder is absent it says so and
   exits 0.
2. **FID features**: the LeNet of ``experiments/mnist_classifier.yaml`` trained on the
   9,000 training images (the ``mnist-lenet`` extractor); FIDs compare with each other
   only. The floor (1,000 training images against the held-out ones) is printed.
3. **Models** (:data:`MODELS`), at about equal parameters and step time on CPU: Glow with
   the project's defaults (``experiments/glow_mnist.yaml``'s flow and module, actnorm
   coupling nets, relative clipping) cut to L=3, K=8, 128 hidden; TarFlow with 4x4
   patches, 4 blocks of 2 layers, 96 channels. Both with Adam 1e-3 (a tenth of the run
   warm-up), batch 32, the same ``--steps``, each twice: with uniform dequantization
   (held-out bits/dim of the 8-bit images, exact) and with Gaussian noise augmentation
   (``--noise-std`` in model space; its held-out figure is the density of the noisy
   data, ``noisy_data_nll_bits``, not bits per dim).
4. **Per run**: the held-out figure every ``--eval-every`` steps, seconds per training
   step (batch 32, after warm-up, measured apart from the run), seconds for 25 samples,
   FID of ``--fid-samples`` samples at temperature 1 against the held-out images; for
   the noise runs both raw and denoised (Tweedie, ``FlowModel.denoise``) samples.

Output: a markdown table on stdout and in ``--out/table.md``, the raw numbers in
``--out/results.json``, and with ``--figures`` the learning curves
(``glow_vs_tarflow_mnist.png``) and sample grids. Not a test: it takes about an hour
on 2 CPU cores at the defaults; ``--smoke`` runs the path at toy sizes.
"""
from __future__ import annotations

import argparse
import copy
import csv
import json
import platform
import sys
import time
from pathlib import Path

import torch
import yaml

from benchmarks.seed_claims import DEFAULT_DATA, ROOT, data_floor, run, train_classifier
from benchmarks.timing import time_steps

MODELS = {
    "glow": {"class_path": "flows.Glow",
             "init_args": {"image_size": 32, "in_channels": 1, "scales": 3, "steps_per_scale": 8,
                           "hidden_channels": 128,
                           "coupling_net": {"class_path": "flows.nets.CouplingNet", "init_args": {"actnorm": True}}}},
    "tarflow": {"class_path": "flows.TarFlow",
                "init_args": {"image_size": 32, "in_channels": 1, "patch_size": 4, "channels": 96, "blocks": 4,
                              "layers_per_block": 2, "head_channels": 32}},
}
SMOKE_SIZE = {"glow": {"steps_per_scale": 1, "hidden_channels": 8},
              "tarflow": {"channels": 16, "blocks": 2, "layers_per_block": 1, "head_channels": 8}}
FIGURE = {"uniform": "val/bpd_32", "noise": "val/noisy_data_nll_bits_32"}


def config_for(model: str, dequantizer: str, args, run_dir: Path) -> dict:
    flow = copy.deepcopy(MODELS[model])
    if args.smoke:
        flow["init_args"].update(SMOKE_SIZE[model])
    if dequantizer == "noise":
        flow["init_args"]["dequantizer"] = {"class_path": "flows.dequantization.GaussianNoiseDequantizer",
                                            "init_args": {"noise_std": args.noise_std}}
    return {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_epochs": -1, "max_steps": args.steps,
                    "val_check_interval": args.eval_every, "check_val_every_n_epoch": None,
                    "num_sanity_val_steps": 0, "log_every_n_steps": 50, "enable_progress_bar": False,
                    "default_root_dir": str(run_dir),
                    "logger": {"class_path": "pytorch_lightning.loggers.CSVLogger",
                               "init_args": {"save_dir": str(run_dir), "name": "log"}},
                    "callbacks": [{"class_path": "lightning_modules.ModelCheckpoint",
                                   "init_args": {"save_last": True, "monitor": None}}]},
        "model": {"class_path": "lightning_modules.GlowModule",
                  "init_args": {"flow": flow, "n_bits": 8,
                                "optimizer": {"algorithm": "adam", "lr": args.lr, "weight_decay": 0.0,
                                              "warmup_steps": max(1, args.steps // 10)}}},
        "data": {"class_path": "datamodules.MNISTDataModule",
                 "init_args": {"data_dir": str(args.data_dir), "image_size": 32, "resolutions": [32],
                               "fit_split": "test", "val_per_class": args.val_per_class, "batch_size": args.batch,
                               "eval_batch_size": 250, "num_workers": 1}},
    }


def curve(run_dir: Path, metric: str) -> list[tuple[int, float]]:
    rows = list(csv.DictReader(open(next(run_dir.rglob("metrics.csv")))))
    return [(int(r["step"]) + 1, float(r[metric])) for r in rows if r.get(metric)]


def step_seconds(module, data, batch_size: int) -> float:
    """Seconds per optimizer step of the model's own loss (batch ``batch_size``)."""
    batch = next(iter(data.train_dataloader()))
    batch = {"images": {32: batch["images"][32][:batch_size]}, "label": batch["label"][:batch_size]}
    optimizer = torch.optim.Adam(module.model.parameters(), lr=1e-6)
    module.train()

    def step():
        loss = module.compute_losses(module.prepare_batch(batch)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return time_steps(step, torch.device("cpu"), 2, 5)[0] / 5


def sample_quality(module, data, weights: Path, args, figures: Path | None, tag: str) -> dict:
    from flows.quantization import to_uint8
    from lightning_modules.metrics import FIDSettings, ImagesAtResolution, TensorImages, fidelity
    from torchvision.utils import save_image

    module.eval()
    torch.manual_seed(2024)
    module.sample_images(25, 1.0)  # warm-up
    started = time.perf_counter()
    grid = module.sample_images(25, 1.0)[32]
    seconds = time.perf_counter() - started
    torch.manual_seed(0)
    fake = [to_uint8(module.sample_images(min(250, args.fid_samples - s), 1.0)[32].cpu(), 8)
            for s in range(0, args.fid_samples, 250)]
    settings = FIDSettings(num_samples=args.fid_samples, feature_extractor="mnist-lenet",
                           feature_weights=str(weights), batch_size=250)
    fid = fidelity(TensorImages(torch.cat(fake)), ImagesAtResolution(data.datasets["val"], 32), settings, None,
                   cuda=False)["fid"]
    if figures is not None:
        figures.mkdir(parents=True, exist_ok=True)
        save_image(to_uint8(grid.cpu(), 8).float() / 255.0, figures / f"glow_vs_tarflow_mnist_{tag}.png", nrow=5,
                   padding=1)
    return {"fid": fid, "sampling_seconds_25": seconds}


def evaluate(model: str, dequantizer: str, run_dir: Path, weights: Path, args, figures: Path | None) -> dict:
    from datamodules import MNISTDataModule
    from lightning_modules import GlowModule

    module = GlowModule.load_from_checkpoint(str(next(run_dir.rglob("last.ckpt"))), map_location="cpu")
    data = MNISTDataModule(data_dir=str(args.data_dir), image_size=32, resolutions=[32], fit_split="test",
                           val_per_class=args.val_per_class, batch_size=args.batch, num_workers=0)
    data.setup("fit")
    row = {"model": module.model_name, "dequantizer": dequantizer, "curve": curve(run_dir, FIGURE[dequantizer]),
           "parameters_millions": sum(p.numel() for p in module.model.parameters()) / 1e6,
           "step_seconds": step_seconds(module, data, args.batch)}
    row["held_out"] = row["curve"][-1][1] if row["curve"] else float("nan")
    if dequantizer == "noise":
        module.model.dequantizer.denoise_samples = False
        row["raw"] = sample_quality(module, data, weights, args, figures, f"{model}_noise_raw")
        module.model.dequantizer.denoise_samples = True
        row["denoised"] = sample_quality(module, data, weights, args, figures, f"{model}_noise_denoised")
    else:
        row["raw"] = sample_quality(module, data, weights, args, figures, f"{model}_uniform")
    print(f"{model}/{dequantizer}: {json.dumps(row)}", flush=True)
    return row


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for (ax, dequantizer, label) in ((axes[0], "uniform", "held-out bits/dim (8-bit, exact)"),
                                     (axes[1], "noise", "held-out noisy_data_nll_bits (not bits/dim)")):
        for key, row in results.items():
            if row["dequantizer"] == dequantizer and row["curve"]:
                steps, values = zip(*row["curve"])
                ax.plot(steps, values, marker="o", label=f"{row['model']} ({row['parameters_millions']:.2f} M)")
        ax.set_xlabel("training step (batch 32)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if ax.lines:  # a panel may have no runs (--runs)
            ax.legend()
    axes[0].set_title("uniform dequantization")
    axes[1].set_title("Gaussian noise augmentation")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def table(results: dict, args, floor: float) -> str:
    lines = [f"Glow vs TarFlow on MNIST: {time.strftime('%Y-%m-%d')}, {platform.node()} "
             f"({torch.get_num_threads()} threads), torch {torch.__version__}. {args.steps} steps of batch "
             f"{args.batch}, Adam {args.lr:g}; held-out figure on 1,000 images every {args.eval_every} steps; FID of "
             f"{args.fid_samples} samples (T = 1) on mnist-lenet features against the held-out images (training "
             f"images score {floor:.2f}: the floor). Noise runs: sigma = {args.noise_std:g} in model space.",
             "",
             "| model | dequantization | params (M) | s / step | held-out (final) | FID raw | FID denoised | "
             "25 samples, s |",
             "|---|---|---|---|---|---|---|---|"]
    for row in results.values():
        figure = (f"{row['held_out']:.3f} bits/dim" if row["dequantizer"] == "uniform"
                  else f"{row['held_out']:.3f} noisy_data_nll_bits")
        denoised = f"{row['denoised']['fid']:.2f}" if "denoised" in row else "-"
        seconds = f"{row['raw']['sampling_seconds_25']:.2f}"
        if "denoised" in row:
            seconds += f" ({row['denoised']['sampling_seconds_25']:.2f} denoised)"
        lines.append(f"| {row['model']} | {row['dequantizer']} | {row['parameters_millions']:.2f} | "
                     f"{row['step_seconds']:.3f} | {figure} | {row['raw']['fid']:.2f} | {denoised} | {seconds} |")
    steps = sorted({s for row in results.values() for s, _ in row["curve"]})
    lines += ["", "| held-out figure at step | " + " | ".join(map(str, steps)) + " |",
              "|---|" + "---|" * len(steps)]
    for row in results.values():
        by_step = dict(row["curve"])
        lines.append(f"| {row['model']} / {row['dequantizer']} | "
                     + " | ".join(f"{by_step[s]:.3f}" if s in by_step else "" for s in steps) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "glow_vs_tarflow_mnist")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--noise-std", type=float, default=0.025,
                        help="noise augmentation's sigma in model space ([-0.5, 0.5]; the paper's 0.05 on [-1, 1])")
    parser.add_argument("--fid-samples", type=int, default=1000)
    parser.add_argument("--classifier-epochs", type=int, default=3)
    parser.add_argument("--val-per-class", type=int, default=100)
    parser.add_argument("--runs", default="glow/uniform,tarflow/uniform,glow/noise,tarflow/noise")
    parser.add_argument("--figures", type=Path, default=None)
    parser.add_argument("--smoke", action="store_true", help="toy sizes: checks the path, numbers mean nothing")
    args = parser.parse_args(argv)
    if not (args.data_dir / "MNIST" / "raw").is_dir():
        print(f"no MNIST files under {args.data_dir}: nothing to compare (see ../shared/data/README.md)")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    args.resolution, args.bootstrap = 32, 0  # the classifier and the floor at 32x32, no interval
    weights, _ = train_classifier(args, args.out, reuse=False)
    floor = data_floor(args, weights)["fid"]
    results = {}
    for key in args.runs.split(","):
        model, dequantizer = key.split("/")
        run_dir = args.out / key.replace("/", "_")
        config = args.out / f"{key.replace('/', '_')}.yaml"
        config.write_text(yaml.safe_dump(config_for(model, dequantizer, args, run_dir), sort_keys=False))
        started = time.perf_counter()
        run([sys.executable, "-m", "lightning_modules.cli", "fit", "--config", str(config)],
            args.out / f"{key.replace('/', '_')}.log")
        print(f"{key}: trained in {time.perf_counter() - started:.0f} s", flush=True)
        results[key] = evaluate(model, dequantizer, run_dir, weights, args, args.figures)
        results[key]["train_seconds"] = time.perf_counter() - started
    text = table(results, args, floor)
    print(text)
    (args.out / "table.md").write_text(text + "\n")
    (args.out / "results.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                       "floor": floor, "results": results}, indent=1))
    if args.figures is not None:
        plot(results, args.figures / "glow_vs_tarflow_mnist.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
