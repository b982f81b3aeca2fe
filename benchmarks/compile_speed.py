"""Compiled against eager, for any shipped config: a training step and a sampling call.

What ``model.init_args.compile: true`` and ``compile_sampling: true`` do to a run, measured
on the module a run of ``experiments/<config>`` builds (``--set`` changes sizes the way a
command line would). Each measurement runs in a fresh process (a compiled function's
caches and the allocator do not carry over), the modes taken round-robin over
``--repeats``:

* training step: ``compute_losses`` (the function ``compile`` wraps), backward, Adam;
  "first step s" is the first step alone (data-dependent initialization and, compiled,
  the compilation), then the median of ``--iterations`` steps after ``--warmup``;
* sampling: ``sample_images`` of ``--samples`` images (``compile_sampling``), first call
  apart, then the median; images per second.

"pays back after" is the number of steps at which the compiled run catches up with the
eager one: (first step compiled - first step eager) / (step eager - step compiled).

    python -m benchmarks.compile_speed quick_tarflow.yaml quick_diffusion_flow.yaml
    python -m benchmarks.compile_speed quick_tarflow.yaml --set model.init_args.flow.init_args.channels=256 \\
        --label "TarFlow 256" --out compile.md

Not a test: the numbers depend on the machine (the README lists what it gave where).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

RESULT_PREFIX = "COMPILE_SPEED_RESULT "
MODES = ("eager", "compiled")


def parse_setting(text: str) -> tuple[str, str]:
    key, separator, value = text.partition("=")
    if not separator or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. model.init_args.flow.init_args.channels=256), "
                                         f"got {text!r}")
    return key, value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="+", help="file names under experiments/")
    parser.add_argument("--set", dest="settings", type=parse_setting, action="append", default=[],
                        metavar="KEY=VALUE", help="a config setting, as on the lightning command line")
    parser.add_argument("--label", default=None, help="the table's name for the model (default: the config)")
    parser.add_argument("--batch", type=int, default=16, help="images per training step")
    parser.add_argument("--samples", type=int, default=16, help="images per sampling call (0: no sampling)")
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1, help="fresh-process runs per mode, round-robin")
    parser.add_argument("--compile-mode", default=None, help="torch.compile's mode (default; reduce-overhead)")
    parser.add_argument("--out", type=Path, default=None, help="write the markdown here and the numbers beside "
                        "it (.json)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: one measurement
    return parser


def _module(spec: dict, folder: Path):
    from lightning_modules.cli import build_cli

    text = (REPO / "experiments" / spec["config"]).read_text()
    config = folder / spec["config"]
    config.write_text("".join(line for line in text.splitlines(keepends=True) if not line.startswith("ckpt_path:")))
    overrides = [item for key, value in spec["settings"] for item in (f"--{key}", value)]
    return build_cli(["--config", str(config), "--trainer.logger", "false", *overrides], run=False).model


def _median_after(call, warmup: int, iterations: int) -> tuple[float, float]:
    """(first call s, median s of ``iterations`` calls after ``warmup`` more)."""
    start = time.perf_counter()
    call()
    first = time.perf_counter() - start
    for _ in range(warmup):
        call()
    seconds = []
    for _ in range(iterations):
        start = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - start)
    return first, statistics.median(seconds)


def measure(spec: dict) -> dict:
    """One mode of one config, in this process."""
    from benchmarks.host_syncs import module_temperature, random_batch

    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    compiled = spec["mode"] == "compiled"
    with tempfile.TemporaryDirectory() as folder:
        module = _module(spec, Path(folder))
    module.compile_losses = compiled
    module.compile_sampling = compiled and spec["samples"] > 0
    if compiled and spec["compile_mode"]:
        module.model.compile_sampler = _with_mode(module.model.compile_sampler, spec["compile_mode"])
    module.configure_model()
    if compiled and spec["compile_mode"]:
        module.compute_losses = torch.compile(type(module).compute_losses.__get__(module), mode=spec["compile_mode"])
    batch = random_batch(module, spec["batch"])
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-5)
    module.train()

    def train_step() -> None:
        module.compute_losses(module.prepare_batch(batch)).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    first_step, step = _median_after(train_step, spec["warmup"], spec["iterations"])
    result = dict(spec, parameters=sum(p.numel() for p in module.parameters()), model=module.model_name,
                  first_step_s=first_step, step_s=step)
    if spec["samples"]:
        module.eval()
        temperature = module_temperature(module)
        with torch.no_grad():
            first_call, call = _median_after(lambda: module.sample_images(spec["samples"], temperature),
                                             max(spec["warmup"] - 1, 0), max(spec["iterations"] // 2, 2))
        result.update(first_sampling_s=first_call, sampling_s=call, images_per_s=spec["samples"] / call)
    return result


def _with_mode(compile_sampler, mode: str):
    return lambda **options: compile_sampler(**{"mode": mode, **options})


def run_in_subprocess(spec: dict) -> dict:
    """One measurement in a fresh interpreter with an empty inductor cache (a cache left by
    an earlier run would hide the compile time a first run pays)."""
    with tempfile.TemporaryDirectory() as cache:
        completed = subprocess.run([sys.executable, "-m", "benchmarks.compile_speed", "x", "--worker", json.dumps(spec)],
                                   cwd=REPO, capture_output=True, text=True, check=False,
                                   env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache})
    for line in reversed(completed.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    tail = (completed.stderr.strip() or completed.stdout.strip()).splitlines()[-12:]
    return {**spec, "error": f"worker exited with {completed.returncode}: " + "\n".join(tail)}


def combine(runs: list[dict]) -> dict:
    """The median over a mode's fresh-process runs of each timing."""
    good = [run for run in runs if "error" not in run]
    if not good:
        return runs[0]
    combined = dict(good[0])
    for key in ("first_step_s", "step_s", "first_sampling_s", "sampling_s", "images_per_s"):
        if key in good[0]:
            combined[key] = statistics.median(run[key] for run in good)
    combined["step_range"] = (min(run["step_s"] for run in good), max(run["step_s"] for run in good))
    return combined


def markdown(rows: list[tuple[dict, dict]], header: str) -> str:
    lines = [header, "",
             "| model | parameters | mode | first step s | step s (range) | step compiled / eager | pays back after "
             "| first sampling call s | images/s | sampling time compiled / eager |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for eager, compiled in rows:
        for row in (eager, compiled):
            if "error" in row:
                lines.append(f"| {row['label']} | | {row['mode']} | failed: {row['error'].splitlines()[-1][:120]} "
                             "| | | | | | |")
                continue
            ratio = pays = sampling_ratio = ""
            if row is compiled and "error" not in eager:
                ratio = f"{row['step_s'] / eager['step_s']:.2f}"
                gain = eager["step_s"] - row["step_s"]
                pays = (f"{(row['first_step_s'] - eager['first_step_s']) / gain:,.0f} steps" if gain > 0
                        else "never")
                if "sampling_s" in row:
                    sampling_ratio = f"{row['sampling_s'] / eager['sampling_s']:.2f}"
            low, high = row["step_range"]
            lines.append(f"| {row['label']} | {row['parameters']:,} | {row['mode']} | {row['first_step_s']:.1f} | "
                         f"{row['step_s']:.4f} ({low:.3g}–{high:.3g}) | {ratio} | {pays} | "
                         f"{row.get('first_sampling_s', float('nan')):.1f} | {row.get('images_per_s', float('nan')):.1f} "
                         f"| {sampling_ratio} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list:
    args = build_parser().parse_args(argv)
    if args.worker:
        print(RESULT_PREFIX + json.dumps(measure(json.loads(args.worker))), flush=True)
        return []
    pairs = []
    for config in args.configs:
        if not (REPO / "experiments" / config).is_file():
            raise SystemExit(f"no experiments/{config}: name a file under experiments/ (e.g. quick_tarflow.yaml)")
        specs = {mode: dict(config=config, settings=args.settings, label=args.label or config, mode=mode,
                            batch=args.batch, samples=args.samples, iterations=args.iterations, warmup=args.warmup,
                            compile_mode=args.compile_mode) for mode in MODES}
        runs: dict[str, list] = {mode: [] for mode in MODES}
        for repeat in range(args.repeats):
            for mode in MODES:
                result = run_in_subprocess(specs[mode])
                runs[mode].append(result)
                status = result.get("error", "").splitlines()[-1:] or [
                    f"step {result['step_s']:.4f} s, first {result['first_step_s']:.1f} s"
                    + (f", {result['images_per_s']:.1f} images/s" if "images_per_s" in result else "")]
                print(f"{config} [{mode}] run {repeat + 1}/{args.repeats}: {status[0]}", flush=True)
        pairs.append((combine(runs["eager"]), combine(runs["compiled"])))
    header = (f"{time.strftime('%Y-%m-%d')}, torch {torch.__version__}, CPU threads {torch.get_num_threads()}, "
              f"batch {args.batch}, {args.samples} images per sampling call, median of {args.iterations} after "
              f"{args.warmup} warm-up, {args.repeats} fresh process(es) per mode"
              + (f", settings {dict(args.settings)}" if args.settings else ""))
    table = markdown(pairs, header)
    print(table)
    if args.out:
        args.out.write_text(table + "\n")
        args.out.with_suffix(".json").write_text(json.dumps(pairs, indent=2) + "\n")
    return pairs


if __name__ == "__main__":
    main()
