"""Training throughput of one SRFlow stage (images per second of forward + backward +
Adamax step), with the RRDB encoder frozen or fine-tuned, and optionally with the
variational condition of seed 000 sec. 3.2 (a no-grad encode + decode through the
previous stage) to show its cost.

    python -m benchmarks.srflow_throughput --resolution 64 --batch 64 --device cuda --precision bf16
    python -m benchmarks.srflow_throughput --resolution 32 --variational --device cuda

Defaults are the seed's SRFlow (L=4, K=16, 64 hidden, 23-block RRDB). Prints one JSON
line. Not a test: numbers depend on the machine.
"""
from __future__ import annotations

import argparse
import json

import torch

from benchmarks.timing import time_steps
from flows import LOWRES
from flows.cascade import Cascade
from flows.glow import Glow
from flows.srflow import SRFlow


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--scales", type=int, default=4)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--rrdb-blocks", type=int, default=23)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--frozen-encoder", action="store_true")
    parser.add_argument("--variational", action="store_true",
                        help="add the noisy condition through a previous (seed-sized Glow) stage")
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    args = parser.parse_args()

    device = torch.device(args.device)
    r = args.resolution
    stage = SRFlow(image_size=r, scales=args.scales, steps_per_scale=args.steps, hidden_channels=args.hidden,
                   rrdb_blocks=args.rrdb_blocks)
    previous = Glow(image_size=r // 2, scales=3, steps_per_scale=32, hidden_channels=512)
    cascade = Cascade(base=previous, sr_stages=[stage], n_bits=8).to(device).train()
    previous.eval().requires_grad_(False)
    # A frozen encoder has no gradients, so autograd builds no graph through it.
    stage.encoder.requires_grad_(not args.frozen_encoder)
    optimizer = torch.optim.Adamax([p for p in stage.parameters() if p.requires_grad], lr=1e-4)
    x = torch.rand(args.batch, 3, r, r, device=device) - 0.5
    cond = {LOWRES: {r // 2: cascade.to_condition(torch.rand(args.batch, 3, r // 2, r // 2, device=device) - 0.5)}}
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            stage_cond = cond
            if args.variational:
                noisy = cascade.variational_condition(r, cond, sigma=0.1).images
                stage_cond = {LOWRES: {r // 2: noisy}}
            loss = -cascade.encode_stage(r, {r: x}, stage_cond).log_prob.mean()
        loss.backward()
        optimizer.step()

    elapsed, peak = time_steps(step, device, args.warmup, args.iterations)
    print(json.dumps({**vars(args), "images_per_second": round(args.batch * args.iterations / elapsed, 2),
                      "peak_memory_mib": peak}))


if __name__ == "__main__":
    main()
