"""Gradient health: judge each layer and the network as vanishing, exploding or healthy.

The judgement reads one number per weight layer and epoch: the typical RMS of
the error signal that reaches the layer, ``dL/dz`` for its pre-activations ``z``.
Its bias gradient is exactly that signal summed over the mini-batch, so the
bias gradient's RMS is the measure whenever every weight layer has a bias. The
weight gradient ``dL/dz^T a`` also scales with the layer's input ``a``: the
first layer's input is mostly zero pixels, and ReLU and sigmoid activations
differ in size, so comparing weight gradients across depth confounds the input
with the error. Without biases the measure falls back to the weight gradient's
RMS over entries that are not tiny, which at least ignores always-zero pixels
and dead units.

Within an epoch, a layer vanishes when its RMS is below ``vanish_ratio`` times
the output layer's or below ``vanish_abs``. It explodes when its RMS is above
``explode_ratio`` times the output layer's or above ``explode_abs``. Over a run,
a layer vanishes (explodes) when it did so in at least ``min_epochs_frac`` of the
epochs: vanishing gradients hurt most early in training and often fade once
the weights adapt, so a median over the run would hide them. The network's
verdict is its worst layer's and names the affected layer nearest the input.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

VANISHING, EXPLODING, HEALTHY = "vanishing", "exploding", "healthy"


@dataclass
class Thresholds:
    vanish_ratio: float = 0.05  # layer RMS / output-layer RMS below this: vanishing
    explode_ratio: float = 10.0  # layer RMS / output-layer RMS above this: exploding
    vanish_abs: float = 1e-10  # layer RMS below this: vanishing, whatever the ratio
    explode_abs: float = 1e3  # layer RMS above this: exploding, whatever the ratio
    min_epochs_frac: float = 0.12  # share of epochs a layer must vanish (explode) in, over a run


@dataclass
class Verdict:
    network: str  # VANISHING, EXPLODING or HEALTHY
    layer_verdicts: list[str]
    first_layer: str | None  # the layer nearest the input with the network's verdict
    rms: np.ndarray  # [L] typical error-signal RMS per layer
    ratios: np.ndarray  # [L] rms / rms of the last layer
    decay_per_layer: float  # geometric mean of rms[l] / rms[l + 1]
    vanishing_frac: np.ndarray | None = None  # [L] share of epochs vanishing (run verdicts)
    exploding_frac: np.ndarray | None = None  # [L] share of epochs exploding (run verdicts)


def judge(layers: list[str], rms: np.ndarray, thresholds: Thresholds) -> Verdict:
    """Judge a depth profile `rms` ([L], input side first) against `thresholds`."""
    rms = np.asarray(rms, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = rms / rms[-1]
        decay = (rms[0] / rms[-1]) ** (1.0 / max(len(rms) - 1, 1))

    verdicts = []
    for value, ratio in zip(rms, ratios):
        too_big = value > thresholds.explode_abs or ratio > thresholds.explode_ratio
        if not np.isfinite(value) or too_big:
            verdicts.append(EXPLODING)
        elif value < thresholds.vanish_abs or ratio < thresholds.vanish_ratio:
            verdicts.append(VANISHING)
        else:
            verdicts.append(HEALTHY)

    network, first = _worst(layers, verdicts)
    return Verdict(network, verdicts, first, rms, ratios, float(decay))


def _worst(layers: list[str], verdicts: list[str]) -> tuple[str, str | None]:
    """Return the network's verdict and the layer nearest the input that has it."""
    for candidate in (EXPLODING, VANISHING):
        if candidate in verdicts:
            return candidate, layers[verdicts.index(candidate)]
    return HEALTHY, None


def judge_run(layers: list[str], epochs: list[Verdict], thresholds: Thresholds) -> Verdict:
    """Judge a whole run from its per-epoch verdicts (see the module docstring)."""
    if not epochs:
        nan = np.full(len(layers), np.nan)
        return Verdict(HEALTHY, [HEALTHY] * len(layers), None, nan, nan, float("nan"))
    per_epoch = np.array([verdict.layer_verdicts for verdict in epochs])  # [E, L]
    vanishing_frac = (per_epoch == VANISHING).mean(axis=0)
    exploding_frac = (per_epoch == EXPLODING).mean(axis=0)
    verdicts = []
    for vanishing, exploding in zip(vanishing_frac, exploding_frac):
        if exploding >= thresholds.min_epochs_frac:
            verdicts.append(EXPLODING)
        elif vanishing >= thresholds.min_epochs_frac:
            verdicts.append(VANISHING)
        else:
            verdicts.append(HEALTHY)
    network, first = _worst(layers, verdicts)

    # The typical profile over the run, for the table: geometric median per layer.
    with np.errstate(divide="ignore", invalid="ignore"):
        rms = np.exp(np.median(np.log(np.stack([v.rms for v in epochs])), axis=0))
        ratios = rms / rms[-1]
        decay = (rms[0] / rms[-1]) ** (1.0 / max(len(rms) - 1, 1))
    return Verdict(
        network, verdicts, first, rms, ratios, float(decay), vanishing_frac, exploding_frac
    )


def profile_columns(names: list[str], layers: list[str]) -> tuple[list[int], str]:
    """Pick the tensors the judgement reads: ``(column per layer, "bias" or "weight")``."""
    biases = [f"{layer}.bias" for layer in layers]
    if all(bias in names for bias in biases):
        return [names.index(bias) for bias in biases], "bias"
    return [names.index(layer) for layer in layers], "weight"


def epoch_profile(record, columns: list[int], source: str) -> np.ndarray:
    """Return each layer's typical error-signal RMS in an epoch: the median over iterations.

    `record` is the epoch's ``EpochRecord``; `columns` and `source` come from
    :func:`profile_columns`. The median ignores the odd spiky mini-batch.
    """
    values = record.stats["rms"] if source == "bias" else record.active_rms
    if len(values) == 0:
        return np.full(len(columns), np.nan)
    return np.median(values[:, columns], axis=0)


def format_table(layers: list[str], verdict: Verdict) -> str:
    """Format the verdict as an aligned text table, one row per layer."""
    width = max(len("layer"), *(len(layer) for layer in layers))
    header = f"{'layer':<{width}}  {'rms':>10}  {'rms/last':>10}"
    has_fractions = verdict.vanishing_frac is not None
    if has_fractions:
        header += f"  {'vanishing':>9}  {'exploding':>9}"
    lines = [header + "  verdict"]
    for i, layer in enumerate(layers):
        line = f"{layer:<{width}}  {verdict.rms[i]:>10.3e}  {verdict.ratios[i]:>10.3e}"
        if has_fractions:
            line += f"  {verdict.vanishing_frac[i]:>9.0%}  {verdict.exploding_frac[i]:>9.0%}"
        lines.append(f"{line}  {verdict.layer_verdicts[i]}")
    named = f" (first at {verdict.first_layer})" if verdict.first_layer else ""
    lines.append(
        f"network: {verdict.network}{named}, decay per layer {verdict.decay_per_layer:.3g}"
    )
    return "\n".join(lines)
