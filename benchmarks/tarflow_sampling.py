"""TarFlow's sampler with and without the key/value cache (flows/tarflow.py), and the
cached one compiled (``--compile``: its patch step over the static-shape cache, one graph
for every patch and block): the same samples (max abs difference printed), and seconds
per call of each; the compiled sampler's first call (its compilation) apart.

    python -m benchmarks.tarflow_sampling                      # the quick config's model, CPU
    python -m benchmarks.tarflow_sampling --compile            # + the compiled cached sampler
    python -m benchmarks.tarflow_sampling --device cuda --config experiments/tarflow_imagenet64.yaml --n 16

The model is built from a YAML that ``lightning fit`` trains, untrained but perturbed
off its identity initialization (the cost of sampling does not depend on the weights;
the equality of the two samplers is only meaningful away from the identity). Prints a
markdown row and one JSON line. Not a test: the numbers depend on the machine.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from benchmarks.timing import time_steps


def measure(config: str, n: int = 16, repeats: int = 3, device: str = "cpu", compile: bool = False,
            compile_mode: str | None = None, compile_backend: str = "inductor", uncached: bool = True,
            overrides: list[str] | None = None) -> dict:
    """Seconds per call of the cached sampler, and of the uncached one and/or the compiled
    cached one, on the TarFlow that ``config`` builds (``overrides``: command-line
    settings), untrained but perturbed off its identity initialization."""
    from lightning_modules.cli import build_cli

    cli = build_cli(["--config", config, "--trainer.logger", "false", "--trainer.accelerator", "cpu",
                     *(overrides or [])], run=False)
    model = cli.model.model.to(device).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
        z = torch.randn(n, model.in_channels, model.image_size, model.image_size, device=device)
        cond = {"labels": torch.arange(n, device=device) % model.num_classes} if model.num_classes else None
        cached = model.decode([z], cond)
        where = torch.device(device)

        def seconds(flag: bool = True) -> float:
            return time_steps(lambda: model.decode([z], cond, cached=flag), where, 1, repeats)[0] / repeats

        row = {"config": config, "device": device, "n": n, "patches": model.blocks[0].num_patches,
               "blocks": len(model.blocks), "parameters": sum(p.numel() for p in model.parameters()),
               "cached_s": seconds()}
        row["cached_images_per_s"] = n / row["cached_s"]
        if uncached:
            reference = model.decode([z], cond, cached=False)
            row.update(uncached_s=seconds(False), max_abs_difference=float((cached - reference).abs().max()))
            row["speedup"] = row["uncached_s"] / row["cached_s"]
        if compile:
            model.compile_sampler(mode=compile_mode, backend=compile_backend)
            start = time.perf_counter()
            compiled = model.decode([z], cond)
            if where.type == "cuda":
                torch.cuda.synchronize()
            row.update(compiled_first_call_s=time.perf_counter() - start, compiled_s=seconds(),
                       compiled_max_abs_difference=float((compiled - cached).abs().max()))
            row["compiled_images_per_s"] = n / row["compiled_s"]
    return row


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="experiments/quick_tarflow.yaml")
    parser.add_argument("--n", type=int, default=16, help="samples per call")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compile", action="store_true", help="also the compiled cached sampler")
    parser.add_argument("--compile-mode", default=None, help="torch.compile's mode (reduce-overhead: CUDA graphs)")
    parser.add_argument("--no-uncached", dest="uncached", action="store_false",
                        help="skip the uncached reference (T - 1 full passes: slow at large T)")
    args = parser.parse_args(argv)
    row = measure(args.config, args.n, args.repeats, args.device, args.compile, args.compile_mode,
                  uncached=args.uncached)
    nan = float("nan")
    print("| config | device | n | patches | cached s | uncached s | speed-up | max abs diff | compiled s "
          "(first call) | compiled / cached |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {args.config} | {args.device} | {args.n} | {row['patches']} | {row['cached_s']:.3f} | "
          f"{row.get('uncached_s', nan):.3f} | {row.get('speedup', nan):.1f}x | "
          f"{row.get('max_abs_difference', nan):.1e} | {row.get('compiled_s', nan):.3f} "
          f"({row.get('compiled_first_call_s', nan):.1f}) | {row.get('compiled_s', nan) / row['cached_s']:.2f} |")
    print(json.dumps(row))
    return row


if __name__ == "__main__":
    main()
