import numpy as np
import pytest
import torch
import torch.nn.functional as F

from src.gradients import GradientMonitor, histogram
from src.models import MLP, create_activation, weight_layers


@pytest.mark.parametrize("bins", [1, 7, 30])
def test_histogram_matches_numpy(bins):
    values = torch.randn(5000, generator=torch.Generator().manual_seed(bins)) * 1e-4
    edges, counts = histogram(values, bins)
    expected, _ = np.histogram(values.numpy(), bins=edges.numpy())
    assert edges.shape == (bins + 1,)
    assert edges[0] == values.min()
    assert edges[-1] == values.max()
    np.testing.assert_array_equal(counts.numpy(), expected)
    assert counts.sum() == values.numel()


def test_histogram_on_edges_matches_numpy():
    # Values that sit exactly on bin edges, the max included.
    values = torch.tensor([0.0, 0.25, 0.5, 0.5, 0.75, 1.0, 1.0])
    edges, counts = histogram(values, 4)
    expected, _ = np.histogram(values.numpy(), bins=edges.numpy())
    np.testing.assert_array_equal(counts.numpy(), expected)
    assert counts.tolist() == [1, 1, 2, 3]


def test_histogram_constant_values_widened():
    values = torch.zeros(10)
    edges, counts = histogram(values, 30)
    expected_counts, expected_edges = np.histogram(values.numpy(), bins=30)
    np.testing.assert_allclose(edges.numpy(), expected_edges, atol=1e-6)
    np.testing.assert_array_equal(counts.numpy(), expected_counts)


def _tiny_model():
    torch.manual_seed(0)
    return MLP((1, 6, 6), 10, [8, 8], lambda: create_activation("sigmoid"))


def test_monitor_means_match_grad_mean():
    model = _tiny_model()
    layers = weight_layers(model)
    monitor = GradientMonitor(layers, iters_per_epoch=3, hist_bins=5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    inputs, targets = torch.rand(3, 4, 1, 6, 6), torch.randint(0, 10, (3, 4))

    expected_means, expected_losses = [], []
    for i in range(3):
        loss = F.cross_entropy(model(inputs[i]), targets[i])
        optimizer.zero_grad()
        loss.backward()
        monitor.record(loss, global_step=i + 1, epoch=1, last_in_epoch=i == 2)
        expected_means.append({name: w.grad.mean().item() for name, w in layers})
        expected_losses.append(loss.item())
        optimizer.step()

    metrics = monitor.drain()
    losses = [m for m in metrics if m.key == "train/loss"]
    assert [m.step for m in losses] == [1, 2, 3]
    np.testing.assert_allclose([m.value for m in losses], expected_losses, rtol=1e-6)
    for name, _ in layers:
        got = [m for m in metrics if m.key == f"grad_mean/{name}"]
        assert [m.step for m in got] == [1, 2, 3]
        want = [row[name] for row in expected_means]
        np.testing.assert_allclose([m.value for m in got], want, rtol=1e-6, atol=1e-12)


def test_monitor_histogram_from_last_batch():
    model = _tiny_model()
    layers = weight_layers(model)
    monitor = GradientMonitor(layers, iters_per_epoch=2, hist_bins=6)
    for i in range(2):
        loss = F.cross_entropy(model(torch.rand(5, 1, 6, 6)), torch.randint(0, 10, (5,)))
        model.zero_grad()
        loss.backward()
        monitor.record(loss, global_step=i + 1, epoch=1, last_in_epoch=i == 1)
    last_grads = {name: w.grad.numpy().copy() for name, w in layers}
    monitor.drain()

    arrays = monitor.histograms.to_arrays()
    assert arrays["epochs"].tolist() == [1]
    assert arrays["edges"].shape == (1, len(layers), 7)
    assert arrays["counts"].shape == (1, len(layers), 6)
    for index, (name, _) in enumerate(layers):
        expected, _ = np.histogram(last_grads[name], bins=arrays["edges"][0, index])
        np.testing.assert_array_equal(arrays["counts"][0, index], expected)


def test_monitor_stats_every_schedule():
    model = _tiny_model()
    monitor = GradientMonitor(weight_layers(model), iters_per_epoch=4, stats_every=2)
    for i in range(4):
        loss = F.cross_entropy(model(torch.rand(2, 1, 6, 6)), torch.randint(0, 10, (2,)))
        model.zero_grad()
        loss.backward()
        monitor.record(loss, global_step=i + 1, epoch=1, last_in_epoch=i == 3)
    metrics = monitor.drain()
    assert [m.step for m in metrics if m.key == "train/loss"] == [1, 2, 3, 4]
    assert [m.step for m in metrics if m.key == "grad_mean/fc1"] == [2, 4]


def test_weight_layers_named_after_modules():
    model = _tiny_model()
    assert [name for name, _ in weight_layers(model)] == ["fc1", "fc2", "fc3"]
