"""Train one network variant and record its gradients in MLflow.

python -m src.train                              # one run with the defaults
python -m src.train -m activation=relu,sigmoid   # a sweep, one MLflow run per job
"""

from __future__ import annotations

import logging
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from src import reports
from src.activations import ActivationMonitor
from src.config import ConfigError, register_schemas, validate
from src.data import load_dataset
from src.datasets import DatasetError
from src.gradients import GradientMonitor, Metric
from src.health import Thresholds, judge_run
from src.loop import Divergence, fit
from src.models import build_model, weight_layers
from src.sweep import job_run_name, read_parent_run, record_job_failure
from src.tracking import (
    Tracker,
    connect_tracking,
    flatten_params,
    resolve_tracking_uri,
    run_environment_tags,
    start_run,
)

log = logging.getLogger(__name__)
register_schemas()


@dataclass
class JobInfo:
    """A job as the launcher describes it: its name, its overrides and its folder."""

    run_name: str = "defaults"
    overrides: list[str] = field(default_factory=list)
    output_dir: Path | None = None  # Hydra's job folder, holding .hydra/ and the job log
    parent_run_id: str | None = None


def resolve_device(name: str) -> torch.device:
    """Map ``auto`` to CUDA when available, else the CPU; pass other names through."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            f"trainer.device={name!r} but CUDA is not available; use trainer.device=auto."
        )
    return device


def train(cfg: DictConfig, job: JobInfo | None = None) -> dict[str, float]:
    """Train the configured variant, log everything to MLflow, and return the final metrics."""
    validate(cfg)
    tracking_uri = connect_tracking(cfg.tracking)  # a wrong server fails here, in seconds
    job = job or JobInfo()
    device = resolve_device(cfg.trainer.device)
    torch.set_num_threads(cfg.trainer.num_threads)
    torch.manual_seed(cfg.seed)

    # Data: device tensors batched by index, or a DataLoader when too large for that.
    data = load_dataset(cfg.dataset, device)

    # Model, optimizer and the monitors.
    model = build_model(
        cfg.model, cfg.activation, data.input_shape, data.num_classes, data.mean, data.std
    ).to(device)
    optimizer = instantiate(cfg.optimizer)(params=model.parameters())
    iters_per_epoch = math.ceil(len(data.train) / cfg.trainer.batch_size)
    monitor = build_monitor(model, cfg.monitor, iters_per_epoch)
    thresholds = Thresholds(**cfg.health)

    tags = {"activation": cfg.activation.name, **run_environment_tags(device, cfg.seed)}
    with start_run(
        tracking_uri, cfg.tracking.experiment_name, job.run_name, tags, job.parent_run_id
    ) as tracker:
        activation_monitor = None
        try:
            # Config and inputs first, so that a failed run still shows what it ran.
            tracker.log_params(flatten_params(cfg))
            log_config(tracker, cfg, job)
            reports.log_dataset_samples(tracker, data.preview())

            log.info(
                "Training %s on %s: %d epochs of %d iterations",
                job.run_name, device, cfg.trainer.epochs, iters_per_epoch,
            )  # fmt: skip
            if cfg.monitor.activations:
                activation_monitor = ActivationMonitor(model, cfg.monitor.saturation_eps)
            fit_start = time.perf_counter()
            history = fit(
                model, optimizer, data, monitor, tracker, cfg.trainer, cfg.seed,
                thresholds, activation_monitor,
            )  # fmt: skip
            # From the first iteration to the end of the last epoch's logging.
            fit_seconds = time.perf_counter() - fit_start
            timing = [Metric("time/fit_seconds", fit_seconds, 0, int(time.time() * 1000))]
            tracker.log_metrics(timing)
            history.add(timing)

            # The verdict over the whole run, figures from the recorded data, the model.
            verdict = judge_run(monitor.layers, history.verdicts, thresholds)
            reports.log_verdict(tracker, monitor.layers, verdict)
            reports.log_run_figures(
                tracker, history.metrics, monitor.histograms, cfg.activation, job.run_name
            )
            if cfg.monitor.epoch_images:
                reports.log_epoch_images(tracker, monitor.histograms, job.run_name)
            if cfg.tracking.log_model:
                reports.log_model(model, data.preview())
        except Divergence as err:
            reports.log_divergence(tracker, err)
            log.error("Run %s diverged: %s", job.run_name, err.reason)
            raise
        except BaseException as err:
            log.error("Run %s failed: %r", job.run_name, err)
            raise
        finally:
            if activation_monitor is not None:
                activation_monitor.remove()
            reports.log_histograms(tracker, monitor.histograms)
            log_job_log(tracker, job)

    return history.last()


def build_monitor(model: nn.Module, monitor_cfg, iters_per_epoch: int) -> GradientMonitor:
    """Build the gradient monitor for every weight layer and its bias.

    Bias gradients are always monitored, because the health verdict reads them;
    their per-iteration metrics are logged only with ``monitor.log_bias``.
    """
    layers = weight_layers(model)
    tensors = list(layers)
    modules = dict(model.named_modules())
    paths = {id(module.weight): path for path, module in modules.items()
             if getattr(module, "weight", None) is not None}  # fmt: skip
    for name, weight in layers:
        bias = getattr(modules[paths[id(weight)]], "bias", None)
        if isinstance(bias, nn.Parameter):
            tensors.append((f"{name}.bias", bias))
    logged = None if monitor_cfg.log_bias else [name for name, _ in layers]
    return GradientMonitor(
        tensors,
        iters_per_epoch,
        layers=[name for name, _ in layers],
        stats_every=monitor_cfg.stats_every,
        hist_every=monitor_cfg.hist_every,
        hist_bins=monitor_cfg.hist_bins,
        hist_mode=monitor_cfg.hist_mode,
        hist_log_range=tuple(monitor_cfg.hist_log_range),
        tiny=monitor_cfg.tiny,
        logged=logged,
    )


def log_config(tracker: Tracker, cfg: DictConfig, job: JobInfo) -> None:
    """Log the resolved config and the overrides as YAML artifacts under ``config/``."""
    tracker.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config/config.yaml")
    tracker.log_text(OmegaConf.to_yaml(OmegaConf.create(job.overrides)), "config/overrides.yaml")
    if job.output_dir is not None and (job.output_dir / ".hydra").is_dir():
        tracker.log_dir(job.output_dir / ".hydra", "config/hydra")


def log_job_log(tracker: Tracker, job: JobInfo) -> None:
    """Log the job's log file, written by Hydra's job logging, as ``logs/<name>.log``."""
    if job.output_dir is None:
        return
    for handler in logging.getLogger().handlers:
        handler.flush()
    for path in sorted(job.output_dir.glob("*.log")):
        tracker.log_file(path, "logs")


def _interrupt(signum: int, frame) -> None:
    raise KeyboardInterrupt(f"received signal {signal.Signals(signum).name}")


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    # A scheduler stops jobs with SIGTERM: treat it as Ctrl-C, so the run ends KILLED.
    signal.signal(signal.SIGTERM, _interrupt)
    hydra_cfg = HydraConfig.get()
    overrides = list(hydra_cfg.overrides.task)
    if hydra_cfg.mode != RunMode.MULTIRUN:
        job = JobInfo(job_run_name(overrides, None), overrides, Path(hydra_cfg.runtime.output_dir))
        return train(cfg, job)["test/accuracy"]

    parent = read_parent_run(hydra_cfg, resolve_tracking_uri(cfg.tracking.uri))
    job = JobInfo(
        run_name=job_run_name(overrides, parent["sweep_keys"] if parent else None),
        overrides=overrides,
        output_dir=Path(hydra_cfg.runtime.output_dir),
        parent_run_id=parent["run_id"] if parent else None,
    )
    # One failed job must not stop the sweep: its run is already marked, the
    # failure is recorded for the sweep's end, and the next job starts.
    try:
        return train(cfg, job)["test/accuracy"]
    except Exception as err:
        if isinstance(err, (ConfigError, DatasetError)):  # the message is complete
            log.error("Job %s failed: %s", job.run_name, err)
        elif not isinstance(err, Divergence):  # train() has logged a divergence already
            log.exception("Job %s failed", job.run_name)
        record_job_failure(hydra_cfg, job.run_name, err)
        return None


if __name__ == "__main__":
    main()
