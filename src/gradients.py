"""The gradient monitor: per-layer weight-gradient statistics and histograms.

Everything is computed and kept on the training device. The host sees the
values once an epoch, in :meth:`GradientMonitor.drain`, so recording every
iteration costs no device synchronisation.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn


def histogram(values: torch.Tensor, bins: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Count `values` into `bins` bins evenly spaced between their min and max.

    Returns ``(edges [bins + 1], counts [bins])``. Bins are half-open ``[e_i, e_i+1)``
    except the last, which also holds the max, as in ``numpy.histogram``. When all
    values are equal the range is widened by 0.5 on each side, also as numpy does.
    Runs on the device of `values` without a host synchronisation.
    """
    values = values.detach().reshape(-1)
    lo, hi = torch.aminmax(values)
    flat = hi == lo
    lo = torch.where(flat, lo - 0.5, lo)
    hi = torch.where(flat, hi + 0.5, hi)
    fractions = torch.arange(bins, device=values.device, dtype=values.dtype) / bins
    edges = torch.cat([lo + (hi - lo) * fractions, hi.reshape(1)])
    index = torch.bucketize(values, edges, right=True) - 1
    counts = torch.bincount(index.clamp_(0, bins - 1), minlength=bins)
    return edges, counts


@dataclass
class HistogramHistory:
    """Per-epoch gradient histograms of every weight layer, as host arrays.

    ``edges[e, l]`` holds the ``bins + 1`` bin edges and ``counts[e, l]`` the counts
    of layer ``layers[l]`` at epoch ``epochs[e]`` (1-based).
    """

    layers: list[str]
    epochs: list[int] = field(default_factory=list)
    edges: list[np.ndarray] = field(default_factory=list)  # each [L, bins + 1]
    counts: list[np.ndarray] = field(default_factory=list)  # each [L, bins]

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Stack the history into the arrays stored in ``histograms.npz``."""
        num_layers = len(self.layers)
        return {
            "layers": np.asarray(self.layers, dtype=str),
            "epochs": np.asarray(self.epochs, dtype=np.int64),
            "edges": np.stack(self.edges) if self.edges else np.zeros((0, num_layers, 0)),
            "counts": np.stack(self.counts) if self.counts else np.zeros((0, num_layers, 0)),
        }

    def save(self, path) -> None:
        np.savez(path, **self.to_arrays())


def load_histograms(path) -> dict[str, np.ndarray]:
    """Read a ``histograms.npz`` artifact back: ``layers``, ``epochs``, ``edges``, ``counts``."""
    with np.load(path) as data:
        return {key: data[key] for key in data.files}


@dataclass
class Metric:
    key: str
    value: float
    step: int
    timestamp: int  # milliseconds since the epoch, as MLflow expects


class GradientMonitor:
    """Record the loss and each weight layer's gradient statistics during training.

    Call :meth:`record` after every ``loss.backward()`` and :meth:`drain` at the end
    of every epoch; ``drain`` returns the epoch's metrics for the tracker.
    Metric keys are ``train/loss`` and ``grad_mean/<layer>``.
    """

    def __init__(
        self,
        layers: list[tuple[str, nn.Parameter]],
        iters_per_epoch: int,
        stats_every: int = 1,
        hist_every: int = 1,
        hist_bins: int = 30,
    ):
        if not layers:
            raise ValueError("The model has no weight layers to monitor.")
        self.names = [name for name, _ in layers]
        self.weights = [weight for _, weight in layers]
        self.iters_per_epoch = iters_per_epoch
        self.stats_every = stats_every
        self.hist_every = hist_every
        self.hist_bins = hist_bins
        self.histograms = HistogramHistory(self.names)

        device = self.weights[0].device
        self._loss = torch.zeros(iters_per_epoch, device=device)
        self._grad_means = torch.zeros(iters_per_epoch, len(layers), device=device)
        self._loss_steps: list[tuple[int, int]] = []  # (global step, ms timestamp) per loss row
        self._stat_steps: list[tuple[int, int]] = []  # same, per row of the statistics
        self._pending_hist: tuple[int, torch.Tensor, torch.Tensor] | None = None

    def record(self, loss: torch.Tensor, global_step: int, epoch: int, last_in_epoch: bool) -> None:
        """Store the loss and, on schedule, the gradient statistics; both stay on the device."""
        now_ms = int(time.time() * 1000)
        self._loss[len(self._loss_steps)] = loss.detach()
        self._loss_steps.append((global_step, now_ms))

        if global_step % self.stats_every == 0:
            grads = [weight.grad for weight in self.weights]
            self._grad_means[len(self._stat_steps)] = torch.stack([g.mean() for g in grads])
            self._stat_steps.append((global_step, now_ms))

        if last_in_epoch and epoch % self.hist_every == 0:
            pairs = [histogram(weight.grad, self.hist_bins) for weight in self.weights]
            edges = torch.stack([e for e, _ in pairs])  # [L, bins + 1]
            counts = torch.stack([c for _, c in pairs])  # [L, bins]
            self._pending_hist = (epoch, edges, counts)

    def drain(self) -> list[Metric]:
        """Copy the epoch's values to the host, clear the buffers, and return them as metrics."""
        losses = self._loss[: len(self._loss_steps)].cpu().tolist()
        means = self._grad_means[: len(self._stat_steps)].cpu().tolist()

        metrics = [
            Metric("train/loss", value, step, ts)
            for value, (step, ts) in zip(losses, self._loss_steps)
        ]
        for row, (step, ts) in zip(means, self._stat_steps):
            metrics.extend(
                Metric(f"grad_mean/{name}", value, step, ts) for name, value in zip(self.names, row)
            )

        if self._pending_hist is not None:
            epoch, edges, counts = self._pending_hist
            self.histograms.epochs.append(epoch)
            self.histograms.edges.append(edges.cpu().numpy())
            self.histograms.counts.append(counts.cpu().numpy())

        self._loss_steps.clear()
        self._stat_steps.clear()
        self._pending_hist = None
        return metrics
