"""Sampling speed of seed 003's models side by side (Tables 5.3/5.4 report seconds for 25
samples): images per second of Glow, NSF, the pixel DDPM (T steps and DDIM with S) and
the diffusion-augmented flow (T steps and DDIM with S), at the quick configs' sizes.

    python -m benchmarks.sampling_speed                      # CPU
    python -m benchmarks.sampling_speed --device cuda        # a GPU, where one is at hand

Models are built from the YAMLs that ``lightning fit`` trains (untrained weights: the
cost of sampling does not depend on them):

* Glow: ``experiments/quick_photos.yaml``; NSF: the same with spline couplings and the
  ResNet coupling net (``experiments/overrides/quick_nsf.yaml``);
* diffusion-augmented flow: ``experiments/quick_diffusion_flow.yaml`` (T from its YAML);
* pixel DDPM: the same DDPM (U-Net and schedule) on the images, with
  ``--pixel-timesteps`` steps (default 2 T: the seed's 1000 pixel steps against its 500).

Prints a markdown table and one JSON line per row. Not a test: numbers depend on the machine.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def build_module(*args: str):
    from lightning_modules.cli import build_cli

    cli = build_cli(["--trainer.logger", "false", "--trainer.accelerator", "cpu", *args], run=False)
    return cli.model


def rows(args) -> tuple[list[tuple], list[torch.nn.Module]]:
    """[(name, sample(n), denoiser passes per call)], and the models."""
    import yaml

    from flows.denoiser import TimeConditionedUNet
    from flows.diffusion import PixelDiffusion

    photos = str(REPO / "experiments/quick_photos.yaml")
    glow = build_module("--config", photos).model
    nsf = build_module("--config", photos, "--config", str(REPO / "experiments/overrides/quick_nsf.yaml")).model
    config = REPO / "experiments/quick_diffusion_flow.yaml"
    flow = build_module("--config", str(config)).model
    prior = flow.joint_prior
    steps = args.ddim_steps
    pixel_timesteps = args.pixel_timesteps or 2 * prior.timesteps
    unet = yaml.safe_load(config.read_text())["model"]["init_args"]["flow"]["init_args"]["joint_prior"]
    unet = unet["init_args"]["denoiser"]["init_args"]
    pixel = PixelDiffusion(in_channels=flow.in_channels, image_size=flow.image_size, n_bits=5,
                           denoiser=lambda i, o, s: TimeConditionedUNet(i, o, s, **unet), timesteps=pixel_timesteps,
                           variance=prior.variance)

    def with_steps(model, diffusion, sampling_steps):
        def sample(n):
            diffusion.sampling_steps = sampling_steps
            return model.sample(n)
        return sample

    return [("Glow", lambda n: glow.sample(n), 0),
            ("NSF", lambda n: nsf.sample(n), 0),
            (f"pixel DDPM, T = {pixel_timesteps}", with_steps(pixel, pixel.diffusion, None), pixel_timesteps),
            (f"pixel DDPM, DDIM S = {steps}", with_steps(pixel, pixel.diffusion, steps), steps),
            (f"diffusion flow, T = {prior.timesteps}", with_steps(flow, prior, None), prior.timesteps),
            (f"diffusion flow, DDIM S = {steps}", with_steps(flow, prior, steps), steps)], [glow, nsf, pixel, flow]


def main() -> None:
    from lightning_modules.metrics import time_sampling

    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--samples", type=int, default=25, help="per call (seed 003: 25)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ddim-steps", type=int, default=50)
    parser.add_argument("--pixel-timesteps", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    table, models = rows(args)
    for model in models:
        model.to(device).eval()
    description = (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"CPU, {torch.get_num_threads()} threads")
    print(f"| model ({description}, {args.samples} samples per call) | seconds per call | images/s |")
    print("|---|---|---|")
    results = []
    with torch.no_grad():
        for name, sample, passes in table:
            seconds = time_sampling(sample, args.samples, device, args.repeats)
            results.append({"model": name, "device": str(device), "samples": args.samples, "seconds": round(seconds, 3),
                            "images_per_second": round(args.samples / seconds, 2), "denoiser_passes": passes})
            print(f"| {name} | {seconds:.3f} | {args.samples / seconds:.2f} |", flush=True)
    for row in results:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
