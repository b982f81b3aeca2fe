"""TarFlow's sampler with and without the key/value cache (flows/tarflow.py): the same
samples (max abs difference printed), and seconds per call of each.

    python -m benchmarks.tarflow_sampling                      # the quick config's model, CPU
    python -m benchmarks.tarflow_sampling --device cuda --config experiments/tarflow_imagenet64.yaml --n 16

The model is built from a YAML that ``lightning fit`` trains, untrained but perturbed
off its identity initialization (the cost of sampling does not depend on the weights;
the equality of the two samplers is only meaningful away from the identity). Prints a
markdown row and one JSON line. Not a test: the numbers depend on the machine.
"""
from __future__ import annotations

import argparse
import json

import torch

from benchmarks.timing import time_steps


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="experiments/quick_tarflow.yaml")
    parser.add_argument("--n", type=int, default=16, help="samples per call")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    from lightning_modules.cli import build_cli

    cli = build_cli(["--config", args.config, "--trainer.logger", "false", "--trainer.accelerator", "cpu"], run=False)
    model = cli.model.model.to(args.device).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
        z = torch.randn(args.n, model.in_channels, model.image_size, model.image_size, device=args.device)
        cond = {"labels": torch.arange(args.n, device=args.device) % model.num_classes} if model.num_classes else None
        cached = model.decode([z], cond)
        uncached = model.decode([z], cond, cached=False)
        device = torch.device(args.device)
        seconds = {name: time_steps(lambda flag=flag: model.decode([z], cond, cached=flag), device, 1,
                                    args.repeats)[0] / args.repeats
                   for name, flag in (("cached", True), ("uncached", False))}
    row = {"config": args.config, "device": args.device, "n": args.n,
           "patches": model.blocks[0].num_patches, "blocks": len(model.blocks),
           "max_abs_difference": float((cached - uncached).abs().max()),
           "cached_s": seconds["cached"], "uncached_s": seconds["uncached"],
           "speedup": seconds["uncached"] / seconds["cached"]}
    print("| config | device | n | patches | cached s | uncached s | speed-up | max abs diff |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {args.config} | {args.device} | {args.n} | {row['patches']} | {row['cached_s']:.3f} | "
          f"{row['uncached_s']:.3f} | {row['speedup']:.1f}x | {row['max_abs_difference']:.1e} |")
    print(json.dumps(row))
    return row


if __name__ == "__main__":
    main()
