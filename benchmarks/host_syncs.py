"""Host reads and graph breaks of each family's training step and sampling call.

A host read is an op that copies a tensor's value to the CPU to decide something there
(``.item()``, ``bool(t)``, ``int(t)``, a boolean index, ``nonzero``): on a GPU each one
stalls the host until the kernel queue drains, and ``torch.compile`` breaks its graph at
each. This counts them with a dispatch mode during one ``compute_losses`` + backward (the
function ``compile: true`` wraps) and one ``sample_images`` call, each after a first call
(ActNorm's data-dependent initialization is a one-time event), and counts the graphs of
``compute_losses`` under ``torch._dynamo.explain`` (which traces, without running the
backend compiler). The modules are built from the shipped configs, as a run builds them.

    python benchmarks/host_syncs.py                       # every family's config
    python benchmarks/host_syncs.py glow_cifar10.yaml     # some
    python benchmarks/host_syncs.py --json out.json

The fast tests assert zero for every model of the model CASES (tests/test_host_syncs.py);
this script gives the table for the README at the configs' real sizes.
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

CONFIGS = ["glow_cifar10.yaml", "quick_photos.yaml", "quick_realnvp.yaml", "nsf_mnist.yaml", "quick_cascade.yaml",
           "quick_hierarchical.yaml", "quick_diffusion_flow.yaml", "pixel_ddpm_mnist.yaml", "quick_tarflow.yaml"]
# Ops that read a tensor's value back to the host.
HOST_READS = {"_local_scalar_dense", "item", "is_nonzero", "nonzero", "masked_select", "equal", "unique",
              "_unique2", "unique_consecutive"}


class HostReadCounter(TorchDispatchMode):
    """Counts the host reads of the ops run inside it, by the project's source line that
    caused each (``where``)."""

    def __init__(self) -> None:
        super().__init__()
        self.where: collections.Counter = collections.Counter()

    @property
    def total(self) -> int:
        return sum(self.where.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        boolean_index = name in ("index", "index_put", "index_put_") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or []))
        if name in HOST_READS or boolean_index:
            ours = [f for f in traceback.extract_stack()
                    if f"{REPO}/flows" in f.filename or f"{REPO}/lightning_modules" in f.filename]
            self.where[f"{name} at {ours[-1].filename[len(str(REPO)) + 1:]}:{ours[-1].lineno}" if ours else name] += 1
        return func(*args, **(kwargs or {}))


def build_module(config: str, folder: Path):
    """The LightningModule a run of ``experiments/<config>`` builds (no trainer, no data)."""
    from lightning_modules.cli import build_cli

    text = (REPO / "experiments" / config).read_text()
    (folder / config).write_text("".join(line for line in text.splitlines(keepends=True)
                                         if not line.startswith("ckpt_path:")))
    return build_cli(["--config", str(folder / config), "--trainer.logger", "false"], run=False).model


def random_batch(module, size: int = 4) -> dict:
    return {"images": {r: torch.randint(0, 256, (size, module.in_channels, r, r), dtype=torch.uint8)
                       for r in module.resolutions},
            "label": torch.arange(size) % max(1, module.num_classes), "index": torch.arange(size)}


def training_step_reads(module, batch: dict) -> HostReadCounter:
    """Host reads of the compiled part of a training step (``compute_losses`` and its
    backward), after one step that initializes what initializes from data."""
    module.train()

    def step() -> None:
        module.compute_losses(module.prepare_batch(batch)).loss.backward()

    step()
    counter = HostReadCounter()
    with counter:
        step()
    return counter


def sampling_reads(module, n: int = 2) -> HostReadCounter:
    module.eval()
    with torch.no_grad():
        module.sample_images(n, module_temperature(module))
        counter = HostReadCounter()
        with counter:
            module.sample_images(n, module_temperature(module))
    return counter


def module_temperature(module):
    """1.0, or one per stage for a module that takes a list."""
    try:
        module.check_temperature(1.0)
        return 1.0
    except ValueError:
        return [1.0] * len(module.resolutions)


def graph_breaks(module, batch: dict) -> tuple[int, int, list[str]]:
    """(graphs, breaks, reasons) of ``compute_losses`` (forward) under dynamo's explain."""
    import torch._dynamo

    module.train()
    prepared = module.prepare_batch(batch)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(lambda b: module.compute_losses(b).loss)(prepared)
    reasons = [str(r.reason).splitlines()[0] for r in explained.break_reasons]
    return explained.graph_count, explained.graph_break_count, reasons


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="*", default=CONFIGS)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--no-explain", dest="explain", action="store_false",
                        help="count host reads only (dynamo's tracing of a large model takes minutes on a CPU)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for config in args.configs:
            torch.manual_seed(0)
            module = build_module(config, Path(folder))
            batch = random_batch(module)
            start = time.perf_counter()
            train = training_step_reads(module, batch)
            sample = sampling_reads(module)
            graphs, breaks, reasons = graph_breaks(module, batch) if args.explain else (None, None, [])
            row = {"config": config, "model": module.model_name, "training_step_host_reads": train.total,
                   "training_step_where": dict(train.where), "sampling_host_reads": sample.total,
                   "sampling_where": dict(sample.where), "graphs": graphs, "graph_breaks": breaks,
                   "break_reasons": sorted(set(reasons)), "seconds": round(time.perf_counter() - start, 1)}
            rows.append(row)
            print(f"{config:28s} {row['model']:14s} host reads/step {train.total:4d}  sampling {sample.total:4d}  "
                  f"graphs {graphs}  breaks {breaks}", flush=True)
            for where, count in sorted({**train.where, **sample.where}.items(), key=lambda kv: -kv[1])[:4]:
                print(f"    {count:4d}  {where}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
