"""Compare finished MLflow runs side by side: figures, a summary table and an explanation.

Use :func:`select_runs` to pick runs by experiment, sweep (parent run) or run id,
:func:`build_comparison` to write the figures and the summary into a folder, and
:func:`log_comparison` to attach that folder to a run. ``python -m src.compare``
does all three from the command line; ``--help`` lists the options.

Input is what training logs (see README.md, "What is recorded"). Any metric, tag
or artifact may be missing from an older or failed run. The comparison leaves it
out and reports that in its explanation.
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import re
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

if TYPE_CHECKING:
    from mlflow.entities import Run
    from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)

PARENT_RUN_TAG = "mlflow.parentRunId"
SWEEP_ROLE_TAG = "sweep.role"  # "parent" on a sweep's parent run
COMPARISON_TAG = "comparison.run_ids"  # comma-separated ids, on the runs that --log-run creates
HISTOGRAMS_ARTIFACT = "gradients/histograms.npz"
COMPARED_STATUSES = ("FINISHED", "FAILED")
DEFAULT_ARTIFACT_PATH = "comparison"
OUTPUT_ROOT = Path("outputs") / "comparisons"

Series = tuple[np.ndarray, np.ndarray]


class ComparedRun(NamedTuple):
    run_id: str
    name: str


class SkippedRun(NamedTuple):
    run_id: str
    reason: str


class RunSelection(list):
    """Runs in comparison order (a plain ``list[Run]``), plus `skipped`: the runs left out and why.

    :func:`build_comparison` reports `skipped` when it is given a RunSelection.
    """

    def __init__(self, runs: Iterable[Run] = (), skipped: Iterable[SkippedRun] = ()):
        super().__init__(runs)
        self.skipped: list[SkippedRun] = list(skipped)


@dataclass
class Comparison:
    """The files that :func:`build_comparison` wrote, the runs it compared and skipped, and why."""

    out_dir: Path
    files: list[Path]  # in the order written, all directly inside out_dir
    runs: list[ComparedRun]  # in comparison order
    skipped: list[SkippedRun]
    explanation: str  # a few lines for a person: what was compared, skipped or missing


# --- Selecting runs -------------------------------------------------------------------------------


def select_runs(
    client: MlflowClient,
    *,
    experiment: str | None = None,
    parent_run_id: str | None = None,
    run_ids: Sequence[str] | None = None,
) -> RunSelection:
    """Select the runs to compare, sorted by start time, then name, then id.

    Selectors combine as a union, and at least one is required:

    - `experiment`: every run in the experiment of that name, except sweep parent
      runs and earlier comparison runs. Only FINISHED and FAILED runs are taken;
      RUNNING, SCHEDULED and KILLED ones are skipped with a logged reason.
    - `parent_run_id`: the child runs of that sweep, with the same status rule.
    - `run_ids`: these runs, whatever their experiment or status. Deleted runs,
      sweep parent runs and comparison runs are skipped with a reason, because
      they hold no training metrics.

    Raises ValueError, naming the value, for an unknown experiment or run id, a
    parent run without children, or a selection that leaves no run to compare.
    """
    if experiment is None and parent_run_id is None and not run_ids:
        raise ValueError("No runs selected: pass an experiment name, a parent run id or run ids.")

    selected: dict[str, Run] = {}
    skipped: dict[str, SkippedRun] = {}

    def offer(run: Run, reason: str | None) -> None:
        run_id = run.info.run_id
        if reason is None:
            selected[run_id] = run
            skipped.pop(run_id, None)
        elif run_id not in selected:
            skipped[run_id] = SkippedRun(run_id, reason)

    if experiment is not None:
        found = _get_experiment(client, experiment)
        for run in _search_all_runs(client, found.experiment_id):
            if not _is_training_run(run):
                continue
            offer(run, _status_reason(run))
    if parent_run_id is not None:
        parent = _get_run(client, parent_run_id)
        children = _search_all_runs(
            client, parent.info.experiment_id, f"tags.`{PARENT_RUN_TAG}` = '{parent_run_id}'"
        )
        if not children:
            raise ValueError(
                f"Run {parent_run_id!r} ({parent.info.run_name}) has no child runs, so it is not "
                "a sweep's parent run. Select it by run id instead."
            )
        for run in children:
            offer(run, _status_reason(run))
    for run_id in run_ids or ():
        run = _get_run(client, run_id)
        offer(run, _explicit_reason(run))

    for reason in skipped.values():
        log.info("Skipping run %s (%s)", reason.run_id, reason.reason)
    if not selected:
        details = "; ".join(f"{s.run_id} ({s.reason})" for s in skipped.values())
        raise ValueError(
            "No runs to compare: the selection matched no finished or failed training run"
            + (f". Skipped: {details}" if details else ".")
        )
    runs = sorted(selected.values(), key=_run_order)
    return RunSelection(runs, sorted(skipped.values()))


def _get_experiment(client: MlflowClient, name: str):
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        listed = 20
        known = [e.name for e in client.search_experiments(max_results=listed)]
        more = ", …" if len(known) == listed else ""
        raise ValueError(
            f"Experiment {name!r} not found in {client.tracking_uri}. Check the name and the "
            f"tracking URI. Experiments there: {', '.join(known) or 'none'}{more}."
        )
    if experiment.lifecycle_stage == "deleted":
        raise ValueError(
            f"Experiment {name!r} is deleted. Restore it with `mlflow experiments restore "
            f"--experiment-id {experiment.experiment_id}` to compare it."
        )
    return experiment


def _get_run(client: MlflowClient, run_id: str) -> Run:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException as error:
        if error.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise ValueError(
            f"Run {run_id!r} not found in {client.tracking_uri}. "
            "Check the run id (the MLflow UI shows it on the run's page) and the tracking URI."
        ) from None


def _search_all_runs(client: MlflowClient, experiment_id: str, filter_string: str = "") -> list:
    """Return every active run of an experiment that matches `filter_string`, across pages."""
    runs = []
    page_token = None
    while True:
        page = client.search_runs(
            [experiment_id], filter_string, max_results=1000, page_token=page_token
        )
        runs.extend(page)
        page_token = page.token
        if not page_token:
            return runs


def _is_training_run(run: Run) -> bool:
    tags = run.data.tags
    return tags.get(SWEEP_ROLE_TAG) != "parent" and COMPARISON_TAG not in tags


def _status_reason(run: Run) -> str | None:
    """Return why a run found by experiment or parent is skipped, or None to compare it."""
    status = run.info.status
    if status in COMPARED_STATUSES:
        return None
    meaning = "stopped before it finished" if status == "KILLED" else "not finished yet"
    return (
        f"{run.info.run_name} has status {status} ({meaning}). "
        "Pass its id explicitly to compare it anyway."
    )


def _explicit_reason(run: Run) -> str | None:
    """Return why a run requested by id is skipped, or None to compare it."""
    name = run.info.run_name
    if run.info.lifecycle_stage == "deleted":
        return (
            f"{name} is deleted. Restore it with "
            f"`mlflow runs restore --run-id {run.info.run_id}` to compare it."
        )
    if run.data.tags.get(SWEEP_ROLE_TAG) == "parent":
        return f"{name} is a sweep's parent run, without training metrics. Select it as the parent."
    if COMPARISON_TAG in run.data.tags:
        return f"{name} is a comparison run, without training metrics."
    return None


def _run_order(run: Run) -> tuple[int, str, str]:
    return (run.info.start_time or 0, run.info.run_name or "", run.info.run_id)


# --- Reading run data -----------------------------------------------------------------------------


@dataclass
class _RunData:
    """The data that the comparison reads from one run, with `notes` on what is missing."""

    run: Run
    short: str  # the run name, with the id's first 8 characters where names repeat
    label: str  # `short`, marked "(diverged)" on diverged runs, for legends and titles
    experiment: str
    loss: Series | None = None
    grad_mean: dict[str, Series] = field(default_factory=dict)
    depth: dict[int, dict[str, float]] = field(default_factory=dict)  # epoch -> layer -> RMS
    depth_source: str = ""
    histograms: dict[str, np.ndarray] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.run.info.run_name or self.run.info.run_id


def _depth_key(name: str) -> tuple:
    """Sort layer names in depth order, so that ``fc10`` comes after ``fc9``.

    NOTE: this is the order of the numbers in the names. It is the depth order
    for the ``fc1``, ``fc2``, … names that src.models gives, not for any naming.
    """
    parts = re.split(r"(\d+)", name)
    return tuple(int(part) if index % 2 else part for index, part in enumerate(parts))


def _layers(metric_keys: Iterable[str], prefix: str) -> list[str]:
    """Return the weight layers of the metrics ``<prefix><layer>``, in depth order, no biases."""
    layers = {
        key[len(prefix) :]
        for key in metric_keys
        if key.startswith(prefix) and not key.endswith(".bias") and "/" not in key[len(prefix) :]
    }
    return sorted(layers, key=_depth_key)


def _history(client: MlflowClient, run_id: str, key: str) -> Series:
    """Fetch a metric's history as (steps, values), sorted by step."""
    metrics = sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))
    steps = np.array([m.step for m in metrics], dtype=np.int64)
    values = np.array([m.value for m in metrics], dtype=float)
    return steps, values


def _iterations_per_epoch(run: Run) -> int | None:
    """Return ceil(dataset.train_size / trainer.batch_size) from the params, as training does."""
    params = run.data.params
    try:
        return math.ceil(int(params["dataset.train_size"]) / int(params["trainer.batch_size"]))
    except (KeyError, ValueError, ZeroDivisionError):
        return None


def _short_names(runs: Sequence[Run]) -> list[str]:
    """Name runs by run name, adding the id's first 8 characters where names repeat."""
    names = [run.info.run_name or run.info.run_id for run in runs]
    return [
        f"{name} [{run.info.run_id[:8]}]" if names.count(name) > 1 else name
        for run, name in zip(runs, names)
    ]


def _read_run(client: MlflowClient, run: Run, short: str, experiment: str, tmp: Path) -> _RunData:
    """Fetch the histories and the histogram artifact that the figures need from one run."""
    label = f"{short} (diverged)" if run.data.tags.get("divergence") else short
    data = _RunData(run=run, short=short, label=label, experiment=experiment)
    run_id = run.info.run_id
    keys = run.data.metrics.keys()

    if "train/loss" in keys:
        data.loss = _history(client, run_id, "train/loss")
    else:
        data.notes.append("no train/loss, so it is not in loss.png")

    for layer in _layers(keys, "grad_mean/"):
        data.grad_mean[layer] = _history(client, run_id, f"grad_mean/{layer}")
    if not data.grad_mean:
        data.notes.append("no grad_mean/<layer> metrics, so it is not in grad_mean.png")

    _read_depth_profile(client, data)
    _read_histograms(client, data, tmp)
    return data


def _read_depth_profile(client: MlflowClient, data: _RunData) -> None:
    """Fill `data.depth` from health/rms, else from the per-epoch mean of grad_rms."""
    run = data.run
    keys = run.data.metrics.keys()
    health_layers = _layers(keys, "health/rms/")
    if health_layers:
        data.depth_source = "health/rms"
        for layer in health_layers:
            for step, value in zip(*_history(client, run.info.run_id, f"health/rms/{layer}")):
                data.depth.setdefault(int(step), {})[layer] = float(value)
        return

    rms_layers = _layers(keys, "grad_rms/")
    iterations = _iterations_per_epoch(run)
    if not rms_layers:
        data.notes.append(
            "no health/rms or grad_rms metrics, so it is not in rms_vs_depth.png "
            "and its rms columns are blank"
        )
        return
    if iterations is None:
        data.notes.append(
            "no health/rms metrics, and no dataset.train_size and trainer.batch_size params "
            "to group grad_rms by epoch, so it is not in rms_vs_depth.png "
            "and its rms columns are blank"
        )
        return

    data.depth_source = "grad_rms"
    data.notes.append(
        "no health/rms metrics, so rms_vs_depth.png shows its per-epoch mean grad_rms "
        "and its rms columns are blank"
    )
    for layer in rms_layers:
        steps, values = _history(client, run.info.run_id, f"grad_rms/{layer}")
        epochs = (steps - 1) // iterations + 1
        for epoch in np.unique(epochs):
            in_epoch = values[(epochs == epoch) & np.isfinite(values)]
            mean = float(in_epoch.mean()) if in_epoch.size else math.nan
            data.depth.setdefault(int(epoch), {})[layer] = mean


def _read_histograms(client: MlflowClient, data: _RunData, tmp: Path) -> None:
    """Download and check ``gradients/histograms.npz``, keeping only epochs with finite values."""
    from mlflow.exceptions import MlflowException

    from src.histograms import load_histograms

    run_id = data.run.info.run_id
    folder = HISTOGRAMS_ARTIFACT.rsplit("/", 1)[0]
    listed = {info.path for info in client.list_artifacts(run_id, folder)}
    if HISTOGRAMS_ARTIFACT not in listed:
        data.notes.append(f"no {HISTOGRAMS_ARTIFACT}, so it is not in waterfalls.png")
        return
    try:
        path = client.download_artifacts(run_id, HISTOGRAMS_ARTIFACT, str(tmp / run_id))
        hist = load_histograms(path)
        layers = [str(layer) for layer in hist["layers"]]
        epochs = np.asarray(hist["epochs"])
        edges = np.asarray(hist["edges"], dtype=float)
        counts = np.asarray(hist["counts"], dtype=float)
    except (MlflowException, OSError, KeyError, ValueError) as error:
        log.warning("Failed to read %s of run %s: %s", HISTOGRAMS_ARTIFACT, run_id, error)
        data.notes.append(f"{HISTOGRAMS_ARTIFACT} could not be read ({error})")
        return

    num_epochs = epochs.shape[0] if epochs.ndim == 1 else -1
    shapes_match = (
        edges.ndim == 3
        and edges.shape[0] == num_epochs
        and edges.shape[1] == len(layers)
        and counts.shape == (*edges.shape[:2], edges.shape[2] - 1)
    )
    if not shapes_match:
        data.notes.append(
            f"{HISTOGRAMS_ARTIFACT} has inconsistent shapes (epochs {epochs.shape}, "
            f"edges {edges.shape}, counts {counts.shape}), so it is not in waterfalls.png"
        )
        return
    if num_epochs == 0 or not layers or edges.shape[2] < 2:
        data.notes.append(
            f"{HISTOGRAMS_ARTIFACT} contains no histogram (the run may have ended before "
            "its first one), so it is not in waterfalls.png"
        )
        return

    finite = np.isfinite(edges).all(axis=(1, 2)) & np.isfinite(counts).all(axis=(1, 2))
    if not finite.all():
        dropped = ", ".join(str(int(e)) for e in epochs[~finite])
        data.notes.append(f"non-finite histograms at epoch {dropped}, left out of waterfalls.png")
    if not finite.any():
        return
    data.histograms = {
        "layers": layers,
        "epochs": epochs[finite],
        "edges": edges[finite],
        "counts": counts[finite],
    }


# --- Building the comparison ----------------------------------------------------------------------


def build_comparison(
    client: MlflowClient,
    runs: Sequence[Run],
    out_dir: Path,
    depth_epochs: Sequence[int] | None = None,
) -> Comparison:
    """Write figures and a summary of `runs` into `out_dir` and return what was written.

    Files: ``loss.png``, ``grad_mean.png``, ``rms_vs_depth.png``, ``waterfalls.png``,
    ``summary.csv`` and ``summary.md``. A figure that no run has data for is not
    written, and the explanation names it. `depth_epochs` are the 1-based epochs
    drawn in ``rms_vs_depth.png``; by default the first, middle and last epoch
    that all finished runs have. Runs keep the order given; if `runs` is a
    :class:`RunSelection`, its skipped runs are reported as well.
    Raises ValueError when `runs` is empty.
    """
    if not runs:
        raise ValueError("No runs to compare: pass at least one run.")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    skipped = list(getattr(runs, "skipped", []))
    experiment_names = _experiment_names(client, runs)

    with tempfile.TemporaryDirectory(prefix="compare-") as tmp:
        data = [
            _read_run(client, run, short, experiment_names[run.info.experiment_id], Path(tmp))
            for run, short in zip(runs, _short_names(runs))
        ]

    depth_path, depth_notes = _write_rms_vs_depth(data, out_dir, depth_epochs)
    figures = [_write_loss(data, out_dir), _write_grad_mean(data, out_dir), depth_path]
    figures.append(_write_waterfalls(data, out_dir))
    files = [path for path in figures if path is not None]

    explanation = _explain(data, skipped, files, depth_notes)
    notes = _explain(data, [], files, depth_notes)
    sources = _describe_sources(client, data)
    page = _write_summary_md(data, skipped, files, sources, notes, out_dir, client.tracking_uri)
    files += [_write_summary_csv(data, out_dir / "summary.csv"), page]
    log.info("Wrote %d files to %s", len(files), out_dir)
    return Comparison(
        out_dir=out_dir,
        files=files,
        runs=[ComparedRun(d.run.info.run_id, d.name) for d in data],
        skipped=skipped,
        explanation=explanation,
    )


def _experiment_names(client: MlflowClient, runs: Sequence[Run]) -> dict[str, str]:
    names = {}
    for experiment_id in dict.fromkeys(run.info.experiment_id for run in runs):
        names[experiment_id] = client.get_experiment(experiment_id).name
    return names


def _write_loss(data: list[_RunData], out_dir: Path) -> Path | None:
    from src.plots import plot_loss, save_figure

    series = {d.label: d.loss for d in data if d.loss is not None and d.loss[0].size}
    if not series:
        return None
    fig = plot_loss(series, title="Training loss (train/loss)", logy=_spans_a_decade(series))
    return save_figure(fig, out_dir / "loss.png")


def _spans_a_decade(series: dict[str, Series]) -> bool:
    """Return whether the positive finite values span a factor of 10 or more.

    Over a decade or more, a log axis keeps both the early drop of the loss and the late
    differences between runs readable. Over a narrower range it shows one or two tick
    labels, so a linear axis reads better.
    """
    values = np.concatenate([values for _, values in series.values()])
    positive = values[np.isfinite(values) & (values > 0)]
    return bool(positive.size) and bool(positive.max() >= 10 * positive.min())


def _write_grad_mean(data: list[_RunData], out_dir: Path) -> Path | None:
    from src.plots import plot_grad_means, save_figure

    series = {d.label: d.grad_mean for d in data if d.grad_mean}
    if not series:
        return None
    fig = plot_grad_means(series, title="Mean weight gradient per layer (grad_mean)")
    return save_figure(fig, out_dir / "grad_mean.png")


def _write_waterfalls(data: list[_RunData], out_dir: Path) -> Path | None:
    from src.plots import plot_waterfalls_side_by_side, save_figure

    panels = [
        (d.label, h["edges"], h["counts"], h["layers"], h["epochs"])
        for d in data
        if (h := d.histograms) is not None
    ]
    if not panels:
        return None
    return save_figure(plot_waterfalls_side_by_side(panels), out_dir / "waterfalls.png")


def _default_depth_epochs(data: list[_RunData]) -> list[int]:
    """Pick the first, middle and last epoch common to the finished runs with depth data.

    Failed runs do not narrow the choice, because a diverged run stops early. Without
    finished runs all runs count, and without a common epoch any recorded epoch counts.
    """
    with_depth = [d for d in data if d.depth]
    if not with_depth:
        return []
    finished = [d for d in with_depth if d.run.info.status == "FINISHED"] or with_depth
    common = set.intersection(*(set(d.depth) for d in finished))
    epochs = sorted(common or set().union(*(set(d.depth) for d in with_depth)))
    return sorted({epochs[0], epochs[(len(epochs) - 1) // 2], epochs[-1]})


def _write_rms_vs_depth(
    data: list[_RunData], out_dir: Path, depth_epochs: Sequence[int] | None
) -> tuple[Path | None, list[str]]:
    """Draw each run's typical gradient RMS against depth at a few epochs; return path and notes."""
    from src.plots import plot_grad_stat_vs_depth_by_variant, save_figure

    notes = []
    epochs = sorted(set(depth_epochs)) if depth_epochs else _default_depth_epochs(data)
    with_depth = [d for d in data if d.depth]
    layers = sorted(
        {layer for d in with_depth for by_layer in d.depth.values() for layer in by_layer},
        key=_depth_key,
    )
    values: dict[str, dict[int, np.ndarray]] = {}
    for d in with_depth:
        missing = [epoch for epoch in epochs if epoch not in d.depth]
        if missing:
            last = max(d.depth)
            notes.append(
                f"{d.short}: no gradient RMS at epoch {', '.join(map(str, missing))} "
                f"(its last is epoch {last}), so rms_vs_depth.png has no line there"
            )
        by_epoch = {
            epoch: np.array([d.depth[epoch].get(layer, math.nan) for layer in layers])
            for epoch in epochs
            if epoch in d.depth
        }
        if by_epoch:
            values[d.label] = by_epoch
    if not values:
        if with_depth:
            listed = ", ".join(map(str, epochs))
            notes.append(f"no run has gradient RMS at epoch {listed}, so no rms_vs_depth.png")
        return None, notes

    notes.insert(0, f"rms_vs_depth.png shows epochs {', '.join(map(str, epochs))}")
    title = "Gradient RMS against depth (health/rms"
    if any(d.depth_source == "grad_rms" for d in with_depth):
        title += ", else the epoch's mean grad_rms"
    fig = plot_grad_stat_vs_depth_by_variant(
        values, layers, ylabel="typical gradient RMS in the epoch", title=title + ")"
    )
    return save_figure(fig, out_dir / "rms_vs_depth.png"), notes


# --- Summary table and explanation ----------------------------------------------------------------

BASE_COLUMNS = (
    "run_name",
    "run_id",
    "experiment",
    "parent_run_id",
    "status",
    "activation",
    "train/loss",
    "train/accuracy",
    "test/accuracy",
    "gradient_health",
    "gradient_health.layer",
    "health/decay_per_layer",
    "divergence",
)
FINAL_METRICS = ("train/loss", "train/accuracy", "test/accuracy", "health/decay_per_layer")
COLUMN_LEGEND = {
    "run": "the run name, with the start of the run id where names repeat",
    "status": "MLflow run status, marked (diverged) when training stopped on non-finite values",
    "activation": "the `activation` tag, else the `activation.name` param",
    "train/loss, train/accuracy, test/accuracy": "last logged value (NaN if it diverged)",
    "gradient_health": "the run's verdict: vanishing, exploding or healthy",
    "gradient_health.layer": "the first layer that the verdict names",
    "health/decay_per_layer": "last epoch's factor by which gradient RMS shrinks per layer "
    "towards the input",
    "divergence": "why training stopped, on diverged runs (the `divergence` tag)",
    "rms/<layer>": "last epoch's typical gradient RMS of the layer (health/rms)",
    "rms_ratio/<layer>": "that RMS divided by the last layer's (health/rms_ratio)",
}


def _health_layers(data: list[_RunData]) -> list[str]:
    """Return the union of layers with health/rms or health/rms_ratio metrics, in depth order."""
    layers: set[str] = set()
    for d in data:
        keys = d.run.data.metrics.keys()
        layers.update(_layers(keys, "health/rms/"), _layers(keys, "health/rms_ratio/"))
    return sorted(layers, key=_depth_key)


def _summary_rows(data: list[_RunData]) -> tuple[list[str], list[dict[str, object]]]:
    """Build one row per run: column name -> value, with None where the run lacks it."""
    layers = _health_layers(data)
    columns = [
        *BASE_COLUMNS,
        *(f"rms/{layer}" for layer in layers),
        *(f"rms_ratio/{layer}" for layer in layers),
    ]
    rows = []
    for d in data:
        info, tags, metrics = d.run.info, d.run.data.tags, d.run.data.metrics
        row: dict[str, object] = {
            "run": d.short,
            "run_name": d.name,
            "run_id": info.run_id,
            "experiment": d.experiment,
            "parent_run_id": tags.get(PARENT_RUN_TAG),
            "status": info.status,
            "activation": tags.get("activation") or d.run.data.params.get("activation.name"),
            "gradient_health": tags.get("gradient_health"),
            "gradient_health.layer": tags.get("gradient_health.layer"),
            "divergence": tags.get("divergence"),
        }
        for key in FINAL_METRICS:
            row[key] = metrics.get(key)
        for layer in layers:
            row[f"rms/{layer}"] = metrics.get(f"health/rms/{layer}")
            row[f"rms_ratio/{layer}"] = metrics.get(f"health/rms_ratio/{layer}")
        rows.append(row)
    return columns, rows


def _write_summary_csv(data: list[_RunData], path: Path) -> Path:
    """Write the summary table; numbers at full precision, blanks where a run lacks a value."""
    columns, rows = _summary_rows(data)
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({key: "" if value is None else value for key, value in row.items()})
    return path


def _format_cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "NaN" if math.isnan(value) else f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _markdown_table(columns: Sequence[str], rows: list[dict[str, object]]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_format_cell(row.get(c)) for c in columns) + " |")
    return lines


def _format_time(milliseconds: int | None) -> str:
    if not milliseconds:
        return "unknown time"
    moment = datetime.fromtimestamp(milliseconds / 1000, tz=timezone.utc)
    return moment.strftime("%Y-%m-%d %H:%M UTC")


def _describe_sources(client: MlflowClient, data: list[_RunData]) -> list[str]:
    """Return one line per (experiment, sweep) group: its runs and when they started."""
    from mlflow.exceptions import MlflowException

    groups: dict[tuple[str, str | None], list[_RunData]] = {}
    for d in data:
        groups.setdefault((d.experiment, d.run.data.tags.get(PARENT_RUN_TAG)), []).append(d)

    lines = []
    for (experiment, parent_id), members in groups.items():
        if parent_id is None:
            where = f"experiment `{experiment}`, not in a sweep"
        else:
            try:
                parent_name = client.get_run(parent_id).info.run_name
            except MlflowException:
                parent_name = "parent run not found"
            where = f"experiment `{experiment}`, sweep `{parent_name}` (parent run `{parent_id}`)"
        starts = sorted(d.run.info.start_time for d in members if d.run.info.start_time)
        first, last = (_format_time(starts[0]), _format_time(starts[-1])) if starts else ("", "")
        if not starts:
            when = "start time unknown"
        elif first == last:
            when = f"started {first}"
        else:
            when = f"started {first} to {last}"
        names = ", ".join(f"`{d.short}`" for d in members)
        lines.append(f"- {where}: {_count(len(members), 'run')} {when}: {names}")
    return lines


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def _explain(
    data: list[_RunData], skipped: list[SkippedRun], figures: list[Path], figure_notes: list[str]
) -> str:
    """Write the few lines a person reads first: what was compared, skipped and missing."""
    experiments = sorted({d.experiment for d in data})
    sweeps = {d.run.data.tags.get(PARENT_RUN_TAG) for d in data} - {None}
    lines = [
        f"Compared {_count(len(data), 'run')} from {_count(len(sweeps), 'sweep')} in "
        f"{_count(len(experiments), 'experiment')} ({', '.join(experiments)}): "
        f"{', '.join(d.short for d in data)}.",
        f"Figures: {', '.join(p.name for p in figures) or 'none'}.",
    ]
    for d in data:
        reason = d.run.data.tags.get("divergence")
        if reason:
            lines.append(f"Diverged: {d.short} ended {d.run.info.status} with {reason}.")
    for run_id, reason in skipped:
        lines.append(f"Skipped run {run_id}: {reason}")
    for d in data:
        for note in d.notes:
            lines.append(f"Missing in {d.short}: {note}.")
    lines.extend(f"{note}." for note in figure_notes)
    return "\n".join(lines)


def _write_summary_md(
    data: list[_RunData],
    skipped: list[SkippedRun],
    figures: list[Path],
    sources: list[str],
    notes: str,
    out_dir: Path,
    tracking_uri: str,
) -> Path:
    """Write the readable page: sources, tables, column legend, figures, skipped runs, notes."""
    columns, rows = _summary_rows(data)
    per_layer = ("rms/", "rms_ratio/")
    hidden = {"run_name", "run_id", "parent_run_id"}  # the run ids get their own list
    result_columns = [
        "run",
        *(c for c in columns if not c.startswith(per_layer) and c not in hidden),
    ]
    rms_columns = ["run", *(c for c in columns if c.startswith(per_layer))]
    for row in rows:
        if row["divergence"]:
            row["status"] = f"{row['status']} (diverged)"
    created = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")

    lines = [f"# Comparison of {_count(len(data), 'run')}", "", f"Created {created} from:", ""]
    lines += [*sources, "", f"Tracking store: `{tracking_uri}`"]
    lines += ["", "## Results", "", *_markdown_table(result_columns, rows)]
    if len(rms_columns) > 1:
        lines += [
            "",
            "## Gradient RMS per layer, last epoch",
            "",
            *_markdown_table(rms_columns, rows),
        ]
    lines += ["", "## Run ids", ""]
    lines += [f"- `{d.short}`: `{d.run.info.run_id}`" for d in data]
    lines += ["", "## Columns", ""]
    lines += [f"- **{name}**: {meaning}" for name, meaning in COLUMN_LEGEND.items()]
    lines += ["", "## Figures", ""]
    for path in figures:
        lines += [f"![{path.stem}]({path.name})", ""]
    if not figures:
        lines += ["None, because no run had the data for any figure.", ""]
    lines += ["## Skipped runs", ""]
    lines += [f"- `{run_id}`: {reason}" for run_id, reason in skipped] or ["None."]
    lines += ["", "## Notes", "", *(f"- {line}" for line in notes.splitlines()), ""]
    path = out_dir / "summary.md"
    path.write_text("\n".join(lines))
    return path


# --- Logging to MLflow ----------------------------------------------------------------------------


def log_comparison(
    client: MlflowClient,
    comparison: Comparison,
    run_id: str,
    artifact_path: str = DEFAULT_ARTIFACT_PATH,
) -> list[str]:
    """Log every file of `comparison` to the existing run `run_id` under `artifact_path`.

    Returns the artifact paths logged. Raises ValueError when the run does not exist.
    """
    _get_run(client, run_id)
    logged = []
    for path in comparison.files:
        client.log_artifact(run_id, str(path), artifact_path)
        logged.append(f"{artifact_path}/{path.name}" if artifact_path else path.name)
    log.info("Logged %d files to run %s under %s/", len(logged), run_id, artifact_path)
    return logged


def create_comparison_run(
    client: MlflowClient, comparison: Comparison, experiment_name: str | None, tracking_uri: str
) -> str:
    """Create a FINISHED run ``comparison <n> runs`` that contains the comparison's files.

    The run goes to experiment `experiment_name` (created if missing), or to the
    experiment of the first compared run. Its tag ``comparison.run_ids`` lists
    the compared run ids, and keeps it out of later selections by experiment.
    Returns the new run's id.
    """
    from src.tracking import get_or_create_experiment

    if experiment_name is None:
        experiment_id = client.get_run(comparison.runs[0].run_id).info.experiment_id
    else:
        experiment_id = get_or_create_experiment(client, experiment_name, tracking_uri)
    # NOTE: MLflow 3 limits a tag value to 8000 characters, about 240 run ids, and
    # create_run fails for a comparison of more runs.
    run = client.create_run(
        experiment_id,
        run_name=f"comparison {len(comparison.runs)} runs",
        tags={COMPARISON_TAG: ",".join(run.run_id for run in comparison.runs)},
    )
    run_id = run.info.run_id
    try:
        log_comparison(client, comparison, run_id)
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id, status="FINISHED")
    return run_id


# --- Command line ---------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(
            f"invalid epoch {text!r}: expected an integer >= 1 (epochs are 1-based)"
        )
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m src.compare",
        description=(
            "Compare MLflow training runs side by side: loss, mean gradient per layer, "
            "gradient RMS against depth, gradient histogram waterfalls and a summary table "
            "(summary.csv, summary.md). Selectors combine as a union, and at least one is required."
        ),
    )
    parser.add_argument(
        "--tracking-uri",
        help="MLflow tracking URI to read, and to write with --log-run "
        "(default: $MLFLOW_TRACKING_URI, "
        "else the local store sqlite:///<repository>/mlruns/mlflow.db)",
    )

    selectors = parser.add_argument_group("run selection")
    selectors.add_argument(
        "--experiment",
        metavar="NAME",
        help="compare the finished and failed runs of this experiment, except sweep parent runs",
    )
    selectors.add_argument(
        "--parent",
        metavar="RUN_ID",
        help="compare the finished and failed child runs of this sweep parent run",
    )
    selectors.add_argument(
        "--runs",
        metavar="RUN_ID",
        nargs="+",
        help="compare these runs, from any experiment or sweep and with any status",
    )

    output = parser.add_argument_group("output")
    output.add_argument(
        "--out",
        metavar="DIR",
        type=Path,
        help="folder for the figures and summary files (default without --log-run: "
        "outputs/comparisons/<UTC timestamp>/ under the current folder)",
    )
    output.add_argument(
        "--log-run",
        action="store_true",
        help="also create an MLflow run 'comparison <n> runs' and log the files to it",
    )
    output.add_argument(
        "--log-experiment",
        metavar="NAME",
        help="experiment of the --log-run run, created if missing "
        "(default: the experiment of the first compared run)",
    )

    parser.add_argument(
        "--epochs",
        metavar="EPOCH",
        nargs="+",
        type=_positive_int,
        help="1-based epochs drawn in rms_vs_depth.png "
        "(default: the first, middle and last epoch common to the finished runs)",
    )
    return parser


def _check_store(tracking_uri: str) -> None:
    """Raise ValueError when a local store does not exist, instead of creating an empty one."""
    if tracking_uri.startswith("sqlite:///"):
        path = Path(tracking_uri.removeprefix("sqlite:///"))
        if not path.is_file():
            raise ValueError(
                f"MLflow store not found: {path} does not exist. Pass --tracking-uri "
                "with an existing store, or train first with `python -m src.train`."
            )
    elif tracking_uri.startswith("file:") or (
        "://" not in tracking_uri and not tracking_uri.startswith("databricks")
    ):
        path = Path(tracking_uri.removeprefix("file://").removeprefix("file:"))
        if not path.is_dir():
            raise ValueError(
                f"MLflow store not found: folder {path} does not exist. "
                "Pass --tracking-uri with an existing store."
            )


def run_cli(args: argparse.Namespace, tracking_uri: str) -> list[str]:
    """Select, compare, write and log as the parsed `args` request; return the result lines."""
    from mlflow.tracking import MlflowClient

    _check_store(tracking_uri)
    client = MlflowClient(tracking_uri)
    runs = select_runs(
        client, experiment=args.experiment, parent_run_id=args.parent, run_ids=args.runs
    )
    log.info("Comparing %d runs from %s", len(runs), tracking_uri)

    results = []
    with tempfile.TemporaryDirectory(prefix="comparison-") as tmp:
        out_dir = args.out
        if out_dir is None:
            stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d_%H-%M-%S")
            out_dir = Path(tmp) if args.log_run else OUTPUT_ROOT / stamp
        comparison = build_comparison(client, runs, out_dir, args.epochs)
        for line in comparison.explanation.splitlines():
            log.info("%s", line)
        if args.out is not None or not args.log_run:
            results.append(f"Wrote {len(comparison.files)} files to {out_dir.resolve()}")
        if args.log_run:
            run_id = create_comparison_run(client, comparison, args.log_experiment, tracking_uri)
            results.append(
                f"Logged {len(comparison.files)} files to run {run_id} "
                f"under {DEFAULT_ARTIFACT_PATH}/ in {tracking_uri}"
            )
    return results


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else repr(error)


def main(argv: Sequence[str] | None = None) -> None:
    """Run the command line; exit with status 2 and a one-line message on bad input."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S"
    )
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.experiment is None and args.parent is None and not args.runs:
        parser.error("select runs with --experiment, --parent or --runs")

    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import SQLAlchemyError

    from src.tracking import resolve_tracking_uri

    tracking_uri = resolve_tracking_uri(args.tracking_uri)
    try:
        results = run_cli(args, tracking_uri)
    except (ValueError, MlflowException) as error:
        log.error("%s", _first_line(error))
        log.debug("Full error", exc_info=True)
        raise SystemExit(2) from None
    except SQLAlchemyError as error:
        # A SQLite file that is not an MLflow store, or a database server that is unreachable.
        log.error("Failed to read the MLflow store %s: %s", tracking_uri, _first_line(error))
        raise SystemExit(2) from None
    for line in results:
        print(line)


if __name__ == "__main__":
    main()
