"""The GPU check in one short run (issue 21 item 4): every speed and memory figure the
README asks a CUDA machine for, written to ONE markdown file, in under 10 minutes on an H200.

    bash benchmarks/gpu_suite.sh                          # a CUDA machine: writes gpu_suite.md
    bash benchmarks/gpu_suite.sh --out runs/gpu_suite.md --budget-s 420
    bash benchmarks/gpu_suite.sh --dry-run --out /tmp/t.md   # CPU, tiny sizes, well under a minute

Sections (each row one measurement, "piece"):

1. **Ours vs normflows**: Glow with K=32 steps per scale, 512 hidden channels, L=3 on
   32x32x3, batch 64, in fp32 and bf16 (autocast): median training step (NLL, backward,
   Adam) and median sampling call in ms, and ours/normflows ratios. The measurement is
   ``benchmarks.versus_peers.measure`` (method and what differs between the two models:
   ``benchmarks/versus_peers.py``, ``benchmarks/peers.py``). normflows is the ``peers``
   extra (``pip install -e '.[peers]'``); without it its rows say so.
2. **Peak memory, plain vs ``memory_efficient``** (``flows/reversible.py``) at K=8/16/32,
   hidden 512, 64x64x3, batch 32, fp32: the training steps' peak (CUDA
   ``max_memory_allocated``) and the step time, each against plain at the same K.
3. **Training images/s of every family's seed-size model**, built from its
   ``experiments/*.yaml`` through the project's own CLI (``build_cli(run=False)``, as
   ``lightning fit`` would build it): one optimizer step per batch of random 8-bit
   images (the family's ``prepare_batch`` dequantization, ``compute_losses``, backward,
   the gradient-norm computation of every training step, the family's own optimizer),
   after the family's step-0 freezing (the cascade's RRDB encoders are frozen for their
   first 100k steps, so they are frozen here). Batch: the YAML's, at most 64. The
   cascade's sample-failure probe (every 500 steps in training) is switched off: it
   would otherwise run on every timed step.
4. **One Config A step of the hierarchical flow** (seed 001,
   ``experiments/hierarchical_celebahq256.yaml``) at batch 16, fp32 and bf16: the
   measurement of ``benchmarks/hierarchical_step.py``.
5. **Compiled vs eager**: the Glow of section 1 with its training loss and its sampling
   call under ``torch.compile`` (default mode, and ``reduce-overhead``: CUDA graphs), fp32
   and bf16; the first step's time (the compilation) apart. The dry run compiles with
   dynamo's ``eager`` backend: the capture is checked, not the generated code.
6. **Host reads** per training step and sampling call of each family's seed-size model,
   and the graphs of its loss (``benchmarks/host_syncs.py``).
7. **TarFlow's cached sampler, eager and compiled** (``benchmarks/tarflow_sampling.py``):
   its patch step over the static-shape key/value cache compiled once (default mode and
   ``reduce-overhead``), images per second and the first call (the compilation) apart,
   on ``experiments/tarflow_imagenet64.yaml``'s model (the dry run: the quick config's).

Running pieces: every piece runs in a worker subprocess with its own time limit; on a
GPU run each piece gets a **fresh process** (no allocator caches, compiled kernels or
memory peaks carry over; the piece's limit includes the process's start). A piece that
raises (a CUDA OOM, a missing package) or exceeds its limit (the worker is killed) gets
``failed: <reason>`` in its row and the suite goes on. The whole suite has a budget
(``--budget-s``, default 450 s): when it is spent, the remaining pieces are written as
skipped.

``--dry-run`` runs the same pieces, the same workers and the same table writer on the
CPU at tiny sizes (Glow K=2, hidden 16, 16x16, batch 2, one timed iteration; the
families' networks shrunk to width 8 and depth 1, the hierarchical flow from
``experiments/quick_hierarchical.yaml``), all pieces in one shared worker process (a
fresh process per piece would spend minutes importing torch and Lightning) with one
torch thread; its numbers are not measurements. ``tests/test_gpu_suite.py`` runs it so
the script cannot rot. Without CUDA a GPU run stops after the first worker's start and
writes no table.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import math
import os
import platform
import queue
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The worker's lines with these prefixes carry its results; anything else a library prints
# on stdout cannot be mistaken for one.
RESULT_PREFIX = "GPU_SUITE_RESULT "
ENV_PREFIX = "GPU_SUITE_ENV "
NORMFLOWS = "normflows"
DEFAULT_BUDGET_S = 540.0
COMPILE_MODES = ("eager", "default", "reduce-overhead")  # section 5; reduce-overhead: CUDA graphs  # 7.5 minutes: the 8, less a margin for the driver itself

FAMILY_CONFIGS = [
    ("Glow", "experiments/glow_cifar10.yaml"),
    ("Glow", "experiments/glow_celeba64.yaml"),
    ("CSRFlow cascade", "experiments/celeba_cascade.yaml"),
    ("hierarchical", "experiments/hierarchical_celebahq256.yaml"),
    ("diffusion flow", "experiments/diffusion_flow_mnist.yaml"),
    ("diffusion flow", "experiments/diffusion_flow_celeba64.yaml"),
    ("NSF", "experiments/nsf_mnist.yaml"),
    ("NSF", "experiments/nsf_celeba64.yaml"),
    ("pixel DDPM", "experiments/pixel_ddpm_mnist.yaml"),
    ("pixel DDPM", "experiments/pixel_ddpm_celeba64.yaml"),
]
HIERARCHICAL_CONFIG_A = "experiments/hierarchical_celebahq256.yaml"
# Dry run: the hierarchical flow's level structure ties its channel counts together
# (508 + 4 = 8 x 8 x 8 at resolution 1), so it is not shrunk key by key: its CPU-sized
# config stands in.
DRY_HIERARCHICAL_CONFIG = "experiments/quick_hierarchical.yaml"
# Dry run: every model key below, wherever it sits in a family's model section, is set
# to this value (widths 8, depth 1), so each family builds and steps in about a second.
DRY_SHRINK = {
    "steps_per_scale": 1, "hidden_channels": 8, "num_blocks": 1, "base_channels": 8, "channel_mults": [1, 2],
    "num_res_blocks": 1, "attention_resolutions": [], "rrdb_blocks": 1, "rrdb_features": 8,
}


@dataclass(frozen=True)
class Sizes:
    """The sizes of every piece: the GPU run's, or the dry run's."""

    peer_steps: int
    peer_hidden: int
    peer_image: int
    peer_batch: int
    peer_iterations: int  # section 1: versus_peers' own defaults on a GPU run
    peer_warmup: int
    memory_steps: tuple[int, ...]
    memory_hidden: int
    memory_image: int
    memory_batch: int
    family_batch_cap: int
    shrink_families: bool
    hierarchical_config: str
    hierarchical_batch: int
    iterations: int
    warmup: int
    # Section 5: torch.compile's backend ("inductor"; the dry run "eager": dynamo's
    # capture alone, in seconds) and the configs whose host reads section 6 counts.
    compile_backend: str
    host_read_configs: tuple[str, ...]
    # Section 7: TarFlow's sampler (config, samples per call, timed calls).
    tarflow_config: str
    tarflow_samples: int
    tarflow_repeats: int
    # Per-piece limits (seconds), each including the piece's process start on a GPU run.
    peer_limit_s: float
    memory_limit_s: float
    family_limit_s: float
    hierarchical_limit_s: float


GPU_SIZES = Sizes(peer_steps=32, peer_hidden=512, peer_image=32, peer_batch=64, peer_iterations=10, peer_warmup=3,
                  memory_steps=(8, 16, 32), memory_hidden=512, memory_image=64, memory_batch=32,
                  family_batch_cap=64, shrink_families=False, hierarchical_config=HIERARCHICAL_CONFIG_A,
                  hierarchical_batch=16, iterations=5, warmup=2, compile_backend="inductor",
                  host_read_configs=("glow_cifar10.yaml", "celeba_cascade.yaml", "hierarchical_celebahq256.yaml",
                                     "diffusion_flow_mnist.yaml", "pixel_ddpm_mnist.yaml", "nsf_mnist.yaml",
                                     "tarflow_imagenet64.yaml"),
                  tarflow_config="experiments/tarflow_imagenet64.yaml", tarflow_samples=16, tarflow_repeats=1,
                  peer_limit_s=90, memory_limit_s=90, family_limit_s=120, hierarchical_limit_s=150)
DRY_SIZES = Sizes(peer_steps=2, peer_hidden=16, peer_image=16, peer_batch=2, peer_iterations=1, peer_warmup=0,
                  memory_steps=(1, 2, 4), memory_hidden=16, memory_image=16, memory_batch=2,
                  family_batch_cap=2, shrink_families=True, hierarchical_config=DRY_HIERARCHICAL_CONFIG,
                  hierarchical_batch=2, iterations=1, warmup=0, compile_backend="eager",
                  host_read_configs=("quick_photos.yaml", "quick_tarflow.yaml"),
                  tarflow_config="experiments/quick_tarflow.yaml", tarflow_samples=2, tarflow_repeats=1,
                  # The first piece of the shared worker pays for importing torch and Lightning.
                  peer_limit_s=90, memory_limit_s=60, family_limit_s=90, hierarchical_limit_s=60)


@dataclass
class Task:
    """One piece: ``kind`` names the worker function, ``spec`` its JSON arguments."""

    id: str
    kind: str
    spec: dict
    limit_s: float


# --- the worker: runs tasks in this process, one result line each ---------------------------------
def _cuda_fresh_start() -> None:
    """Between two pieces of a shared worker: no tensors or cached blocks of the last
    piece, and a fresh peak, so ``max_memory_allocated`` is this piece's alone."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def run_glow(spec: dict) -> dict:
    """Sections 1 and 2: ``benchmarks.versus_peers.measure`` of one Glow."""
    import importlib.util

    if spec["implementation"] == NORMFLOWS and importlib.util.find_spec(NORMFLOWS) is None:
        raise RuntimeError("normflows not installed (pip install -e '.[peers]')")
    from benchmarks.versus_peers import measure

    _cuda_fresh_start()
    result = measure(spec)
    keep = ("parameters", "step_s", "sample_s", "peak_mib", "train_mib", "final_nll", "device_name", "first_step_s")
    return {key: result[key] for key in keep}


def _shrunk(node, shrink: dict):
    """``node`` with every key of ``shrink`` set to its value, at any depth."""
    if isinstance(node, dict):
        return {key: (shrink[key] if key in shrink else _shrunk(value, shrink)) for key, value in node.items()}
    if isinstance(node, list):
        return [_shrunk(item, shrink) for item in node]
    return node


def build_family_module(config_path: str, shrink: bool, workdir: str):
    """The LightningModule of an experiment YAML, built by the project's CLI as ``lightning
    fit`` builds it, and the YAML's training batch size. Only the model and data sections
    are kept: the trainer's loggers and callbacks play no part in a step."""
    import yaml

    from lightning_modules.cli import build_cli

    config = yaml.safe_load((REPO / config_path).read_text())
    model = _shrunk(config["model"], DRY_SHRINK) if shrink else config["model"]
    trimmed = {"model": model, "data": config["data"]}  # no ckpt_path: not a key without a subcommand
    path = Path(workdir) / Path(config_path).name
    path.write_text(yaml.safe_dump(trimmed))
    cli = build_cli(["--config", str(path), "--trainer.logger", "false", "--trainer.accelerator", "cpu",
                     "--trainer.devices", "1", "--trainer.default_root_dir", workdir,
                     "--trainer.enable_progress_bar", "false"], run=False)
    return cli.model, int(config["data"]["init_args"].get("batch_size", 1))


def run_family(spec: dict) -> dict:
    """Section 3: training images/s of one family's model."""
    import torch

    from benchmarks.timing import time_steps
    from lightning_modules.parts import build_optimizer

    _cuda_fresh_start()
    torch.manual_seed(0)
    device = torch.device(spec["device"])
    with tempfile.TemporaryDirectory() as workdir:
        module, yaml_batch = build_family_module(spec["config"], spec["shrink"], workdir)
    if getattr(module, "failure_probe_every_n_steps", 0):
        # The cascade's sample-failure probe runs every 500 steps in training; without a
        # trainer the step count stays 0 and it would run on every timed step.
        module.failure_probe_every_n_steps = 0
    batch_size = min(yaml_batch, spec["batch_cap"])
    module.configure_model()  # channels_last where the YAML asks for it
    module = module.to(device)
    # The schedule is not stepped: it only needs a step count per epoch to exist.
    optimizer = build_optimizer(module.optimizer_groups(), lambda: 1000)["optimizer"]
    generator = torch.Generator().manual_seed(0)
    batch = {"images": {r: torch.randint(0, 256, (batch_size, module.in_channels, r, r), dtype=torch.uint8,
                                         generator=generator).to(device) for r in module.resolutions},
             "label": torch.zeros(batch_size, dtype=torch.long, device=device)}
    module.on_train_batch_start(batch, 0)  # step 0's freezing (the cascade's RRDB encoders)
    module.train()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=spec["precision"] == "bf16")
    parameters = [p for p in module.parameters() if p.requires_grad]
    threshold = module.grad_clip_norm or math.inf
    losses = []

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = module.compute_losses(module.prepare_batch(batch, noise=True)).loss
        loss.backward()
        # Every training step computes the gradient norm (FlowModule.on_before_optimizer_step).
        torch.nn.utils.clip_grad_norm_(parameters, threshold)
        optimizer.step()
        losses.append(loss.detach())

    elapsed, peak = time_steps(step, device, spec["warmup"], spec["iterations"])
    final_loss = losses[-1].float().item()
    if not math.isfinite(final_loss):
        raise FloatingPointError(f"the loss is {final_loss}")
    return {"model_name": module.model_name, "parameters": sum(p.numel() for p in module.parameters()),
            "batch": batch_size, "resolutions": list(module.resolutions),
            "images_per_second": batch_size * spec["iterations"] / elapsed,
            "step_s": elapsed / spec["iterations"], "peak_mib": peak}


def run_hierarchical_step(spec: dict) -> dict:
    """Section 4: ``benchmarks/hierarchical_step.py`` itself, its JSON line read back."""
    from unittest import mock

    from benchmarks import hierarchical_step

    _cuda_fresh_start()
    argv = ["hierarchical_step", "--config", spec["config"], "--batch", str(spec["batch"]), "--iterations",
            str(spec["iterations"]), "--warmup", str(spec["warmup"]), "--device", spec["device"],
            "--precision", spec["precision"]]
    printed = io.StringIO()
    with mock.patch.object(sys, "argv", argv), contextlib.redirect_stdout(printed):
        hierarchical_step.main()
    result = json.loads(printed.getvalue().strip().splitlines()[-1])
    return {"parameters_millions": result["parameters_millions"], "step_s": result["seconds_per_step"],
            "peak_mib": result["peak_memory_mib"], "batch": spec["batch"]}


def run_sleep(spec: dict) -> dict:
    """For the runner's tests: sleep, then return or end the process with a status."""
    time.sleep(spec.get("seconds", 0))
    if "exit" in spec:
        os._exit(spec["exit"])
    return {"slept_s": spec.get("seconds", 0)}


def run_host_reads(spec: dict) -> dict:
    """Section 6: host reads of one family's training step and sampling call, and the
    graphs of its loss (``benchmarks/host_syncs.py``), on the suite's device."""
    import torch

    from benchmarks.host_syncs import build_module, graph_breaks, random_batch, sampling_reads, training_step_reads

    _cuda_fresh_start()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as workdir:
        module = build_module(spec["config"], Path(workdir)).to(spec["device"])
    batch = {key: ({r: x.to(spec["device"]) for r, x in value.items()} if isinstance(value, dict)
                   else value.to(spec["device"])) for key, value in random_batch(module, 2).items()}
    train = training_step_reads(module, batch)
    sample = sampling_reads(module)
    graphs, breaks, _ = graph_breaks(module, batch)
    return {"model_name": module.model_name, "training_reads": train.total, "sampling_reads": sample.total,
            "graphs": graphs, "breaks": breaks}


def run_tarflow_sampling(spec: dict) -> dict:
    """Section 7: TarFlow's cached sampler, eager or compiled (``benchmarks/tarflow_sampling.py``)."""
    from benchmarks.tarflow_sampling import measure

    _cuda_fresh_start()
    return measure(spec["config"], spec["n"], spec["repeats"], spec["device"], compile=spec["mode"] != "eager",
                   compile_mode=None if spec["mode"] in ("eager", "default") else spec["mode"],
                   compile_backend=spec["backend"], uncached=False)


WORKERS = {"glow": run_glow, "family": run_family, "hierarchical_step": run_hierarchical_step,
           "host_reads": run_host_reads, "tarflow_sampling": run_tarflow_sampling, "_sleep": run_sleep}


def _environment() -> dict:
    import torch

    cuda = torch.cuda.is_available()
    return {"torch": torch.__version__, "cuda": cuda,
            "device_name": torch.cuda.get_device_name(0) if cuda else _cpu_name(),
            "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(), "platform": platform.platform(),
            "python": platform.python_version()}


def _one_line(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".strip()
    return next((line for line in text.splitlines() if line.strip()), type(error).__name__)


def worker(tasks_file: str) -> None:
    tasks = json.loads(Path(tasks_file).read_text())
    if any(task["kind"] != "_sleep" for task in tasks):
        print("\n" + ENV_PREFIX + json.dumps(_environment()), flush=True)
    for task in tasks:
        try:
            line = {"id": task["id"], "result": WORKERS[task["kind"]](task["spec"])}
        except Exception as error:  # noqa: BLE001 -- any failure of a piece is that piece's row
            line = {"id": task["id"], "error": _one_line(error)}
        # On a line of its own even after a library's unterminated print.
        print("\n" + RESULT_PREFIX + json.dumps(line), flush=True)


# --- the driver: tasks through workers, with limits ---------------------------------------------
@dataclass
class Outcome:
    results: dict[str, dict] = field(default_factory=dict)  # id -> {"result": ...} or {"error": ...}
    environment: dict | None = None
    fatal: str | None = None  # a reason every piece fails alike (no CUDA): the rest are not started


def _seconds(value: float) -> str:
    """1.5 -> '1.5', 0.997 -> '1', 90.0 -> '90'."""
    return f"{value:.1f}".rstrip("0").rstrip(".")


def _read_lines(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)  # end of output: the worker has exited


def _stderr_tail(path: Path) -> str:
    lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else "no output on stderr"


def _run_worker(tasks: list[Task], outcome: Outcome, deadline: float, budget_s: float, python: str,
                log, require_cuda: bool, env: dict | None) -> None:
    """One worker process for ``tasks``, in order, until they are done, one fails the
    process (exit, limit) or the budget is spent; fills ``outcome`` for each task it
    settles (at least the first)."""
    with tempfile.TemporaryDirectory() as scratch:
        tasks_file, stderr_file = Path(scratch) / "tasks.json", Path(scratch) / "stderr.txt"
        tasks_file.write_text(json.dumps([{"id": t.id, "kind": t.kind, "spec": t.spec} for t in tasks]))
        with stderr_file.open("w") as stderr:
            # Its own process group: a timed-out piece is ended with whatever it started.
            process = subprocess.Popen([python, "-m", "benchmarks.gpu_suite", "--worker", str(tasks_file)],
                                       cwd=REPO, stdout=subprocess.PIPE, stderr=stderr, text=True,
                                       start_new_session=True, env=env)
            lines: queue.Queue = queue.Queue()
            threading.Thread(target=_read_lines, args=(process.stdout, lines), daemon=True).start()
            try:
                for task in tasks:
                    started = time.monotonic()
                    allowed = min(task.limit_s, deadline - started)
                    if allowed <= 0:
                        _skip([task], outcome, budget_s, log)
                        continue
                    settled = None
                    while settled is None:
                        try:
                            line = lines.get(timeout=max(0.0, started + allowed - time.monotonic()))
                        except queue.Empty:
                            limit = "the suite's budget" if allowed < task.limit_s else "its limit"
                            settled = {"error": f"timed out after {_seconds(allowed)} s ({limit})"}
                            break
                        if line is None:
                            process.wait()
                            settled = {"error": f"worker exited with status {process.returncode}: "
                                                f"{_stderr_tail(stderr_file)}"}
                        elif line.startswith(ENV_PREFIX):
                            environment = json.loads(line[len(ENV_PREFIX):])
                            outcome.environment = outcome.environment or environment
                            if require_cuda and not environment["cuda"]:
                                # Every piece would fail alike, each after starting a process.
                                outcome.fatal = (f"CUDA is not available to torch {environment['torch']} "
                                                 f"({python}); --dry-run is the CPU check")
                                log(f"  {outcome.fatal}")
                                return
                        elif line.startswith(RESULT_PREFIX):
                            reply = json.loads(line[len(RESULT_PREFIX):])
                            if reply["id"] == task.id:
                                settled = {key: value for key, value in reply.items() if key != "id"}
                    outcome.results[task.id] = settled
                    seconds = time.monotonic() - started
                    log(f"  {task.id}: {'failed: ' + settled['error'] if 'error' in settled else 'ok'} "
                        f"({seconds:.1f} s)")
                    if "error" in settled and (settled["error"].startswith(("timed out", "worker exited"))):
                        return  # this process is gone or stuck: the caller starts another
            finally:
                if process.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def _skip(tasks: list[Task], outcome: Outcome, budget_s: float, log) -> None:
    for task in tasks:
        outcome.results[task.id] = {"error": f"skipped: the suite's budget of {budget_s:g} s was spent"}
        log(f"  {task.id}: skipped (budget spent)")


def run_tasks(tasks: list[Task], *, shared: bool, budget_s: float, python: str = sys.executable,
              require_cuda: bool = False, env: dict | None = None,
              log=lambda message: print(message, file=sys.stderr, flush=True)) -> Outcome:
    """Every task's result or failure. ``shared``: one worker process for as many tasks
    as it completes (a new one after a timeout or crash); else a fresh process per task.
    ``require_cuda``: when a worker's torch sees no CUDA, every task fails at once.
    ``env``: the workers' environment (default: this process's)."""
    outcome = Outcome()
    deadline = time.monotonic() + budget_s
    while len(outcome.results) < len(tasks):
        pending = [task for task in tasks if task.id not in outcome.results]
        if time.monotonic() >= deadline:
            _skip(pending, outcome, budget_s, log)
            break
        _run_worker(pending if shared else pending[:1], outcome, deadline, budget_s, python, log, require_cuda, env)
        if outcome.fatal:
            for task in pending:
                outcome.results.setdefault(task.id, {"error": outcome.fatal})
    return outcome


# --- the pieces ---------------------------------------------------------------------------------
def build_tasks(sizes: Sizes, device: str, dry_run: bool) -> list[Task]:
    tasks = []
    for precision in ("fp32", "bf16"):
        for implementation in ("ours", NORMFLOWS):
            spec = dict(label=implementation, implementation=implementation, glow_kwargs={},
                        steps=sizes.peer_steps, hidden=sizes.peer_hidden, image_size=sizes.peer_image,
                        device=device, batch=sizes.peer_batch, precision=precision,
                        iterations=sizes.peer_iterations, warmup=sizes.peer_warmup, seed=0)
            tasks.append(Task(f"peers/{precision}/{implementation}", "glow", spec, sizes.peer_limit_s))
    for steps in sizes.memory_steps:
        for mode, kwargs in (("plain", {}), ("memory_efficient", {"memory_efficient": True})):
            spec = dict(label=mode, implementation="ours", glow_kwargs=kwargs, steps=steps, hidden=sizes.memory_hidden,
                        image_size=sizes.memory_image, device=device, batch=sizes.memory_batch, precision="fp32",
                        iterations=sizes.iterations, warmup=sizes.warmup, seed=0)
            tasks.append(Task(f"memory/{steps}/{mode}", "glow", spec, sizes.memory_limit_s))
    for family, config in FAMILY_CONFIGS:
        if family == "hierarchical" and dry_run:
            config = DRY_HIERARCHICAL_CONFIG
        spec = dict(family=family, config=config, shrink=sizes.shrink_families and family != "hierarchical",
                    batch_cap=sizes.family_batch_cap, device=device, precision="fp32",
                    iterations=sizes.iterations, warmup=sizes.warmup)
        tasks.append(Task(f"family/{config}", "family", spec, sizes.family_limit_s))
    for precision in ("fp32", "bf16"):
        spec = dict(config=sizes.hierarchical_config, batch=sizes.hierarchical_batch, device=device,
                    precision=precision, iterations=sizes.iterations, warmup=sizes.warmup)
        tasks.append(Task(f"hierarchical/{precision}", "hierarchical_step", spec, sizes.hierarchical_limit_s))
    for precision in ("fp32", "bf16"):
        for mode in COMPILE_MODES:
            kwargs = {} if mode == "eager" else {
                "torch_compile": True, "compile_sampling": True, "compile_backend": sizes.compile_backend,
                "compile_mode": None if mode == "default" else mode}
            spec = dict(label=mode, implementation="ours", glow_kwargs=kwargs, steps=sizes.peer_steps,
                        hidden=sizes.peer_hidden, image_size=sizes.peer_image, device=device, batch=sizes.peer_batch,
                        precision=precision, iterations=sizes.peer_iterations, warmup=max(1, sizes.peer_warmup),
                        seed=0)
            # A compiled piece pays its compilation inside its limit.
            tasks.append(Task(f"compiled/{precision}/{mode}", "glow", spec, 2 * sizes.peer_limit_s))
    for config in sizes.host_read_configs:
        tasks.append(Task(f"host_reads/{config}", "host_reads", dict(config=config, device=device),
                          sizes.family_limit_s))
    for mode in COMPILE_MODES:
        spec = dict(config=sizes.tarflow_config, n=sizes.tarflow_samples, repeats=sizes.tarflow_repeats,
                    device=device, mode=mode, backend=sizes.compile_backend)
        tasks.append(Task(f"tarflow_sampling/{mode}", "tarflow_sampling", spec, 2 * sizes.peer_limit_s))
    return tasks


# --- the table ---------------------------------------------------------------------------------
def _row(reply: dict, leading: str, cells: int, render) -> str:
    """One table row: the leading cells, then ``render(result)`` (``cells`` cells) or the
    failure in the first of them."""
    if "error" in reply:
        return f"| {leading} | {_failed(reply)} |" + " |" * (cells - 1)
    return f"| {leading} | {render(reply['result'])} |"


def _rate(result: dict) -> str:
    return f"{result['batch'] / result['step_s']:.4g}" if result["step_s"] else "n/a"


def _failed(reply: dict) -> str:
    reason = reply["error"].replace("|", "/").replace("\n", " ")
    return f"failed: {reason[:160]}"


def _ms(seconds: float) -> str:
    return f"{1000 * seconds:.4g}"


def _mib(value) -> str:
    return "n/a (CPU)" if value is None else f"{value:,.0f}"


def _ratio(numerator: dict, denominator: dict, key: str) -> str:
    if "error" in numerator or "error" in denominator:
        return "n/a"
    base = denominator["result"][key]
    return f"{numerator['result'][key] / base:.2f}" if base else "n/a"


def markdown(tasks: list[Task], outcome: Outcome, header: dict, sizes: Sizes) -> str:
    results = outcome.results
    by_id = {task.id: task for task in tasks}
    peers = by_id["peers/fp32/ours"].spec
    lines = [
        "# GPU suite",
        "",
        f"Date: {header['date']}. Machine: {header['device_name']} ({header['platform']}, {header['cpu_count']} CPUs, "
        f"{header['threads']} torch threads). torch {header['torch']}, Python {header['python']}.",
        f"Command: `{header['command']}`",
        f"Mode: {header['mode']}. Wall time {header['wall_s']:.0f} s of a {header['budget_s']:g} s budget.",
        "",
        f"## 1. Ours vs normflows: Glow K={sizes.peer_steps}, hidden {sizes.peer_hidden}",
        "",
        f"L=3, {peers['image_size']}x{peers['image_size']}x3, batch {peers['batch']}; median of "
        f"{peers['iterations']} after {peers['warmup']} warm-up (`benchmarks/versus_peers.py`'s measurement); "
        "peak MiB: the piece's whole run (CUDA `max_memory_allocated`; CPU: the process's peak resident set).",
        "",
        "| precision | implementation | parameters | train step ms | sampling ms | peak MiB "
        "| step ours/normflows | sampling ours/normflows |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for precision in ("fp32", "bf16"):
        ours, peer = results[f"peers/{precision}/ours"], results[f"peers/{precision}/{NORMFLOWS}"]
        for name, reply in (("ours", ours), (NORMFLOWS, peer)):
            if "error" in reply:
                lines.append(f"| {precision} | {name} | {_failed(reply)} | | | | | |")
                continue
            r = reply["result"]
            ratios = (f"{_ratio(ours, peer, 'step_s')} | {_ratio(ours, peer, 'sample_s')}" if name == "ours"
                      else "– | –")
            lines.append(f"| {precision} | {name} | {r['parameters']:,} | {_ms(r['step_s'])} | {_ms(r['sample_s'])} "
                         f"| {r['peak_mib']:,.0f} | {ratios} |")
    memory = by_id[f"memory/{sizes.memory_steps[0]}/plain"].spec
    lines += [
        "",
        "## 2. Peak memory: plain vs memory_efficient",
        "",
        f"Glow, L=3, {memory['image_size']}x{memory['image_size']}x3, hidden {memory['hidden']}, batch "
        f"{memory['batch']}, fp32; train MiB: the training steps' peak (CUDA `max_memory_allocated`; CPU: the "
        "resident set they add).",
        "",
        "| K | mode | parameters | train MiB | train step ms | train MiB / plain | step / plain |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for steps in sizes.memory_steps:
        plain = results[f"memory/{steps}/plain"]
        for mode in ("plain", "memory_efficient"):
            reply = results[f"memory/{steps}/{mode}"]
            ratios = ("– | –" if mode == "plain"
                      else f"{_ratio(reply, plain, 'train_mib')} | {_ratio(reply, plain, 'step_s')}")
            lines.append(_row(reply, f"{steps} | {mode}", 5, lambda r: (
                f"{r['parameters']:,} | {r['train_mib']:,.0f} | {_ms(r['step_s'])} | {ratios}")))
    family_tasks = [task for task in tasks if task.kind == "family"]
    first = family_tasks[0].spec
    lines += [
        "",
        "## 3. Training images/s of every family's seed-size model",
        "",
        f"Built from the YAML by the project's CLI; one optimizer step per batch of random 8-bit images, "
        f"{first['precision']}, mean of {first['iterations']} after {first['warmup']} warm-up; batch: the YAML's, "
        f"at most {first['batch_cap']}; the cascade trains its three stages in one step"
        + ("; dry run: networks shrunk to width 8, depth 1" if first["shrink"] else "") + ".",
        "",
        "| family | config | model | parameters (M) | batch | resolutions | images/s | step ms | peak MiB |",
        "|---|---|---|---:|---:|---|---:|---:|---:|",
    ]
    for task in family_tasks:
        lines.append(_row(results[task.id], f"{task.spec['family']} | `{task.spec['config']}`", 7, lambda r: (
            f"{r['model_name']} | {r['parameters'] / 1e6:.2f} | {r['batch']} | "
            f"{', '.join(map(str, r['resolutions']))} | {r['images_per_second']:.4g} | {_ms(r['step_s'])} | "
            f"{_mib(r['peak_mib'])}")))
    step = by_id["hierarchical/fp32"].spec
    lines += [
        "",
        "## 4. One Config A step of the hierarchical flow",
        "",
        f"`benchmarks/hierarchical_step.py --config {step['config']} --batch {step['batch']}`: forward, backward, "
        f"gradient clipping 50, Adam over the three parameter groups; mean of {step['iterations']} after "
        f"{step['warmup']} warm-up.",
        "",
        "| precision | config | parameters (M) | step s | images/s | peak MiB |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for precision in ("fp32", "bf16"):
        lines.append(_row(results[f"hierarchical/{precision}"], f"{precision} | `{step['config']}`", 4,
                          lambda r: f"{r['parameters_millions']:.2f} | {r['step_s']:.4g} | {_rate(r)} | "
                                    f"{_mib(r['peak_mib'])}"))
    compiled = by_id["compiled/fp32/default"].spec
    lines += [
        "",
        f"## 5. Compiled vs eager: Glow K={sizes.peer_steps}, hidden {sizes.peer_hidden}",
        "",
        f"`torch.compile` of the training loss (forward and backward) and of the sampling call, backend "
        f"{compiled['glow_kwargs']['compile_backend']}; reduce-overhead: CUDA graphs. Batch {compiled['batch']}; "
        "median step after warm-up; first step: the first training step alone (its compilation).",
        "",
        "| precision | mode | train step ms | first step s | sampling ms | peak MiB | step / eager | sampling / eager |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for precision in ("fp32", "bf16"):
        eager = results[f"compiled/{precision}/eager"]
        for mode in COMPILE_MODES:
            reply = results[f"compiled/{precision}/{mode}"]
            ratios = ("– | –" if mode == "eager"
                      else f"{_ratio(reply, eager, 'step_s')} | {_ratio(reply, eager, 'sample_s')}")
            lines.append(_row(reply, f"{precision} | {mode}", 6, lambda r: (
                f"{_ms(r['step_s'])} | {r['first_step_s']:.3g} | {_ms(r['sample_s'])} | {r['peak_mib']:,.0f} "
                f"| {ratios}")))
    lines += [
        "",
        "## 6. Host reads per training step and sampling call, graphs of the loss",
        "",
        "`benchmarks/host_syncs.py` on the suite's device: ops that read a tensor back to the host "
        "(`.item()`, `bool(t)`, boolean indexing, `nonzero`) in one `compute_losses` + backward and one "
        "`sample_images` call after a first one; graphs and breaks of `compute_losses` under dynamo's explain.",
        "",
        "| config | model | host reads / training step | host reads / sampling call | graphs | graph breaks |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for config in sizes.host_read_configs:
        lines.append(_row(results[f"host_reads/{config}"], f"`{config}`", 5, lambda r: (
            f"{r['model_name']} | {r['training_reads']} | {r['sampling_reads']} | {r['graphs']} | {r['breaks']}")))
    lines += [
        "",
        f"## 7. TarFlow's cached sampler, eager and compiled: `{sizes.tarflow_config}`",
        "",
        f"`benchmarks/tarflow_sampling.py`: {sizes.tarflow_samples} samples per call, the model untrained and "
        f"perturbed; compiled: the patch step over the static-shape key/value cache (backend "
        f"{sizes.compile_backend}; reduce-overhead: CUDA graphs); first call: the compilation.",
        "",
        "| mode | patches x blocks | seconds per call | images/s | first call s | images/s / eager |",
        "|---|---|---:|---:|---:|---:|",
    ]
    eager = results.get("tarflow_sampling/eager", {}).get("result")
    for mode in COMPILE_MODES:
        reply = results[f"tarflow_sampling/{mode}"]

        def tarflow_row(r, mode=mode):
            rate = r.get("compiled_images_per_s", r["cached_images_per_s"])
            ratio = f"{rate / eager['cached_images_per_s']:.2f}" if eager and mode != "eager" else "–"
            first = f"{r['compiled_first_call_s']:.3g}" if mode != "eager" else "–"
            return (f"{r['patches']} x {r['blocks']} | {r.get('compiled_s', r['cached_s']):.4g} | {rate:.4g} | "
                    f"{first} | {ratio}")
        lines.append(_row(reply, mode, 5, tarflow_row))
    return "\n".join(lines) + "\n"


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="The GPU check in one run: ours vs normflows, memory modes, "
                                                 "every family's images/s, a Config A step; one markdown file.")
    parser.add_argument("--out", type=Path, default=Path("gpu_suite.md"),
                        help="the markdown file (default gpu_suite.md)")
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU, tiny sizes, one shared worker: checks the suite runs (numbers are not measurements)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help=f"the whole suite's time budget (default {DEFAULT_BUDGET_S:g} s; dry run 240 s)")
    parser.add_argument("--shared-process", action="store_true",
                        help="all pieces in one worker process (faster start, pieces no longer isolated); "
                             "the dry run's default")
    parser.add_argument("--python", default=sys.executable, help="the interpreter of the workers")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: a worker's tasks file
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.worker is not None:
        worker(args.worker)
        return
    sizes = DRY_SIZES if args.dry_run else GPU_SIZES
    device = "cpu" if args.dry_run else "cuda"
    budget_s = args.budget_s if args.budget_s is not None else (240.0 if args.dry_run else DEFAULT_BUDGET_S)
    shared = args.shared_process or args.dry_run
    out = args.out.resolve()  # before anything changes directory: relative to where the user ran it
    tasks = build_tasks(sizes, device, args.dry_run)
    started = time.monotonic()
    print(f"gpu_suite: {len(tasks)} pieces, {'one shared worker' if shared else 'a fresh process each'}, "
          f"budget {budget_s:g} s", file=sys.stderr, flush=True)
    env = dict(os.environ)
    if args.dry_run:
        # One intra-op thread: on a small machine shared with other jobs, torch's threads
        # waiting on each other stall the tiny steps for seconds (the dry run took 2.5x longer).
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    outcome = run_tasks(tasks, shared=shared, budget_s=budget_s, python=args.python, require_cuda=device == "cuda",
                        env=env)
    environment = outcome.environment or {"torch": "?", "cuda": False, "device_name": "?", "cpu_count": os.cpu_count(),
                                          "threads": "?", "platform": platform.platform(),
                                          "python": platform.python_version()}
    if outcome.fatal:
        raise SystemExit(f"gpu_suite: {outcome.fatal}; no table written.")
    launcher = os.environ.get("GPU_SUITE_LAUNCHER", "python -m benchmarks.gpu_suite")
    header = {**environment,
              "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "command": " ".join([launcher, *map(shlex.quote, sys.argv[1:] if argv is None else argv)]),
              "mode": ("dry run: CPU, tiny sizes, one shared worker process, one torch thread; the numbers are "
                       "not measurements"
                       if args.dry_run else
                       f"{device}, {'one shared worker process' if shared else 'a fresh process per piece'}"),
              "wall_s": time.monotonic() - started, "budget_s": budget_s}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(markdown(tasks, outcome, header, sizes))
    failed = sum("error" in reply for reply in outcome.results.values())
    print(f"gpu_suite: wrote {out} ({failed} of {len(tasks)} pieces failed, {header['wall_s']:.0f} s)",
          file=sys.stderr)


if __name__ == "__main__":
    main()
