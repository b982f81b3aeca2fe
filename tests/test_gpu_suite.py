"""benchmarks/gpu_suite.sh: the dry run (CPU, tiny sizes) writes every section with a
number in every row, and a piece that times out, crashes or outlasts the budget fails
its own row only."""
from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.gpu_suite import FAMILY_CONFIGS, Task, run_tasks

REPO = Path(__file__).resolve().parents[1]
# The wrapper's interpreter is this one (CI's virtual environment is not the repo's .venv).
SAME_PYTHON = {**os.environ, "PYTHON": sys.executable}
NORMFLOWS_INSTALLED = importlib.util.find_spec("normflows") is not None

# Section heading -> (rows expected, the column every measured row must hold a positive number in).
SECTIONS = {
    "## 1. Ours vs normflows": (4, "train step ms"),
    "## 2. Peak memory: plain vs memory_efficient": (6, "train step ms"),
    "## 3. Training images/s of every family's seed-size model": (len(FAMILY_CONFIGS), "images/s"),
    "## 4. One Config A step of the hierarchical flow": (2, "step s"),
    "## 5. Compiled vs eager": (6, "train step ms"),
    "## 6. Host reads per training step and sampling call": (2, "graphs"),
    "## 7. TarFlow's cached sampler, eager and compiled": (3, "images/s"),
}


def _tables(text: str) -> dict[str, list[dict[str, str]]]:
    """Each section's table as rows of {column: cell}."""
    tables, heading, columns = {}, None, None
    for line in text.splitlines():
        if line.startswith("## "):
            heading = next(h for h in SECTIONS if line.startswith(h))
            tables[heading], columns = [], None
        elif line.startswith("|") and heading is not None:
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            if columns is None:
                columns = cells
            elif not set("".join(cells)) <= set("-:"):  # not the separator line
                tables[heading].append(dict(zip(columns, cells)))
    return tables


def _number(cell: str) -> float:
    return float(cell.replace(",", ""))


@pytest.mark.slow  # ~35 s: the fast suite keeps to its budget; CI runs the slow tests
def test_dry_run_writes_every_section_with_a_number_in_every_row(tmp_path):
    out = tmp_path / "t.md"
    completed = subprocess.run(["bash", str(REPO / "benchmarks/gpu_suite.sh"), "--dry-run", "--out", str(out)],
                               env=SAME_PYTHON,
                               cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert completed.returncode == 0, completed.stderr[-3000:]
    text = out.read_text()
    for field in ("Date: ", "Machine: ", "torch ", "Command: `bash benchmarks/gpu_suite.sh --dry-run"):
        assert field in text
    tables = _tables(text)
    assert list(tables) == list(SECTIONS)
    for heading, (expected_rows, column) in SECTIONS.items():
        rows = tables[heading]
        assert len(rows) == expected_rows, (heading, rows)
        for row in rows:
            failed = [cell for cell in row.values() if cell.startswith("failed:")]
            if failed:
                # The only failure a healthy checkout may show: the optional peer is not installed.
                assert not NORMFLOWS_INSTALLED and row.get("implementation") == "normflows", row
                assert "normflows not installed" in failed[0]
                continue
            value = _number(row[column])
            assert math.isfinite(value) and value > 0, (heading, row)
    peers = tables["## 1. Ours vs normflows"]
    for row in (row for row in peers if row["implementation"] == "ours"):
        ratio = row["step ours/normflows"]
        assert _number(ratio) > 0 if NORMFLOWS_INSTALLED else ratio == "n/a", row
    # Every family's own model was built from its YAML: the names the modules give themselves
    # (the dry run's hierarchical flow is quick_hierarchical's, 32x32).
    models = [row["model"] for row in tables["## 3. Training images/s of every family's seed-size model"]]
    assert models == ["Glow32", "Glow64", "Glow16-SRF32(0.02)-SRF64(0.50)", "HierarchicalFlow32", "DiffusionFlow32",
                      "DiffusionFlow64", "NSF32", "NSF64", "PixelDDPM32", "PixelDDPM64"]
    # The compiled rows ran through dynamo (the dry run's eager backend), and no family
    # reads back to the host in its step or sampling call, one graph per loss.
    for row in tables["## 6. Host reads per training step and sampling call"]:
        assert (row["host reads / training step"], row["host reads / sampling call"], row["graph breaks"]) == \
            ("0", "0", "0"), row


def _sleep(name: str, limit_s: float, **spec) -> Task:
    return Task(name, "_sleep", spec, limit_s)


def _errors(outcome) -> dict[str, str | None]:
    return {name: reply.get("error") for name, reply in outcome.results.items()}


def test_a_piece_that_times_out_or_crashes_fails_only_its_own_row():
    tasks = [_sleep("stuck", 1.5, seconds=60), _sleep("after_stuck", 10), _sleep("crash", 10, exit=3),
             _sleep("after_crash", 10)]
    for shared in (True, False):
        errors = _errors(run_tasks(tasks, shared=shared, budget_s=60, log=lambda message: None))
        assert list(errors) == [task.id for task in tasks]
        assert errors["stuck"].startswith("timed out after 1.5 s (its limit)"), errors
        assert errors["crash"].startswith("worker exited with status 3"), errors
        assert errors["after_stuck"] is None and errors["after_crash"] is None, errors


def test_pieces_past_the_budget_are_skipped():
    tasks = [_sleep("long", 30, seconds=60), _sleep("next", 30)]
    errors = _errors(run_tasks(tasks, shared=False, budget_s=1.0, log=lambda message: None))
    assert errors["long"].startswith("timed out after 1 s (the suite's budget)"), errors
    assert errors["next"] == "skipped: the suite's budget of 1 s was spent"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the run on a machine without CUDA")
def test_a_gpu_run_without_cuda_stops_at_once_and_writes_no_table(tmp_path):
    out = tmp_path / "gpu.md"
    completed = subprocess.run(["bash", str(REPO / "benchmarks/gpu_suite.sh"), "--out", str(out)], env=SAME_PYTHON,
                               cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert completed.returncode != 0
    assert "CUDA is not available" in completed.stderr and "--dry-run" in completed.stderr
    assert completed.stderr.count("CUDA is not available") == 2  # one worker's report, then the exit: no more starts
    assert not out.exists()
