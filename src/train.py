"""Train one network variant and record its gradients in MLflow.

python -m src.train                              # one run with the defaults
python -m src.train -m activation=relu,sigmoid   # a sweep, one MLflow run per job
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import hydra
import torch
import torch.nn.functional as F
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from src import reports
from src.config import register_schemas, validate
from src.data import load_dataset
from src.gradients import GradientMonitor, Metric
from src.models import build_model, weight_layers
from src.sweep import job_run_name, read_parent_run
from src.tracking import Tracker, flatten_params, resolve_tracking_uri, start_run

log = logging.getLogger(__name__)
register_schemas()


@dataclass
class JobInfo:
    """What the launcher knows about a job: its name, its overrides and its folder."""

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


@torch.no_grad()
def evaluate(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, batch_size: int = 1000):
    """Return ``(mean loss, accuracy)`` of `model` on a whole split, as device tensors."""
    model.eval()
    loss_sum = torch.zeros((), device=inputs.device)
    correct = torch.zeros((), device=inputs.device, dtype=torch.long)
    for start in range(0, len(inputs), batch_size):
        logits = model(inputs[start : start + batch_size])
        batch_targets = targets[start : start + batch_size]
        loss_sum += F.cross_entropy(logits, batch_targets, reduction="sum")
        correct += (logits.argmax(dim=1) == batch_targets).sum()
    model.train()
    return loss_sum / len(inputs), correct / len(inputs)


def fit(model, optimizer, data, monitor: GradientMonitor, tracker: Tracker, trainer_cfg, seed: int):
    """Run the training loop; return the host history ``{metric key: ([steps], [values])}``."""
    train_x, train_y = data.train_inputs, data.train_targets
    num_train = len(train_x)
    batch_size = trainer_cfg.batch_size
    iters_per_epoch = math.ceil(num_train / batch_size)
    shuffle = torch.Generator().manual_seed(seed)  # own stream: reshuffles do not touch dropout RNG
    history: dict[str, tuple[list[int], list[float]]] = {}
    global_step = 0

    for epoch in range(1, trainer_cfg.epochs + 1):
        t0 = time.perf_counter()
        perm = torch.randperm(num_train, generator=shuffle).to(train_x.device)
        loss_sum = torch.zeros((), device=train_x.device)
        correct = torch.zeros((), device=train_x.device, dtype=torch.long)

        for i in range(iters_per_epoch):
            idx = perm[i * batch_size : (i + 1) * batch_size]
            inputs, targets = train_x[idx], train_y[idx]  # [B, C, H, W], [B]
            logits = model(inputs)
            loss = F.cross_entropy(logits, targets)

            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            global_step += 1
            monitor.record(loss, global_step, epoch, last_in_epoch=i == iters_per_epoch - 1)
            optimizer.step()

            loss_sum += loss.detach() * len(idx)
            correct += (logits.argmax(dim=1) == targets).sum()

        # Once an epoch: move the recorded values to the host and send them in batches.
        metrics = monitor.drain()
        test_loss, test_acc = evaluate(model, data.test_inputs, data.test_targets)
        train_loss, train_acc = loss_sum.item() / num_train, correct.item() / num_train
        seconds = time.perf_counter() - t0
        now_ms = int(time.time() * 1000)
        metrics += [
            Metric("train/accuracy", train_acc, epoch, now_ms),
            Metric("test/loss", test_loss.item(), epoch, now_ms),
            Metric("test/accuracy", test_acc.item(), epoch, now_ms),
            Metric("time/epoch_seconds", seconds, epoch, now_ms),
        ]
        tracker.log_metrics(metrics)
        for m in metrics:
            steps, values = history.setdefault(m.key, ([], []))
            steps.append(m.step)
            values.append(m.value)

        log.info(
            "epoch %3d/%d | loss %.4f | acc %.4f | test loss %.4f | test acc %.4f | %.2f s",
            epoch,
            trainer_cfg.epochs,
            train_loss,
            train_acc,
            test_loss.item(),
            test_acc.item(),
            seconds,
        )
    return history


def train(cfg: DictConfig, job: JobInfo | None = None) -> dict[str, float]:
    """Train the configured variant, log everything to MLflow, and return the final metrics."""
    validate(cfg)
    job = job or JobInfo()
    device = resolve_device(cfg.trainer.device)
    torch.set_num_threads(cfg.trainer.num_threads)
    torch.manual_seed(cfg.seed)

    # Data: whole splits as tensors on the device, batched by index.
    data = load_dataset(cfg.dataset, device)

    # Model, optimizer and the gradient monitor.
    model = build_model(cfg.model, cfg.activation, data.input_shape, data.num_classes).to(device)
    optimizer = instantiate(cfg.optimizer)(params=model.parameters())
    iters_per_epoch = math.ceil(len(data.train_inputs) / cfg.trainer.batch_size)
    monitor = GradientMonitor(
        weight_layers(model),
        iters_per_epoch,
        stats_every=cfg.monitor.stats_every,
        hist_every=cfg.monitor.hist_every,
        hist_bins=cfg.monitor.hist_bins,
    )

    tracking_uri = resolve_tracking_uri(cfg.tracking.uri)
    tags = {"activation": cfg.activation.name, "device": str(device)}
    with start_run(
        tracking_uri, cfg.tracking.experiment_name, job.run_name, tags, job.parent_run_id
    ) as tracker:
        try:
            # Config and inputs first, so that a failed run still shows what it ran.
            tracker.log_params(flatten_params(cfg))
            log_config(tracker, cfg, job)
            reports.log_dataset_samples(tracker, data)

            log.info(
                "Training %s on %s: %d epochs of %d iterations",
                job.run_name,
                device,
                cfg.trainer.epochs,
                iters_per_epoch,
            )
            history = fit(model, optimizer, data, monitor, tracker, cfg.trainer, cfg.seed)

            # Figures from the recorded data, then the model.
            reports.log_run_figures(
                tracker, history, monitor.histograms, cfg.activation, job.run_name
            )
            if cfg.tracking.log_model:
                reports.log_model(model, data)
        except BaseException as err:
            log.error("Run %s failed: %s", job.run_name, err)
            raise
        finally:
            reports.log_histograms(tracker, monitor.histograms)
            log_job_log(tracker, job)

    return {key: values[-1] for key, (_, values) in history.items()}


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


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float:
    hydra_cfg = HydraConfig.get()
    overrides = list(hydra_cfg.overrides.task)
    parent = None
    if hydra_cfg.mode == RunMode.MULTIRUN:
        parent = read_parent_run(hydra_cfg, resolve_tracking_uri(cfg.tracking.uri))
    job = JobInfo(
        run_name=job_run_name(overrides, parent["sweep_keys"] if parent else None),
        overrides=overrides,
        output_dir=Path(hydra_cfg.runtime.output_dir),
        parent_run_id=parent["run_id"] if parent else None,
    )
    metrics = train(cfg, job)
    return metrics["test/accuracy"]


if __name__ == "__main__":
    main()
