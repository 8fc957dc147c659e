import numpy as np
import pytest
import torch
import torch.nn.functional as F

from src.gradients import (
    STATS,
    GradientMonitor,
    count_into,
    derive_statistics,
    histogram,
    raw_statistics,
)
from src.histograms import symmetric_log_edges
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

    metrics = monitor.drain(epoch=1).metrics
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
    monitor.drain(epoch=1)

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
    metrics = monitor.drain(epoch=1).metrics
    assert [m.step for m in metrics if m.key == "train/loss"] == [1, 2, 3, 4]
    assert [m.step for m in metrics if m.key == "grad_mean/fc1"] == [2, 4]


def test_weight_layers_named_after_modules():
    model = _tiny_model()
    assert [name for name, _ in weight_layers(model)] == ["fc1", "fc2", "fc3"]


def _statistics(grads, tiny=1e-8):
    raw = raw_statistics(grads, tiny).numpy()
    numel = np.array([g.numel() for g in grads], dtype=np.float64)
    return derive_statistics(raw, numel)


def test_statistics_match_torch_reference():
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(64, 32, generator=gen) * 1e-3 + 2e-4, torch.randn(10, generator=gen)]
    grads[0][0, :5] = 0.0  # exact zeros count as tiny
    stats = _statistics(grads, tiny=1e-6)
    for index, g in enumerate(grads):
        g64 = g.double()
        assert stats["mean"][index] == pytest.approx(g64.mean().item(), rel=1e-5)
        assert stats["norm"][index] == pytest.approx(torch.linalg.vector_norm(g64).item(), rel=1e-6)
        assert stats["rms"][index] == pytest.approx(g64.pow(2).mean().sqrt().item(), rel=1e-6)
        assert stats["std"][index] == pytest.approx(g64.std().item(), rel=1e-4)
        assert stats["max_abs"][index] == pytest.approx(g64.abs().max().item(), rel=1e-7)
        tiny_frac = (g64.abs() < 1e-6).double().mean().item()
        assert stats["tiny_frac"][index] == pytest.approx(tiny_frac, abs=1e-12)
        assert stats["nonfinite"][index] == 0
    assert stats["tiny_frac"][0] >= 5 / grads[0].numel()


def test_statistics_count_nonfinite():
    g = torch.ones(4, 5)
    g[0, 0] = float("nan")
    g[1, 1] = float("inf")
    g[2, 2] = -float("inf")
    stats = _statistics([g, torch.ones(3)])
    assert stats["nonfinite"].tolist() == [3, 0]
    assert np.isnan(stats["norm"][0]) or np.isinf(stats["norm"][0])


def test_statistics_tiny_threshold_zero():
    stats = _statistics([torch.zeros(8)], tiny=0.0)
    assert stats["tiny_frac"].tolist() == [0.0]


def test_symmetric_log_edges_layout():
    edges = symmetric_log_edges(31, 1e-8, 1.0)
    assert len(edges) == 32  # 15 bins a sign plus the central bin
    assert np.all(np.diff(edges) > 0)
    np.testing.assert_allclose(edges[:16], -edges[16:][::-1])
    assert edges[16] == pytest.approx(1e-8)
    assert edges[-1] == pytest.approx(1.0)


def test_fixed_edges_match_numpy():
    edges = torch.as_tensor(symmetric_log_edges(21, 1e-6, 1e-1))
    values = torch.randn(2000, generator=torch.Generator().manual_seed(1)) * 1e-3
    counts = count_into(values, edges)
    expected, _ = np.histogram(values.numpy(), bins=edges.numpy())
    np.testing.assert_array_equal(counts.numpy(), expected)


def test_fixed_edges_keep_outliers():
    edges = torch.as_tensor(symmetric_log_edges(5, 1e-3, 1.0))
    counts = count_into(torch.tensor([-50.0, 0.0, 50.0]), edges)
    assert counts.sum() == 3
    assert counts[0] == 1
    assert counts[-1] == 1


def test_monitor_log_mode_shares_edges():
    model = _tiny_model()
    monitor = GradientMonitor(weight_layers(model), 1, hist_bins=11, hist_mode="log")
    loss = F.cross_entropy(model(torch.rand(4, 1, 6, 6)), torch.randint(0, 10, (4,)))
    loss.backward()
    monitor.record(loss, global_step=1, epoch=1, last_in_epoch=True)
    monitor.drain(epoch=1)
    arrays = monitor.histograms.to_arrays()
    assert str(arrays["mode"]) == "log"
    assert arrays["edges"].shape == (1, 3, 12)
    np.testing.assert_array_equal(arrays["edges"][0, 0], arrays["edges"][0, 2])


def test_monitor_logs_every_stat_and_bias():
    model = _tiny_model()
    tensors = weight_layers(model) + [("fc1.bias", model.layers.fc1.bias)]
    monitor = GradientMonitor(tensors, 1, layers=["fc1", "fc2", "fc3"])
    loss = F.cross_entropy(model(torch.rand(4, 1, 6, 6)), torch.randint(0, 10, (4,)))
    loss.backward()
    monitor.record(loss, global_step=1, epoch=1, last_in_epoch=True)
    record = monitor.drain(epoch=1)
    keys = {m.key for m in record.metrics}
    for stat in STATS:
        assert f"grad_{stat}/fc1" in keys
        assert f"grad_{stat}/fc1.bias" in keys
    assert monitor.histograms.to_arrays()["layers"].tolist() == ["fc1", "fc2", "fc3"]
    assert record.first_nonfinite() is None


def test_record_finds_first_nonfinite():
    model = _tiny_model()
    monitor = GradientMonitor(weight_layers(model), 3)
    for step in (1, 2, 3):
        model.zero_grad()
        loss = F.cross_entropy(model(torch.rand(4, 1, 6, 6)), torch.randint(0, 10, (4,)))
        loss.backward()
        if step >= 2:
            model.layers.fc2.weight.grad[0, 0] = float("nan")
        monitor.record(loss, global_step=step, epoch=1, last_in_epoch=step == 3)
    record = monitor.drain(epoch=1)
    step, reason = record.first_nonfinite()
    assert step == 2
    assert "iteration 2" in reason
    assert record.stats["nonfinite"][1].tolist() == [0, 1, 0]


def _train_and_drain(stats_thread: bool) -> list:
    torch.manual_seed(0)
    model = _tiny_model()
    monitor = GradientMonitor(weight_layers(model), iters_per_epoch=4, stats_thread=stats_thread)
    optimizer = torch.optim.Adam(model.parameters())
    inputs, targets = torch.rand(4, 8, 1, 6, 6), torch.randint(0, 10, (4, 8))
    for i in range(4):
        loss = F.cross_entropy(model(inputs[i]), targets[i])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        monitor.record(loss, global_step=i + 1, epoch=1, last_in_epoch=i == 3)
        optimizer.step()
    try:
        return [(m.key, m.step, m.value) for m in monitor.drain(epoch=1).metrics]
    finally:
        monitor.close()


def test_statistics_thread_matches_inline():
    assert _train_and_drain(stats_thread=True) == _train_and_drain(stats_thread=False)


def test_statistics_thread_error_reaches_training_thread():
    model = _tiny_model()
    monitor = GradientMonitor(weight_layers(model), iters_per_epoch=2, stats_thread=True)
    loss = F.cross_entropy(model(torch.rand(4, 1, 6, 6)), torch.randint(0, 10, (4,)))
    loss.backward()
    model.zero_grad(set_to_none=True)  # no gradients: the statistics fail in the thread
    monitor.record(loss, global_step=1, epoch=1, last_in_epoch=False)
    with pytest.raises(TypeError, match="NoneType"):
        monitor.drain(epoch=1)
    monitor.close()


def test_histogram_large_tensor_near_numpy():
    values = torch.randn(1_000_000, generator=torch.Generator().manual_seed(1)) * 1e-3
    edges, counts = histogram(values, 30)
    expected, _ = np.histogram(values.numpy(), bins=edges.numpy())
    assert counts.sum() == values.numel()
    # Only values within float32 rounding of an edge may change bins.
    assert np.abs(counts.numpy() - expected).sum() <= 20


def test_histogram_with_nan_counts_every_value():
    values = torch.tensor([float("nan"), 1.0, 2.0, 3.0])
    _, counts = histogram(values, 3)
    assert counts.sum() == 4
