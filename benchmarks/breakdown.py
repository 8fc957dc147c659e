"""Break one reference job down into the phases that its time and memory go to.

    python benchmarks/breakdown.py                  # the reference job, about 3 minutes
    python benchmarks/breakdown.py --tiny           # a smoke run on tiny settings

Three parts, each repeated ``--repeats`` times (medians are reported):

- start-up: a fresh interpreter imports torch, MLflow, ``mlflow.pytorch``,
  matplotlib and Hydra in the order the job does. Each import's increment is
  timed, then the rest of ``src.train``;
- the job: ``src.train.train`` runs the relu and then the sigmoid variant into a
  fresh SQLite store, in this process. Its phases are timed by wrapping the
  functions that do them, so the figures are the real pipeline's. Each phase's
  time is exclusive, without the phases nested in it, so "training iterations"
  is the loop's time after the statistics, histograms, activation hooks,
  evaluation, verdicts and logging are taken out of it. Then the comparison
  that a sweep's end builds from the two runs;
- the bare loop: the same iterations with nothing recorded, for reference.

Memory: after each phase of the first job the script reads the process's
peak resident set (VmHWM) and its current split into anonymous memory and
file-backed pages (mostly shared libraries), from ``/proc/self/status``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from monitoring import (  # noqa: E402
    FULL,
    TINY,
    bare_loop,
    clean_env,
    compose,
    machine,
)

# The imports a job makes, in the order that ``python -m src.train`` makes them.
IMPORT_STEPS = [
    ("import torch", "import torch"),
    ("import mlflow", "import mlflow"),
    ("import mlflow.pytorch", "import mlflow.pytorch"),
    ("import matplotlib (Agg, 3-D)",
     "import matplotlib.figure, matplotlib.backends.backend_agg, mpl_toolkits.mplot3d"),
    ("import hydra", "import hydra, hydra.utils"),
    ("import src.train (the rest)", "import src.train"),
]  # fmt: skip

STARTUP_SCRIPT = """
import json, sys, time
steps = json.loads(sys.argv[1])
times = {}
for name, statement in steps:
    start = time.perf_counter()
    exec(statement)
    times[name] = time.perf_counter() - start
print(json.dumps(times))
"""


def measure_startup(repeats: int) -> dict[str, list[float]]:
    """Time each import step in fresh interpreters, and a bare interpreter's start and exit."""
    rows: dict[str, list[float]] = defaultdict(list)
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True, env=clean_env())
        rows["interpreter start and exit"].append(time.perf_counter() - start)
        result = subprocess.run(
            [sys.executable, "-c", STARTUP_SCRIPT, json.dumps(IMPORT_STEPS)],
            cwd=PROJECT_ROOT, env=clean_env(), capture_output=True, text=True, check=True,
        )  # fmt: skip
        for name, seconds in json.loads(result.stdout).items():
            rows[name].append(seconds)
    return rows


class PhaseTimer:
    """Accumulate exclusive wall time per phase: a nested phase's time leaves its parent's."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._stack: list[list] = []  # [phase, start, seconds spent in nested phases]

    def current(self) -> str | None:
        """Return the innermost running phase, or None outside every phase."""
        return self._stack[-1][0] if self._stack else None

    @contextlib.contextmanager
    def phase(self, name: str):
        frame = [name, time.perf_counter(), 0.0]
        self._stack.append(frame)
        try:
            yield
        finally:
            self._stack.pop()
            total = time.perf_counter() - frame[1]
            self.seconds[name] += total - frame[2]
            self.calls[name] += 1
            if self._stack:
                self._stack[-1][2] += total


def memory_status() -> dict[str, int]:
    """Return VmHWM, VmRSS, RssAnon, RssFile and RssShmem of this process, in bytes."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"):
            fields[key] = int(value.split()[0]) * 1024
    return fields


class Instrument:
    """Wrap the pipeline's functions with phase timers, and undo it on exit."""

    def __init__(self, timer: PhaseTimer) -> None:
        self.timer = timer
        self.memory: list[tuple[str, dict[str, int]]] = []
        self.track_memory = False
        self._undo: list[tuple[object, str, object]] = []

    def wrap(self, owner, attribute: str, phase, memory: bool = False) -> None:
        """Time ``owner.attribute`` as `phase`, a name or a function of the call's arguments."""
        original = getattr(owner, attribute)
        timer = self.timer

        @functools.wraps(original)
        def timed(*args, **kwargs):
            name = phase(*args, **kwargs) if callable(phase) else phase
            if name is None:  # this call stays in the phase it is nested in
                return original(*args, **kwargs)
            with timer.phase(name):
                result = original(*args, **kwargs)
            if memory and self.track_memory:
                self.memory.append((name, memory_status()))
            return result

        self._undo.append((owner, attribute, original))
        setattr(owner, attribute, timed)

    def wrap_context(self, owner, attribute: str, enter: str, leave: str) -> None:
        """Time a context manager factory's entry as `enter` and its exit as `leave`."""
        original = getattr(owner, attribute)
        timer = self.timer
        instrument = self

        @contextlib.contextmanager
        def timed(*args, **kwargs):
            manager = original(*args, **kwargs)
            with timer.phase(enter):
                value = manager.__enter__()
            if instrument.track_memory:
                instrument.memory.append((enter, memory_status()))
            try:
                yield value
            except BaseException as err:
                with timer.phase(leave):
                    if not manager.__exit__(type(err), err, err.__traceback__):
                        raise
            else:
                with timer.phase(leave):
                    manager.__exit__(None, None, None)

        self._undo.append((owner, attribute, original))
        setattr(owner, attribute, timed)

    def restore(self) -> None:
        for owner, attribute, original in reversed(self._undo):
            setattr(owner, attribute, original)
        self._undo.clear()


def figure_phase(tracker, figure, artifact_file: str) -> str:
    return f"figure {artifact_file}"


def history_phase(timer: PhaseTimer, *args, **kwargs) -> str | None:
    """Name a metric history read inside the model logging; leave other reads in their phase.

    ``mlflow.pytorch.log_model`` (MLflow 3) reads every metric's whole history back, to
    link the values at the model's step to the model.
    """
    return "model logging: metric history read back" if timer.current() == "model logging" else None


def instrument_pipeline(instrument: Instrument) -> None:
    """Wrap every phase of ``src.train.train`` that the breakdown reports."""
    import torch.export
    from mlflow.tracking import MlflowClient

    import src.train as train_module
    from src import loop, plots, reports
    from src.activations import ActivationMonitor
    from src.gradients import GradientMonitor
    from src.tracking import Tracker

    wrap = instrument.wrap
    wrap(train_module, "validate", "config validation and store check")
    wrap(train_module, "connect_tracking", "config validation and store check")
    wrap(train_module, "load_dataset", "data generation", memory=True)
    wrap(train_module, "build_model", "model and optimizer")
    instrument.wrap_context(train_module, "start_run", "store and run creation", "run end")
    wrap(Tracker, "log_params", "params, config and tags")
    wrap(train_module, "log_config", "params, config and tags")
    wrap(reports, "log_dataset_samples", "dataset sample grid", memory=True)
    wrap(train_module, "fit", "training iterations", memory=True)
    wrap(GradientMonitor, "record", "gradient statistics (on the device)")
    wrap(GradientMonitor, "_histograms", "histograms (on the device)")
    wrap(GradientMonitor, "drain", "statistics to the host and Metric objects")
    wrap(ActivationMonitor, "drain", "activation hooks")
    wrap(loop, "evaluate", "per-epoch evaluation")
    wrap(loop, "judge", "per-epoch verdict")
    wrap(loop, "epoch_profile", "per-epoch verdict")
    wrap(Tracker, "log_metrics", "metrics into the store (Tracker.log_metrics)")
    if hasattr(Tracker, "flush"):
        wrap(Tracker, "flush", "waiting for the metric writer")
    wrap(reports, "log_verdict", "run verdict")
    wrap(reports, "log_run_figures", "figures (loss, grad_mean, activation)", memory=True)
    wrap(plots, "plot_waterfall", "3-D waterfall figure")
    wrap(Tracker, "log_figure", figure_phase)
    wrap(reports, "log_epoch_images", "epoch images", memory=True)
    wrap(MlflowClient, "log_image", "epoch images: log_image (PNG, WebP, tag)")
    wrap(reports, "log_model", "model logging", memory=True)
    wrap(torch.export, "export", "model logging: torch.export")
    wrap(MlflowClient, "get_metric_history", functools.partial(history_phase, instrument.timer))
    wrap(reports, "log_histograms", "histogram file")
    wrap(train_module, "log_job_log", "job log")

    # Each hook call is timed; the forward pass it sits in loses that time.
    original_hook = ActivationMonitor._hook
    timer = instrument.timer

    def timed_hook_factory(self, name):
        hook = original_hook(self, name)

        def timed_hook(module, inputs, output):
            with timer.phase("activation hooks"):
                return hook(module, inputs, output)

        return timed_hook

    instrument._undo.append((ActivationMonitor, "_hook", original_hook))
    ActivationMonitor._hook = timed_hook_factory


def run_jobs(
    size: dict, workdir: Path, log_model: bool, writer: bool
) -> tuple[PhaseTimer, Instrument, dict]:
    """Train relu then sigmoid into one store as children of a parent run, then compare them.

    With `writer`, each run's tracker gets a MetricWriter, as in ``monitoring.py``.
    """
    from mlflow.tracking import MlflowClient

    import src.train
    from src import compare
    from src.tracking import default_tracking_uri, get_or_create_experiment
    from src.train import JobInfo

    timer = PhaseTimer()
    instrument = Instrument(timer)
    instrument_pipeline(instrument)
    store = workdir / "store"
    store.mkdir(parents=True)
    uri = default_tracking_uri(store)
    overrides = [f"trainer.epochs={size['epochs']}", f"dataset.train_size={size['train_size']}",
                 f"tracking.uri={uri}", f"tracking.log_model={str(log_model).lower()}",
                 f"tracking.metric_writer={str(writer).lower()}"]  # fmt: skip
    jobs = {}
    stack = contextlib.ExitStack()
    try:
        with timer.phase("store creation (first client, schema)"):
            client = MlflowClient(uri)
            experiment_id = get_or_create_experiment(client, "vanishing-gradients", uri)
            parent = client.create_run(experiment_id, run_name="breakdown").info.run_id
        for index, activation in enumerate(["relu", "sigmoid"]):
            instrument.track_memory = index == 0
            cfg = compose([*overrides, f"activation={activation}"])
            job = JobInfo(run_name=f"activation={activation}", parent_run_id=parent)
            start = time.perf_counter()
            src.train.train(cfg, job)
            jobs[activation] = time.perf_counter() - start
        instrument.track_memory = False
        with timer.phase("comparison at the sweep's end"):
            runs = compare.select_runs(client, parent_run_id=parent)
            comparison = compare.build_comparison(client, runs, workdir / "comparison")
            compare.log_comparison(client, comparison, parent)
    finally:
        stack.close()
        instrument.restore()
    return timer, instrument, jobs


def report(startup, runs, bare, memory, size, repeats) -> tuple[str, dict]:
    """Format the phases as Markdown tables; return them with the medians as a dict."""
    lines = [
        f"Machine: {machine()}",
        f"Repeats: {repeats}; medians in seconds; settings: {json.dumps(size)}",
        "",
        "| phase | median s | all runs s |",
        "| --- | ---: | --- |",
    ]
    medians = {}

    def add(name: str, values: list[float]) -> None:
        medians[name] = statistics.median(values)
        runs_text = ", ".join(f"{v:.3f}" for v in values)
        lines.append(f"| {name} | {medians[name]:.3f} | {runs_text} |")

    for name, values in startup.items():
        add(name, values)
    phases = list(dict.fromkeys(name for timer, _ in runs for name in timer.seconds))
    for name in phases:
        # Both jobs' time in one phase, per job: the store and comparison are per sweep.
        per_sweep = name.startswith(("store creation", "comparison"))
        values = [timer.seconds.get(name, 0.0) / (1 if per_sweep else 2) for timer, _ in runs]
        add(f"{name}{' (once a sweep)' if per_sweep else ''}", values)
    add("job total, in process (train())", [statistics.mean(jobs.values()) for _, jobs in runs])
    add("bare loop, same iterations", bare)

    lines += [
        "",
        "Memory of the first job's process after each phase, in MiB:",
        "",
        "| after | peak (VmHWM) | resident | anonymous | file-backed |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, status in memory:
        lines.append(
            f"| {name} | {status['VmHWM'] / 2**20:.0f} | {status['VmRSS'] / 2**20:.0f} "
            f"| {status['RssAnon'] / 2**20:.0f} | {status['RssFile'] / 2**20:.0f} |"
        )
    return "\n".join(lines), medians


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny settings, for a smoke test")
    parser.add_argument("--repeats", type=int, default=3, help="repeats of each measurement")
    parser.add_argument("--no-model", action="store_true", help="skip the model logging")
    parser.add_argument(
        "--writer", action="store_true", help="store metrics through a MetricWriter process"
    )
    parser.add_argument("--json", type=Path, help="also write the medians as JSON here")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")

    import logging

    logging.basicConfig(level=logging.WARNING)
    size = TINY if args.tiny else FULL
    startup = measure_startup(args.repeats)
    runs, bare, memory = [], [], []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory(prefix="vg-breakdown-") as tmp:
            timer, instrument, jobs = run_jobs(size, Path(tmp), not args.no_model, args.writer)
        runs.append((timer, jobs))
        memory = memory or instrument.memory
        bare_cfg = compose([f"trainer.epochs={size['epochs']}",
                            f"dataset.train_size={size['train_size']}"])  # fmt: skip
        bare.append(bare_loop(bare_cfg))
    table, medians = report(startup, runs, bare, memory, size, args.repeats)
    print(table)
    if args.json:
        args.json.write_text(json.dumps({"medians": medians}, indent=2))


if __name__ == "__main__":
    main()
