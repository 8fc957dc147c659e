import pytest
import torch
from torch import nn

from src.activations import ActivationMonitor


def _net(activation: nn.Module, weight, bias) -> nn.Sequential:
    linear = nn.Linear(2, len(bias))
    with torch.no_grad():
        linear.weight.copy_(torch.tensor(weight))
        linear.bias.copy_(torch.tensor(bias))
    return nn.Sequential(linear, activation)


def test_dead_units_relu():
    # Inputs are positive: unit 0 is always active, unit 1 never, unit 2 on some samples.
    model = _net(nn.ReLU(), [[1.0, 1.0], [-1.0, -1.0], [1.0, -1.0]], [0.0, 0.0, 0.0])
    monitor = ActivationMonitor(model)
    model(torch.tensor([[1.0, 2.0], [3.0, 1.0]]))
    model(torch.tensor([[0.5, 0.5]]))
    (metric,) = monitor.drain(epoch=1)
    assert metric.key == "act_dead_frac/1"
    assert metric.step == 1
    assert metric.value == pytest.approx(1 / 3)


def test_dead_units_reset_each_epoch():
    model = _net(nn.ReLU(), [[1.0, 1.0]], [0.0])
    monitor = ActivationMonitor(model)
    model(torch.tensor([[-1.0, -1.0]]))
    assert monitor.drain(epoch=1)[0].value == 1.0
    model(torch.tensor([[1.0, 1.0]]))
    assert monitor.drain(epoch=2)[0].value == 0.0


def test_saturated_fraction_sigmoid():
    # Unit 0 saturates high (bias 10), unit 1 sits at 0.5, unit 2 saturates low.
    model = _net(nn.Sigmoid(), [[0.0, 0.0]] * 3, [10.0, 0.0, -10.0])
    monitor = ActivationMonitor(model, saturation_eps=0.01)
    model(torch.zeros(4, 2))
    (metric,) = monitor.drain(epoch=1)
    assert metric.key == "act_saturated_frac/1"
    assert metric.value == pytest.approx(2 / 3)


def test_saturated_fraction_tanh():
    model = _net(nn.Tanh(), [[0.0, 0.0]] * 2, [5.0, 0.1])
    monitor = ActivationMonitor(model, saturation_eps=0.01)
    model(torch.zeros(3, 2))
    assert monitor.drain(epoch=1)[0].value == pytest.approx(0.5)


def test_eval_mode_not_counted():
    model = _net(nn.ReLU(), [[1.0, 1.0]], [0.0])
    monitor = ActivationMonitor(model)
    model.eval()
    model(torch.ones(2, 2))
    assert monitor.drain(epoch=1) == []


def test_remove_detaches_hooks():
    model = _net(nn.Sigmoid(), [[0.0, 0.0]], [0.0])
    monitor = ActivationMonitor(model)
    monitor.remove()
    model(torch.zeros(2, 2))
    assert monitor.drain(epoch=1) == []
    assert not model[1]._forward_hooks


def test_saturated_count_matches_reference():
    torch.manual_seed(0)
    outputs = [torch.sigmoid(torch.randn(128, 64) * 4) for _ in range(3)]
    model = nn.Sequential(nn.Identity(), nn.Sigmoid())
    monitor = ActivationMonitor(model, saturation_eps=0.01)
    expected = 0
    for output in outputs:
        logits = torch.logit(output)
        model(logits)
        expected += int(((torch.sigmoid(logits) - 0.5).abs() >= 0.49).sum())
    (metric,) = monitor.drain(epoch=1)
    assert metric.value == pytest.approx(expected / (3 * 128 * 64), abs=1e-4)


def test_dead_channels_convolution():
    # Channel 0 is active somewhere, channel 1 never: [B, C, H, W] outputs count per channel.
    conv = nn.Conv2d(1, 2, kernel_size=1)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([1.0, -1.0]).view(2, 1, 1, 1))
        conv.bias.zero_()
    model = nn.Sequential(conv, nn.ReLU())
    monitor = ActivationMonitor(model)
    model(torch.rand(3, 1, 4, 4))
    model(torch.rand(2, 1, 4, 4))
    (metric,) = monitor.drain(epoch=1)
    assert metric.key == "act_dead_frac/1"
    assert metric.value == pytest.approx(0.5)
