"""Classifier-free guidance of a class-conditional TarFlow on a toy two-class problem:
does the accuracy of a class classifier on guided samples rise with the weight w?

Data: 1x4x4 "images" whose 16 values are N(+m, s^2) for class 1 and N(-m, s^2) for
class 0 (m = 0.03, s = 0.2: the classes overlap, so even the data are classified by the
Bayes rule, the sign of the mean value, with accuracy below 1). A TarFlow (2x2 patches,
2 blocks of 1 layer, 32 channels) trains on them with 20 % of the labels dropped to the
null class, on the exact log-likelihood; then draws ``--samples`` images per w and the
Bayes rule classifies them.

    python -m benchmarks.tarflow_guidance               # CPU, about half a minute

Prints a markdown table and one JSON line. ``tests/test_tarflow.py`` runs a shorter
version and asserts the rise.
"""
from __future__ import annotations

import argparse
import json

import torch

from flows import LABELS
from flows.tarflow import GUIDANCE, TarFlow

MEAN, STD = 0.03, 0.2


def toy_batch(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    labels = torch.randint(0, 2, (n,), generator=generator)
    sign = (2.0 * labels - 1.0).view(-1, 1, 1, 1)
    return sign * MEAN + STD * torch.randn(n, 1, 4, 4, generator=generator), labels


def classify(x: torch.Tensor) -> torch.Tensor:
    """The Bayes rule of the toy classes: the sign of the mean value."""
    return (x.flatten(1).mean(dim=1) > 0).long()


def train_and_measure(steps: int = 600, samples: int = 2000, weights=(0.0, 0.5, 1.0, 2.0, 4.0),
                      seed: int = 0) -> dict:
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = TarFlow(in_channels=1, image_size=4, patch_size=2, channels=32, blocks=2, layers_per_block=1,
                    head_channels=16, num_classes=2, label_dropout=0.2).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        x, labels = toy_batch(256, generator)
        dropped = torch.rand(labels.shape, generator=generator) < model.label_dropout
        cond = {LABELS: torch.where(dropped, -1, labels)}
        loss = -model.encode(x, cond).log_prob.mean() / x[0].numel()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    data, data_labels = toy_batch(samples, generator)
    result = {"steps": steps, "samples": samples, "final_loss_nats_per_dim": float(loss.detach()),
              "data_accuracy": float((classify(data) == data_labels).float().mean()), "accuracy": {}}
    labels = torch.arange(samples) % 2
    for w in weights:
        torch.manual_seed(seed + 1)
        drawn = model.sample(samples, {LABELS: labels, GUIDANCE: w})
        result["accuracy"][w] = float((classify(drawn) == labels).float().mean())
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--samples", type=int, default=2000)
    args = parser.parse_args(argv)
    result = train_and_measure(args.steps, args.samples)
    print(f"data (Bayes rule on real samples): {result['data_accuracy']:.3f}")
    print("| w | " + " | ".join(str(w) for w in result["accuracy"]) + " |")
    print("|---|" + "---|" * len(result["accuracy"]))
    print("| accuracy | " + " | ".join(f"{a:.3f}" for a in result["accuracy"].values()) + " |")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
