"""The benchmark script runs on tiny settings and prints a well-formed table (no timing checks)."""

import json
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
    for name in ["bare, reference MLP", "pipeline, reference MLP", "by hand, 1 epochs",
                 "bare, >10M-parameter MLP", "pipeline, >10M-parameter MLP"]:  # fmt: skip
        assert name in measures
    for name in ["pipeline / bare, reference MLP", "pipeline / by hand, 1 epochs"]:
        assert data["ratios"][name] > 0
    assert all(len(row) in (3, 4) for row in rows)
    assert all(value["median"] > 0 for value in data["rows"].values() if value["seconds"])


@pytest.mark.slow
def test_benchmark_sweep_table(tmp_path):
    stdout, data = run_benchmark(tmp_path, "sweep")
    assert "peak memory, relu job" in data["rows"]
    assert data["rows"]["peak memory, relu job"]["note"].endswith("GiB")
    assert data["ratios"]["four-job sweep, 2 workers / 1 worker"] > 0
    assert "reference sweep relu,sigmoid, end to end" in data["rows"]
    assert "interpreter start-up (import src.train)" in stdout
