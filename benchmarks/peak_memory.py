"""Run a command and report its peak resident memory, split into anonymous and file-backed pages.

    python benchmarks/peak_memory.py --json peak.json -- python -m src.train

Linux copies the memory high-water mark of the process that forks a child into
the child's ``ru_maxrss`` (at ``exec``, from the forking process's address
space). A command started by a large process, such as the benchmark after it
trained a model, therefore reports at least that process's size. Started from this
small launcher, the command's ``ru_maxrss`` is its own peak, plus that of its
own children where larger.

While the command runs, this launcher samples ``/proc/PID/status`` every 20 ms.
The largest sample splits the resident set into anonymous memory (heap, torch
tensors, pages of libraries written to) and file-backed pages (mostly the code
and read-only data of shared libraries, which other processes that map the same
files share). Samples miss the last moments of the process, when its
interpreter and libraries shut down; ``ru_maxrss`` covers them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

SAMPLE_SECONDS = 0.02
FIELDS = ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem")


def sample(pid: int) -> dict[str, int] | None:
    """Return the memory fields of process `pid` in bytes, or None once it has no memory."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    fields = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in FIELDS:
            fields[key] = int(value.split()[0]) * 1024
    return fields if "VmRSS" in fields else None


def measure(command: list[str]) -> dict:
    """Run `command`; return its exit code, ``ru_maxrss`` and the largest sample's split."""
    process = subprocess.Popen(command)
    largest: dict[str, int] = {}
    high_water = 0
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            break
        fields = sample(process.pid)
        if fields:
            high_water = max(high_water, fields.get("VmHWM", 0))
            if fields["VmRSS"] >= largest.get("VmRSS", 0):
                largest = fields
        time.sleep(SAMPLE_SECONDS)
    process.returncode = os.waitstatus_to_exitcode(status)
    return {
        "returncode": process.returncode,
        "ru_maxrss": usage.ru_maxrss * 1024,  # KiB on Linux
        "sampled_hwm": high_water,
        "rss_at_peak": largest.get("VmRSS", 0),
        "anon_at_peak": largest.get("RssAnon", 0),
        "file_at_peak": largest.get("RssFile", 0),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, required=True, help="where to write the figures")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given: put it after --")
    result = measure(command)
    args.json.write_text(json.dumps(result, indent=2))
    sys.exit(result["returncode"])


if __name__ == "__main__":
    main()
