"""The training loop, its end-of-epoch bookkeeping, and evaluation."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from src.activations import ActivationMonitor
from src.checkpoint import TrainState
from src.config import check_batch_norm_batches
from src.gradients import EpochRecord, GradientMonitor, Metric
from src.health import Thresholds, Verdict, epoch_profile, judge, profile_columns
from src.splits import EVAL_BATCH_SIZE, DatasetSplits, Split

log = logging.getLogger(__name__)


class Divergence(RuntimeError):
    """The loss or a gradient became NaN or infinite; training cannot go on."""

    def __init__(self, step: int, reason: str, nonfinite_counts: dict[str, int]):
        super().__init__(reason)
        self.step = step
        self.reason = reason
        self.nonfinite_counts = nonfinite_counts  # tensor name -> non-finite entries at `step`


Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]  # (inputs [B, C, H, W], targets [B])


def tensor_batches(split: Split, batch_size: int, shuffle: torch.Generator | None) -> Batches:
    """Yield mini-batches of a split held as device tensors, indexed by a random permutation.

    Draws one ``torch.randperm`` from `shuffle` per call; None keeps the split's order.
    """
    num_samples = len(split.inputs)
    if shuffle is None:
        for start in range(0, num_samples, batch_size):
            yield (
                split.inputs[start : start + batch_size],
                split.targets[start : start + batch_size],
            )
        return
    perm = torch.randperm(num_samples, generator=shuffle).to(split.inputs.device)
    for start in range(0, num_samples, batch_size):
        idx = perm[start : start + batch_size]
        yield split.inputs[idx], split.targets[idx]


def loader_batches(loader: Iterable, device: torch.device) -> Batches:
    """Yield a DataLoader's mini-batches, copied to `device` (asynchronously from pinned memory)."""
    for inputs, targets in loader:
        yield inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)


@torch.no_grad()
def evaluate(model: nn.Module, batches: Batches, device: torch.device):
    """Return ``(mean loss, accuracy)`` of `model` over all `batches`, as device tensors."""
    model.eval()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    count = 0
    for inputs, targets in batches:
        logits = model(inputs)
        loss_sum += F.cross_entropy(logits, targets, reduction="sum")
        correct += (logits.argmax(dim=1) == targets).sum()
        count += len(targets)
    model.train()
    return loss_sum / count, correct / count


def batch_sources(
    data: DatasetSplits, batch_size: int, shuffle: torch.Generator, seed: int, device: torch.device
) -> dict[str, Callable[[], Batches]]:
    """Return, for ``train``, ``val`` and ``test``, a function that yields one pass's batches.

    The tensor path indexes device tensors; the streamed path iterates DataLoaders,
    built once here so that their worker processes last the whole run.
    """
    if not data.streamed:
        return {
            "train": lambda: tensor_batches(data.train, batch_size, shuffle),
            "val": lambda: tensor_batches(data.val, EVAL_BATCH_SIZE, None),
            "test": lambda: tensor_batches(data.test, EVAL_BATCH_SIZE, None),
        }
    loaders = {
        "train": data.train_loader(batch_size, shuffle, seed),
        "test": data.eval_loader(data.test, seed),
    }
    loaders["val"] = loaders["test"] if data.val is data.test else data.eval_loader(data.val, seed)
    return {name: _loader_source(loader, device) for name, loader in loaders.items()}


def _loader_source(loader: Iterable, device: torch.device) -> Callable[[], Iterator]:
    return lambda: loader_batches(loader, device)


def check_last_batch(model: nn.Module, num_train: int, batch_size: int) -> None:
    """Raise ConfigError when a BatchNorm1d layer would meet a mini-batch of a single image.

    ``validate`` rejects such a batch size before any work wherever the config gives the
    training-set size, and this guard covers the rest (an image folder). BatchNorm2d
    normalises over at least 2x2 positions a channel, so one image is enough for it.
    """
    if any(isinstance(module, nn.BatchNorm1d) for module in model.modules()):
        check_batch_norm_batches(num_train, batch_size)


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
    data: DatasetSplits,
    monitor: GradientMonitor,
    tracker,
    trainer_cfg,
    seed: int,
    thresholds: Thresholds,
    activation_monitor: ActivationMonitor | None = None,
    state: TrainState | None = None,
    on_epoch_end: Callable[[TrainState], None] | None = None,
) -> TrainState:
    """Run the training loop from `state` (a new one by default) and return where it ended.

    Both data paths (device tensors, or a DataLoader) give the same iterations, the
    same monitoring and the same metrics: per iteration ``train/loss`` and the
    gradient statistics, per epoch the accuracies, ``val/*``, ``test/*`` and health.
    `tracker` needs only ``log_metrics``. After each epoch's metrics are sent, `state`
    is updated and `on_epoch_end` called (the checkpoint). When the loop stops early
    (Ctrl-C, SIGTERM, an error), the values recorded in the unfinished epoch are sent
    before the exception propagates. Raises Divergence on NaN/Inf.
    """
    num_train = len(data.train)
    batch_size = trainer_cfg.batch_size
    iters_per_epoch = math.ceil(num_train / batch_size)
    check_last_batch(model, num_train, batch_size)
    device = next(model.parameters()).device
    state = state or TrainState.new(seed)
    batches = batch_sources(data, batch_size, state.shuffle, seed, device)
    history = state.history
    global_step = state.global_step
    columns, source = profile_columns(monitor.names, monitor.layers)

    for epoch in range(state.epoch + 1, trainer_cfg.epochs + 1):
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)

        try:
            for i, (inputs, targets) in enumerate(batches["train"]()):  # [B, C, H, W], [B]
                logits = model(inputs)
                loss = F.cross_entropy(logits, targets)

                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                global_step += 1
                monitor.record(loss, global_step, epoch, last_in_epoch=i == iters_per_epoch - 1)
                optimizer.step()

                loss_sum += loss.detach() * len(targets)
                correct += (logits.argmax(dim=1) == targets).sum()
        except BaseException:
            flush_partial_epoch(monitor, tracker, epoch)
            raise

        # Once an epoch: the recorded values go to the host, then to MLflow in batches.
        record = monitor.drain(epoch)
        metrics = record.metrics
        verdict = None  # an epoch without recorded statistics (monitor.stats_every) has none
        if record.stat_steps:
            verdict = judge(monitor.layers, epoch_profile(record, columns, source), thresholds)
            history.verdicts.append(verdict)

        test_loss, test_acc = evaluate(model, batches["test"](), device)
        val_loss, val_acc = test_loss, test_acc  # the test split also validates without a share
        if data.val is not data.test:
            val_loss, val_acc = evaluate(model, batches["val"](), device)
        train_loss, train_acc = loss_sum.item() / num_train, correct.item() / num_train
        seconds = time.perf_counter() - t0
        now_ms = int(time.time() * 1000)
        metrics += [
            Metric("train/accuracy", train_acc, epoch, now_ms),
            Metric("val/loss", val_loss.item(), epoch, now_ms),
            Metric("val/accuracy", val_acc.item(), epoch, now_ms),
            Metric("test/loss", test_loss.item(), epoch, now_ms),
            Metric("test/accuracy", test_acc.item(), epoch, now_ms),
            Metric("time/epoch_seconds", seconds, epoch, now_ms),
        ]
        if verdict is not None:
            metrics += health_metrics(verdict, monitor.layers, epoch, now_ms)
        if activation_monitor is not None:
            metrics += activation_monitor.drain(epoch)
        tracker.log_metrics(metrics)
        history.add(metrics)

        log.info(
            "epoch %3d/%d | loss %.4f | acc %.4f | val loss %.4f | val acc %.4f "
            "| test acc %.4f | %s | %.2f s",
            epoch, trainer_cfg.epochs, train_loss, train_acc, val_loss.item(), val_acc.item(),
            test_acc.item(), verdict.network if verdict else "no statistics", seconds,
        )  # fmt: skip
        check_finite(record, monitor.names)
        state.epoch, state.global_step = epoch, global_step
        if on_epoch_end is not None:
            on_epoch_end(state)
    return state


def flush_partial_epoch(monitor: GradientMonitor, tracker, epoch: int) -> None:
    """Send what `monitor` recorded in an epoch that did not finish, logging any failure.

    It runs while another exception propagates, so it raises nothing of its own: the
    caller gets that exception.
    """
    try:
        metrics = monitor.drain(epoch).metrics
        if metrics:
            tracker.log_metrics(metrics)
            log.info("Sent the %d values recorded in unfinished epoch %d", len(metrics), epoch)
    except Exception as err:
        log.error("Could not send the values recorded in unfinished epoch %d: %s", epoch, err)
