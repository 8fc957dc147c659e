"""Test src.models: the MLP, residual MLP and CNN, batch norm, initialisation and normalisation."""

import math
import re

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from src.activations import ActivationMonitor
from src.gradients import GradientMonitor
from src.health import profile_columns
from src.models import CNN, INITS, MLP, build_model, create_activation, init_weights, weight_layers
from tests.conftest import compose_config

WIDTH = 512  # a 512 x 512 layer has 262,144 weights: sample moments within about 1%
# Gains of torch.nn.init.calculate_gain, written out: the reference for every init test.
GAINS = {
    "relu": math.sqrt(2.0),
    "leaky_relu": math.sqrt(2.0 / (1 + 0.01**2)),
    "tanh": 5.0 / 3,
    "sigmoid": 1.0,
    "gelu": math.sqrt(2.0),  # no entry of its own: ReLU's
}


def model_cfg(**values):
    base = {"name": "mlp", "hidden_sizes": [64], "batch_norm": False, "init": "default",
            "residual": False, "channels": [8, 16], "kernel_size": 3, "pool": "max"}  # fmt: skip
    return OmegaConf.create({**base, **values})


def activation_cfg(name: str):
    return OmegaConf.create({"name": name})


def wide_model(init: str, activation: str) -> nn.Module:
    """An MLP 512 -> 512 -> 512 -> 512: two hidden layers followed by `activation`, one output."""
    torch.manual_seed(0)
    cfg = model_cfg(hidden_sizes=[WIDTH, WIDTH], init=init)
    return build_model(cfg, activation_cfg(activation), (1, 1, WIDTH), WIDTH)


def expected_std(init: str, gain: float, fan_in: int, fan_out: int) -> float:
    """Return the standard deviation that each scheme promises for a weight matrix."""
    if init == "xavier_uniform":
        return gain * math.sqrt(6.0 / (fan_in + fan_out)) / math.sqrt(3.0)
    if init == "xavier_normal":
        return gain * math.sqrt(2.0 / (fan_in + fan_out))
    if init in ("kaiming_uniform", "kaiming_normal"):
        return gain / math.sqrt(fan_in)
    if init == "orthogonal":
        return gain / math.sqrt(fan_in)  # rows of norm gain, for a square matrix
    return 1.0 / math.sqrt(3.0 * fan_in)  # PyTorch's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))


# Weight initialisation


@pytest.mark.parametrize("activation", sorted(GAINS))
@pytest.mark.parametrize("init", INITS)
def test_init_matches_promised_distribution(init, activation):
    model = wide_model(init, activation)
    layers = dict(weight_layers(model))
    for name, gain in (("fc2", GAINS[activation]), ("fc3", 1.0)):  # fc3 is the output layer
        weight = layers[name].detach().double()
        std = expected_std(init, gain if init != "default" else 1.0, WIDTH, WIDTH)
        assert weight.std().item() == pytest.approx(std, rel=0.02), name
        assert abs(weight.mean().item()) < 0.02 * std, name
        if init in ("xavier_uniform", "kaiming_uniform", "default"):
            bound = std * math.sqrt(3.0)
            assert weight.abs().max().item() <= bound * (1 + 1e-6), name
            assert weight.abs().max().item() > 0.99 * bound, name


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_orthogonal_rows_are_orthogonal(activation):
    weight = dict(weight_layers(wide_model("orthogonal", activation)))["fc2"].detach().double()
    gain = GAINS[activation]
    torch.testing.assert_close(
        weight @ weight.T, gain**2 * torch.eye(WIDTH, dtype=torch.float64), atol=1e-5, rtol=0
    )


@pytest.mark.parametrize("init", [i for i in INITS if i != "default"])
def test_init_zeroes_biases(init):
    model = wide_model(init, "relu")
    for module in model.modules():
        if isinstance(module, nn.Linear):
            assert torch.count_nonzero(module.bias) == 0


def test_default_init_keeps_pytorch_biases():
    model = wide_model("default", "relu")
    bias = model.layers.fc2.bias.detach()
    bound = 1 / math.sqrt(WIDTH)
    assert bias.abs().max().item() <= bound
    assert bias.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.15)


def test_default_init_draws_as_plain_pytorch():
    torch.manual_seed(7)
    model = build_model(model_cfg(hidden_sizes=[32, 16]), activation_cfg("relu"), (1, 6, 6), 10)
    torch.manual_seed(7)
    reference = [nn.Linear(36, 32), nn.Linear(32, 16), nn.Linear(16, 10)]
    for (_, weight), linear in zip(weight_layers(model), reference):
        assert torch.equal(weight, linear.weight)


def test_init_covers_conv_kernels():
    torch.manual_seed(0)
    cfg = model_cfg(name="cnn", channels=[64, 64], hidden_sizes=[32], init="kaiming_normal")
    model = build_model(cfg, activation_cfg("relu"), (3, 16, 16), 10)
    kernel = model.layers.conv2.weight.detach()
    fan_in = 64 * 3 * 3
    assert kernel.std().item() == pytest.approx(math.sqrt(2.0 / fan_in), rel=0.03)
    assert torch.count_nonzero(model.layers.conv2.bias) == 0


def test_init_rejects_unknown_scheme():
    with pytest.raises(ValueError, match="he_normal"):
        init_weights(nn.Linear(2, 2), "he_normal")


# Architectures


def test_mlp_layer_names_unchanged():
    model = build_model(model_cfg(hidden_sizes=[8, 8]), activation_cfg("relu"), (1, 4, 4), 3)
    names = [name for name, _ in model.layers.named_children()]
    assert names == ["flatten", "fc1", "act1", "fc2", "act2", "fc3"]


def test_residual_mlp_adds_skips():
    torch.manual_seed(0)
    cfg = model_cfg(hidden_sizes=[16, 16, 16], residual=True)
    model = build_model(cfg, activation_cfg("tanh"), (1, 2, 3), 4)
    assert [name for name, _ in weight_layers(model)] == ["fc1", "fc2", "fc3", "fc4"]
    x = torch.randn(5, 1, 2, 3)
    layers = dict(weight_layers(model))
    biases = {name: module.bias for name, module in model.named_modules()
              if isinstance(module, nn.Linear) for name in [name.rsplit(".", 1)[-1]]}  # fmt: skip
    h = torch.tanh(F.linear(x.flatten(1), layers["fc1"], biases["fc1"]))
    h = h + torch.tanh(F.linear(h, layers["fc2"], biases["fc2"]))
    h = h + torch.tanh(F.linear(h, layers["fc3"], biases["fc3"]))
    expected = F.linear(h, layers["fc4"], biases["fc4"])
    torch.testing.assert_close(model(x), expected)


def test_residual_mlp_rejects_unequal_widths():
    with pytest.raises(ValueError, match="equal hidden widths"):
        MLP((1, 4, 4), 10, [32, 16], nn.ReLU, residual=True)


def test_batch_norm_drops_bias_before_it():
    cfg = model_cfg(hidden_sizes=[16, 16], batch_norm=True)
    model = build_model(cfg, activation_cfg("relu"), (1, 4, 4), 10)
    assert model.layers.fc1.bias is None
    assert model.layers.fc2.bias is None
    assert model.layers.fc3.bias is not None  # the output layer has no batch norm after it
    assert isinstance(model.layers.bn1, nn.BatchNorm1d)
    # Without a bias on every weight layer, the health verdict reads weight gradients.
    names = [name for name, _ in weight_layers(model)] + ["fc3.bias"]
    assert profile_columns(names, names[:3])[1] == "weight"


def test_cnn_layer_names_and_shapes():
    cfg = model_cfg(
        name="cnn", channels=[4, 8, 8], hidden_sizes=[32, 16], kernel_size=5, pool="avg"
    )
    model = build_model(cfg, activation_cfg("relu"), (3, 32, 32), 7)
    names = [name for name, _ in weight_layers(model)]
    assert names == ["conv1", "conv2", "conv3", "fc1", "fc2", "fc3"]
    assert dict(weight_layers(model))["fc1"].shape == (32, 8 * 4 * 4)
    assert isinstance(model.layers.pool1, nn.AvgPool2d)
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 7)


def test_cnn_rejects_too_many_blocks():
    with pytest.raises(ValueError, match="fewer model.channels"):
        CNN((1, 8, 8), 10, [4, 4, 4, 4], [8], nn.ReLU)


def test_layer_names_safe_for_metric_keys():
    cfgs = [
        model_cfg(hidden_sizes=[8, 8, 8], residual=True, batch_norm=True),
        model_cfg(name="cnn", channels=[4, 4], hidden_sizes=[8], batch_norm=True),
    ]
    for cfg in cfgs:
        model = build_model(cfg, activation_cfg("sigmoid"), (1, 8, 8), 10)
        for name, _ in weight_layers(model):
            assert re.fullmatch(r"(conv|fc)\d+", name), name
        for name in ActivationMonitor(model).names:
            assert re.fullmatch(r"[a-z_]+\d+", name), name


# Normalisation of the input


def test_normalize_standardises_channels():
    torch.manual_seed(0)
    cfg = model_cfg(name="cnn", channels=[4], hidden_sizes=[8])
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    model = build_model(cfg, activation_cfg("relu"), (3, 8, 8), 10, mean, std)
    torch.manual_seed(0)
    plain = build_model(cfg, activation_cfg("relu"), (3, 8, 8), 10)
    x = torch.rand(4, 3, 8, 8)
    standardised = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(model(x), plain(standardised))


def test_normalize_skipped_for_identity():
    model = build_model(model_cfg(), activation_cfg("relu"), (1, 4, 4), 10, [0.0], [1.0])
    assert "normalize" not in dict(model.layers.named_children())


def test_normalize_rejects_wrong_channel_count():
    with pytest.raises(ValueError, match="dataset.mean"):
        build_model(model_cfg(), activation_cfg("relu"), (3, 4, 4), 10, [0.1, 0.2], [1.0])


# Training with gradient monitoring


def train_few_iterations(model: nn.Module, input_shape, iterations: int = 4) -> GradientMonitor:
    """Train `model` for a few SGD steps on random data, recording every weight's gradients."""
    layers = weight_layers(model)
    monitor = GradientMonitor(layers, iters_per_epoch=iterations, hist_bins=8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    generator = torch.Generator().manual_seed(0)
    for step in range(1, iterations + 1):
        inputs = torch.rand(16, *input_shape, generator=generator)
        targets = torch.randint(0, 10, (16,), generator=generator)
        loss = F.cross_entropy(model(inputs), targets)
        optimizer.zero_grad()
        loss.backward()
        monitor.record(loss, step, epoch=1, last_in_epoch=step == iterations)
        optimizer.step()
    return monitor


@pytest.mark.parametrize(
    ("values", "input_shape", "expected"),
    [
        ({"name": "cnn", "channels": [4, 8], "hidden_sizes": [16]}, (1, 12, 12),
         ["conv1", "conv2", "fc1", "fc2"]),
        ({"name": "cnn", "channels": [4], "hidden_sizes": [16], "batch_norm": True}, (3, 8, 8),
         ["conv1", "fc1", "fc2"]),
        ({"hidden_sizes": [16, 16, 16, 16], "residual": True}, (1, 6, 6),
         ["fc1", "fc2", "fc3", "fc4", "fc5"]),
    ],
    ids=["cnn", "cnn_batch_norm", "residual_mlp"],
)  # fmt: skip
def test_training_records_every_weight_layer(values, input_shape, expected):
    torch.manual_seed(0)
    model = build_model(model_cfg(**values), activation_cfg("sigmoid"), input_shape, 10)
    monitor = train_few_iterations(model, input_shape)
    record = monitor.drain(epoch=1)
    keys = {metric.key for metric in record.metrics}
    for layer in expected:
        assert f"grad_rms/{layer}" in keys
        steps = [m.step for m in record.metrics if m.key == f"grad_rms/{layer}"]
        assert steps == [1, 2, 3, 4]
    assert monitor.layers == expected
    rms = record.stats["rms"]  # [iterations, layers]
    assert (rms > 0).all()
    assert monitor.histograms.layers == expected


def test_skip_connections_keep_gradients_alive():
    # Sigmoid, ten hidden layers of 32. The error signal reaching a layer is its bias
    # gradient: without skips the first layer's is about 1e-9 of the output layer's;
    # with them it stays within a factor of ten.
    ratios = {}
    for residual in (False, True):
        torch.manual_seed(0)
        cfg = model_cfg(hidden_sizes=[32] * 10, residual=residual)
        model = build_model(cfg, activation_cfg("sigmoid"), (1, 6, 6), 10)
        inputs = torch.rand(16, 1, 6, 6, generator=torch.Generator().manual_seed(0))
        targets = torch.arange(16) % 10
        F.cross_entropy(model(inputs), targets).backward()
        biases = [m.bias.grad for m in model.modules() if isinstance(m, nn.Linear)]
        ratios[residual] = (biases[0].norm() / biases[-1].norm()).item()
    assert ratios[False] < 1e-6
    assert ratios[True] > 0.1


def test_every_model_option_builds_for_every_dataset():
    from src.data import input_shape_of

    for dataset in ("digits", "uci_digits", "mnist", "fashion_mnist", "kmnist", "cifar10",
                    "image_folder"):  # fmt: skip
        for model in ("mlp", "cnn"):
            cfg = compose_config([f"dataset={dataset}", f"model={model}"])
            shape = input_shape_of(cfg.dataset)
            net = build_model(
                cfg.model, cfg.activation, shape, 10, cfg.dataset.mean, cfg.dataset.std
            )
            assert net(torch.rand(2, *shape)).shape == (2, 10), (dataset, model)


def test_create_activation_kwargs():
    assert create_activation("lrelu", negative_slope=0.2).negative_slope == 0.2


def test_depth_study_every_job_builds():
    import itertools

    from hydra.core.override_parser.overrides_parser import OverridesParser

    from src.config import validate
    from src.data import input_shape_of
    from tests.conftest import CONF_DIR

    params = OmegaConf.load(CONF_DIR / "experiment" / "depth_study.yaml").hydra.sweeper.params
    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
    choices = [
        [f"{o.get_key_element()}={value}" for value in o.sweep_string_iterator()] for o in parsed
    ]
    jobs = list(itertools.product(*choices))
    assert len(jobs) == 36
    for job in jobs:
        cfg = compose_config(["+experiment=depth_study", *job])
        validate(cfg)
        assert cfg.dataset.name == "uci_digits"
        model = build_model(cfg.model, cfg.activation, input_shape_of(cfg.dataset), 10)
        assert len(weight_layers(model)) in (4, 11), job


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["model.init=he_normal"], "model.init"),
        (["model.residual=true"], "model.hidden_sizes"),  # 256, 128, 64 are not equal
        (["model=cnn", "model.kernel_size=4"], "model.kernel_size"),
        (["model=cnn", "model.pool=median"], "model.pool"),
        (["model=cnn", "model.channels=[]"], "model.channels"),
        (["model=cnn", "dataset=uci_digits", "dataset.image_size=8", "model.channels=[4,4,4,4]"],
         "model.channels"),
    ],
)  # fmt: skip
def test_validate_rejects_bad_model(overrides, key):
    from src.config import ConfigError, validate

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(compose_config(overrides))


def test_batch_norm_single_image_batch_rejected():
    from src.loop import check_last_batch

    model = build_model(model_cfg(batch_norm=True), activation_cfg("relu"), (1, 4, 4), 10)
    with pytest.raises(ValueError, match="trainer.batch_size=128"):
        check_last_batch(model, 257, 128)
    check_last_batch(model, 258, 128)
    plain = build_model(model_cfg(), activation_cfg("relu"), (1, 4, 4), 10)
    check_last_batch(plain, 257, 128)
