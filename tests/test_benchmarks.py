"""The benchmark script runs on tiny settings and prints a well-formed table (no timing checks)."""

import json
import re
import subprocess
import sys

import pytest

from tests.conftest import PROJECT_ROOT

SCRIPT = PROJECT_ROOT / "benchmarks" / "monitoring.py"


def run_benchmark(tmp_path, *sections: str) -> tuple[str, dict]:
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny", "--repeats", "1", "--json", str(out),
         "--sections", *sections],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout, json.loads(out.read_text())


def table_rows(stdout: str) -> list[list[str]]:
    return [
        [cell.strip() for cell in line.strip("|").split("|")]
        for line in stdout.splitlines()
        if line.startswith("|") and not line.startswith("| ---")
    ]


def test_benchmark_reference_table(tmp_path):
    stdout, data = run_benchmark(tmp_path, "reference", "big")
    assert stdout.startswith("Machine: ")
    rows = table_rows(stdout)
    measures = [row[0] for row in rows]
    for name in ["bare, reference MLP", "pipeline, reference MLP",
                 "pipeline with writer, reference MLP", "by hand, 1 epochs",
                 "bare, >10M-parameter MLP", "pipeline, >10M-parameter MLP",
                 "pipeline with writer, >10M-parameter MLP", "CPU time, bare, reference MLP",
                 "CPU time, pipeline with writer, reference MLP",
                 "CPU time, writer process, reference MLP"]:  # fmt: skip
        assert name in measures
    for name in ["pipeline / bare, reference MLP", "pipeline with writer / bare, reference MLP",
                 "pipeline / by hand, 1 epochs"]:  # fmt: skip
        assert data["ratios"][name] > 0
    assert all(len(row) in (3, 4) for row in rows)
    assert all(value["median"] > 0 for value in data["rows"].values() if value["seconds"])


@pytest.mark.slow
def test_benchmark_sweep_table(tmp_path):
    stdout, data = run_benchmark(tmp_path, "sweep")
    assert "peak memory, relu job" in data["rows"]
    assert re.fullmatch(
        r"\d+\.\d\d GiB \(\d+\.\d\d anonymous \+ \d+\.\d\d file-backed at the largest sample\)",
        data["rows"]["peak memory, relu job"]["note"],
    )
    assert data["ratios"]["four-job sweep, 2 workers / 1 worker"] > 0
    assert "reference sweep relu,sigmoid, end to end" in data["rows"]
    assert "interpreter start-up (import src.train)" in stdout


def test_peak_memory_own_not_parent(tmp_path):
    """The launcher reports the command's own peak, not that of the large process above it."""
    ballast = bytearray(300 * 2**20)  # makes this process at least 300 MiB resident
    out = tmp_path / "peak.json"
    result = subprocess.run(
        [sys.executable, str(PROJECT_ROOT / "benchmarks" / "peak_memory.py"), "--json", str(out),
         "--", sys.executable, "-c", "x = bytearray(50 * 2**20)"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    del ballast
    assert result.returncode == 0, result.stderr
    peak = json.loads(out.read_text())
    assert 50 * 2**20 < peak["ru_maxrss"] < 250 * 2**20


def test_peak_memory_passes_exit_code(tmp_path):
    out = tmp_path / "peak.json"
    result = subprocess.run(
        [sys.executable, str(PROJECT_ROOT / "benchmarks" / "peak_memory.py"), "--json", str(out),
         "--", sys.executable, "-c", "raise SystemExit(3)"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 3
    assert json.loads(out.read_text())["returncode"] == 3


@pytest.mark.slow
def test_breakdown_table(tmp_path):
    out = tmp_path / "breakdown.json"
    result = subprocess.run(
        [sys.executable, str(PROJECT_ROOT / "benchmarks" / "breakdown.py"), "--tiny",
         "--repeats", "1", "--json", str(out)],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    medians = json.loads(out.read_text())["medians"]
    for phase in ["import torch", "data generation", "training iterations",
                  "gradient statistics (on the device)",
                  "metrics into the store (Tracker.log_metrics)", "per-epoch evaluation",
                  "histograms (on the device)", "activation hooks",
                  "3-D waterfall figure", "epoch images", "model logging",
                  "comparison at the sweep's end (once a sweep)"]:  # fmt: skip
        assert medians[phase] >= 0, phase
    assert "Memory of the first job's process" in result.stdout
