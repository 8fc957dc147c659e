"""Draw figures from recorded training data: activations, losses and gradient statistics.

Every function takes numpy arrays or plain Python values, never a live model, and
returns a `matplotlib.figure.Figure` that the caller saves with `save_figure` or logs.
Figures are built without pyplot, so no global figure state or backend is involved.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure, SubFigure
from matplotlib.ticker import FuncFormatter, MaxNLocator
from mpl_toolkits.mplot3d.art3d import Line3DCollection

# Okabe-Ito palette, whose colors stay distinguishable under the common forms of color blindness.
PALETTE = (
    "#0072B2",
    "#E69F00",
    "#009E73",
    "#D55E00",
    "#CC79A7",
    "#56B4E9",
    "#F0E442",
    "#000000",
)
EPOCH_CMAP = "viridis"
DEFAULT_AZIM = -130.0
DEFAULT_ELEV = 50.0
MAX_PANELS_PER_ROW = 4
SAVE_DPI = 120

Series = tuple[np.ndarray, np.ndarray]
WaterfallPanel = tuple[str, np.ndarray, np.ndarray, list[str], np.ndarray]


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Save `fig` as a PNG at 120 dpi with a tight bounding box and return the path.

    Creates missing parent directories. The figure stays open, so the caller may
    save or log it again.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=SAVE_DPI, bbox_inches="tight")
    return path


def plot_activations(curves: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]) -> Figure:
    """Plot activation functions and their derivatives in two side-by-side panels.

    `curves` maps an activation name to (x, y, dy): 1-D arrays of equal length
    with the inputs (typically on [-5, 5]), the activation values and the
    derivative values. Each panel has one line per activation.
    """
    fig = Figure(figsize=(10, 4), layout="constrained")
    value_ax, derivative_ax = fig.subplots(1, 2)

    for index, (name, (x, y, dy)) in enumerate(curves.items()):
        color = _color(index)
        value_ax.plot(np.asarray(x), np.asarray(y), color=color, label=name)
        derivative_ax.plot(np.asarray(x), np.asarray(dy), color=color, label=name)

    value_ax.set_title("activation")
    value_ax.set_ylabel("activation f(x)")
    derivative_ax.set_title("derivative")
    derivative_ax.set_ylabel("derivative f'(x)")
    for ax in (value_ax, derivative_ax):
        ax.set_xlabel("input x")
        ax.axhline(0.0, color="0.7", linewidth=0.8, zorder=0)
        ax.axvline(0.0, color="0.7", linewidth=0.8, zorder=0)
        ax.grid(True, alpha=0.3)
        if curves:
            ax.legend(title="activation")
    return fig


def plot_waterfall(
    edges: np.ndarray,
    counts: np.ndarray,
    layers: list[str],
    epochs: np.ndarray,
    title: str,
    azim: float = DEFAULT_AZIM,
    elev: float = DEFAULT_ELEV,
) -> Figure:
    """Draw per-layer gradient histograms over epochs as 3-D waterfalls.

    `edges` has shape [E, L, B+1] (bin edges for each epoch and layer, which may
    differ between epochs and layers), `counts` has shape [E, L, B] and `epochs`
    has shape [E] (1-based epoch numbers). Each of the L layers gets one 3-D panel
    titled with its layer name: x is the gradient value at the bin centres, y the
    epoch and z the count, with one curve per epoch colored by epoch. Panels sit
    in a row, or in a grid when L > 4. Raises ValueError on inconsistent shapes.
    """
    edges, counts, epochs = _validate_histograms(edges, counts, layers, epochs, title)
    rows = math.ceil(len(layers) / MAX_PANELS_PER_ROW)
    columns = math.ceil(len(layers) / rows)
    fig = Figure(figsize=(4.2 * columns + 1.0, 4.2 * rows + 0.6))
    _draw_waterfall_row(fig, edges, counts, layers, epochs, title, azim, elev, rows, columns)
    return fig


def plot_waterfalls_side_by_side(panels: list[WaterfallPanel]) -> Figure:
    """Draw several variants' gradient waterfalls, one row per variant, for comparison.

    Each item is (title, edges, counts, layers, epochs) with the shapes that
    `plot_waterfall` takes. Each row carries the variant title and one 3-D panel
    per layer, and all panels share the default view angles. Axes are not shared,
    because gradient scales often differ by orders of magnitude between variants.
    Raises ValueError when `panels` is empty or an item has inconsistent shapes.
    """
    if not panels:
        raise ValueError(
            "panels is empty: pass at least one (title, edges, counts, layers, epochs) item."
        )
    validated = []
    for title, edges, counts, layers, epochs in panels:
        edges, counts, epochs = _validate_histograms(edges, counts, layers, epochs, title)
        validated.append((title, edges, counts, layers, epochs))

    columns = max(len(layers) for _, _, _, layers, _ in validated)
    fig = Figure(figsize=(4.2 * columns + 1.0, 4.4 * len(validated)))
    rows = fig.subfigures(len(validated), 1, squeeze=False)[:, 0]
    for subfig, (title, edges, counts, layers, epochs) in zip(rows, validated):
        _draw_waterfall_row(
            subfig, edges, counts, layers, epochs, title, DEFAULT_AZIM, DEFAULT_ELEV, 1, columns
        )
    return fig


def plot_loss(
    series: dict[str, Series],
    title: str = "Training loss",
    logy: bool = False,
) -> Figure:
    """Plot loss against iteration with one overlaid line per variant.

    `series` maps a variant label (e.g. "activation=relu") to (steps, values),
    two 1-D arrays of equal length. With `logy`, the y axis is logarithmic and
    non-positive losses are left out of the line.
    """
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for index, (label, (steps, values)) in enumerate(series.items()):
        values = np.asarray(values, dtype=float)
        if logy:
            values = _mask_non_positive(values)
        ax.plot(np.asarray(steps), values, color=_color(index), label=label, linewidth=1.4)

    if logy:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.grid(True, alpha=0.3)
    if series:
        ax.legend()
    return fig


def plot_grad_means(
    series: Mapping[str, Mapping[str, Series]] | Mapping[str, Series],
    title: str = "Mean weight gradient",
) -> Figure:
    """Plot a gradient statistic against iteration, one panel per layer.

    `series` maps variant label -> layer name -> (steps, values). A single
    variant may also be passed directly as layer name -> (steps, values), in which
    case no legend is drawn. Layers appear in the order of their first appearance,
    variants are overlaid in each panel with the same color in every panel, and
    one legend is shared by the figure. Panels have independent y scales.
    """
    if series and all(isinstance(value, (tuple, list)) for value in series.values()):
        series = {"": series}
    layers = list(dict.fromkeys(layer for by_layer in series.values() for layer in by_layer))

    rows = max(1, math.ceil(len(layers) / MAX_PANELS_PER_ROW))
    columns = max(1, math.ceil(len(layers) / rows))
    fig = Figure(figsize=(3.8 * columns + 0.5, 3.2 * rows + 0.9), layout="constrained")
    fig.suptitle(title)
    if not layers:
        return fig

    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for ax in axes[len(layers) :]:
        ax.remove()

    for ax, layer in zip(axes, layers):
        for index, (label, by_layer) in enumerate(series.items()):
            if layer not in by_layer:
                continue
            steps, values = by_layer[layer]
            ax.plot(
                np.asarray(steps),
                np.asarray(values),
                color=_color(index),
                label=label,
                linewidth=1.2,
            )
        ax.set_title(layer)
        ax.set_xlabel("iteration")
        ax.set_ylabel("gradient")
        ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0), useMathText=True)
        ax.grid(True, alpha=0.3)

    labels = [label for label in series if label]
    if labels:
        handles = _legend_handles(axes[: len(layers)], labels)
        fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 4))
    return fig


def plot_grad_stat_vs_depth(
    values: dict[str, np.ndarray],
    layers: list[str],
    ylabel: str,
    title: str,
    logy: bool = True,
) -> Figure:
    """Plot a per-layer gradient statistic against depth, one line per label.

    `values` maps a line label (e.g. "relu, epoch 50") to an array of shape [L]
    in the order of `layers` (input side first). With `logy` (the default), the
    y axis is logarithmic and non-positive or non-finite values are left out.
    Raises ValueError when an array does not have one value per layer.
    """
    positions = np.arange(len(layers))
    fig = Figure(figsize=(max(6.0, 1.2 * len(layers) + 3.0), 4.5), layout="constrained")
    ax = fig.add_subplot()

    for index, (label, per_layer) in enumerate(values.items()):
        per_layer = _per_layer_values(per_layer, layers, f"values[{label!r}]", logy)
        ax.plot(positions, per_layer, color=_color(index), marker="o", label=label)

    if logy:
        ax.set_yscale("log")
    ax.set_xticks(positions, layers)
    ax.set_title(title)
    ax.set_xlabel("layer (input → output)")
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    if values:
        ax.legend()
    return fig


def plot_image_grid(
    images: np.ndarray,
    labels: Sequence[str],
    rows: int = 8,
    cols: int = 8,
    title: str | None = None,
) -> Figure:
    """Draw the first rows * cols images in a grid, each under its label, as one picture.

    `images` is [N, H, W] (grey) or [N, H, W, 3] (colour), with values in [0, 1]; values
    outside are clipped. Cells beyond N stay blank. All tiles go into one image on one
    Axes, which draws and saves several times faster than an Axes per image.
    Raises ValueError for another shape or a label count that differs from N.
    """
    images = np.clip(np.asarray(images, dtype=np.float32), 0.0, 1.0)
    if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[3] != 3):
        raise ValueError(f"images has shape {images.shape}, expected [N, H, W] or [N, H, W, 3]")
    if len(labels) != len(images):
        raise ValueError(f"got {len(labels)} labels for {len(images)} images, expected one each")
    count, height, width = images.shape[:3]
    gap_x, gap_y = max(width // 5, 1), max(height // 2, 1)  # white gutters; labels sit in gap_y
    cell_height, cell_width = height + gap_y, width + gap_x
    canvas = np.ones((rows * cell_height, cols * cell_width, *images.shape[3:]), np.float32)
    for index in range(min(count, rows * cols)):
        row, col = divmod(index, cols)
        top, left = row * cell_height + gap_y, col * cell_width + gap_x // 2
        canvas[top : top + height, left : left + width] = images[index]

    fig_width = cols * 0.9
    title_height = 0.4 if title else 0.0
    image_height = fig_width * canvas.shape[0] / canvas.shape[1]
    fig = Figure(figsize=(fig_width, image_height + title_height))
    ax = fig.add_axes((0.0, 0.0, 1.0, image_height / (image_height + title_height)))
    ax.set_axis_off()
    ax.imshow(canvas, cmap="gray", vmin=0.0, vmax=1.0, aspect="auto")
    for index, label in enumerate(labels[: rows * cols]):
        row, col = divmod(index, cols)
        ax.text(col * cell_width + cell_width / 2, row * cell_height + gap_y * 0.55, str(label),
                ha="center", va="center", fontsize=9)  # fmt: skip
    if title:
        fig.suptitle(title, y=1.0 - 0.1 / (image_height + title_height), va="top")
    return fig


def render_epoch_histograms(
    edges: np.ndarray,
    counts: np.ndarray,
    layers: list[str],
    epochs: np.ndarray,
    title: str,
    dpi: int = 72,
    symlog_threshold: float | None = None,
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(epoch, RGB image [H, W, 3] uint8)``: each epoch's histograms, a panel per layer.

    One figure is drawn once and its step lines updated per epoch, which is several
    times faster than a new figure per epoch. Each panel's x range is the widest
    over all epochs, so playing the images in order shows a distribution narrow.
    With `symlog_threshold` (for log-spaced edges), the x axis is symmetric-log,
    linear within that magnitude.
    """
    edges, counts, epochs = _validate_histograms(edges, counts, layers, epochs, title)
    columns = min(len(layers), MAX_PANELS_PER_ROW)
    rows = math.ceil(len(layers) / columns)
    fig = Figure(figsize=(3.2 * columns, 2.6 * rows + 0.4), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for ax in axes[len(layers) :]:
        ax.set_visible(False)

    steps = []
    for index, (ax, layer) in enumerate(zip(axes, layers)):
        finite = np.isfinite(edges[:, index])
        low = float(edges[:, index][finite].min()) if finite.any() else -1.0
        high = float(edges[:, index][finite].max()) if finite.any() else 1.0
        ax.set_xlim(*_nonsingular_limits(low, high))
        ax.set_ylim(0, max(float(counts[:, index].max()), 1.0) * 1.05)
        ax.set_title(layer)
        ax.set_xlabel("gradient value")
        if symlog_threshold is None:
            ax.ticklabel_format(axis="x", style="sci", scilimits=(-2, 3))
        else:
            ax.set_xscale("symlog", linthresh=symlog_threshold)
        steps.append(ax.stairs(np.zeros(counts.shape[2]), np.arange(counts.shape[2] + 1.0),
                               color=_color(0), fill=True, animated=True))  # fmt: skip
    axes[0].set_ylabel("count")
    suptitle = fig.suptitle(f"{title}: weight gradients, epoch {int(epochs[-1])}", animated=True)
    # Draw axes, ticks and labels once; each frame redraws only the animated
    # artists on a copy of that background (blitting), about 20 times faster.
    fig.canvas.draw()
    fig.set_layout_engine("none")
    background = fig.canvas.copy_from_bbox(fig.bbox)

    for e, epoch in enumerate(epochs):
        if not (np.isfinite(edges[e]).all() and np.isfinite(counts[e]).all()):
            continue  # a diverged epoch has nothing to draw
        fig.canvas.restore_region(background)
        for index, step in enumerate(steps):
            step.set_data(counts[e, index], edges[e, index])
            step.axes.draw_artist(step)
        suptitle.set_text(f"{title}: weight gradients, epoch {int(epoch)}")
        fig.draw_artist(suptitle)
        yield int(epoch), np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def _per_layer_values(values, layers: list[str], name: str, logy: bool) -> np.ndarray:
    """Return `values` as floats, one per layer, masked for a log axis; raise ValueError if not."""
    values = np.asarray(values, dtype=float)
    if values.shape != (len(layers),):
        raise ValueError(
            f"{name} has shape {values.shape}, expected ({len(layers)},), one value per layer"
        )
    return _mask_non_positive(values) if logy else values


def _color(index: int) -> str:
    return PALETTE[index % len(PALETTE)]


def _mask_non_positive(values: np.ndarray) -> np.ndarray:
    """Replace non-positive and non-finite values with NaN so a log axis skips them."""
    values = np.array(values, dtype=float)
    values[~(np.isfinite(values) & (values > 0))] = np.nan
    return values


def _legend_handles(axes: Sequence[Axes], labels: list[str]) -> list:
    """Find one line per label across `axes`, so a variant absent from a layer keeps a handle."""
    handles = []
    for label in labels:
        for ax in axes:
            match = [line for line in ax.lines if line.get_label() == label]
            if match:
                handles.append(match[0])
                break
    return handles


def _validate_histograms(
    edges: np.ndarray,
    counts: np.ndarray,
    layers: list[str],
    epochs: np.ndarray,
    title: str,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Convert histogram inputs to float arrays and raise ValueError on inconsistent shapes."""
    edges = np.asarray(edges, dtype=float)
    counts = np.asarray(counts, dtype=float)
    epochs = np.asarray(epochs)
    if edges.ndim != 3 or edges.shape[2] < 2:
        raise ValueError(
            f"{title}: edges has shape {edges.shape}, expected [epochs, layers, bins + 1]"
        )
    expected_counts = (edges.shape[0], edges.shape[1], edges.shape[2] - 1)
    if counts.shape != expected_counts:
        raise ValueError(
            f"{title}: counts has shape {counts.shape}, expected {expected_counts} to match edges"
        )
    if len(layers) != edges.shape[1]:
        raise ValueError(
            f"{title}: got {len(layers)} layer names for {edges.shape[1]} layers in edges"
        )
    if epochs.shape != (edges.shape[0],):
        raise ValueError(f"{title}: epochs has shape {epochs.shape}, expected ({edges.shape[0]},)")
    if edges.shape[0] == 0 or edges.shape[1] == 0:
        raise ValueError(
            f"{title}: edges has shape {edges.shape}, expected at least one epoch and one layer"
        )
    return edges, counts, epochs


def _draw_waterfall_row(
    container: Figure | SubFigure,
    edges: np.ndarray,
    counts: np.ndarray,
    layers: list[str],
    epochs: np.ndarray,
    title: str,
    azim: float,
    elev: float,
    rows: int,
    columns: int,
) -> None:
    """Add a 3-D waterfall panel per layer to `container`, a title and an epoch colorbar."""
    norm = _epoch_norm(epochs)
    axes = []
    for layer_index, layer in enumerate(layers):
        ax = container.add_subplot(rows, columns, layer_index + 1, projection="3d")
        _draw_waterfall_panel(ax, edges[:, layer_index], counts[:, layer_index], epochs, norm)
        ax.set_title(layer, pad=0)
        ax.view_init(elev=elev, azim=azim)
        axes.append(ax)

    container.suptitle(title, fontsize="x-large")
    container.subplots_adjust(left=0.02, right=0.9, bottom=0.04, top=0.88, wspace=0.15, hspace=0.15)
    colorbar_ax = container.add_axes((0.92, 0.2, 0.012, 0.55))
    colorbar = container.colorbar(ScalarMappable(norm=norm, cmap=EPOCH_CMAP), cax=colorbar_ax)
    colorbar.set_label("epoch")
    colorbar.set_ticks(_epoch_ticks(epochs))


def _epoch_norm(epochs: np.ndarray) -> Normalize:
    """Map epoch numbers to [0, 1] for the colormap, widening a single epoch to a unit range."""
    low = float(np.min(epochs))
    high = float(np.max(epochs))
    if low == high:
        low -= 0.5
        high += 0.5
    return Normalize(vmin=low, vmax=high)


def _epoch_ticks(epochs: np.ndarray, max_ticks: int = 6) -> np.ndarray:
    """Choose integer epoch ticks: every epoch when there are few, else evenly spaced ones."""
    epochs = np.unique(epochs)
    if epochs.size <= max_ticks:
        return epochs
    ticks = MaxNLocator(nbins=max_ticks - 1, integer=True).tick_values(epochs[0], epochs[-1])
    # The locator may add ticks outside the data, and set_ticks would widen the view to them.
    return ticks[(ticks >= epochs[0]) & (ticks <= epochs[-1])]


def _draw_waterfall_panel(
    ax: Axes,
    edges: np.ndarray,
    counts: np.ndarray,
    epochs: np.ndarray,
    norm: Normalize,
) -> None:
    """Draw one layer's histograms on a 3-D Axes, one curve per epoch.

    `edges` has shape [E, B+1] and `counts` shape [E, B]. An epoch whose edges
    are all equal (every gradient had the same value) is drawn as a vertical
    stem at that value, with the total count as its height.
    """
    cmap = ScalarMappable(norm=norm, cmap=EPOCH_CMAP)
    x_values = []
    curves = []  # one [points, 3] array of (x, epoch, count) per epoch
    z_max = 0.0
    for epoch, epoch_edges, epoch_counts in zip(epochs, edges, counts):
        if epoch_edges[0] == epoch_edges[-1]:
            x = np.full(2, epoch_edges[0])
            z = np.array([0.0, float(np.sum(epoch_counts))])
        else:
            x = 0.5 * (epoch_edges[:-1] + epoch_edges[1:])
            z = epoch_counts
        curves.append(np.column_stack([x, np.full_like(x, float(epoch)), z]))
        x_values.append(x[np.isfinite(x)])
        if np.any(np.isfinite(z)):
            z_max = max(z_max, float(np.nanmax(z)))
    # One collection for all epochs draws several times faster than a line per epoch.
    colors = cmap.to_rgba(np.asarray(epochs, dtype=float))
    ax.add_collection3d(Line3DCollection(curves, colors=colors, linewidths=1.0))

    x_all = np.concatenate(x_values)
    if x_all.size:
        ax.set_xlim(*_nonsingular_limits(float(x_all.min()), float(x_all.max())))
        # Panels do not share x limits, so the spread is also stated in numbers.
        finite_edges = edges[np.isfinite(edges)]
        ax.text2D(
            0.0,
            0.94,
            f"max |bin edge| = {_format_scientific(float(np.max(np.abs(finite_edges))))}",
            transform=ax.transAxes,
            verticalalignment="top",
            fontsize="small",
            color="0.25",
        )
    ax.set_ylim(norm.vmin, norm.vmax)
    ax.set_yticks(_epoch_ticks(epochs))
    ax.set_zlim(0.0, z_max * 1.05 if z_max > 0 else 1.0)

    # Each tick carries its own power of ten, because an offset text is easy to overlook
    # in 3-D and gradients of 1e-6 and 1e-3 would otherwise get the same tick labels.
    ax.xaxis.set_major_formatter(FuncFormatter(_format_scientific))
    ax.xaxis.set_major_locator(MaxNLocator(nbins=4))
    ax.zaxis.set_major_locator(MaxNLocator(nbins=4, integer=True))
    ax.set_xlabel("gradient value", labelpad=10)
    ax.set_ylabel("epoch", labelpad=6)
    ax.set_zlabel("count", labelpad=6)
    ax.tick_params(labelsize="small")


def _format_scientific(value: float, _position: int | None = None) -> str:
    """Format a tick value as mathtext, with a power of ten outside [1e-2, 1e4)."""
    if value == 0:
        return "0"
    exponent = math.floor(math.log10(abs(value)))
    if -2 <= exponent < 4:
        return f"{value:g}"
    mantissa = value / 10**exponent
    if math.isclose(abs(mantissa), 1.0):
        return rf"$-10^{{{exponent}}}$" if mantissa < 0 else rf"$10^{{{exponent}}}$"
    return rf"${mantissa:.3g}{{\times}}10^{{{exponent}}}$"


def _nonsingular_limits(low: float, high: float) -> tuple[float, float]:
    """Return (low, high), widened by 5% of the value, or by 0.5 at zero, when low == high."""
    if low < high:
        return low, high
    pad = 0.05 * abs(low) if low != 0 else 0.5
    return low - pad, high + pad


# Line styles from the earliest to the latest epoch drawn, so the latest is the boldest.
EPOCH_LINESTYLES = (":", "--", "-.", "-")
EPOCH_MARKERS = ("s", "^", "D", "o")


def plot_grad_stat_vs_depth_by_variant(
    values: Mapping[str, Mapping[int, np.ndarray]],
    layers: list[str],
    ylabel: str,
    title: str,
    logy: bool = True,
) -> Figure:
    """Plot a per-layer gradient statistic against depth for several variants and epochs.

    `values` maps a variant label -> 1-based epoch -> array of shape [L] in the
    order of `layers` (input side first), with NaN for a layer the variant lacks.
    Each variant keeps one color, and each epoch, ranked over all variants, its
    own line style and marker, with the latest epoch solid. Lines are labelled
    "<variant>, epoch <n>". With `logy` (the default), non-positive and non-finite
    values are left out. Raises ValueError when an array has not one value per layer.
    """
    epochs = sorted({epoch for by_epoch in values.values() for epoch in by_epoch})
    styles = _epoch_styles(epochs)
    positions = np.arange(len(layers))
    fig = Figure(figsize=(max(6.5, 1.2 * len(layers) + 3.5), 4.8), layout="constrained")
    ax = fig.add_subplot()

    for index, (label, by_epoch) in enumerate(values.items()):
        for epoch, per_layer in sorted(by_epoch.items()):
            per_layer = _per_layer_values(per_layer, layers, f"values[{label!r}][{epoch}]", logy)
            style = styles[epoch]
            ax.plot(
                positions,
                per_layer,
                color=_color(index),
                linestyle=EPOCH_LINESTYLES[style],
                marker=EPOCH_MARKERS[style],
                markersize=5,
                label=f"{label}, epoch {epoch}",
            )

    if logy:
        ax.set_yscale("log")
    ax.set_xticks(positions, layers)
    ax.set_title(title)
    ax.set_xlabel("layer (input → output)")
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    if values:
        fig.legend(loc="outside right upper", fontsize="small")
    return fig


def _epoch_styles(epochs: list[int]) -> dict[int, int]:
    """Map sorted epochs to indices into EPOCH_LINESTYLES, the last epoch to the solid style.

    Up to four epochs take the last styles in order; more epochs share them evenly.
    """
    count = len(EPOCH_LINESTYLES)
    if len(epochs) <= count:
        return {epoch: count - len(epochs) + rank for rank, epoch in enumerate(epochs)}
    return {epoch: rank * (count - 1) // (len(epochs) - 1) for rank, epoch in enumerate(epochs)}
