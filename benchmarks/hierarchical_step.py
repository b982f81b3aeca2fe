"""One training step of seed 001's Config A (forward + backward + Adam step of the
three parameter groups, gradient clipping 50): seconds per step and peak memory.

    python -m benchmarks.hierarchical_step --device cuda --precision bf16 --batch 16
    python -m benchmarks.hierarchical_step --config experiments/hierarchical_lsun128.yaml --device cuda

The model is built from the experiment's YAML (``model.init_args.flow``), so the
benchmark measures exactly what ``lightning fit`` trains. Prints one JSON line with the
parameter count beside the official code's trainable count for Config A (77.38 M:
timoneh/hflow's ``num_parameters`` less its 2.77 M fixed mask tensors; Table 2's 80.15 M
includes them). ``--count-only`` skips the timing. Not a test: numbers depend on the
machine.

    python -m benchmarks.hierarchical_step --count-only
    {"parameters_millions": 78.29, "official_trainable_millions": 77.38, ...}
"""
from __future__ import annotations

import argparse
import json

import torch
import yaml

from benchmarks.timing import time_steps
from flows.hierarchical import HierarchicalFlow
from lightning_modules import HierarchicalModule

OFFICIAL_TRAINABLE_MILLIONS = {"experiments/hierarchical_celebahq256.yaml": 77.38}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="experiments/hierarchical_celebahq256.yaml")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--count-only", action="store_true", help="print the parameter count, no timing")
    args = parser.parse_args()

    with open(args.config) as handle:
        config = yaml.safe_load(handle)
    model = HierarchicalFlow(**config["model"]["init_args"]["flow"]["init_args"])
    counts = {"config": args.config,
              "parameters_millions": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
              "official_trainable_millions": OFFICIAL_TRAINABLE_MILLIONS.get(args.config)}
    if args.count_only:
        print(json.dumps(counts))
        return
    device = torch.device(args.device)
    module = HierarchicalModule(flow=model).to(device).train()
    groups = [{"params": g.params, "lr": g.settings.lr} for g in module.optimizer_groups()]
    optimizer = torch.optim.Adam(groups, betas=(0.9, 0.999))
    size, channels = model.image_size, model.in_channels
    x = torch.rand(args.batch, channels, size, size, device=device) - 0.5
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            encoding = model.encode(x)
            loss = sum(level.loss_weight * -lp for level, lp in zip(model.levels, encoding.level_log_probs)).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 50.0)
        optimizer.step()

    elapsed, peak = time_steps(step, device, args.warmup, args.iterations)
    print(json.dumps({**vars(args), **counts, "seconds_per_step": round(elapsed / args.iterations, 3),
                      "peak_memory_mib": peak}))


if __name__ == "__main__":
    main()
