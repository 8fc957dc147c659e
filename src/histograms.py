"""Gradient-histogram data on the host: the format of ``gradients/histograms.npz``.

NumPy only, so that reading finished runs does not import torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


def symmetric_log_edges(bins: int, lo: float, hi: float) -> np.ndarray:
    """Return fixed edges ``[-hi .. -lo, lo .. hi]`` with log-spaced magnitudes.

    There are ``bins // 2`` bins per sign plus one central bin ``[-lo, lo)`` for
    values too small to tell from zero, so ``2 * (bins // 2) + 1`` bins in all.
    The same edges for every layer, epoch and run make histograms comparable.
    """
    per_sign = max(bins // 2, 1)
    magnitudes = np.logspace(np.log10(lo), np.log10(hi), per_sign + 1)
    return np.concatenate([-magnitudes[::-1], magnitudes]).astype(np.float32)


@dataclass
class HistogramHistory:
    """Per-epoch gradient histograms of every weight layer, as host arrays.

    ``edges[e, l]`` contains the ``bins + 1`` bin edges and ``counts[e, l]`` the counts
    of layer ``layers[l]`` at epoch ``epochs[e]`` (1-based).
    """

    layers: list[str]
    mode: str = "range"  # "range": each tensor's own min..max; "log": fixed symmetric log edges
    epochs: list[int] = field(default_factory=list)
    edges: list[np.ndarray] = field(default_factory=list)  # each [L, bins + 1]
    counts: list[np.ndarray] = field(default_factory=list)  # each [L, bins]

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Stack the history into the arrays stored in ``histograms.npz``."""
        num_layers = len(self.layers)
        return {
            "layers": np.asarray(self.layers, dtype=str),
            "mode": np.asarray(self.mode),
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
