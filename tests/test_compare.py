"""Tests for src.compare against a real SQLite MLflow store filled with synthetic runs.

The runs are logged with MlflowClient directly, in the shape that training logs,
so these tests check the comparison and not the training.
"""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from src.compare import (
    COMPARISON_TAG,
    _read_depth_profile,
    _RunData,
    _spans_a_decade,
    build_comparison,
    log_comparison,
    main,
    select_runs,
)
from src.plots import plot_grad_stat_vs_depth_by_variant
from src.tracking import default_tracking_uri, get_or_create_experiment
from tests.conftest import PROJECT_ROOT

EPOCHS = 3
ITERATIONS_PER_EPOCH = 4  # dataset.train_size 512 / trainer.batch_size 128
BINS = 10
SHALLOW = ["fc1", "fc2", "fc3", "fc4"]
DEEP = ["fc1", "fc2", "fc3", "fc4", "fc5", "fc6"]
FIGURES = {"loss.png", "grad_mean.png", "rms_vs_depth.png", "waterfalls.png"}
SUMMARY_FILES = {"summary.csv", "summary.md"}
START = 1_700_000_000_000  # start time of the first run, ms since the Unix epoch
DIVERGENCE = "non-finite loss (nan) at iteration 10"
LOSS_RATE = {"relu": 0.8, "sigmoid": 0.95, "tanh": 0.9, "gelu": 0.85, "elu": 0.8}  # per iteration


@dataclass
class Store:
    uri: str
    client: MlflowClient
    ids: dict[str, str]  # short name used in these tests -> run id
    root: Path


def log_training_run(
    client: MlflowClient,
    experiment_id: str,
    name: str,
    start: int,
    tmp: Path,
    *,
    layers: list[str] = SHALLOW,
    activation: str = "relu",
    decay: float = 1.0,
    parent_id: str | None = None,
    status: str = "FINISHED",
    verdict: tuple[str, str] | None = ("healthy", None),
    divergence: str | None = None,
    health: bool = True,
    histogram_epochs: int | None = EPOCHS,
) -> str:
    """Log one run as training does and return its id.

    Gradient RMS is 1e-2 at the last layer and `decay` times smaller per layer towards
    the input. A run with `divergence` gets NaN losses from iteration 10 on and stops
    its epoch metrics and histograms after epoch 2, the last of them non-finite.
    `histogram_epochs=None` logs no histogram artifact.
    """
    tags = {"activation": activation}
    if parent_id:
        tags["mlflow.parentRunId"] = parent_id
    if verdict is not None:
        tags["gradient_health"] = verdict[0]
        if verdict[1]:
            tags["gradient_health.layer"] = verdict[1]
    if divergence:
        tags["divergence"] = divergence
    run_id = client.create_run(
        experiment_id, start_time=start, tags=tags, run_name=name
    ).info.run_id

    rms = {layer: 1e-2 * decay ** (len(layers) - 1 - i) for i, layer in enumerate(layers)}
    metrics = []
    last_epoch = 2 if divergence else EPOCHS
    for step in range(1, EPOCHS * ITERATIONS_PER_EPOCH + 1):
        loss = math.nan if divergence and step >= 10 else 2.3 * LOSS_RATE[activation] ** step
        metrics.append(Metric("train/loss", loss, START + step, step))
        for layer in layers:
            sign = 1 if step % 2 else -1
            metrics.append(Metric(f"grad_mean/{layer}", sign * rms[layer] / 10, START, step))
            metrics.append(Metric(f"grad_rms/{layer}", rms[layer] * step, START, step))
        metrics.append(Metric("grad_rms/fc1.bias", 1.0, START, step))
        metrics.append(Metric("grad_mean/fc1.bias", 1.0, START, step))
    for epoch in range(1, last_epoch + 1):
        metrics.append(Metric("train/accuracy", 0.5 + 0.1 * epoch, START, epoch))
        metrics.append(Metric("test/accuracy", 0.4 + 0.1 * epoch, START, epoch))
        metrics.append(Metric("test/loss", 1.0 / epoch, START, epoch))
        if health:
            for layer in layers:
                metrics.append(Metric(f"health/rms/{layer}", rms[layer] * epoch, START, epoch))
                ratio = rms[layer] / rms[layers[-1]]
                metrics.append(Metric(f"health/rms_ratio/{layer}", ratio, START, epoch))
            metrics.append(Metric("health/decay_per_layer", decay, START, epoch))
    params = [
        Param("activation.name", activation),
        Param("dataset.train_size", "512"),
        Param("trainer.batch_size", "128"),
    ]
    client.log_batch(run_id, metrics=metrics, params=params)

    if histogram_epochs is not None:
        path = tmp / run_id / "histograms.npz"
        path.parent.mkdir(parents=True)
        epochs = min(histogram_epochs, last_epoch)
        np.savez(path, **make_histograms(layers, rms, epochs, nonfinite_last=bool(divergence)))
        client.log_artifact(run_id, str(path), "gradients")
    client.set_terminated(run_id, status=status, end_time=start + 1000)
    return run_id


def make_histograms(
    layers: list[str], rms: dict[str, float], epochs: int, nonfinite_last: bool = False
) -> dict[str, np.ndarray]:
    """Build the arrays of ``histograms.npz`` from normal draws with each layer's RMS."""
    rng = np.random.default_rng(0)
    edges = np.zeros((epochs, len(layers), BINS + 1))
    counts = np.zeros((epochs, len(layers), BINS), dtype=np.int64)
    for epoch in range(epochs):
        for index, layer in enumerate(layers):
            values = rng.normal(0.0, rms[layer], 400)
            counts[epoch, index], edges[epoch, index] = np.histogram(values, bins=BINS)
    if nonfinite_last and epochs:
        edges[-1] = np.nan
    return {
        "layers": np.asarray(layers, dtype=str),
        "epochs": np.arange(1, epochs + 1, dtype=np.int64),
        "edges": edges,
        "counts": counts,
    }


def create_parent(client: MlflowClient, experiment_id: str, name: str, start: int) -> str:
    tags = {"sweep.role": "parent", "sweep.overrides": name}
    run = client.create_run(experiment_id, start_time=start, tags=tags, run_name=name)
    client.set_terminated(run.info.run_id, status="FAILED")
    return run.info.run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Store:
    """Two sweeps in two experiments, a stand-alone RUNNING run and a KILLED child.

    Sweep "a" (experiment vanishing-gradients): relu (flat RMS, healthy), sigmoid
    (RMS 10x smaller per layer, vanishing at fc1) and tanh (FAILED, diverged).
    Sweep "b" (experiment deep-variants, six layers): relu, and an older sigmoid
    run without health metrics, verdict or histograms, plus a KILLED child.
    """
    root = tmp_path_factory.mktemp("compare-store")
    uri = default_tracking_uri(root / "mlruns")
    (root / "mlruns").mkdir()
    client = MlflowClient(uri)
    shallow = get_or_create_experiment(client, "vanishing-gradients", uri)
    deep = get_or_create_experiment(client, "deep-variants", uri)
    tmp = root / "npz"

    ids = {"a_parent": create_parent(client, shallow, "sweep activation=relu,sigmoid,tanh", START)}
    child = {"parent_id": ids["a_parent"], "tmp": tmp}
    ids["a_relu"] = log_training_run(client, shallow, "activation=relu", START + 1, **child)
    ids["a_sigmoid"] = log_training_run(
        client,
        shallow,
        "activation=sigmoid",
        START + 2,
        activation="sigmoid",
        decay=0.1,
        verdict=("vanishing", "fc1"),
        **child,
    )
    ids["a_tanh"] = log_training_run(
        client,
        shallow,
        "activation=tanh",
        START + 3,
        activation="tanh",
        status="FAILED",
        verdict=("exploding", "fc4"),
        divergence=DIVERGENCE,
        **child,
    )
    ids["running"] = log_training_run(
        client,
        shallow,
        "activation=gelu",
        START + 4,
        tmp,
        activation="gelu",
        status="RUNNING",
        health=False,
        histogram_epochs=0,
    )

    ids["b_parent"] = create_parent(client, deep, "sweep activation=relu,sigmoid", START + 5)
    child = {"parent_id": ids["b_parent"], "tmp": tmp, "layers": DEEP}
    ids["b_relu"] = log_training_run(client, deep, "activation=relu", START + 6, **child)
    ids["b_sigmoid"] = log_training_run(
        client,
        deep,
        "activation=sigmoid",
        START + 7,
        activation="sigmoid",
        decay=0.1,
        verdict=None,
        health=False,
        histogram_epochs=None,
        **child,
    )
    ids["b_killed"] = log_training_run(
        client, deep, "activation=elu", START + 8, activation="elu", status="KILLED", **child
    )
    return Store(uri=uri, client=client, ids=ids, root=root)


@pytest.fixture(scope="module")
def comparison(store, tmp_path_factory):
    """The comparison of sweep "a" (by experiment) and sweep "b" (by parent), built once."""
    runs = select_runs(
        store.client, experiment="vanishing-gradients", parent_run_id=store.ids["b_parent"]
    )
    return build_comparison(store.client, runs, tmp_path_factory.mktemp("comparison"))


def read_summary(comparison) -> list[dict[str, str]]:
    with (comparison.out_dir / "summary.csv").open(newline="") as file:
        return list(csv.DictReader(file))


def ids_of(runs) -> list[str]:
    return [run.info.run_id for run in runs]


# --- select_runs ----------------------------------------------------------------------------------


def test_select_by_experiment(store):
    runs = select_runs(store.client, experiment="vanishing-gradients")
    ids = store.ids
    assert ids_of(runs) == [ids["a_relu"], ids["a_sigmoid"], ids["a_tanh"]]
    assert [skip.run_id for skip in runs.skipped] == [ids["running"]]
    assert "RUNNING" in runs.skipped[0].reason


def test_select_by_parent_only_children(store):
    runs = select_runs(store.client, parent_run_id=store.ids["b_parent"])
    assert ids_of(runs) == [store.ids["b_relu"], store.ids["b_sigmoid"]]
    assert [skip.run_id for skip in runs.skipped] == [store.ids["b_killed"]]
    assert "KILLED" in runs.skipped[0].reason


def test_select_by_ids_across_sweeps(store):
    ids = store.ids
    runs = select_runs(store.client, run_ids=[ids["b_relu"], ids["a_tanh"], ids["a_relu"]])
    assert ids_of(runs) == [ids["a_relu"], ids["a_tanh"], ids["b_relu"]]
    assert runs.skipped == []


def test_select_by_id_takes_running_run(store):
    runs = select_runs(
        store.client, experiment="vanishing-gradients", run_ids=[store.ids["running"]]
    )
    assert store.ids["running"] in ids_of(runs)
    assert runs.skipped == []


def test_select_by_id_skips_parent_run(store):
    runs = select_runs(store.client, run_ids=[store.ids["a_relu"], store.ids["a_parent"]])
    assert ids_of(runs) == [store.ids["a_relu"]]
    assert [skip.run_id for skip in runs.skipped] == [store.ids["a_parent"]]
    assert "parent run" in runs.skipped[0].reason


def test_select_only_parent_by_id_raises(store):
    with pytest.raises(ValueError, match="No runs to compare"):
        select_runs(store.client, run_ids=[store.ids["a_parent"]])


def test_select_unknown_run_id_raises(store):
    with pytest.raises(ValueError, match="Run 'deadbeef' not found"):
        select_runs(store.client, run_ids=[store.ids["a_relu"], "deadbeef"])


def test_select_unknown_parent_raises(store):
    with pytest.raises(ValueError, match="Run 'nosuchparent' not found"):
        select_runs(store.client, parent_run_id="nosuchparent")


def test_select_leaf_as_parent_raises(store):
    with pytest.raises(ValueError, match="has no child runs"):
        select_runs(store.client, parent_run_id=store.ids["a_relu"])


def test_select_unknown_experiment_raises(store):
    with pytest.raises(ValueError, match="Experiment 'no-such-experiment' not found") as error:
        select_runs(store.client, experiment="no-such-experiment")
    assert "vanishing-gradients" in str(error.value)


def test_select_without_selector_raises(store):
    with pytest.raises(ValueError, match="No runs selected"):
        select_runs(store.client)


def test_select_by_experiment_leaves_out_comparison_runs(store):
    client = store.client
    experiment_id = get_or_create_experiment(client, "with-comparison", store.uri)
    trained = log_training_run(client, experiment_id, "trained", START, store.root / "npz")
    client.create_run(experiment_id, run_name="comparison 1 runs", tags={COMPARISON_TAG: trained})
    runs = select_runs(client, experiment="with-comparison")
    assert ids_of(runs) == [trained]


# --- build_comparison -----------------------------------------------------------------------------


def test_comparison_writes_all_files(comparison):
    names = {path.name for path in comparison.files}
    assert names == FIGURES | SUMMARY_FILES
    for path in comparison.files:
        assert path.parent == comparison.out_dir
        assert path.stat().st_size > 0


def test_comparison_runs_in_start_order(comparison, store):
    ids = store.ids
    expected = ["a_relu", "a_sigmoid", "a_tanh", "b_relu", "b_sigmoid"]
    assert [run.run_id for run in comparison.runs] == [ids[name] for name in expected]
    assert comparison.runs[0].name == "activation=relu"


def test_comparison_reports_skipped(comparison, store):
    assert {skip.run_id for skip in comparison.skipped} == {
        store.ids["running"],
        store.ids["b_killed"],
    }
    assert f"Skipped run {store.ids['running']}" in comparison.explanation
    assert f"Skipped run {store.ids['b_killed']}" in comparison.explanation


def test_summary_csv_columns(comparison):
    with (comparison.out_dir / "summary.csv").open(newline="") as file:
        header = next(csv.reader(file))
    assert header[:6] == [
        "run_name",
        "run_id",
        "experiment",
        "parent_run_id",
        "status",
        "activation",
    ]
    for column in ["train/loss", "train/accuracy", "test/accuracy", "divergence"]:
        assert column in header
    assert [c for c in header if c.startswith("rms/")] == [f"rms/{layer}" for layer in DEEP]
    assert [c for c in header if c.startswith("rms_ratio/")] == [
        f"rms_ratio/{layer}" for layer in DEEP
    ]


def test_summary_csv_one_row_per_run(comparison, store):
    rows = read_summary(comparison)
    assert [row["run_id"] for row in rows] == [run.run_id for run in comparison.runs]
    by_id = {row["run_id"]: row for row in rows}
    ids = store.ids

    relu = by_id[ids["a_relu"]]
    assert relu["status"] == "FINISHED"
    assert relu["experiment"] == "vanishing-gradients"
    assert relu["parent_run_id"] == ids["a_parent"]
    assert relu["gradient_health"] == "healthy"
    assert float(relu["train/loss"]) == pytest.approx(2.3 * 0.8**12)
    assert float(relu["test/accuracy"]) == pytest.approx(0.7)
    assert relu["rms/fc5"] == ""


def test_summary_csv_vanishing_values(comparison, store):
    sigmoid = {row["run_id"]: row for row in read_summary(comparison)}[store.ids["a_sigmoid"]]
    assert sigmoid["activation"] == "sigmoid"
    assert sigmoid["gradient_health"] == "vanishing"
    assert sigmoid["gradient_health.layer"] == "fc1"
    assert float(sigmoid["rms/fc1"]) == pytest.approx(3e-5)  # 1e-5 at epoch 3, times 3
    assert float(sigmoid["rms/fc4"]) == pytest.approx(3e-2)
    assert float(sigmoid["rms_ratio/fc1"]) == pytest.approx(1e-3)
    assert float(sigmoid["health/decay_per_layer"]) == pytest.approx(0.1)


def test_summary_csv_diverged_run(comparison, store):
    tanh = {row["run_id"]: row for row in read_summary(comparison)}[store.ids["a_tanh"]]
    assert tanh["status"] == "FAILED"
    assert tanh["divergence"] == DIVERGENCE
    assert math.isnan(float(tanh["train/loss"]))
    assert float(tanh["test/accuracy"]) == pytest.approx(0.6)  # epoch 2, its last


def test_summary_csv_blanks_for_old_run(comparison, store):
    old = {row["run_id"]: row for row in read_summary(comparison)}[store.ids["b_sigmoid"]]
    assert old["gradient_health"] == ""
    assert old["divergence"] == ""
    assert all(old[f"rms/{layer}"] == "" for layer in DEEP)


def test_summary_md_names_runs_and_verdicts(comparison, store):
    page = (comparison.out_dir / "summary.md").read_text()
    assert page.startswith("# Comparison of 5 runs")
    for name in ["activation=relu", "activation=sigmoid", "activation=tanh"]:
        assert name in page
    for verdict in ["healthy", "vanishing", "exploding"]:
        assert verdict in page
    assert "vanishing-gradients" in page
    assert "sweep activation=relu,sigmoid,tanh" in page
    assert DIVERGENCE in page
    for figure in FIGURES:
        assert f"]({figure})" in page


def test_summary_md_lists_skipped(comparison, store):
    page = (comparison.out_dir / "summary.md").read_text()
    skipped_section = page.split("## Skipped runs", 1)[1].split("##", 1)[0]
    assert store.ids["running"] in skipped_section
    assert "status RUNNING" in skipped_section
    assert store.ids["b_killed"] in skipped_section
    assert "status KILLED" in skipped_section


def test_explanation_names_missing_data(comparison):
    lines = comparison.explanation.splitlines()
    old_run = [line for line in lines if "Missing in activation=sigmoid [" in line]
    assert any("no gradients/histograms.npz" in line for line in old_run), lines
    assert any("no health/rms" in line and "grad_rms" in line for line in old_run), lines


def test_explanation_marks_diverged(comparison):
    assert f"Diverged: activation=tanh ended FAILED with {DIVERGENCE}." in comparison.explanation
    assert "non-finite histograms at epoch 2" in comparison.explanation


def test_explanation_default_depth_epochs(comparison):
    assert "rms_vs_depth.png shows epochs 1, 2, 3." in comparison.explanation
    assert "activation=tanh: no gradient RMS at epoch 3" in comparison.explanation


def test_comparison_chosen_depth_epochs(store, tmp_path):
    runs = select_runs(store.client, run_ids=[store.ids["a_relu"], store.ids["a_sigmoid"]])
    result = build_comparison(store.client, runs, tmp_path, depth_epochs=[2])
    assert "rms_vs_depth.png shows epochs 2." in result.explanation
    assert (tmp_path / "rms_vs_depth.png").is_file()


def test_comparison_run_without_data(store, tmp_path):
    runs = select_runs(store.client, run_ids=[store.ids["running"]])
    result = build_comparison(store.client, runs, tmp_path)
    names = {path.name for path in result.files}
    assert "waterfalls.png" not in names
    assert {"loss.png", "rms_vs_depth.png", "summary.csv", "summary.md"} <= names
    assert "contains no histogram" in result.explanation
    assert "per-epoch mean grad_rms" in result.explanation


def test_comparison_rejects_empty_runs(store, tmp_path):
    with pytest.raises(ValueError, match="No runs to compare"):
        build_comparison(store.client, [], tmp_path)


def test_depth_plot_styles_by_variant_and_epoch():
    values = {
        "relu": {1: np.ones(3), 3: np.ones(3)},
        "sigmoid": {1: np.array([1e-3, 1e-2, np.nan]), 3: np.ones(3)},
    }
    fig = plot_grad_stat_vs_depth_by_variant(values, ["fc1", "fc2", "fc3"], "rms", "title")
    lines = fig.axes[0].lines
    assert [line.get_label() for line in lines] == [
        "relu, epoch 1",
        "relu, epoch 3",
        "sigmoid, epoch 1",
        "sigmoid, epoch 3",
    ]
    assert lines[0].get_color() == lines[1].get_color() != lines[2].get_color()
    assert lines[1].get_linestyle() == lines[3].get_linestyle() == "-"
    assert lines[0].get_linestyle() != "-"
    with pytest.raises(ValueError, match="one value per layer"):
        plot_grad_stat_vs_depth_by_variant({"x": {1: np.ones(2)}}, ["fc1"], "rms", "title")


def test_depth_fallback_epoch_means(store):
    run = store.client.get_run(store.ids["b_sigmoid"])
    data = _RunData(run=run, short="old", label="old", experiment="deep-variants")
    _read_depth_profile(store.client, data)
    assert data.depth_source == "grad_rms"
    assert sorted(data.depth) == [1, 2, 3]
    # grad_rms/fc6 is 1e-2 times the iteration, so epoch e averages iterations 4e-3 .. 4e.
    assert data.depth[1]["fc6"] == pytest.approx(1e-2 * 2.5)
    assert data.depth[3]["fc6"] == pytest.approx(1e-2 * 10.5)
    assert data.depth[3]["fc1"] == pytest.approx(1e-7 * 10.5)
    assert "fc1.bias" not in data.depth[1]


@pytest.mark.parametrize(
    ("losses", "expected"),
    [([2.3, 0.01], True), ([2.3, 1.0], False), ([2.3, math.nan, 0.1], True), ([math.nan], False)],
)
def test_loss_log_axis_over_a_decade(losses, expected):
    series = {"run": (np.arange(len(losses)), np.array(losses))}
    assert _spans_a_decade(series) is expected


# --- log_comparison -------------------------------------------------------------------------------


def test_log_comparison_under_comparison_folder(store, comparison):
    client = store.client
    experiment_id = get_or_create_experiment(client, "comparison-target", store.uri)
    target = client.create_run(experiment_id, run_name="target").info.run_id
    logged = log_comparison(client, comparison, target)
    client.set_terminated(target)

    listed = {info.path for info in client.list_artifacts(target, "comparison")}
    expected = {f"comparison/{path.name}" for path in comparison.files}
    assert listed == expected
    assert set(logged) == expected


def test_log_comparison_unknown_run_raises(store, comparison):
    with pytest.raises(ValueError, match="Run 'missing-run' not found"):
        log_comparison(store.client, comparison, "missing-run")


# --- command line ---------------------------------------------------------------------------------


def run_cli(store: Store, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), "MLFLOW_TRACKING_URI": store.uri}
    return subprocess.run(
        [sys.executable, "-m", "src.compare", *args],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_writes_files(store, tmp_path):
    out = tmp_path / "out"
    result = run_cli(
        store, "--runs", store.ids["a_sigmoid"], store.ids["b_relu"], "--out", str(out)
    )
    assert result.returncode == 0, result.stderr
    assert {path.name for path in out.iterdir()} == FIGURES | SUMMARY_FILES
    assert f"Wrote 6 files to {out}" in result.stdout
    assert "Compared 2 runs from 2 sweeps in 2 experiments" in result.stderr


def test_cli_log_run_creates_run(store):
    ids = [store.ids["a_relu"], store.ids["b_sigmoid"]]
    result = run_cli(store, "--runs", *ids, "--log-run", "--log-experiment", "cli-comparisons")
    assert result.returncode == 0, result.stderr
    client = store.client
    experiment = client.get_experiment_by_name("cli-comparisons")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "comparison 2 runs"
    assert run.info.status == "FINISHED"
    assert run.data.tags[COMPARISON_TAG] == ",".join(ids)
    listed = {Path(info.path).name for info in client.list_artifacts(run.info.run_id, "comparison")}
    assert listed == {"loss.png", "grad_mean.png", "rms_vs_depth.png", "waterfalls.png"} | {
        "summary.csv",
        "summary.md",
    }
    assert f"Logged 6 files to run {run.info.run_id}" in result.stdout


def test_cli_unknown_run_id_exits_2(store):
    result = run_cli(store, "--runs", store.ids["a_relu"], "0123456789abcdef")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1, result.stderr
    assert "Run '0123456789abcdef' not found" in errors[0]


def test_cli_unknown_experiment_exits_2(store, monkeypatch, caplog):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.uri)
    with pytest.raises(SystemExit) as exit_info:
        main(["--experiment", "no-such-experiment"])
    assert exit_info.value.code == 2
    assert "Experiment 'no-such-experiment' not found" in caplog.text


def test_cli_missing_store_exits_2(tmp_path, caplog):
    missing = tmp_path / "nowhere" / "mlflow.db"
    with pytest.raises(SystemExit) as exit_info:
        main(["--tracking-uri", f"sqlite:///{missing}", "--runs", "abc"])
    assert exit_info.value.code == 2
    assert f"MLflow store not found: {missing} does not exist" in caplog.text
    assert not missing.parent.exists()


def test_cli_requires_selector(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--out", "somewhere"])
    assert exit_info.value.code == 2
    assert "--experiment, --parent or --runs" in capsys.readouterr().err


def test_cli_default_output_folder(store, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.uri)
    monkeypatch.chdir(tmp_path)
    main(["--parent", store.ids["a_parent"], "--epochs", "1", "3"])
    (folder,) = (tmp_path / "outputs" / "comparisons").iterdir()
    assert {path.name for path in folder.iterdir()} == FIGURES | SUMMARY_FILES
    assert str(folder) in capsys.readouterr().out


def test_cli_corrupt_store_exits_2(tmp_path, caplog):
    store_file = tmp_path / "mlflow.db"
    store_file.write_text("not a database")
    with pytest.raises(SystemExit) as exit_info:
        main(["--tracking-uri", f"sqlite:///{store_file}", "--runs", "abc"])
    assert exit_info.value.code == 2
    assert "Failed to read the MLflow store" in caplog.text
    assert "file is not a database" in caplog.text


def test_cli_rejects_epoch_zero(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--runs", "abc", "--epochs", "0"])
    assert exit_info.value.code == 2
    assert "invalid epoch '0'" in capsys.readouterr().err
