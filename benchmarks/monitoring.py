"""Measure what gradient monitoring costs, side by side in one run.

    python benchmarks/monitoring.py                 # the full benchmark, about 20 minutes
    python benchmarks/monitoring.py --tiny          # a smoke run on tiny settings

Every measurement runs on the same machine in the same invocation, repeated
``--repeats`` times; the table quotes medians and the ratios between them:

- bare: the reference training loop with nothing recorded (same data, model,
  optimizer, seed and thread count as the pipeline);
- pipeline: ``src.train.train`` with full monitoring into a temporary SQLite
  store, timed by its ``time/fit_seconds`` (first iteration to the end of the
  last epoch's logging);
- by hand: the same loop, logging the loss and each layer's mean gradient
  with one ``mlflow.log_metric`` call per value, and drawing each layer's
  histogram on the host every epoch;
- the end-to-end reference sweep and each job's peak memory;
- the monitoring overhead on an MLP of more than 10 million parameters;
- a four-job sweep with Hydra's joblib launcher, two workers against one.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
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


def bare_loop(cfg) -> float:
    """Train as the pipeline does, recording nothing; return the loop's seconds."""
    import torch.nn.functional as F

    data, model, optimizer, shuffle = setup(cfg)
    start = time.perf_counter()
    for _ in range(cfg.trainer.epochs):
        for inputs, targets in batches(data, cfg.trainer.batch_size, shuffle):
            loss = F.cross_entropy(model(inputs), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return time.perf_counter() - start


def pipeline(cfg, store: Path) -> float:
    """Train through ``src.train.train`` into a fresh store; return ``time/fit_seconds``."""
    from src.tracking import default_tracking_uri
    from src.train import train

    store.mkdir(parents=True, exist_ok=True)
    cfg.tracking.uri = default_tracking_uri(store)
    cfg.tracking.log_model = False
    return train(cfg)["time/fit_seconds"]


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


def run_command(args: list[str], env: dict | None = None) -> tuple[float, int]:
    """Run a command; return its wall seconds and peak resident memory in bytes."""
    start = time.perf_counter()
    process = subprocess.Popen(args, cwd=PROJECT_ROOT, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)  # fmt: skip
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(args)} failed: {process.stderr.read().decode()[-2000:]}")
    process.stderr.close()
    return seconds, usage.ru_maxrss * 1024  # ru_maxrss is in KiB on Linux


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
            cfg = compose(base)
            row("bare, reference MLP").seconds.append(bare_loop(cfg))
            row("pipeline, reference MLP").seconds.append(
                pipeline(compose(base), workdir / f"pipeline-{repeat}")
            )
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

    if "sweep" in sections:
        python = sys.executable
        start_row = row("interpreter start-up (import src.train)")
        sweep_row = row("reference sweep relu,sigmoid, end to end")
        memory = {"relu": [], "sigmoid": []}
        for repeat in range(repeats):
            seconds, _ = run_command([python, "-c", "import src.train"], clean_env())
            start_row.seconds.append(seconds)
            store = workdir / f"sweep-{repeat}"
            seconds, _ = run_command(
                [python, "-m", "src.train", "-m", "activation=relu,sigmoid", *base,
                 f"tracking.uri=sqlite:///{store}/mlflow.db", f"hydra.sweep.dir={store}/sweep"],
                clean_env(),
            )  # fmt: skip
            sweep_row.seconds.append(seconds)
            for activation in memory:
                job = workdir / f"job-{activation}-{repeat}"
                _, peak = run_command(
                    [python, "-m", "src.train", f"activation={activation}", *base,
                     f"tracking.uri=sqlite:///{job}/mlflow.db", f"hydra.run.dir={job}/run"],
                    clean_env(),
                )  # fmt: skip
                memory[activation].append(peak)
        for activation, peaks in memory.items():
            row(
                f"peak memory, {activation} job"
            ).note = f"{statistics.median(peaks) / 2**30:.2f} GiB"

        four = [
            f"trainer.epochs={size['sweep_epochs']}",
            f"dataset.train_size={size['train_size']}",
            "tracking.log_model=false",
            "trainer.num_threads=1",
        ]
        for repeat in range(repeats):
            for workers in (1, 2):
                store = workdir / f"joblib-{workers}-{repeat}"
                seconds, _ = run_command(
                    [python, "-m", "src.train", "-m", "activation=relu,sigmoid,tanh,gelu", *four,
                     "hydra/launcher=joblib", f"hydra.launcher.n_jobs={workers}",
                     f"tracking.uri=sqlite:///{store}/mlflow.db", f"hydra.sweep.dir={store}/sweep"],
                    clean_env(),
                )  # fmt: skip
                row(f"four-job sweep, {workers} joblib worker(s)").seconds.append(seconds)

    return {"rows": rows}


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
        "pipeline / bare, >10M-parameter MLP": (
            ratio(rows, "pipeline, >10M-parameter MLP", "bare, >10M-parameter MLP"), "<= 1.03"),
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
