"""How noisy is each training estimate of the diffusion flow's bound? (issue 21)

    python -m benchmarks.diffusion_bound_estimators --config experiments/quick_diffusion_flow.yaml \
        --checkpoint runs/quick_diffusion_flow/diffusion_flow/version_0/checkpoints/last.ckpt

For held-out images x (the config's validation split, dequantized with the evaluation's
fixed noise) and their latents z_0 = f(x), every estimator of
:class:`flows.timestep_sampling.TimestepSampler` draws ``--draws`` one-call estimates of the
DDPM's bound of z_0 per image. Reported, in bits per dim of the image:

* ``per-image std``: the standard deviation of one estimate around its image's mean,
  averaged (root mean square) over the images: what one training step sees;
* ``bias``: the estimates' mean minus the full T-step bound (each averaged over its own
  draws), with its standard error: near zero for an unbiased estimate;
* ``denoiser rows``: denoiser evaluations per image and step, the cost (``uniform x2``,
  the mean of two uniform draws at the same cost as ``endpoints``, is std / sqrt 2);
* ``min`` / ``max``: the range of single estimates.

The importance sampler's history is first filled from training images (``--warm``
batches of uniform draws over 1..T-1, as training would fill it). Without
``--checkpoint`` the config's untrained model is measured. Not a test: one model, one
machine. Prints a markdown table and one JSON line.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import time

import torch

from flows.timestep_sampling import TimestepSampler
from lightning_modules.cli import build_cli
from lightning_modules.diffusion_module import DiffusionFlowModule


def held_out_latents(module: DiffusionFlowModule, datamodule, images: int, split: str) -> torch.Tensor:
    loader = datamodule.val_dataloader() if split == "val" else datamodule.train_dataloader()
    latents = []
    with torch.no_grad():
        for batch in loader:
            x = module.prepare_batch(batch, noise=True).images[module.resolution]
            z, _, _ = module.model.transform(x)
            latents.append(module.model.gather_latents(z))
            if sum(len(z) for z in latents) >= images:
                break
    return torch.cat(latents)[:images]


def measure(prior, z0: torch.Tensor, sampler: TimestepSampler, draws: int, per_dim_bits: float) -> dict:
    estimates = []
    with torch.no_grad():
        for _ in range(draws):
            estimates.append(prior.estimate_negative_elbo(z0, sampler)["negative_elbo"] * per_dim_bits)
    estimates = torch.stack(estimates)  # [draws, images]
    return {"std": estimates.std(0).pow(2).mean().sqrt().item(), "mean": estimates.mean(0),
            "variance_of_mean": estimates.var(0) / draws,
            "min": estimates.min().item(), "max": estimates.max().item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="experiments/quick_diffusion_flow.yaml")
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--draws", type=int, default=200)
    parser.add_argument("--full-bound-draws", type=int, default=4)
    parser.add_argument("--warm", type=int, default=40, help="training batches that fill the importance history")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    cli = build_cli(["--config", args.config], run=False)
    module, datamodule = cli.model, cli.datamodule
    if args.checkpoint:
        module = DiffusionFlowModule.load_from_checkpoint(args.checkpoint, map_location="cpu")
    module.eval()
    datamodule.setup("fit")
    torch.manual_seed(args.seed)
    prior = module.diffusion
    timesteps, per_dim_bits = prior.timesteps, 1.0 / (module.model.dims * math.log(2.0))
    z0 = held_out_latents(module, datamodule, args.images, "val")

    with torch.no_grad():
        full = torch.stack([prior.negative_elbo(z0) * per_dim_bits for _ in range(args.full_bound_draws)])
    full_mean, full_var = full.mean(0), full.var(0) / args.full_bound_draws if args.full_bound_draws > 1 else 0

    importance = TimestepSampler(timesteps, "importance")
    filler = TimestepSampler(timesteps, "endpoints")
    z_train = held_out_latents(module, datamodule, 4 * datamodule.batch_size, "train")
    with torch.no_grad():
        for step in range(args.warm):
            chunk = z_train[(step % 4) * datamodule.batch_size:][:datamodule.batch_size]
            estimate = prior.estimate_negative_elbo(chunk, filler)
            importance.update(estimate["t"], estimate["sampled_term"])
    samplers = {"uniform": TimestepSampler(timesteps, "uniform"), "endpoints": TimestepSampler(timesteps, "endpoints"),
                "importance": importance}
    rows = {}
    for name, sampler in samplers.items():
        started = time.perf_counter()
        result = measure(prior, z0, sampler, args.draws, per_dim_bits)
        bias = (result["mean"] - full_mean).mean().item()
        bias_se = ((result["variance_of_mean"] + full_var).mean() / len(z0)).sqrt().item()
        rows[name] = {"std_bpd": result["std"], "bias_bpd": bias, "bias_standard_error_bpd": bias_se,
                      "min_bpd": result["min"], "max_bpd": result["max"],
                      "denoiser_rows": 1 if sampler.first == 0 else 2,
                      "seconds": time.perf_counter() - started}
    rows["uniform x2"] = {**rows["uniform"], "std_bpd": rows["uniform"]["std_bpd"] / math.sqrt(2), "denoiser_rows": 2,
                          "min_bpd": float("nan"), "max_bpd": float("nan")}
    importance_ready = bool((importance.counts[1:] >= importance.history.shape[1]).all())

    print(f"# Training estimates of the DDPM bound, {time.strftime('%Y-%m-%d')}, {platform.node()}, "
          f"torch {torch.__version__}")
    print(f"config {args.config}, checkpoint {args.checkpoint or '(untrained)'}, T = {timesteps}, "
          f"{len(z0)} held-out images x {args.draws} draws; full bound of z_0 "
          f"{full_mean.mean().item():.3f} bits/dim (mean over images); importance history full: {importance_ready}")
    print()
    print("| estimator | per-image std (bits/dim) | bias (bits/dim) | min .. max | denoiser rows |")
    print("|---|---|---|---|---|")
    for name, row in rows.items():
        spread = "" if math.isnan(row["min_bpd"]) else f"{row['min_bpd']:.1f} .. {row['max_bpd']:.1f}"
        print(f"| {name} | {row['std_bpd']:.3f} | {row['bias_bpd']:+.3f} +- {row['bias_standard_error_bpd']:.3f} "
              f"| {spread} | {row['denoiser_rows']} |")
    print(json.dumps({"config": args.config, "checkpoint": args.checkpoint, "timesteps": timesteps,
                      "full_bound_bpd": full_mean.mean().item(), "rows": rows}))


if __name__ == "__main__":
    main()
