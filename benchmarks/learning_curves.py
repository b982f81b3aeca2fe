"""How fast and how stably Glow learns: held-out bits/dim curves over several seeds, loss
spike counts, for this project's Glow with and without the options the Glow literature
uses against spikes and slow starts, and for normflows' Glow of the same architecture.

    python -m benchmarks.learning_curves --steps 500 --seeds 0 1 2 --out runs/learning_curves

Data: the MNIST test split in ../shared/data (9,000 images to train on, the other 1,000
held out), resized to ``--image-size``; ``--data embedded`` uses the embedded photo
crops instead. Every run sees the same batches and dequantization noise for a seed, so
variants differ only by the model and the optimizer options.

Training: Adam at ``--lr`` without warm-up unless a variant adds one, the loss is the
mean negative log-likelihood in bits/dim of uniformly dequantized 8-bit data. Every
``--eval-every`` steps the held-out bits/dim (the exact NLL of the dequantized held-out
images under fixed noise, a flow's honest figure) is recorded.

Spikes: a step whose training loss exceeds the median of the previous ``--window``
steps by more than ``--spike-margin`` bits/dim (after the first ``--window`` steps).

Output: a markdown table (held-out bits/dim at a few steps as mean +- std over seeds,
spike counts per seed, final bits/dim) and a JSON file with every curve, plus a PNG of
the mean curves with their spread.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch

from flows import Glow
from flows.quantization import bits_per_dim, dequantize
from flows.nets import CouplingNet
from lightning_modules.parts import OptimizerGroup, OptimizerSettings, RelativeGradientClipping, build_optimizer


@dataclass
class Variant:
    """One way of training: Glow keyword arguments and optimizer options."""

    glow: dict = field(default_factory=dict)
    net: dict = field(default_factory=dict)
    warmup_steps: int = 0
    clip_norm: float | None = None
    clip_relative: float | None = None  # lightning_modules.parts.RelativeGradientClipping's factor
    peer: bool = False
    # OptimizerSettings fields over Adam at --lr (e.g. the TarFlow authors' AdamW and
    # cosine decay), built by the project's own build_optimizer; empty: plain Adam.
    optimizer: dict = field(default_factory=dict)


VARIANTS = {
    "adam, no warm-up": Variant(),
    "+ warm-up": Variant(warmup_steps=100),
    "+ actnorm in nets": Variant(net={"actnorm": True}),
    "+ edge padding": Variant(net={"edge_padding": True}),
    "+ scale bound (squish)": Variant(glow={"scale_fn": "squish"}),
    "+ grad clip": Variant(clip_norm=50.0),  # below the median gradient norm (~60 here): clips most steps
    "+ grad clip (loose)": Variant(clip_norm=100.0),  # clips only the larger gradients
    "+ relative grad clip": Variant(clip_relative=2.0),  # 2x the running average norm, any model size
    "normflows": Variant(peer=True),
    # apple/ml-tarflow's recipe (train.py, utils.CosineLRSchedule) on a Glow: AdamW (0.9, 0.95),
    # weight decay 1e-4, cosine to 1e-6 over the run (the warm-up comes from the variant).
    "+ adamw cosine": Variant(optimizer={"algorithm": "adamw", "betas": (0.9, 0.95), "weight_decay": 1e-4,
                                          "decay": "cosine", "lr_floor": 1e-6}),
}


def load_mnist(image_size: int) -> torch.Tensor:
    from datamodules.pyramid import resize_uint8
    from datamodules.sources import MNISTIdx
    root = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
    images = MNISTIdx(str(root), "test", image_size=28).images.unsqueeze(1)
    return resize_uint8(images, image_size) if image_size != 28 else images


def load_embedded(image_size: int, channels: int) -> torch.Tensor:
    from datamodules.sources import EmbeddedImages
    train = EmbeddedImages(9000, image_size, channels, split="train").images
    held_out = EmbeddedImages(1000, image_size, channels, split="val").images
    return torch.cat([train, held_out])


def build(variant: Variant, args, channels: int):
    """(model, per-sample nll function)."""
    if variant.peer:
        from benchmarks.peers import build_peer_glow
        peer = build_peer_glow(in_channels=channels, image_size=args.image_size, scales=args.scales,
                               steps_per_scale=args.steps_per_scale, hidden_channels=args.hidden)
        return peer.model, peer.nll
    glow = Glow(in_channels=channels, image_size=args.image_size, scales=args.scales,
                steps_per_scale=args.steps_per_scale, hidden_channels=args.hidden,
                coupling_net=partial(CouplingNet, **variant.net), **variant.glow)
    return glow, lambda x: -glow.log_prob(x)


def count_spikes(losses: list[float], window: int, margin: float) -> int:
    spikes = 0
    for step in range(window, len(losses)):
        if not math.isfinite(losses[step]) or losses[step] > np.median(losses[step - window:step]) + margin:
            spikes += 1
    return spikes


def run(variant: Variant, seed: int, data: torch.Tensor, args) -> dict:
    train, held_out = data[:-args.held_out], data[-args.held_out:]
    dims = data[0].numel()
    generator = torch.Generator().manual_seed(seed)
    held_out_x = dequantize(held_out, 8, torch.rand(held_out.shape, generator=generator))
    torch.manual_seed(seed)
    model, nll = build(variant, args, data.shape[1])
    settings = OptimizerSettings.adam(args.lr, warmup_steps=variant.warmup_steps, **variant.optimizer)
    built = build_optimizer([OptimizerGroup("model", list(model.parameters()), settings)], lambda: args.steps,
                            lambda: args.steps)
    optimizer, schedule = built["optimizer"], built["lr_scheduler"]["scheduler"]
    relative = RelativeGradientClipping(variant.clip_relative) if variant.clip_relative else None
    losses, curve, grad_norms = [], [], []

    def evaluate(step: int) -> None:
        model.eval()
        with torch.no_grad():
            values = [bits_per_dim(-nll(held_out_x[i:i + 250]), dims) for i in range(0, len(held_out_x), 250)]
        curve.append((step, torch.cat(values).mean().item()))
        model.train()

    start = time.perf_counter()
    model.train()
    for step in range(args.steps):
        indices = torch.randint(len(train), (args.batch,), generator=generator)
        x = dequantize(train[indices], 8, torch.rand((args.batch, *train.shape[1:]), generator=generator))
        if step == 0:
            with torch.no_grad():
                nll(x)  # ActNorm's data-dependent initialization, in both implementations
            evaluate(0)
        loss = bits_per_dim(-nll(x), dims).mean()
        optimizer.zero_grad(set_to_none=True)
        if torch.isfinite(loss):
            loss.backward()
            threshold = min(variant.clip_norm or math.inf, relative.threshold() if relative else math.inf)
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), threshold)
            grad_norms.append(norm.item())
            if torch.isfinite(norm):
                optimizer.step()
                if relative is not None:
                    relative.update(norm.item())
        schedule.step()
        losses.append(loss.item())
        if (step + 1) % args.eval_every == 0:
            evaluate(step + 1)
    return {"seed": seed, "curve": curve, "losses": losses, "seconds": time.perf_counter() - start,
            "spikes": count_spikes(losses, args.window, args.spike_margin),
            "grad_norm_median": float(np.median(grad_norms)) if grad_norms else None}


def summarize(results: dict, args) -> str:
    steps = [s for s, _ in next(iter(results.values()))[0]["curve"]]
    shown = sorted({steps[len(steps) // 4], steps[len(steps) // 2], steps[(3 * len(steps)) // 4], steps[-1]})
    header = ("| variant | " + " | ".join(f"held-out bpd @{s}" for s in shown)
              + " | spikes per seed | s per run |")
    lines = [header, "|" + "---|" * (len(shown) + 3)]
    for name, runs in results.items():
        cells = []
        for s in shown:
            values = np.array([dict(r["curve"])[s] for r in runs])
            cells.append(f"{values.mean():.3f} +- {values.std():.3f}")
        spikes = ", ".join(str(r["spikes"]) for r in runs)
        seconds = np.mean([r["seconds"] for r in runs])
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {spikes} | {seconds:.0f} |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for index, (name, runs) in enumerate(results.items()):
        steps = np.array([s for s, _ in runs[0]["curve"]])
        values = np.array([[v for _, v in r["curve"]] for r in runs])
        mean, low, high = values.mean(0), values.min(0), values.max(0)
        color = plt.cm.tab20(index % 20)
        axis.plot(steps, mean, label=name, color=color, linestyle=("-", "--", ":")[index // 7 % 3])
        axis.fill_between(steps, low, high, alpha=0.15, color=color)
    axis.set_xlabel("training step")
    axis.set_ylabel("held-out bits/dim (exact NLL)")
    finite = [v for runs in results.values() for r in runs for _, v in r["curve"][1:] if math.isfinite(v)]
    if finite:
        axis.set_ylim(min(finite) - 0.1, min(max(finite), np.percentile(finite, 95) + 0.5))
    axis.legend(fontsize=8)
    axis.set_title("Glow learning curves: mean over seeds, band = min..max")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", choices=["mnist", "embedded"], default="mnist")
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--channels", type=int, default=3, help="embedded data only (MNIST is grey)")
    parser.add_argument("--scales", type=int, default=2)
    parser.add_argument("--steps-per-scale", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--held-out", type=int, default=1000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--window", type=int, default=50)
    parser.add_argument("--spike-margin", type=float, default=0.5, help="bits/dim above the running median")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), help=f"of {list(VARIANTS)}")
    parser.add_argument("--combined", default=None,
                        help="an extra variant combining others, e.g. '+ warm-up,+ grad clip'")
    parser.add_argument("--out", type=Path, default=Path("runs/learning_curves"))
    parser.add_argument("--merge", type=Path, nargs="+", default=None,
                        help="no training: one table and plot of the runs in these output folders (same settings)")
    args = parser.parse_args()
    if args.merge:
        results, header = {}, ""
        for folder in args.merge:
            results.update(json.loads((folder / "learning_curves.json").read_text())["results"])
            header = header or (folder / "learning_curves.md").read_text().split("\n\n")[0]
        write_outputs(results, header + f"\n(merged from {', '.join(map(str, args.merge))})\n", args)
        return

    variants = {name: VARIANTS[name] for name in args.variants}
    if args.combined:
        parts = [VARIANTS[name.strip()] for name in args.combined.split(",")]
        variants["combined: " + args.combined] = Variant(
            glow={k: v for p in parts for k, v in p.glow.items()}, net={k: v for p in parts for k, v in p.net.items()},
            warmup_steps=max(p.warmup_steps for p in parts),
            clip_relative=min((p.clip_relative for p in parts if p.clip_relative), default=None),
            clip_norm=min((p.clip_norm for p in parts if p.clip_norm), default=None),
            optimizer={k: v for p in parts for k, v in p.optimizer.items()})
    data = load_mnist(args.image_size) if args.data == "mnist" else load_embedded(args.image_size, args.channels)
    results = {}
    for name, variant in variants.items():
        results[name] = [run(variant, seed, data, args) for seed in args.seeds]
        print(name, [(r["curve"][-1][1], r["spikes"], round(r["seconds"])) for r in results[name]], flush=True)
    command = "python -m benchmarks.learning_curves " + " ".join(
        f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
        for k, v in vars(args).items() if k not in ("variants", "out", "combined") and v is not None)
    header = (f"Glow learning curves, {time.strftime('%Y-%m-%d')}, {args.data} {args.image_size}x{args.image_size}, "
              f"L={args.scales} K={args.steps_per_scale} hidden={args.hidden}, batch {args.batch}, Adam lr {args.lr}, "
              f"{args.steps} steps, seeds {args.seeds}, spike = loss > running median({args.window}) + "
              f"{args.spike_margin} bpd\n`{command}`\n")
    write_outputs(results, header, args)


def write_outputs(results: dict, header: str, args) -> None:
    table = summarize(results, args)
    print(header)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "learning_curves.md").write_text(header + "\n" + table + "\n")
    (args.out / "learning_curves.json").write_text(json.dumps(
        {"settings": {k: str(v) for k, v in vars(args).items()}, "results": results}))
    plot(results, args.out / "learning_curves.png")


if __name__ == "__main__":
    main()
