"""Artifacts of one run: histogram data, figures, dataset samples and the model.

Figures are drawn from recorded data only (the history and the histogram
arrays), never from the live model, so they can be redrawn from a finished run.
"""

from __future__ import annotations

import logging
import tempfile
import threading
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn

from src.health import EXPLODING, Verdict, format_table
from src.histograms import HistogramHistory
from src.models import activation_curve, create_activation
from src.tracking import Tracker, redact_credentials

log = logging.getLogger(__name__)

HISTOGRAM_ARTIFACT = "gradients/histograms.npz"


def log_histograms(tracker: Tracker, histograms: HistogramHistory) -> None:
    """Log the per-epoch histogram arrays as ``gradients/histograms.npz``."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(HISTOGRAM_ARTIFACT).name
        histograms.save(path)
        tracker.log_file(path, str(Path(HISTOGRAM_ARTIFACT).parent))


def log_verdict(tracker: Tracker, layers: list[str], verdict: Verdict) -> None:
    """Log the run's gradient-health verdict as tags and as a table in the job log."""
    table = format_table(layers, verdict)
    log.info("Gradient health over the run:\n%s", table)
    tags = {"gradient_health": verdict.network}
    if verdict.first_layer:
        tags["gradient_health.layer"] = verdict.first_layer
    tracker.set_tags(tags)
    tracker.log_text(table + "\n", "health/verdict.txt")


def log_divergence(tracker: Tracker, divergence) -> None:
    """Tag a diverged run with the reason, the iteration and each tensor's non-finite count."""
    counts = ", ".join(f"{name}={count}" for name, count in divergence.nonfinite_counts.items())
    first_bad = next((n for n, c in divergence.nonfinite_counts.items() if c > 0), None)
    tags = {
        "divergence": divergence.reason,
        "divergence.step": divergence.step,
        "divergence.nonfinite": counts,
        "gradient_health": EXPLODING,
    }
    if first_bad:
        tags["gradient_health.layer"] = first_bad
    tracker.set_tags(tags)


def log_dataset_samples(tracker: Tracker, data, count: int = 64) -> None:
    """Log a grid of the first `count` training images as ``figures/dataset_samples.png``."""
    from src.plots import plot_image_grid

    images = data.train_inputs[:count].cpu()  # [N, C, H, W]
    targets = data.train_targets[:count].cpu().tolist()
    pixels = images[:, 0] if images.shape[1] == 1 else images.permute(0, 2, 3, 1)
    figure = plot_image_grid(pixels.numpy(), targets, title="Training samples")
    tracker.log_figure(figure, "figures/dataset_samples.png")


def series(history: dict, key: str) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(steps, values)`` of one metric key as arrays."""
    steps, values = history[key]
    return np.asarray(steps), np.asarray(values, dtype=np.float64)


def log_run_figures(
    tracker: Tracker, history: dict, histograms: HistogramHistory, activation_cfg, label: str
) -> None:
    """Log the run's loss, mean-gradient, waterfall and activation figures under ``figures/``."""
    from src import plots

    tracker.log_figure(plots.plot_loss({label: series(history, "train/loss")}), "figures/loss.png")

    layer_series = {
        name: series(history, f"grad_mean/{name}")
        for name in histograms.layers
        if f"grad_mean/{name}" in history
    }
    tracker.log_figure(plots.plot_grad_means({label: layer_series}), "figures/grad_mean.png")

    if histograms.epochs:
        arrays = histograms.to_arrays()
        figure = plots.plot_waterfall(
            arrays["edges"],
            arrays["counts"],
            histograms.layers,
            arrays["epochs"],
            title=activation_cfg.name,
        )
        tracker.log_figure(figure, "figures/gradient_waterfall.png")

    kwargs = {k: v for k, v in activation_cfg.items() if k != "name"}
    curve = activation_curve(create_activation(activation_cfg.name, **kwargs))
    tracker.log_figure(
        plots.plot_activations({activation_cfg.name: curve}), "figures/activation.png"
    )


def log_epoch_images(tracker: Tracker, histograms: HistogramHistory, title: str) -> None:
    """Log each epoch's histograms as an image with key ``gradient_histograms`` and step = epoch.

    The MLflow UI shows images logged under one key with a step slider, which
    plays the epochs in order.
    """
    if not histograms.epochs:
        return
    from src.plots import render_epoch_histograms

    arrays = histograms.to_arrays()
    threshold = None
    if histograms.mode == "log":
        threshold = float(np.min(np.abs(arrays["edges"])))  # the central bin's half-width
    frames = render_epoch_histograms(
        arrays["edges"], arrays["counts"], histograms.layers, arrays["epochs"], title,
        symlog_threshold=threshold,
    )  # fmt: skip
    for epoch, image in frames:
        tracker.log_image(image, key="gradient_histograms", step=epoch)


# Per-epoch metrics whose final values are linked to the logged model, for MLflow's model view.
MODEL_METRICS = ("train/accuracy", "val/loss", "val/accuracy", "test/loss", "test/accuracy")


def log_model(model: nn.Module, data, run_id: str, params: dict, example_size: int = 4) -> str:
    """Log `model`, moved to the CPU, with ``mlflow.pytorch`` as run `run_id`'s ``model``.

    Returns the logged model's id. The signature and input example come from real
    test images. The ``src`` package travels with the model, so
    ``mlflow.pytorch.load_model`` can unpickle it on a machine without this
    repository. ``runs:/<run_id>/model`` finds it, and the run lists it as an
    output, with the final values of MODEL_METRICS linked to it.
    """
    import mlflow
    from mlflow.entities import LoggedModelOutput, Metric
    from mlflow.models import infer_signature

    client = mlflow.MlflowClient()
    model = model.to("cpu").eval()
    example = data.test_inputs[:example_size].cpu()
    with torch.no_grad():
        logits = model(example)
    signature = infer_signature(example.numpy(), logits.numpy())
    experiment_id = client.get_run(run_id).info.experiment_id
    _fail_pending_models(client, experiment_id, run_id)
    logged = mlflow.initialize_logged_model(
        name="model",
        source_run_id=run_id,
        params={key: redact_credentials(str(value)) for key, value in params.items()},
        experiment_id=experiment_id,
    )
    save = partial(
        mlflow.pytorch.log_model,
        model,
        name="model",
        model_id=logged.model_id,
        signature=signature,
        input_example=example.numpy(),
        code_paths=[str(Path(__file__).resolve().parent)],
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "numpy"],
    )
    # NOTE: inside an active run, log_model links the metrics logged at its `step` to
    # the model. To find them it reads back every value of every metric of the run, 1.9 s
    # of its 2.6 s for a reference run (MLflow 3.17). MLflow keeps the active run per
    # thread, so another thread skips that, and the link is made below instead.
    _run_in_thread(save)
    final = []
    for key in MODEL_METRICS:
        history = client.get_metric_history(run_id, key)
        if history:
            last = max(history, key=lambda m: (m.step, m.timestamp))
            final.append(
                Metric(last.key, last.value, last.timestamp, last.step, model_id=logged.model_id)
            )
    step = max((m.step for m in final), default=0)
    client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=step)])
    if final:
        client.log_batch(run_id, metrics=final)
    return logged.model_id


def _fail_pending_models(client, experiment_id: str, run_id: str) -> None:
    """Mark FAILED the models of `run_id` that an attempt killed while logging left PENDING."""
    from mlflow.entities import LoggedModelStatus

    models = client.search_logged_models(
        experiment_ids=[experiment_id], filter_string=f"source_run_id = '{run_id}'"
    )
    for model in models:
        if model.status == LoggedModelStatus.PENDING:
            client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
            log.info(
                "Marked model %s FAILED: an earlier attempt left it unfinished", model.model_id
            )


def _run_in_thread(function) -> None:
    """Call `function` in a new thread and wait for it; its exception is raised here."""
    outcome: list[BaseException] = []

    def target() -> None:
        try:
            function()
        except BaseException as err:  # noqa: BLE001 - re-raised in the calling thread
            outcome.append(err)

    thread = threading.Thread(target=target, name="log-model")
    thread.start()
    thread.join()
    if outcome:
        raise outcome[0]
