"""The training loop, its end-of-epoch bookkeeping, and evaluation."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from src.activations import ActivationMonitor
from src.gradients import EpochRecord, GradientMonitor, Metric
from src.health import Thresholds, Verdict, epoch_profile, judge, profile_columns
from src.tracking import Tracker

log = logging.getLogger(__name__)


class Divergence(RuntimeError):
    """The loss or a gradient became NaN or infinite; training cannot go on."""

    def __init__(self, step: int, reason: str, nonfinite_counts: dict[str, int]):
        super().__init__(reason)
        self.step = step
        self.reason = reason
        self.nonfinite_counts = nonfinite_counts  # tensor name -> non-finite entries at `step`


@dataclass
class History:
    """Host copies of every logged metric and each epoch's gradient-health verdict."""

    metrics: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)
    verdicts: list[Verdict] = field(default_factory=list)

    def add(self, metrics: list[Metric]) -> None:
        for metric in metrics:
            steps, values = self.metrics.setdefault(metric.key, ([], []))
            steps.append(metric.step)
            values.append(metric.value)

    def last(self) -> dict[str, float]:
        return {key: values[-1] for key, (_, values) in self.metrics.items()}


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


def health_metrics(verdict: Verdict, layers: list[str], epoch: int, now_ms: int) -> list[Metric]:
    """Return the verdict's per-layer figures as ``health/*`` metrics at step `epoch`."""
    metrics = [Metric("health/decay_per_layer", verdict.decay_per_layer, epoch, now_ms)]
    for layer, rms, ratio in zip(layers, verdict.rms, verdict.ratios):
        metrics.append(Metric(f"health/rms/{layer}", float(rms), epoch, now_ms))
        metrics.append(Metric(f"health/rms_ratio/{layer}", float(ratio), epoch, now_ms))
    return metrics


def check_finite(record: EpochRecord, names: list[str]) -> None:
    """Raise Divergence at the epoch's first non-finite loss or gradient."""
    event = record.first_nonfinite()
    if event is None:
        return
    step, reason = event
    counts = {name: 0 for name in names}
    if step in record.stat_steps:
        row = record.stats["nonfinite"][record.stat_steps.index(step)]
        counts = {name: int(count) for name, count in zip(names, row)}
    bad = ", ".join(f"{name}={count}" for name, count in counts.items() if count)
    if bad:
        reason += f" (non-finite entries: {bad})"
    raise Divergence(step, reason, counts)


def fit(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data,
    monitor: GradientMonitor,
    tracker: Tracker,
    trainer_cfg,
    seed: int,
    thresholds: Thresholds,
    activation_monitor: ActivationMonitor | None = None,
) -> History:
    """Run the training loop and return what it recorded; raise Divergence on NaN/Inf."""
    train_x, train_y = data.train_inputs, data.train_targets
    num_train = len(train_x)
    batch_size = trainer_cfg.batch_size
    iters_per_epoch = math.ceil(num_train / batch_size)
    shuffle = torch.Generator().manual_seed(seed)  # own stream: reshuffles leave the global RNG
    history = History()
    global_step = 0
    columns, source = profile_columns(monitor.names, monitor.layers)

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

        # Once an epoch: the recorded values go to the host, then to MLflow in batches.
        record = monitor.drain(epoch)
        metrics = record.metrics
        profile = epoch_profile(record, columns, source)
        verdict = judge(monitor.layers, profile, thresholds)
        history.verdicts.append(verdict)

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
        metrics += health_metrics(verdict, monitor.layers, epoch, now_ms)
        if activation_monitor is not None:
            metrics += activation_monitor.drain(epoch)
        tracker.log_metrics(metrics)
        history.add(metrics)

        log.info(
            "epoch %3d/%d | loss %.4f | acc %.4f | test loss %.4f | test acc %.4f | %s | %.2f s",
            epoch, trainer_cfg.epochs, train_loss, train_acc,
            test_loss.item(), test_acc.item(), verdict.network, seconds,
        )  # fmt: skip
        check_finite(record, monitor.names)
    return history
