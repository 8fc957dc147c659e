"""Measure what gradient monitoring costs, side by side in one run.

    python benchmarks/monitoring.py                 # the full benchmark, about 20 minutes
    python benchmarks/monitoring.py --tiny          # a smoke run on tiny settings

Every measurement runs on the same machine in the same invocation, repeated
``--repeats`` times; the table quotes medians and the ratios between them:

- bare: the reference training loop with nothing recorded (same data, model,
  optimizer, seed and thread count as the pipeline);
- pipeline: ``src.train.train`` with full monitoring into a temporary SQLite
  store, with ``tracking.metric_writer=false``, timed by its ``time/fit_seconds``
  (first iteration to the end of the last epoch's logging);
- pipeline with writer: the same with ``tracking.metric_writer=true`` (the
  default where a core is free for it), so a child process stores the metrics.
  ``time/fit_seconds`` then also covers the wait until the writer has stored
  every value;
- CPU time: the training process's CPU seconds in the bare loop and in ``fit``,
  and the writer process's. Other work on the machine inflates wall times
  more than CPU times (70% against 15% in one run on 2 loaded cores), so CPU
  times tell better what the wall times would be with a core free for the writer;
- by hand: the same loop, logging the loss and each layer's mean gradient
  with one ``mlflow.log_metric`` call per value, and drawing each layer's
  histogram on the host every epoch;
- the end-to-end reference sweep and each job's peak memory: the peak resident
  set of the job's process (its ``ru_maxrss``, started from a small launcher,
  ``benchmarks/peak_memory.py``, because Linux counts the memory of the process
  that forks a child into the child's ``ru_maxrss``), and the anonymous and
  file-backed parts of its largest sample;
- the monitoring overhead on an MLP of more than 10 million parameters;
- a four-job sweep with Hydra's joblib launcher, two workers against one.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))

# Settings of one benchmark size: the reference experiment, or a tiny smoke run.
FULL = {
    "epochs": 50,
    "train_size": 5000,
    "hand_epochs": 5,
    "big_hidden": [4096, 2048],  # 784*4096 + 4096*2048 + 2048*10 weights: 11.6M parameters
    "big_train_size": 1280,
    "big_epochs": 2,
    "sweep_epochs": 10,
}
TINY = {
    "epochs": 2,
    "train_size": 300,
    "hand_epochs": 1,
    "big_hidden": [64, 32],
    "big_train_size": 256,
    "big_epochs": 1,
    "sweep_epochs": 1,
}


@dataclass
class Row:
    measure: str
    seconds: list[float] = field(default_factory=list)
    note: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.seconds) if self.seconds else math.nan


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from src.config import register_schemas

    register_schemas()
    with initialize_config_dir(config_dir=str(PROJECT_ROOT / "conf"), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)


def setup(cfg):
    """Build the data, model, optimizer and shuffle generator exactly as the pipeline does."""
    import torch
    from hydra.utils import instantiate

    from src.data import load_dataset
    from src.models import build_model

    torch.set_num_threads(cfg.trainer.num_threads)
    torch.manual_seed(cfg.seed)
    data = load_dataset(cfg.dataset, torch.device("cpu"))
    model = build_model(
        cfg.model, cfg.activation, data.input_shape, data.num_classes, data.mean, data.std
    )
    optimizer = instantiate(cfg.optimizer)(params=model.parameters())
    return data, model, optimizer, torch.Generator().manual_seed(cfg.seed)


def batches(data, batch_size: int, shuffle):
    """Yield one epoch's ``(inputs, targets)`` mini-batches in a fresh random order."""
    import torch

    num_train = len(data.train_inputs)
    perm = torch.randperm(num_train, generator=shuffle)
    for i in range(math.ceil(num_train / batch_size)):
        idx = perm[i * batch_size : (i + 1) * batch_size]
        yield data.train_inputs[idx], data.train_targets[idx]


@dataclass
class Timing:
    """Seconds of one measured span."""

    wall: float
    cpu: float  # CPU time of this process in the span
    child_cpu: float = 0.0  # CPU time of child processes that ended within the run


def bare_loop(cfg) -> float:
    """Train as the pipeline does, recording nothing; return the loop's seconds."""
    return bare_timing(cfg).wall


def bare_timing(cfg) -> Timing:
    """Train as the pipeline does, recording nothing; return the loop's wall and CPU time."""
    import torch.nn.functional as F

    data, model, optimizer, shuffle = setup(cfg)
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(cfg.trainer.epochs):
        for inputs, targets in batches(data, cfg.trainer.batch_size, shuffle):
            loss = F.cross_entropy(model(inputs), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return Timing(time.perf_counter() - start, time.process_time() - cpu_start)


def pipeline(cfg, store: Path, writer: bool = False) -> float:
    """Train through ``src.train.train`` into a fresh store; return ``time/fit_seconds``."""
    return pipeline_timing(cfg, store, writer).wall


def pipeline_timing(cfg, store: Path, writer: bool = False) -> Timing:
    """Train through ``src.train.train`` into a fresh store; return the training loop's times.

    The wall time is ``time/fit_seconds``. With `writer`, a MetricWriter stores the
    metrics from a child process, and the times also cover the wait until it has
    stored them all. The child's CPU time is `child_cpu`.
    """
    import src.train
    from src.tracking import default_tracking_uri

    store.mkdir(parents=True, exist_ok=True)
    cfg.tracking.uri = default_tracking_uri(store)
    cfg.tracking.log_model = False
    cfg.tracking.metric_writer = writer
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    with cpu_time_of_fit(src.train) as fit_cpu:
        fit_seconds = src.train.train(cfg)["time/fit_seconds"]
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    child_cpu = (after.ru_utime + after.ru_stime) - (children.ru_utime + children.ru_stime)
    return Timing(fit_seconds, fit_cpu[-1], child_cpu)


@contextlib.contextmanager
def cpu_time_of_fit(train_module):
    """Yield a list that gets the CPU seconds of this process in each call of ``fit``."""
    original_fit = train_module.fit
    seconds: list[float] = []

    def fit(*args, **kwargs):
        start = time.process_time()
        try:
            return original_fit(*args, **kwargs)
        finally:
            seconds.append(time.process_time() - start)

    train_module.fit = fit
    try:
        yield seconds
    finally:
        train_module.fit = original_fit


def by_hand(cfg, store: Path) -> float:
    """Train while logging each value with ``mlflow.log_metric``, as users often do."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import mlflow
    import numpy as np
    import torch.nn.functional as F

    from src.models import weight_layers

    store.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(f"sqlite:///{store}/mlflow.db")
    client = mlflow.MlflowClient()
    if client.get_experiment_by_name("by-hand") is None:
        # Artifacts beside the temporary store, not in ./mlruns of the current folder.
        client.create_experiment("by-hand", artifact_location=(store / "artifacts").as_uri())
    mlflow.set_experiment("by-hand")
    data, model, optimizer, shuffle = setup(cfg)
    layers = weight_layers(model)

    with mlflow.start_run():
        start = time.perf_counter()
        step = 0
        for epoch in range(1, cfg.trainer.epochs + 1):
            for inputs, targets in batches(data, cfg.trainer.batch_size, shuffle):
                loss = F.cross_entropy(model(inputs), targets)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                step += 1
                mlflow.log_metric("train/loss", loss.item(), step=step)
                for name, weight in layers:
                    mlflow.log_metric(f"grad_mean/{name}", weight.grad.mean().item(), step=step)
                optimizer.step()
            fig, axes = plt.subplots(1, len(layers), figsize=(3 * len(layers), 3))
            for ax, (name, weight) in zip(axes, layers):
                counts, edges = np.histogram(weight.grad.cpu().numpy(), bins=30)
                ax.stairs(counts, edges)
                ax.set_title(name)
            mlflow.log_figure(fig, f"histograms/epoch_{epoch:03d}.png")
            plt.close(fig)
        return time.perf_counter() - start


def run_command(args: list[str], env: dict | None = None) -> float:
    """Run a command; return its wall seconds."""
    start = time.perf_counter()
    result = subprocess.run(args, cwd=PROJECT_ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)  # fmt: skip
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed: {result.stderr.decode()[-2000:]}")
    return seconds


def peak_memory(args: list[str], env: dict | None = None) -> dict:
    """Run a command through ``peak_memory.py``; return its memory figures in bytes.

    ``ru_maxrss`` of a child counts the memory of the process that forked it, so a
    child of this large process would report at least this process's size.
    The small launcher forks the command instead.
    """
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        launcher = [sys.executable, str(PROJECT_ROOT / "benchmarks" / "peak_memory.py")]
        run_command([*launcher, "--json", out.name, "--", *args], env)
        return json.loads(Path(out.name).read_text())


def clean_env() -> dict:
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, "
            f"torch {torch.__version__}, {platform.system()} {platform.release()}")  # fmt: skip


def measure(size: dict, repeats: int, workdir: Path, sections: set[str]) -> dict:
    base = [
        f"trainer.epochs={size['epochs']}",
        f"dataset.train_size={size['train_size']}",
    ]
    rows: dict[str, Row] = {}

    def row(name: str) -> Row:
        return rows.setdefault(name, Row(name))

    if "reference" in sections:
        # Alternate the variants in each repeat, so drift of a noisy machine hits all alike.
        for repeat in range(repeats):
            bare = bare_timing(compose(base))
            direct = pipeline_timing(compose(base), workdir / f"pipeline-{repeat}")
            written = pipeline_timing(
                compose(base), workdir / f"pipeline-writer-{repeat}", writer=True
            )
            row("bare, reference MLP").seconds.append(bare.wall)
            row("pipeline, reference MLP").seconds.append(direct.wall)
            row("pipeline with writer, reference MLP").seconds.append(written.wall)
            row("CPU time, bare, reference MLP").seconds.append(bare.cpu)
            row("CPU time, pipeline, reference MLP").seconds.append(direct.cpu)
            row("CPU time, pipeline with writer, reference MLP").seconds.append(written.cpu)
            row("CPU time, writer process, reference MLP").seconds.append(written.child_cpu)
        hand_base = [
            f"trainer.epochs={size['hand_epochs']}",
            f"dataset.train_size={size['train_size']}",
        ]
        for repeat in range(repeats):
            row(f"bare, {size['hand_epochs']} epochs").seconds.append(bare_loop(compose(hand_base)))
            row(f"pipeline, {size['hand_epochs']} epochs").seconds.append(
                pipeline(compose(hand_base), workdir / f"pipeline-short-{repeat}")
            )
            row(f"by hand, {size['hand_epochs']} epochs").seconds.append(
                by_hand(compose(hand_base), workdir / f"hand-{repeat}")
            )

    if "big" in sections:
        hidden = ",".join(map(str, size["big_hidden"]))
        big = [f"model.hidden_sizes=[{hidden}]", f"dataset.train_size={size['big_train_size']}",
               f"trainer.epochs={size['big_epochs']}"]  # fmt: skip
        for repeat in range(repeats):
            row("bare, >10M-parameter MLP").seconds.append(bare_loop(compose(big)))
            row("pipeline, >10M-parameter MLP").seconds.append(
                pipeline(compose(big), workdir / f"big-{repeat}")
            )
            row("pipeline with writer, >10M-parameter MLP").seconds.append(
                pipeline(compose(big), workdir / f"big-writer-{repeat}", writer=True)
            )

    if "sweep" in sections:
        python = sys.executable
        start_row = row("interpreter start-up (import src.train)")
        sweep_row = row("reference sweep relu,sigmoid, end to end")
        memory = {"relu": [], "sigmoid": []}
        for repeat in range(repeats):
            start_row.seconds.append(run_command([python, "-c", "import src.train"], clean_env()))
            store = workdir / f"sweep-{repeat}"
            seconds = run_command(
                [python, "-m", "src.train", "-m", "activation=relu,sigmoid", *base,
                 f"tracking.uri=sqlite:///{store}/mlflow.db", f"hydra.sweep.dir={store}/sweep"],
                clean_env(),
            )  # fmt: skip
            sweep_row.seconds.append(seconds)
            for activation in memory:
                job = workdir / f"job-{activation}-{repeat}"
                memory[activation].append(peak_memory(
                    [python, "-m", "src.train", f"activation={activation}", *base,
                     f"tracking.uri=sqlite:///{job}/mlflow.db", f"hydra.run.dir={job}/run"],
                    clean_env(),
                ))  # fmt: skip
        for activation, samples in memory.items():
            row(f"peak memory, {activation} job").note = memory_note(samples)

        four = [
            f"trainer.epochs={size['sweep_epochs']}",
            f"dataset.train_size={size['train_size']}",
            "tracking.log_model=false",
            "trainer.num_threads=1",
        ]
        for repeat in range(repeats):
            for workers in (1, 2):
                store = workdir / f"joblib-{workers}-{repeat}"
                seconds = run_command(
                    [python, "-m", "src.train", "-m", "activation=relu,sigmoid,tanh,gelu", *four,
                     "hydra/launcher=joblib", f"hydra.launcher.n_jobs={workers}",
                     f"tracking.uri=sqlite:///{store}/mlflow.db", f"hydra.sweep.dir={store}/sweep"],
                    clean_env(),
                )  # fmt: skip
                row(f"four-job sweep, {workers} joblib worker(s)").seconds.append(seconds)

    return {"rows": rows}


def memory_note(samples: list[dict]) -> str:
    """Describe the median peak of several runs, with the split of the largest sample."""
    peak = statistics.median(sample["ru_maxrss"] for sample in samples) / 2**30
    anon = statistics.median(sample["anon_at_peak"] for sample in samples) / 2**30
    file = statistics.median(sample["file_at_peak"] for sample in samples) / 2**30
    return f"{peak:.2f} GiB ({anon:.2f} anonymous + {file:.2f} file-backed at the largest sample)"


def ratio(rows: dict[str, Row], top: str, bottom: str) -> float:
    if top not in rows or bottom not in rows:
        return math.nan
    return rows[top].median / rows[bottom].median


def report(rows: dict[str, Row], size: dict, repeats: int) -> tuple[str, dict]:
    """Format the table and the ratios as Markdown; return it with the ratios."""
    hand = size["hand_epochs"]
    ratios = {
        "pipeline / bare, reference MLP": (
            ratio(rows, "pipeline, reference MLP", "bare, reference MLP"), "<= 1.05"),
        "pipeline with writer / bare, reference MLP": (
            ratio(rows, "pipeline with writer, reference MLP", "bare, reference MLP"), "<= 1.05"),
        "CPU time of the training process: pipeline / bare, reference MLP": (
            ratio(rows, "CPU time, pipeline, reference MLP", "CPU time, bare, reference MLP"),
            ""),
        "CPU time of the training process: pipeline with writer / bare, reference MLP": (
            ratio(rows, "CPU time, pipeline with writer, reference MLP",
                  "CPU time, bare, reference MLP"), ""),
        "pipeline / bare, >10M-parameter MLP": (
            ratio(rows, "pipeline, >10M-parameter MLP", "bare, >10M-parameter MLP"), "<= 1.03"),
        "pipeline with writer / bare, >10M-parameter MLP": (
            ratio(rows, "pipeline with writer, >10M-parameter MLP", "bare, >10M-parameter MLP"),
            "<= 1.03"),
        f"pipeline / by hand, {hand} epochs": (
            ratio(rows, f"pipeline, {hand} epochs", f"by hand, {hand} epochs"), "<= 0.25"),
        "four-job sweep, 2 workers / 1 worker": (
            ratio(rows, "four-job sweep, 2 joblib worker(s)", "four-job sweep, 1 joblib worker(s)"),
            "<= 0.65"),
    }  # fmt: skip
    sweep = rows.get("reference sweep relu,sigmoid, end to end")
    bare = rows.get("bare, reference MLP")
    start = rows.get("interpreter start-up (import src.train)")
    if sweep and bare and start:
        budget = 1.3 * 2 * bare.median + start.median
        ratios["reference sweep / (1.3 x bare of both + start-up)"] = (
            sweep.median / budget,
            "<= 1.0",
        )

    lines = [
        f"Machine: {machine()}",
        f"Repeats: {repeats}; medians in seconds; settings: {json.dumps(size)}",
        "",
        "| measure | median s | all runs s | note |",
        "| --- | ---: | --- | --- |",
    ]
    for item in rows.values():
        runs = ", ".join(f"{s:.2f}" for s in item.seconds)
        median = f"{item.median:.2f}" if item.seconds else ""
        lines.append(f"| {item.measure} | {median} | {runs} | {item.note} |")
    lines += ["", "| ratio | measured | target |", "| --- | ---: | --- |"]
    for name, (value, target) in ratios.items():
        lines.append(f"| {name} | {value:.3f} | {target} |")
    return "\n".join(lines), {name: value for name, (value, _) in ratios.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny settings, for a smoke test")
    parser.add_argument("--repeats", type=int, default=3, help="repeats of each measurement")
    parser.add_argument(
        "--sections", nargs="+", default=["reference", "big", "sweep"],
        choices=["reference", "big", "sweep"], help="which measurements to run",
    )  # fmt: skip
    parser.add_argument("--json", type=Path, help="also write the rows and ratios as JSON here")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")

    import logging

    logging.basicConfig(level=logging.WARNING)
    size = TINY if args.tiny else FULL
    with tempfile.TemporaryDirectory(prefix="vg-bench-") as tmp:
        result = measure(size, args.repeats, Path(tmp), set(args.sections))
    table, ratios = report(result["rows"], size, args.repeats)
    print(table)
    if args.json:
        rows = {name: {"seconds": r.seconds, "median": r.median, "note": r.note}
                for name, r in result["rows"].items()}  # fmt: skip
        args.json.write_text(json.dumps({"rows": rows, "ratios": ratios}, indent=2))


if __name__ == "__main__":
    main()
