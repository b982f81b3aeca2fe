"""TarFlow's input scale on two settings: the project's [-0.5, 0.5] (``input_scale: 1``)
against ml-tarflow's [-1, 1] (``input_scale: 2``), the same model, data, seeds and steps.

    python -m benchmarks.tarflow_input_scale                 # photos 16x16 and MNIST 16x16, seeds 0-2
    python -m benchmarks.tarflow_input_scale --steps 100 --seeds 0

Each run: a small TarFlow (16x16x{3,1}, patch 2, 4 blocks of 2 layers, 64 channels) trained
with AdamW (0.9, 0.95) at ``--lr`` on batches of 32, uniform dequantization; held-out
bits/dim (exact, the same fixed dequantization noise for every run) at the listed steps.
The figure is of the images in model space in both arms (the scale's log-det is in the
likelihood), so the numbers compare. Settings: the embedded photos (scikit-learn /
scikit-image, 2,048 / 256) and the MNIST test split at ../shared/data/mnist (9,000 /
1,000; skipped where absent). Not a test: numbers depend on the machine's RNG streams
only, but the README quotes a run.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
MNIST = ROOT.parent / "shared" / "data" / "mnist"


def datasets(name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(train, held-out) uint8 images at 16x16."""
    if name == "photos":
        from datamodules import EmbeddedDataModule
        data = EmbeddedDataModule(image_size=16, resolutions=[16], train_size=2048, val_size=256)
    else:
        if not (MNIST / "MNIST" / "raw").is_dir():
            return None
        from datamodules import MNISTDataModule
        data = MNISTDataModule(data_dir=str(MNIST), image_size=16, resolutions=[16], fit_split="test",
                               val_per_class=100, num_workers=0)
    data.setup("fit")
    return tuple(torch.stack([split[i]["images"][16] for i in range(len(split))])
                 for split in (data.datasets["train"], data.datasets["val"]))


def run(train: torch.Tensor, held_out: torch.Tensor, scale: float, seed: int, steps: int, lr: float,
        report: list[int]) -> dict[int, float]:
    from flows.quantization import bits_per_dim, dequantize
    from flows.tarflow import TarFlow

    torch.manual_seed(seed)
    model = TarFlow(in_channels=train.shape[1], image_size=16, patch_size=2, channels=64, blocks=4,
                    layers_per_block=2, head_channels=32, input_scale=scale)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=1e-4)
    clean_held_out = dequantize(held_out, 8, noise=False)
    fixed_noise = torch.rand(held_out.shape, generator=torch.Generator().manual_seed(1234))
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for step in range(1, steps + 1):
        batch = train[torch.randint(0, len(train), (32,), generator=generator)]
        model.train()
        loss = model.training_loss(dequantize(batch, 8, noise=False), n_bits=8).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step in report:
            model.eval()
            with torch.no_grad():
                objective = model.training_loss(clean_held_out, n_bits=8, noise=fixed_noise)
            out[step] = bits_per_dim(objective.log_prob, objective.dims, 8).mean().item()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--settings", default="photos,mnist")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    report = sorted({min(50, args.steps), args.steps})
    print(f"TarFlow input scale: {time.strftime('%Y-%m-%d')}, {torch.get_num_threads()} threads; {args.steps} steps "
          f"of batch 32, AdamW lr {args.lr}, seeds {seeds}; held-out bits/dim, mean +- std over seeds\n")
    print("| setting | input | " + " | ".join(f"step {s}" for s in report) + " | wins (lower at the last step) |")
    print("|---|---|" + "---:|" * len(report) + "---|")
    for setting in args.settings.split(","):
        data = datasets(setting)
        if data is None:
            print(f"| {setting} | skipped: no data | " + " | " * len(report))
            continue
        results = {scale: [run(*data, scale, seed, args.steps, args.lr, report) for seed in seeds]
                   for scale in (1.0, 2.0)}
        wins = sum(a[report[-1]] < b[report[-1]] for a, b in zip(results[1.0], results[2.0]))
        for scale, name in ((1.0, "[-0.5, 0.5] (input_scale 1)"), (2.0, "[-1, 1] (input_scale 2)")):
            cells = []
            for step in report:
                values = [r[step] for r in results[scale]]
                spread = statistics.stdev(values) if len(values) > 1 else 0.0
                cells.append(f"{statistics.mean(values):.3f} +- {spread:.3f}")
            mine = wins if scale == 1.0 else len(seeds) - wins
            print(f"| {setting} | {name} | " + " | ".join(cells) + f" | {mine} of {len(seeds)} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
