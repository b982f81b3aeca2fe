"""Our Glow against normflows' Glow of the same architecture (``benchmarks/peers.py``):
training step time, sampling time and peak memory, side by side.

    python -m benchmarks.versus_peers                              # CUDA if present, else CPU
    python -m benchmarks.versus_peers --device cuda --configs 8x128,32x512 --precision bf16 \
        --variant reversible='{"memory_efficient": true}' --out versus_peers.md

Every configuration is a multi-scale Glow on 32x32x3 images with L=3 scales and
``KxHIDDEN`` from ``--configs`` (K steps per scale, coupling networks HIDDEN wide). Rows:
``ours`` (``flows.Glow(**base, **ours_kwargs)``), one ``ours[NAME]`` row per ``--variant
NAME=JSON`` (``flows.Glow(**base, **JSON)``), and ``normflows``.

Method:

* **A fresh subprocess per measurement** (one configuration, one implementation):
  no allocator caches, compiled kernels or memory peaks carry over from one
  implementation to the next, and the peak memory is that implementation's alone.
* **Training step**: mean negative log-likelihood (nats per image) of a fixed batch of
  uniform x in [-0.5, 0.5), backward, Adam step. Both models are in training mode, and
  the first step initializes their ActNorms from the data. Each step is timed on its own
  (``time.perf_counter``; on CUDA with ``torch.cuda.synchronize()`` before and after),
  and the table gives the **median** of ``--iterations`` steps after ``--warmup``
  untimed ones (the median ignores the odd slow step: a page fault, another process).
* **Sampling**: one batch of ``--batch`` images from the prior at temperature 1, in
  eval mode without gradients, timed and summarized the same way.
* **Peak memory**: on CUDA, ``torch.cuda.max_memory_allocated()`` over the worker's whole
  run (parameters, Adam state, activations of the training steps, sampling): the
  tensors themselves, not the CUDA context or the allocator's cached blocks. On CPU,
  the peak resident set of the worker process (``getrusage(RUSAGE_SELF).ru_maxrss``),
  which includes the Python interpreter and the torch libraries (a few hundred MiB,
  the same for both implementations: the JSON gives it as ``rss_before_model_mib``).
  The table's "train MiB" is what training itself adds: on CUDA the training peak
  (``max_memory_allocated`` after the training steps), on CPU the training steps' peak
  resident set (``VmHWM``, reset through ``/proc/self/clear_refs`` once the model is
  built) minus the resident set before the model was built.
* Variants (``--variant NAME=JSON``) take Glow keyword arguments plus switches of the
  measurement itself: ``"torch_compile": true`` (``torch.compile`` of the training
  loss; ``"compile_mode": "reduce-overhead"`` for CUDA graphs, ``"compile_backend"``,
  ``"compile_sampling": true`` to compile the sampling call too), ``"channels_last": true`` (model and input in channels-last memory
  format), ``"fold": true`` (sampling from :func:`flows.folding.fold_for_inference`'s
  copy) and ``"invconv_cache": false`` (sampling without the 1x1 conv weight cache).
* ``--repeats N`` runs every row N times, each in a fresh process, round-robin over
  the rows, and reports the median and the range: on a small shared VM two identical
  fresh processes differ by up to ~20 % in step time, more than the differences
  measured, so one run per row proves nothing.
* ``--peer-variant NAME='{"torch_compile": true}'`` adds normflows compiled the same way
  (``torch.compile`` of its negative log-likelihood). The "first step s" column is the
  first training step alone: ActNorm's initialization and, compiled, the compilation.
* ``--image-size`` changes the resolution (the memory-mode comparison runs 64x64x3);
  ``--no-peer`` leaves normflows out (ratios are then against the first row).
* ``--precision bf16`` runs the loss and sampling under ``torch.autocast(bfloat16)`` for
  both implementations (ours keeps log-dets and priors in float32; normflows
  accumulates log-dets in bf16, see ``benchmarks/peers.py``).
* Threads: torch's default (all cores); printed, and recorded by every worker. On a
  machine shared with other jobs, intra-op threads that wait on each other can stall
  for whole seconds: measure on an idle machine, or set ``OMP_NUM_THREADS`` (the
  workers inherit the environment) and report it.

Prints one markdown table (with a header: date, machine, exact command); ``--out
FILE.md`` also writes it there and the raw numbers (every timed step) to ``FILE.json``.
Not a test: numbers depend on the machine and on what else runs on it.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
IMAGE_SHAPE = (3, 32, 32)
SCALES = 3
LEARNING_RATE = 1e-4
SEED = 0
# The worker prints its result on one stdout line with this prefix, so that anything
# else a library prints cannot be mistaken for it.
RESULT_PREFIX = "VERSUS_PEERS_RESULT "
NORMFLOWS = "normflows"


# --- command line -----------------------------------------------------------------------------
def parse_configs(text: str) -> list[tuple[int, int]]:
    """``"8x128,32x512"`` -> [(8, 128), (32, 512)] (K steps per scale, hidden channels)."""
    configs = []
    for item in text.split(","):
        try:
            steps, hidden = (int(part) for part in item.strip().lower().split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"a configuration is KxHIDDEN, e.g. 8x128; got {item!r}") from None
        if steps < 1 or hidden < 1:
            raise argparse.ArgumentTypeError(f"K and HIDDEN must be positive, got {item!r}")
        configs.append((steps, hidden))
    return configs


def parse_kwargs(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not JSON: {text!r} ({error})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object of Glow keyword arguments, got {text!r}")
    return value


def parse_variant(text: str) -> tuple[str, dict]:
    """``NAME=JSON`` -> (NAME, kwargs)."""
    name, separator, kwargs = text.partition("=")
    if not separator or not name.strip():
        raise argparse.ArgumentTypeError(f"a variant is NAME=JSON, e.g. reversible='{{\"memory_efficient\": true}}'; "
                                         f"got {text!r}")
    return name.strip(), parse_kwargs(kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Our Glow against normflows' Glow: step time, sampling time, "
                                                 "peak memory (fresh subprocess per measurement).")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--configs", type=parse_configs, default=parse_configs("8x128,32x512"),
                        help="comma-separated KxHIDDEN (steps per scale x coupling width); L=3 at 32x32x3")
    parser.add_argument("--batch", type=int, default=None, help="images per step and per sampling call "
                                                                "(default 16 on CPU, 64 on CUDA)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--image-size", type=int, default=IMAGE_SHAPE[1], help="square images of 3 channels")
    parser.add_argument("--no-peer", dest="peer", action="store_false",
                        help="leave normflows out; ratios are then against the first row of each configuration")
    parser.add_argument("--iterations", type=int, default=10, help="timed training steps and sampling calls")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls before them")
    parser.add_argument("--repeats", type=int, default=1,
                        help="fresh-process runs per row, round-robin over the rows; the table gives their median")
    parser.add_argument("--ours-kwargs", type=parse_kwargs, default={},
                        help="JSON of extra flows.Glow keyword arguments for the 'ours' row")
    parser.add_argument("--variant", type=parse_variant, action="append", default=[], metavar="NAME=JSON",
                        help="an extra row 'ours[NAME]' built as flows.Glow(**base, **JSON); repeatable")
    parser.add_argument("--peer-variant", type=parse_variant, action="append", default=[], metavar="NAME=JSON",
                        help="an extra row 'normflows[NAME]'; JSON takes {\"torch_compile\": true}")
    parser.add_argument("--out", type=Path, default=None, help="write the markdown here and the raw numbers "
                                                               "to the same name with .json")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: one measurement
    return parser


# --- the worker: one measurement in its own process ----------------------------------------------
def _max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _proc_status_mib(field: str) -> float:
    """``VmRSS`` / ``VmHWM`` of this process in MiB (Linux; NaN elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return math.nan


def _reset_peak_rss() -> None:
    """Start a new resident-set high-water mark (Linux: writing 5 to clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _timed(call: Callable[[], object], warmup: int, iterations: int, device: torch.device) -> list[float]:
    """Seconds of each of ``iterations`` calls after ``warmup`` untimed ones."""
    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # CUDA runs asynchronously: wait for the work itself

    for _ in range(warmup):
        call()
    seconds = []
    for _ in range(iterations):
        synchronize()
        start = time.perf_counter()
        call()
        synchronize()
        seconds.append(time.perf_counter() - start)
    return seconds


def compiled(function, options: dict):
    """``torch.compile(function)`` with the variant's ``compile_mode`` (None: default;
    "reduce-overhead": CUDA graphs) and ``compile_backend`` ("inductor"; "eager": dynamo's
    capture alone, which the GPU suite's dry run uses to check the path in seconds)."""
    return torch.compile(function, mode=options.get("compile_mode"), backend=options.get("compile_backend", "inductor"))


def measure(spec: dict) -> dict:
    """Train-step and sampling times and peak memory of one implementation (``spec`` as
    built by :func:`_worker_spec`)."""
    device = torch.device(spec["device"])
    torch.manual_seed(spec["seed"])
    rss_before_model = _proc_status_mib("VmRSS")
    image_shape = (IMAGE_SHAPE[0], spec.get("image_size", IMAGE_SHAPE[1]), spec.get("image_size", IMAGE_SHAPE[2]))
    base = dict(in_channels=image_shape[0], image_size=image_shape[1], scales=SCALES,
                steps_per_scale=spec["steps"], hidden_channels=spec["hidden"])
    if spec["implementation"] == NORMFLOWS:
        from benchmarks.peers import build_peer_glow, count_parameters

        peer = build_peer_glow(**base)
        module = peer.model.to(device)
        nll, sample = peer.nll, peer.sample
        if spec["glow_kwargs"].get("torch_compile"):  # --peer-variant NAME='{"torch_compile": true}'
            nll = compiled(peer.nll, spec["glow_kwargs"])
    else:
        from benchmarks.peers import count_parameters
        from flows import Glow
        from flows.layers import invconv

        options = dict(spec["glow_kwargs"])
        compile_loss, channels_last = options.pop("torch_compile", False), options.pop("channels_last", False)
        compile_options = {key: options.pop(key) for key in ("compile_mode", "compile_backend", "compile_sampling")
                           if key in options}
        fold, invconv.CACHE_FROZEN_WEIGHTS = options.pop("fold", False), options.pop("invconv_cache", True)
        module = Glow(**base, **options).to(device)
        if channels_last:
            module = module.to(memory_format=torch.channels_last)
        log_prob = compiled(module.log_prob, compile_options) if compile_loss else module.log_prob
        draw = compiled(module.sample, compile_options) if compile_options.get("compile_sampling") else module.sample
        nll = lambda x: -log_prob(x.contiguous(memory_format=torch.channels_last) if channels_last else x)  # noqa: E731

        folded: list = []  # folded once, when sampling starts (after the training steps)

        def sample(n: int):
            if fold and not folded:
                from flows.folding import fold_for_inference
                folded.append(fold_for_inference(module))
            return folded[0].sample(n) if fold else draw(n)

    optimizer = torch.optim.Adam(module.parameters(), lr=LEARNING_RATE)
    x = torch.rand(spec["batch"], *image_shape, device=device) - 0.5
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if spec["precision"] == "bf16"
                else nullcontext())
    losses = []

    def train_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = nll(x).mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())  # no .item(): that would synchronize inside the step

    module.train()
    _reset_peak_rss()
    # The first step on its own: ActNorm's initialization and, compiled, the compilation.
    first_step_s = _timed(train_step, 0, 1, device)[0]
    step_seconds = _timed(train_step, max(0, spec["warmup"] - 1), spec["iterations"], device)
    memory = {}
    if device.type == "cuda":
        memory["peak_train_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        memory["train_mib"] = memory["peak_train_mib"]
        torch.cuda.reset_peak_memory_stats(device)
    else:
        memory["train_mib"] = _proc_status_mib("VmHWM") - rss_before_model

    module.eval()

    def sample_batch() -> None:
        with torch.no_grad(), autocast:
            sample(spec["batch"])

    sample_seconds = _timed(sample_batch, spec["warmup"], spec["iterations"], device)
    if device.type == "cuda":
        memory["peak_sample_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        peak = max(memory.values())
        device_name = torch.cuda.get_device_name(device)
    else:
        peak = _max_rss_mib()
        memory["rss_before_model_mib"] = rss_before_model
        device_name = cpu_name()
    final_nll = losses[-1].float().item() if losses else math.nan
    return {
        **spec,
        "parameters": count_parameters(module),
        "step_s": statistics.median(step_seconds) if step_seconds else math.nan,
        "first_step_s": first_step_s,
        "sample_s": statistics.median(sample_seconds) if sample_seconds else math.nan,
        "step_s_all": step_seconds,
        "sample_s_all": sample_seconds,
        "peak_mib": peak,
        **memory,
        "final_nll": final_nll,  # a sanity check: finite, nats per image
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device_name": device_name,
    }


# --- the driver -------------------------------------------------------------------------------
def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _worker_spec(args, steps: int, hidden: int, label: str, implementation: str, glow_kwargs: dict) -> dict:
    return dict(label=label, implementation=implementation, glow_kwargs=glow_kwargs, steps=steps, hidden=hidden,
                image_size=args.image_size, device=args.device, batch=args.batch, precision=args.precision, iterations=args.iterations,
                warmup=args.warmup, seed=SEED)


def run_in_subprocess(spec: dict) -> dict:
    """One measurement in a fresh interpreter; a failure (an OOM, a bad keyword) becomes
    an ``error`` entry rather than ending the benchmark."""
    completed = subprocess.run([sys.executable, "-m", "benchmarks.versus_peers", "--worker", json.dumps(spec)],
                               cwd=REPO, capture_output=True, text=True, check=False)
    for line in reversed(completed.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    tail = (completed.stderr.strip() or completed.stdout.strip()).splitlines()[-15:]
    return {**spec, "error": f"worker exited with {completed.returncode}: " + "\n".join(tail)}


def _rows(args) -> list[dict]:
    rows = []
    ours_label = "ours" if not args.ours_kwargs else f"ours {json.dumps(args.ours_kwargs)}"
    for steps, hidden in args.configs:
        measurements = [(ours_label, "ours", args.ours_kwargs)]
        measurements += [(f"ours[{name}]", "ours", kwargs) for name, kwargs in args.variant]
        if args.peer:
            measurements += [(NORMFLOWS, NORMFLOWS, {})]
            measurements += [(f"{NORMFLOWS}[{name}]", NORMFLOWS, kwargs) for name, kwargs in args.peer_variant]
        runs: dict[str, list[dict]] = {label: [] for label, _, _ in measurements}
        # Round-robin over the implementations, so a change in the machine's load during
        # the benchmark touches every row alike.
        for repeat in range(args.repeats):
            for label, implementation, kwargs in measurements:
                print(f"measuring K={steps} hidden={hidden} {label} (run {repeat + 1}/{args.repeats}) ...",
                      file=sys.stderr, flush=True)
                row = run_in_subprocess(_worker_spec(args, steps, hidden, label, implementation, kwargs))
                if "error" in row:
                    print(f"  FAILED: {row['error']}", file=sys.stderr, flush=True)
                runs[label].append(row)
        rows.extend(_combine(label_runs) for label_runs in runs.values())
    return rows


def _combine(runs: list[dict]) -> dict:
    """One row from the fresh-process runs of one measurement: medians over the runs,
    the runs themselves kept under ``runs`` (a failed run makes the row failed)."""
    failed = [r for r in runs if "error" in r]
    if failed:
        return failed[0]
    combined = dict(runs[0])
    for key in ("step_s", "sample_s", "peak_mib", "train_mib", "first_step_s"):
        combined[key] = statistics.median(r[key] for r in runs)
    combined["step_s_range"] = (min(r["step_s"] for r in runs), max(r["step_s"] for r in runs))
    combined["runs"] = runs
    return combined


def _ratio(row: dict, reference: dict | None, key: str) -> str:
    if row is reference:
        return "–"  # the reference itself
    if reference is None or "error" in row or "error" in reference or not reference[key]:
        return "n/a"
    return f"{row[key] / reference[key]:.2f}"


def _reference(rows: list[dict], row: dict) -> dict | None:
    """normflows' row of the same configuration and variant (``ours[compiled]`` against
    ``normflows[compiled]``), else normflows' plain row, or (``--no-peer``) its first row."""
    same = [r for r in rows if r["steps"] == row["steps"] and r["hidden"] == row["hidden"]]
    variant = row["label"][row["label"].find("["):] if row["label"].startswith("ours[") else None
    matching = next((r for r in same if variant and r["label"] == f"{NORMFLOWS}{variant}"), None)
    plain = next((r for r in same if r["label"] == NORMFLOWS), None)
    return matching or plain or (same[0] if same else None)


def markdown(rows: list[dict], header: dict) -> str:
    against = "normflows" if any(r["implementation"] == NORMFLOWS for r in rows) else "first row"
    lines = [
        (f"Date: {header['date']}. Machine: {header['platform']}, {header['cpu_count']} CPUs, "
         f"torch {header['torch']}, normflows {header['normflows']}, device {header['device']} "
         f"({header['device_name']}), {header['threads']} torch threads; {header['image_size']}x"
         f"{header['image_size']}x3, L=3, batch {header['batch']}, "
         f"{header['precision']}, median of {header['iterations']} after {header['warmup']} warm-up, "
         f"median over {header['repeats']} fresh-process run(s) per row."),
        f"Command: `{header['command']}`",
        "",
        (f"| config (K, hidden) | implementation | parameters | step s (median) | step s range | first step s "
         f"| sampling s | peak MiB | train MiB | step ours/{against} | sampling ours/{against} "
         f"| train MiB ours/{against} |"),
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        config = f"({row['steps']}, {row['hidden']})"
        if "error" in row:
            first_line = row["error"].splitlines()[-1][:80].replace("|", "/")
            lines.append(f"| {config} | {row['label']} | failed: {first_line} | | | | | | | | | |")
            continue
        reference = _reference(rows, row)
        low, high = row.get("step_s_range", (row["step_s"], row["step_s"]))
        lines.append(f"| {config} | {row['label']} | {row['parameters']:,} | {row['step_s']:.4g} "
                     f"| {low:.3g}–{high:.3g} | {row.get('first_step_s', math.nan):.3g} | {row['sample_s']:.4g} | {row['peak_mib']:,.0f} | {row['train_mib']:,.0f} "
                     f"| {_ratio(row, reference, 'step_s')} | {_ratio(row, reference, 'sample_s')} "
                     f"| {_ratio(row, reference, 'train_mib')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.worker is not None:
        print(RESULT_PREFIX + json.dumps(measure(json.loads(args.worker))), flush=True)
        return
    if args.batch is None:
        args.batch = 64 if args.device == "cuda" else 16
    if args.iterations < 1 or args.warmup < 0 or args.batch < 1 or args.repeats < 1:
        raise SystemExit("need --iterations >= 1, --warmup >= 0, --batch >= 1 and --repeats >= 1")
    print(f"torch threads: {torch.get_num_threads()} (torch's default, on {os.cpu_count()} CPUs); "
          "each worker records its own", file=sys.stderr)
    try:
        import normflows
        normflows_version = getattr(normflows, "__version__", "?")
    except ImportError:
        normflows_version = "not installed (pip install -e '.[peers]')"
    rows = _rows(args)
    measured = [row for row in rows if "error" not in row]
    header = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "normflows": normflows_version,
        "device": args.device,
        "device_name": measured[0]["device_name"] if measured else (cpu_name() if args.device == "cpu" else "?"),
        "threads": measured[0]["threads"] if measured else torch.get_num_threads(),
        "batch": args.batch,
        "image_size": args.image_size,
        "repeats": args.repeats,
        "precision": args.precision,
        "iterations": args.iterations,
        "warmup": args.warmup,
        "command": shlex.join(["python", "-m", "benchmarks.versus_peers", *(sys.argv[1:] if argv is None else argv)]),
    }
    table = markdown(rows, header)
    print(table)
    if args.out is not None:
        args.out.write_text(table)
        args.out.with_suffix(".json").write_text(json.dumps({"header": header, "rows": rows}, indent=2) + "\n")
        print(f"wrote {args.out} and {args.out.with_suffix('.json')}", file=sys.stderr)


if __name__ == "__main__":
    main()
