"""End-to-end runs of the real pipeline into a temporary SQLite MLflow store."""

import csv
import os
import signal
import subprocess
import sys

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from src import train as train_module
from src.data import load_dataset
from src.gradients import STATS
from src.histograms import load_histograms
from src.reports import MODEL_METRICS
from src.tracking import flatten_params
from src.train import JobInfo, train
from tests.conftest import PROJECT_ROOT, TINY_OVERRIDES

LAYERS = ["fc1", "fc2", "fc3", "fc4"]
EXPECTED_ARTIFACTS = {
    "config/config.yaml",
    "config/overrides.yaml",
    "gradients/histograms.npz",
    "figures/dataset_samples.png",
    "figures/loss.png",
    "figures/grad_mean.png",
    "figures/gradient_waterfall.png",
    "figures/activation.png",
    "health/verdict.txt",
}


def list_artifacts(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    found = set()
    for info in client.list_artifacts(run_id, path):
        if info.is_dir:
            found |= list_artifacts(client, run_id, info.path)
        else:
            found.add(info.path)
    return found


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One tiny run, shared by the read-back tests: (cfg, client, run, final metrics)."""
    from src.tracking import default_tracking_uri
    from tests.conftest import compose_config

    store = tmp_path_factory.mktemp("mlruns")
    cfg = compose_config(TINY_OVERRIDES)
    cfg.tracking.uri = default_tracking_uri(store)
    metrics = train(cfg, JobInfo(run_name="activation=relu", overrides=["activation=relu"]))
    client = MlflowClient(cfg.tracking.uri)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment_name)
    (run,) = client.search_runs([experiment.experiment_id])
    return cfg, client, run, metrics


def test_run_finished_with_name(finished_run):
    _, _, run, _ = finished_run
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "activation=relu"


def test_run_logs_every_param(finished_run):
    cfg, _, run, _ = finished_run
    expected = flatten_params(cfg)
    assert run.data.params == expected
    assert run.data.params["optimizer.lr"] == "0.001"
    assert run.data.params["model.hidden_sizes"] == "[32, 16, 16]"


def test_run_metric_step_counts(finished_run):
    cfg, client, run, _ = finished_run
    iters = 3 * cfg.trainer.epochs  # 300 images in batches of 128: 3 iterations an epoch
    per_iteration = ["train/loss"]
    for stat in STATS:
        per_iteration += [f"grad_{stat}/{layer}" for layer in LAYERS]
    for key in per_iteration:
        history = client.get_metric_history(run.info.run_id, key)
        assert [m.step for m in history] == list(range(1, iters + 1)), key

    per_epoch = ["train/accuracy", "test/accuracy", "test/loss", "health/decay_per_layer"]
    per_epoch += [f"health/rms/{layer}" for layer in LAYERS]
    per_epoch += [f"health/rms_ratio/{layer}" for layer in LAYERS]
    per_epoch += [f"act_dead_frac/act{i}" for i in (1, 2, 3)]
    for key in per_epoch:
        history = client.get_metric_history(run.info.run_id, key)
        assert [m.step for m in history] == list(range(1, cfg.trainer.epochs + 1)), key


def test_bias_stats_logged_on_request(tiny_cfg):
    tiny_cfg.monitor.log_bias = True
    tiny_cfg.tracking.log_model = False
    train(tiny_cfg)
    client = MlflowClient(tiny_cfg.tracking.uri)
    experiment = client.get_experiment_by_name(tiny_cfg.tracking.experiment_name)
    (run,) = client.search_runs([experiment.experiment_id])
    history = client.get_metric_history(run.info.run_id, "grad_rms/fc1.bias")
    assert [m.step for m in history] == list(range(1, 7))


def test_sparse_stats_keep_health_honest(tiny_cfg):
    # Statistics every 4 iterations leave the 3-iteration epochs 1 without any.
    tiny_cfg.monitor.stats_every = 4
    tiny_cfg.tracking.log_model = False
    train(tiny_cfg)
    client = MlflowClient(tiny_cfg.tracking.uri)
    experiment = client.get_experiment_by_name(tiny_cfg.tracking.experiment_name)
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.data.tags["gradient_health"] != "exploding"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "health/rms/fc1")]
    assert steps == [2]


def test_bias_stats_not_logged_by_default(finished_run):
    _, _, run, _ = finished_run
    assert not [key for key in run.data.metrics if key.endswith(".bias")]


def test_run_tagged_with_verdict(finished_run):
    _, _, run, _ = finished_run
    assert run.data.tags["gradient_health"] in {"vanishing", "exploding", "healthy"}
    assert run.data.tags["activation"] == "relu"
    if run.data.tags["gradient_health"] != "healthy":
        assert run.data.tags["gradient_health.layer"] in LAYERS


def test_logged_stats_match_recomputation(finished_run):
    # The RMS is the norm over the square root of the entry count: fc1 is 784 x 32.
    _, client, run, _ = finished_run
    norms = client.get_metric_history(run.info.run_id, "grad_norm/fc1")
    rms = client.get_metric_history(run.info.run_id, "grad_rms/fc1")
    for norm, value in zip(norms, rms):
        assert value.value == pytest.approx(norm.value / np.sqrt(784 * 32), rel=1e-6)


def test_run_logs_every_artifact(finished_run):
    _, client, run, _ = finished_run
    artifacts = list_artifacts(client, run.info.run_id)
    assert EXPECTED_ARTIFACTS <= artifacts, EXPECTED_ARTIFACTS - artifacts


def test_histogram_artifact_shape(finished_run, tmp_path):
    cfg, client, run, _ = finished_run
    path = client.download_artifacts(run.info.run_id, "gradients/histograms.npz", str(tmp_path))
    hist = load_histograms(path)
    assert hist["layers"].tolist() == LAYERS
    assert hist["epochs"].tolist() == [1, 2]
    assert hist["edges"].shape == (2, 4, 31)
    assert hist["counts"].shape == (2, 4, 30)
    # Every count covers the whole weight tensor: fc1 is 784 x 32.
    assert hist["counts"][:, 0].sum(axis=1).tolist() == [784 * 32] * 2
    assert np.all(np.diff(hist["edges"], axis=-1) > 0)


def test_logged_model_predicts_same_logits(finished_run):
    cfg, client, run, _ = finished_run
    mlflow.set_tracking_uri(cfg.tracking.uri)
    model = mlflow.pytorch.load_model(f"runs:/{run.info.run_id}/model")
    data = load_dataset(cfg.dataset, torch.device("cpu"))
    inputs = data.test_inputs[:16]
    reference = train_module.build_model(
        cfg.model, cfg.activation, data.input_shape, data.num_classes
    )
    assert tuple(model(inputs).shape) == (16, 10)
    assert not torch.allclose(model(inputs), reference(inputs)), "must be the trained weights"


def test_logged_model_matches_final_accuracy(finished_run):
    cfg, _, run, metrics = finished_run
    mlflow.set_tracking_uri(cfg.tracking.uri)
    model = mlflow.pytorch.load_model(f"runs:/{run.info.run_id}/model")
    data = load_dataset(cfg.dataset, torch.device("cpu"))
    with torch.no_grad():
        accuracy = (model(data.test_inputs).argmax(1) == data.test_targets).float().mean()
    assert accuracy.item() == pytest.approx(metrics["test/accuracy"], abs=1e-6)


def test_logged_model_linked_to_run(finished_run):
    cfg, client, run, metrics = finished_run
    (logged,) = client.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{run.info.run_id}'",
    )
    assert logged.name == "model"
    assert logged.params["trainer.epochs"] == str(cfg.trainer.epochs)
    linked = {m.key: m for m in logged.metrics}
    assert sorted(linked) == sorted(MODEL_METRICS)
    assert linked["test/accuracy"].value == pytest.approx(metrics["test/accuracy"])
    assert linked["test/accuracy"].step == cfg.trainer.epochs
    outputs = client.get_run(run.info.run_id).outputs.model_outputs
    assert [o.model_id for o in outputs] == [logged.model_id]
    # Linking adds no value to the run's own history.
    history = client.get_metric_history(run.info.run_id, "test/accuracy")
    assert len(history) == cfg.trainer.epochs


def test_pending_model_of_killed_attempt_marked_failed(tmp_path):
    from mlflow.entities import LoggedModelStatus

    from src import reports
    from src.tracking import default_tracking_uri
    from tests.conftest import compose_config

    cfg = compose_config(TINY_OVERRIDES)
    uri = default_tracking_uri(tmp_path)
    client = MlflowClient(uri)
    experiment_id = client.create_experiment("models", artifact_location=str(tmp_path / "art"))
    run_id = client.create_run(experiment_id).info.run_id
    mlflow.set_tracking_uri(uri)
    pending = mlflow.initialize_logged_model(name="model", source_run_id=run_id)
    data = load_dataset(cfg.dataset, torch.device("cpu"))
    model = train_module.build_model(cfg.model, cfg.activation, data.input_shape, data.num_classes)
    model_id = reports.log_model(model, data, run_id, {"seed": 0})
    statuses = {m.model_id: m.status for m in client.search_logged_models([experiment_id])}
    assert statuses[pending.model_id] == LoggedModelStatus.FAILED
    assert statuses[model_id] == LoggedModelStatus.READY


def test_failed_run_marked_failed(tiny_cfg, monkeypatch):
    def broken_fit(*args, **kwargs):
        raise RuntimeError("simulated crash in the training loop")

    monkeypatch.setattr(train_module, "fit", broken_fit)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(tiny_cfg)
    client = MlflowClient(tiny_cfg.tracking.uri)
    experiment = client.get_experiment_by_name(tiny_cfg.tracking.experiment_name)
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FAILED"
    assert run.data.params["trainer.epochs"] == "2", "params logged before the crash stay"


def test_bad_config_starts_no_run(tiny_cfg):
    tiny_cfg.trainer.batch_size = 0
    with pytest.raises(ValueError, match="trainer.batch_size"):
        train(tiny_cfg)
    client = MlflowClient(tiny_cfg.tracking.uri)
    assert client.get_experiment_by_name(tiny_cfg.tracking.experiment_name) is None


def test_diverged_run_failed_with_counts(tiny_cfg):
    tiny_cfg.optimizer.lr = 1e10
    with pytest.raises(train_module.Divergence, match="non-finite"):
        train(tiny_cfg)
    client = MlflowClient(tiny_cfg.tracking.uri)
    experiment = client.get_experiment_by_name(tiny_cfg.tracking.experiment_name)
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FAILED"
    assert "non-finite" in run.data.tags["divergence"]
    step = int(run.data.tags["divergence.step"])
    assert step >= 1
    counts = run.data.tags["divergence.nonfinite"]
    assert counts.startswith("fc1=")
    assert run.data.tags["gradient_health"] == "exploding"
    nonfinite = [
        m.value
        for layer in LAYERS
        for m in client.get_metric_history(run.info.run_id, f"grad_nonfinite/{layer}")
        if m.step == step
    ]
    assert sum(nonfinite) > 0, "the per-layer counts at the diverging step are logged"
    artifacts = list_artifacts(client, run.info.run_id)
    assert "gradients/histograms.npz" in artifacts


def run_multirun(tmp_path, *overrides: str) -> tuple[subprocess.CompletedProcess, str]:
    """Run ``python -m src.train -m`` on tiny settings into a store in `tmp_path`."""
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    (tmp_path / "mlruns").mkdir()
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    env.pop("MLFLOW_TRACKING_URI", None)
    result = subprocess.run(
        [sys.executable, "-m", "src.train", "-m", *overrides, *TINY_OVERRIDES,
         "trainer.epochs=1", "tracking.log_model=false",
         f"tracking.uri={uri}", f"hydra.sweep.dir={tmp_path}/sweep"],
        cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    return result, uri


def sweep_runs(uri: str) -> tuple[object, list]:
    """Return the sweep's parent run and its child runs."""
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("vanishing-gradients")
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("sweep.role") == "parent"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    return parent, children


def test_multirun_two_activations(tmp_path):
    result, uri = run_multirun(tmp_path, "activation=relu,sigmoid")
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(uri)
    parent, jobs = sweep_runs(uri)
    assert parent.info.status == "FINISHED"
    assert sorted(r.info.run_name for r in jobs) == ["activation=relu", "activation=sigmoid"]
    assert all(r.info.status == "FINISHED" for r in jobs)
    for run in jobs:
        artifacts = list_artifacts(client, run.info.run_id)
        assert "logs/train.log" in artifacts
        assert "config/hydra/overrides.yaml" in artifacts
        assert any(path.startswith("images/gradient_histograms") for path in artifacts)

    comparison = list_artifacts(client, parent.info.run_id, "comparison")
    for name in ["loss.png", "grad_mean.png", "rms_vs_depth.png", "waterfalls.png",
                 "summary.csv", "summary.md"]:  # fmt: skip
        assert f"comparison/{name}" in comparison
    summary = client.download_artifacts(parent.info.run_id, "comparison/summary.csv", str(tmp_path))
    with open(summary) as f:
        rows = list(csv.DictReader(f))
    assert sorted(row["run_name"] for row in rows) == ["activation=relu", "activation=sigmoid"]


def test_multirun_divergence_spares_sibling(tmp_path):
    result, uri = run_multirun(tmp_path, "optimizer.lr=1e-3,1e10")
    assert result.returncode == 1, "a failed job makes the sweep exit non-zero"
    assert "1 job(s) of the sweep failed" in result.stderr + result.stdout
    client = MlflowClient(uri)
    parent, jobs = sweep_runs(uri)
    by_name = {run.info.run_name: run for run in jobs}
    assert by_name["optimizer.lr=0.001"].info.status == "FINISHED"
    diverged = by_name["optimizer.lr=10000000000.0"]
    assert diverged.info.status == "FAILED"
    assert "non-finite" in diverged.data.tags["divergence"]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["sweep.failed_jobs"] == "1"
    assert "comparison/summary.md" in list_artifacts(client, parent.info.run_id, "comparison")


def test_epoch_images_have_steps(finished_run):
    cfg, client, run, _ = finished_run
    images = [p for p in list_artifacts(client, run.info.run_id, "images") if p.endswith(".png")]
    steps = sorted(int(path.split("+step+")[1].split("+")[0]) for path in images)
    assert steps == list(range(1, cfg.trainer.epochs + 1))


def test_log_histogram_mode_runs(tiny_cfg, tmp_path):
    tiny_cfg.monitor.hist_mode = "log"
    tiny_cfg.monitor.hist_bins = 21
    tiny_cfg.tracking.log_model = False
    train(tiny_cfg)
    client = MlflowClient(tiny_cfg.tracking.uri)
    experiment = client.get_experiment_by_name(tiny_cfg.tracking.experiment_name)
    (run,) = client.search_runs([experiment.experiment_id])
    path = client.download_artifacts(run.info.run_id, "gradients/histograms.npz", str(tmp_path))
    hist = load_histograms(path)
    assert str(hist["mode"]) == "log"
    assert hist["edges"].shape == (2, 4, 22)
    np.testing.assert_array_equal(hist["edges"][0, 0], hist["edges"][1, 3])


def test_sigterm_marks_run_killed(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    (tmp_path / "mlruns").mkdir()
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    env.pop("MLFLOW_TRACKING_URI", None)
    process = subprocess.Popen(
        [sys.executable, "-m", "src.train", *TINY_OVERRIDES, "trainer.epochs=50",
         "dataset.train_size=3000", f"tracking.uri={uri}", f"hydra.run.dir={tmp_path}/run"],
        cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    for line in process.stdout:
        if "epoch   2/50" in line:
            process.send_signal(signal.SIGTERM)
            break
    process.stdout.read()
    assert process.wait(timeout=120) == 128 + signal.SIGTERM  # as a shell reports it
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("vanishing-gradients")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "KILLED"
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) >= 2 * 24
