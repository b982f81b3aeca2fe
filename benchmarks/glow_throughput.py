"""Training throughput of Glow (images per second of forward + backward + Adamax step).

    python -m benchmarks.glow_throughput --resolution 32 --scales 3 --steps 32 --hidden 512 \
        --batch 64 --device cuda --precision bf16

Prints one JSON line: configuration, images/s, peak memory. Not a test: numbers depend
on the machine.
"""
from __future__ import annotations

import argparse
import json

import torch

from benchmarks.timing import time_steps
from flows import Glow


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--scales", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    args = parser.parse_args()

    device = torch.device(args.device)
    model = Glow(image_size=args.resolution, scales=args.scales, steps_per_scale=args.steps,
                 hidden_channels=args.hidden).to(device).train()
    optimizer = torch.optim.Adamax(model.parameters(), lr=1e-4)
    x = torch.rand(args.batch, 3, args.resolution, args.resolution, device=device) - 0.5
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = -model.log_prob(x).mean()
        loss.backward()
        optimizer.step()

    elapsed, peak = time_steps(step, device, args.warmup, args.iterations)
    print(json.dumps({
        **vars(args),
        "images_per_second": round(args.batch * args.iterations / elapsed, 2),
        "peak_memory_mib": peak,
    }))


if __name__ == "__main__":
    main()
