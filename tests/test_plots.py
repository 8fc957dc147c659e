"""Tests for src.plots: figure structure, edge cases and PNG output, all on synthetic data."""

from pathlib import Path

import numpy as np
import pytest
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from mpl_toolkits.mplot3d.art3d import Line3DCollection
from mpl_toolkits.mplot3d.axes3d import Axes3D

from src.plots import (
    plot_activations,
    plot_grad_means,
    plot_grad_stat_vs_depth,
    plot_image_grid,
    plot_loss,
    plot_waterfall,
    plot_waterfalls_side_by_side,
    save_figure,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
LAYERS = ["fc1", "fc2", "fc3", "fc4"]
EPOCHS = 3
BINS = 30


def make_histograms(
    stds: list[float], epochs: int = EPOCHS, bins: int = BINS, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Build (edges [E, L, B+1], counts [E, L, B], epochs [E]) from normal draws per layer."""
    rng = np.random.default_rng(seed)
    edges = np.zeros((epochs, len(stds), bins + 1))
    counts = np.zeros((epochs, len(stds), bins))
    for epoch in range(epochs):
        for layer, std in enumerate(stds):
            counts[epoch, layer], edges[epoch, layer] = np.histogram(
                rng.normal(0.0, std, 500), bins=bins
            )
    return edges, counts, np.arange(1, epochs + 1)


def axes_3d(fig: Figure) -> list[Axes3D]:
    return [ax for ax in fig.axes if isinstance(ax, Axes3D)]


def waterfall_curves(ax: Axes3D) -> list[np.ndarray]:
    """Return the (x, epoch, count) points of each curve that a waterfall panel draws."""
    (collection,) = [c for c in ax.collections if isinstance(c, Line3DCollection)]
    return [np.asarray(curve) for curve in collection._segments3d]


def axes_2d(fig: Figure) -> list[Axes]:
    return [ax for ax in fig.axes if not isinstance(ax, Axes3D)]


def data_labels(ax: Axes) -> list[str]:
    """Return the labels of lines drawn from data, leaving out reference lines such as axhline."""
    return [line.get_label() for line in ax.lines if not line.get_label().startswith("_")]


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert len(data) > len(PNG_SIGNATURE)
    assert data[: len(PNG_SIGNATURE)] == PNG_SIGNATURE


@pytest.fixture
def sigmoid_histograms() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return make_histograms([1e-6, 1e-5, 1e-4, 1e-3])


@pytest.fixture
def relu_histograms() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return make_histograms([1e-3] * 4, seed=1)


def test_save_figure_writes_png(tmp_path: Path) -> None:
    fig = Figure()
    fig.add_subplot().plot([0, 1], [0, 1])

    path = save_figure(fig, tmp_path / "nested" / "line.png")

    assert path == tmp_path / "nested" / "line.png"
    assert_png(path)


def test_save_figure_accepts_string_path(tmp_path: Path) -> None:
    fig = Figure()
    fig.add_subplot()

    path = save_figure(fig, str(tmp_path / "empty.png"))

    assert isinstance(path, Path)
    assert_png(path)


def test_activations_two_panels_one_line_each(tmp_path: Path) -> None:
    x = np.linspace(-5, 5, 101)
    sigmoid = 1 / (1 + np.exp(-x))
    curves = {
        "relu": (x, np.maximum(x, 0), (x > 0).astype(float)),
        "sigmoid": (x, sigmoid, sigmoid * (1 - sigmoid)),
    }

    fig = plot_activations(curves)

    assert isinstance(fig, Figure)
    value_ax, derivative_ax = fig.axes
    assert value_ax.get_title() == "activation"
    assert derivative_ax.get_title() == "derivative"
    assert data_labels(value_ax) == ["relu", "sigmoid"]
    assert data_labels(derivative_ax) == ["relu", "sigmoid"]
    assert value_ax.get_legend() is not None
    assert value_ax.get_xlabel() != ""
    assert_png(save_figure(fig, tmp_path / "activations.png"))


def test_waterfall_one_3d_panel_per_layer(sigmoid_histograms, tmp_path: Path) -> None:
    edges, counts, epochs = sigmoid_histograms

    fig = plot_waterfall(edges, counts, LAYERS, epochs, "sigmoid")

    panels = axes_3d(fig)
    assert isinstance(fig, Figure)
    assert len(panels) == len(LAYERS)
    assert [ax.get_title() for ax in panels] == LAYERS
    assert fig.get_suptitle() == "sigmoid"
    assert_png(save_figure(fig, tmp_path / "waterfall.png"))


def test_waterfall_one_curve_per_epoch(sigmoid_histograms) -> None:
    edges, counts, epochs = sigmoid_histograms

    fig = plot_waterfall(edges, counts, LAYERS, epochs, "sigmoid")

    for ax in axes_3d(fig):
        assert len(waterfall_curves(ax)) == EPOCHS


def test_waterfall_axis_labels_and_colorbar(sigmoid_histograms) -> None:
    edges, counts, epochs = sigmoid_histograms

    fig = plot_waterfall(edges, counts, LAYERS, epochs, "sigmoid")

    ax = axes_3d(fig)[0]
    assert ax.get_xlabel() == "gradient value"
    assert ax.get_ylabel() == "epoch"
    assert ax.get_zlabel() == "count"
    colorbar_axes = axes_2d(fig)
    assert len(colorbar_axes) == 1
    assert colorbar_axes[0].get_ylabel() == "epoch"


def test_waterfall_view_angles_applied(sigmoid_histograms) -> None:
    edges, counts, epochs = sigmoid_histograms

    fig = plot_waterfall(edges, counts, LAYERS, epochs, "sigmoid", azim=-60, elev=20)

    for ax in axes_3d(fig):
        assert ax.azim == -60
        assert ax.elev == 20


def test_waterfall_x_limits_per_layer(sigmoid_histograms) -> None:
    edges, counts, epochs = sigmoid_histograms

    fig = plot_waterfall(edges, counts, LAYERS, epochs, "sigmoid")

    widths = [np.ptp(ax.get_xlim()) for ax in axes_3d(fig)]
    assert widths[0] < 1e-4
    assert widths[-1] > 1e-3


def test_waterfall_tiny_gradients_tick_labels(sigmoid_histograms, tmp_path: Path) -> None:
    edges, counts, epochs = sigmoid_histograms
    fig = plot_waterfall(edges, counts, LAYERS, epochs, "sigmoid")

    save_figure(fig, tmp_path / "ticks.png")

    labels = [label.get_text() for label in axes_3d(fig)[0].get_xticklabels()]
    assert any("10^{-6}" in label for label in labels)


def test_waterfall_grid_for_many_layers() -> None:
    layers = [f"fc{index}" for index in range(1, 7)]
    edges, counts, epochs = make_histograms([1e-3] * len(layers))

    fig = plot_waterfall(edges, counts, layers, epochs, "relu")

    panels = axes_3d(fig)
    assert len(panels) == len(layers)
    assert panels[0].get_subplotspec().get_geometry()[:2] == (2, 3)


@pytest.mark.filterwarnings("error")
def test_waterfall_degenerate_edges(tmp_path: Path) -> None:
    edges, counts, epochs = make_histograms([1e-3, 1e-3])
    edges[:, 0, :] = 0.0
    edges[1, 1, :] = 2e-6

    fig = plot_waterfall(edges, counts, ["fc1", "fc2"], epochs, "dead layer")

    panels = axes_3d(fig)
    curves = waterfall_curves(panels[0])
    assert len(curves) == EPOCHS
    assert all(len(curve) == 2 for curve in curves)  # a stem per epoch of equal edges
    low, high = panels[0].get_xlim()
    assert low < 0.0 < high
    assert_png(save_figure(fig, tmp_path / "degenerate.png"))


@pytest.mark.filterwarnings("error")
def test_waterfall_all_zero_counts(tmp_path: Path) -> None:
    edges, counts, epochs = make_histograms([1e-3, 1e-3])
    counts[:] = 0.0

    fig = plot_waterfall(edges, counts, ["fc1", "fc2"], epochs, "empty")

    assert axes_3d(fig)[0].get_zlim() == (0.0, 1.0)
    assert_png(save_figure(fig, tmp_path / "zero_counts.png"))


@pytest.mark.filterwarnings("error")
def test_waterfall_single_epoch(tmp_path: Path) -> None:
    edges, counts, epochs = make_histograms([1e-3] * 4, epochs=1)

    fig = plot_waterfall(edges, counts, LAYERS, epochs, "relu")

    panel = axes_3d(fig)[0]
    assert len(waterfall_curves(panel)) == 1
    assert list(panel.get_yticks()) == [1]
    assert_png(save_figure(fig, tmp_path / "single_epoch.png"))


def test_waterfall_rejects_mismatched_shapes(sigmoid_histograms) -> None:
    edges, counts, epochs = sigmoid_histograms

    with pytest.raises(ValueError, match="counts has shape"):
        plot_waterfall(edges, counts[:, :, :-1], LAYERS, epochs, "sigmoid")
    with pytest.raises(ValueError, match="layer names"):
        plot_waterfall(edges, counts, LAYERS[:-1], epochs, "sigmoid")
    with pytest.raises(ValueError, match="epochs has shape"):
        plot_waterfall(edges, counts, LAYERS, epochs[:-1], "sigmoid")


def test_side_by_side_row_per_variant(relu_histograms, sigmoid_histograms, tmp_path: Path) -> None:
    panels = [
        ("relu", *relu_histograms[:2], LAYERS, relu_histograms[2]),
        ("sigmoid", *sigmoid_histograms[:2], LAYERS, sigmoid_histograms[2]),
    ]

    fig = plot_waterfalls_side_by_side(panels)

    assert isinstance(fig, Figure)
    assert len(axes_3d(fig)) == 2 * len(LAYERS)
    assert [subfig.get_suptitle() for subfig in fig.subfigs] == ["relu", "sigmoid"]
    for subfig in fig.subfigs:
        assert [ax.get_title() for ax in axes_3d(subfig)] == LAYERS
    assert_png(save_figure(fig, tmp_path / "side_by_side.png"))


def test_side_by_side_same_view_angles(relu_histograms, sigmoid_histograms) -> None:
    panels = [
        ("relu", *relu_histograms[:2], LAYERS, relu_histograms[2]),
        ("sigmoid", *sigmoid_histograms[:2], LAYERS, sigmoid_histograms[2]),
    ]

    fig = plot_waterfalls_side_by_side(panels)

    assert len({(ax.azim, ax.elev) for ax in axes_3d(fig)}) == 1


def test_side_by_side_first_layer_spread_differs(relu_histograms, sigmoid_histograms) -> None:
    panels = [
        ("relu", *relu_histograms[:2], LAYERS, relu_histograms[2]),
        ("sigmoid", *sigmoid_histograms[:2], LAYERS, sigmoid_histograms[2]),
    ]

    fig = plot_waterfalls_side_by_side(panels)

    relu_first = axes_3d(fig.subfigs[0])[0]
    sigmoid_first = axes_3d(fig.subfigs[1])[0]
    assert np.ptp(sigmoid_first.get_xlim()) < 1e-2 * np.ptp(relu_first.get_xlim())


def test_side_by_side_rejects_empty_list() -> None:
    with pytest.raises(ValueError, match="panels is empty"):
        plot_waterfalls_side_by_side([])


def test_loss_one_line_per_variant(tmp_path: Path) -> None:
    steps = np.arange(100)
    series = {
        "activation=relu": (steps, np.exp(-steps / 20) + 0.1),
        "activation=sigmoid": (steps, np.exp(-steps / 80) + 0.3),
    }

    fig = plot_loss(series)

    (ax,) = fig.axes
    assert [line.get_label() for line in ax.lines] == list(series)
    assert ax.get_title() == "Training loss"
    assert ax.get_xlabel() == "iteration"
    assert ax.get_ylabel() == "loss"
    assert ax.get_yscale() == "linear"
    assert ax.get_legend() is not None
    assert_png(save_figure(fig, tmp_path / "loss.png"))


@pytest.mark.filterwarnings("error")
def test_loss_log_scale_skips_non_positive(tmp_path: Path) -> None:
    steps = np.arange(5)
    series = {"activation=relu": (steps, np.array([1.0, 0.5, 0.0, -0.1, 0.2]))}

    fig = plot_loss(series, title="Loss", logy=True)

    (ax,) = fig.axes
    assert ax.get_yscale() == "log"
    assert np.isnan(ax.lines[0].get_ydata()[2])
    assert np.isnan(ax.lines[0].get_ydata()[3])
    assert_png(save_figure(fig, tmp_path / "loss_log.png"))


def test_grad_means_panel_per_layer_in_order(tmp_path: Path) -> None:
    steps = np.arange(50)
    series = {
        "activation=relu": {layer: (steps, np.full(50, 1e-3)) for layer in LAYERS[:3]},
        "activation=sigmoid": {layer: (steps, np.full(50, 1e-6)) for layer in LAYERS[1:]},
    }

    fig = plot_grad_means(series)

    panels = [ax for ax in fig.axes if ax.get_title()]
    assert len(fig.axes) == len(LAYERS)
    assert [ax.get_title() for ax in panels] == LAYERS
    assert fig.get_suptitle() == "Mean weight gradient"
    assert [len(ax.lines) for ax in panels] == [1, 2, 2, 1]
    assert_png(save_figure(fig, tmp_path / "grad_means.png"))


def test_grad_means_consistent_variant_colors() -> None:
    steps = np.arange(10)
    series = {
        "activation=relu": {layer: (steps, np.full(10, 1e-3)) for layer in LAYERS},
        "activation=sigmoid": {layer: (steps, np.full(10, 1e-6)) for layer in LAYERS},
    }

    fig = plot_grad_means(series)

    for label in series:
        colors = {
            line.get_color() for ax in fig.axes for line in ax.lines if line.get_label() == label
        }
        assert len(colors) == 1


def test_grad_means_shared_legend() -> None:
    steps = np.arange(10)
    series = {
        "activation=relu": {"fc1": (steps, np.full(10, 1e-3))},
        "activation=sigmoid": {
            "fc1": (steps, np.full(10, 1e-6)),
            "fc2": (steps, np.full(10, 1e-5)),
        },
    }

    fig = plot_grad_means(series)

    assert len(fig.legends) == 1
    assert [text.get_text() for text in fig.legends[0].get_texts()] == list(series)


def test_grad_means_scientific_y_offset(tmp_path: Path) -> None:
    steps = np.arange(10)
    series = {"activation=sigmoid": {"fc1": (steps, np.linspace(1e-6, 5e-6, 10))}}
    fig = plot_grad_means(series)

    save_figure(fig, tmp_path / "offset.png")

    offset_text = fig.axes[0].yaxis.get_offset_text().get_text().replace("\u2212", "-")
    assert "10^{-6}" in offset_text


def test_grad_means_single_variant_mapping() -> None:
    steps = np.arange(10)
    series = {layer: (steps, np.full(10, 1e-3)) for layer in LAYERS[:2]}

    fig = plot_grad_means(series, title="Mean gradient")

    assert [ax.get_title() for ax in fig.axes] == LAYERS[:2]
    assert fig.get_suptitle() == "Mean gradient"
    assert len(fig.legends) == 0


def test_stat_vs_depth_layer_ticks_and_log(tmp_path: Path) -> None:
    values = {
        "relu, epoch 3": np.array([1e-3, 1e-3, 1e-3, 1e-3]),
        "sigmoid, epoch 3": np.array([1e-6, 1e-5, 1e-4, 1e-3]),
    }

    fig = plot_grad_stat_vs_depth(values, LAYERS, "mean |gradient|", "Gradient vs depth")

    (ax,) = fig.axes
    assert [label.get_text() for label in ax.get_xticklabels()] == LAYERS
    assert ax.get_yscale() == "log"
    assert ax.get_ylabel() == "mean |gradient|"
    assert ax.get_title() == "Gradient vs depth"
    assert [line.get_label() for line in ax.lines] == list(values)
    assert_png(save_figure(fig, tmp_path / "depth.png"))


@pytest.mark.filterwarnings("error")
def test_stat_vs_depth_non_positive_on_log(tmp_path: Path) -> None:
    values = {
        "partly zero": np.array([0.0, -1e-5, 1e-4, 1e-3]),
        "all zero": np.zeros(4),
    }

    fig = plot_grad_stat_vs_depth(values, LAYERS, "std", "Gradient std")

    (ax,) = fig.axes
    ydata = ax.lines[0].get_ydata()
    assert np.isnan(ydata[0])
    assert np.isnan(ydata[1])
    assert ydata[2] == 1e-4
    assert_png(save_figure(fig, tmp_path / "depth_non_positive.png"))


def test_stat_vs_depth_linear_keeps_values() -> None:
    values = {"signed": np.array([-1.0, 0.0, 1.0, 2.0])}

    fig = plot_grad_stat_vs_depth(values, LAYERS, "mean", "Mean", logy=False)

    (ax,) = fig.axes
    assert ax.get_yscale() == "linear"
    assert list(ax.lines[0].get_ydata()) == [-1.0, 0.0, 1.0, 2.0]


def test_stat_vs_depth_rejects_wrong_length() -> None:
    with pytest.raises(ValueError, match="one value per layer"):
        plot_grad_stat_vs_depth({"short": np.ones(3)}, LAYERS, "std", "Gradient std")


def test_image_grid_one_picture_with_labels(tmp_path: Path) -> None:
    images = np.random.default_rng(0).random((5, 28, 28))

    fig = plot_image_grid(images, ["1", "2", "3", "4", "5"], rows=2, cols=3, title="Samples")

    (ax,) = fig.axes
    (picture,) = ax.get_images()
    assert picture.get_array().shape == (2 * (28 + 14), 3 * (28 + 5))
    assert [text.get_text() for text in ax.texts] == ["1", "2", "3", "4", "5"]
    assert fig.get_suptitle() == "Samples"
    assert_png(save_figure(fig, tmp_path / "grid.png"))


def test_image_grid_places_images_in_cells() -> None:
    images = np.zeros((2, 4, 4))
    images[1] = 0.5

    fig = plot_image_grid(images, [0, 1], rows=1, cols=3)

    canvas = fig.axes[0].get_images()[0].get_array()
    # 4x4 tiles under a 2-pixel label band, 1-pixel gutters: columns 0, 5 and 10 start gutters.
    assert np.all(canvas[2:6, 0:4] == 0.0)
    assert np.all(canvas[2:6, 5:9] == 0.5)
    assert np.all(canvas[:, 10:] == 1.0)  # the blank third cell


def test_image_grid_colour_and_clipping() -> None:
    images = np.full((1, 8, 8, 3), 2.0)

    fig = plot_image_grid(images, ["x"], rows=1, cols=1)

    canvas = fig.axes[0].get_images()[0].get_array()
    assert canvas.shape == (12, 9, 3)
    assert canvas.max() == 1.0


def test_image_grid_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="expected \\[N, H, W\\]"):
        plot_image_grid(np.zeros((2, 1, 8, 8)), ["a", "b"])
    with pytest.raises(ValueError, match="got 1 labels for 2 images"):
        plot_image_grid(np.zeros((2, 8, 8)), ["a"])
