"""Classifier-free guidance of a class-conditional TarFlow and GlowCC on a toy two-class
problem: does the accuracy of a class classifier on guided samples rise with the weight w?

Data: 1x4x4 "images" whose 16 values are N(+m, s^2) for class 1 and N(-m, s^2) for
class 0 (m = 0.03, s = 0.2: the classes overlap, so even the data are classified by the
Bayes rule, the sign of the mean value, with accuracy below 1). A TarFlow (2x2 patches,
2 blocks of 1 layer, 32 channels) or a GlowCC (one scale of 2 steps, 32 channels; its
class-conditional top prior is what guidance moves) trains on them with 20 % of the
labels dropped to the null class, on the exact log-likelihood; then draws ``--samples``
images per w and the Bayes rule classifies them.

    python -m benchmarks.guidance               # CPU, about a minute for both models

Every guidance rule (``RULES``) samples the same trained model: the table has one row
per model and rule.

Prints a markdown table and one JSON line. ``tests/test_guidance.py`` runs a shorter
version and asserts the rise.
"""
from __future__ import annotations

import argparse
import json

import torch

from flows import GUIDANCE, LABELS, Glow
from flows.base import Guidance
from flows.tarflow import TarFlow

MEAN, STD = 0.03, 0.2


def toy_batch(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    labels = torch.randint(0, 2, (n,), generator=generator)
    sign = (2.0 * labels - 1.0).view(-1, 1, 1, 1)
    return sign * MEAN + STD * torch.randn(n, 1, 4, 4, generator=generator), labels


def classify(x: torch.Tensor) -> torch.Tensor:
    """The Bayes rule of the toy classes: the sign of the mean value."""
    return (x.flatten(1).mean(dim=1) > 0).long()


MODELS = {
    "tarflow": lambda: TarFlow(in_channels=1, image_size=4, patch_size=2, channels=32, blocks=2, layers_per_block=1,
                               head_channels=16, num_classes=2, label_dropout=0.2),
    "glow": lambda: Glow(in_channels=1, image_size=4, scales=1, steps_per_scale=2, hidden_channels=32, num_classes=2,
                         label_dropout=0.2),
}


# The guidance rules (flows.base.Guidance) compared on the same trained model: name ->
# (rule, schedule, attention temperature of the unconditional pass). The schedule and
# the attention temperature act along TarFlow's patch sequence only.
RULES = {"cfg": ("cfg", "constant", 1.0), "cfg annealed": ("cfg", "annealed", 1.0),
         "starflow": ("starflow", "constant", 1.0), "starflow annealed": ("starflow", "annealed", 1.0),
         "cfg, attention 0.5": ("cfg", "constant", 0.5)}


def train_and_measure(steps: int = 600, samples: int = 2000, weights=(0.0, 0.5, 1.0, 2.0, 4.0),
                      seed: int = 0, model_name: str = "tarflow", rules: tuple[str, ...] = ("cfg",)) -> dict:
    """Train ``MODELS[model_name]`` through its own ``training_loss`` (which drops the
    labels) and measure the Bayes rule's accuracy on samples at each guidance weight,
    under each of ``rules`` (names of :data:`RULES`; ``accuracy`` is the first's)."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = MODELS[model_name]().train()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        x, labels = toy_batch(256, generator)
        # the toy data are continuous: n_bits 8 and the uniform noise only shift the loss
        loss = model.training_loss(x, {LABELS: labels}, n_bits=8).log_prob.mean().neg() / x[0].numel()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    data, data_labels = toy_batch(samples, generator)
    result = {"model": model_name, "steps": steps, "samples": samples, "final_loss_nats_per_dim": float(loss.detach()),
              "data_accuracy": float((classify(data) == data_labels).float().mean()), "by_rule": {}}
    labels = torch.arange(samples) % 2
    for rule in rules:
        accuracy = result["by_rule"][rule] = {}
        for w in weights:
            torch.manual_seed(seed + 1)
            drawn = model.sample(samples, {LABELS: labels, GUIDANCE: Guidance(w, *RULES[rule])})
            accuracy[w] = float((classify(drawn) == labels).float().mean())
    result["accuracy"] = result["by_rule"][rules[0]]
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--rules", nargs="+", default=list(RULES), choices=list(RULES))
    args = parser.parse_args(argv)
    results = []
    for name in args.models:
        # the schedule and the attention temperature act along TarFlow's patches only
        rules = tuple(args.rules) if name == "tarflow" else tuple(r for r in args.rules if RULES[r][1:] == ("constant", 1.0))
        results.append(train_and_measure(args.steps, args.samples, model_name=name, rules=rules))
    print(f"data (Bayes rule on real samples): {results[0]['data_accuracy']:.3f}")
    print("| model | rule | " + " | ".join(f"w = {w}" for w in results[0]["accuracy"]) + " |")
    print("|---|---|" + "---:|" * len(results[0]["accuracy"]))
    for result in results:
        for rule, accuracy in result["by_rule"].items():
            print(f"| {result['model']} | {rule} | " + " | ".join(f"{a:.3f}" for a in accuracy.values()) + " |")
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
