"""Networks built from config, their weight initialisation, and activations looked up by name.

Module names (``fc1``, ``conv1``, ``act1``, ...) become the layer names in metric keys,
so every model names its layers with letters, digits and underscores only.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
from torch import nn

# Lowercase names and common aliases; keyword arguments come from the activation config.
ACTIVATIONS: dict[str, Callable[..., nn.Module]] = {
    "relu": nn.ReLU,
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "leaky_relu": nn.LeakyReLU,
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
}
ALIASES = {"swish": "silu", "lrelu": "leaky_relu", "logistic": "sigmoid"}

MODELS = ("mlp", "cnn")
INITS = (
    "default",
    "xavier_uniform",
    "xavier_normal",
    "kaiming_uniform",
    "kaiming_normal",
    "orthogonal",
)
POOLS = {"max": nn.MaxPool2d, "avg": nn.AvgPool2d}

# The nonlinearity name that torch.nn.init.calculate_gain accepts for each activation.
# ELU, GELU and SiLU have no name there. They behave like ReLU for positive inputs, so
# they get ReLU's gain sqrt(2).
GAIN_NONLINEARITY = {
    "relu": "relu",
    "leaky_relu": "leaky_relu",
    "sigmoid": "sigmoid",
    "tanh": "tanh",
    "elu": "relu",
    "gelu": "relu",
    "silu": "relu",
}


def create_activation(name: str, **kwargs) -> nn.Module:
    """Build the activation module called `name` (case-insensitive, aliases allowed)."""
    key = ALIASES.get(name.lower(), name.lower())
    if key not in ACTIVATIONS:
        known = ", ".join(sorted(ACTIVATIONS))
        raise ValueError(f"Unknown activation {name!r}: expected one of {known}.")
    return ACTIVATIONS[key](**kwargs)


class Normalize(nn.Module):
    """Standardise each channel of [B, C, H, W] images: ``(x - mean) / std``.

    Part of the model, so a logged model takes raw images with pixels in [0, 1].
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer(
            "mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1)
        )
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class Residual(nn.Module):
    """Add a skip connection around `branch`: ``x + branch(x)``."""

    def __init__(self, branch: nn.Module):
        super().__init__()
        self.branch = branch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.branch(x)


def _dense_layers(
    widths: Sequence[int],
    activation: Callable[[], nn.Module],
    batch_norm: bool = False,
    residual: bool = False,
) -> OrderedDict[str, nn.Module]:
    """Build ``fc1..fcN`` for `widths` (input first), each but the last followed by [bn, act].

    With `batch_norm`, every hidden layer is ``fc -> bn -> act`` and its linear layer has
    no bias. Batch normalisation subtracts the batch mean, which cancels any bias, so the
    bias gradient would be exactly zero. With `residual`, each hidden layer after the
    first (widths equal) becomes ``block<i>``, which computes ``h + act(bn(fc<i>(h)))``.
    """
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    last = len(widths) - 1
    for i, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:]), start=1):
        if i == last:
            layers[f"fc{i}"] = nn.Linear(fan_in, fan_out)
            break
        hidden: OrderedDict[str, nn.Module] = OrderedDict()
        hidden[f"fc{i}"] = nn.Linear(fan_in, fan_out, bias=not batch_norm)
        if batch_norm:
            hidden[f"bn{i}"] = nn.BatchNorm1d(fan_out)
        hidden[f"act{i}"] = activation()
        if residual and i > 1:
            layers[f"block{i}"] = Residual(nn.Sequential(hidden))
        else:
            layers.update(hidden)
    return layers


def _in_features(input_shape: Sequence[int]) -> int:
    return math.prod(int(dim) for dim in input_shape)


class MLP(nn.Module):
    """Flatten, then linear layers ``fc1..fcN`` with an activation after each but the last.

    Module names (``fc1``, ``act1``, ...) are the layer names in metric keys. With
    `residual`, the hidden layers after ``fc1`` get skip connections, so their widths
    must be equal; with `batch_norm`, hidden linear layers are followed by ``bn<i>``.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        hidden_sizes: Sequence[int],
        activation: Callable[[], nn.Module],
        batch_norm: bool = False,
        residual: bool = False,
        normalize: Normalize | None = None,
    ):
        super().__init__()
        hidden_sizes = [int(width) for width in hidden_sizes]
        if residual and len(set(hidden_sizes)) > 1:
            raise ValueError(
                f"A residual MLP needs equal hidden widths, got hidden_sizes={hidden_sizes}."
            )
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        if normalize is not None:
            layers["normalize"] = normalize
        layers["flatten"] = nn.Flatten()
        widths = [_in_features(input_shape), *hidden_sizes, num_classes]
        layers.update(_dense_layers(widths, activation, batch_norm, residual))
        self.layers = nn.Sequential(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)  # [B, C, H, W] -> logits [B, num_classes]


def conv_output_shape(input_shape: Sequence[int], channels: Sequence[int]) -> tuple[int, int, int]:
    """Return the (C, H, W) that the CNN's convolution blocks make of `input_shape`.

    Each block keeps the spatial size ("same" padding, odd kernels) and pools by 2,
    rounding down.
    """
    _, height, width = (int(dim) for dim in input_shape)
    for _ in channels:
        height, width = height // 2, width // 2
    return (int(channels[-1]) if channels else int(input_shape[0]), height, width)


class CNN(nn.Module):
    """Convolution blocks ``conv<i> -> [conv_bn<i>] -> conv_act<i> -> pool<i>``, then an MLP head.

    Each convolution has `kernel_size` (odd) with "same" padding and each pooling
    halves the height and width. The head flattens and applies ``fc1..fcN`` as the
    MLP does, with an activation after each but the last.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        channels: Sequence[int],
        hidden_sizes: Sequence[int],
        activation: Callable[[], nn.Module],
        kernel_size: int = 3,
        pool: str = "max",
        batch_norm: bool = False,
        normalize: Normalize | None = None,
    ):
        super().__init__()
        channels = [int(c) for c in channels]
        out_channels, height, width = conv_output_shape(input_shape, channels)
        if height < 1 or width < 1:
            raise ValueError(
                f"{len(channels)} convolution blocks halve an input of {tuple(input_shape)} "
                f"to nothing: use fewer model.channels or larger images."
            )
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        if normalize is not None:
            layers["normalize"] = normalize
        in_channels = int(input_shape[0])
        for i, out in enumerate(channels, start=1):
            # The bias before batch normalisation would get an exactly zero gradient.
            layers[f"conv{i}"] = nn.Conv2d(
                in_channels, out, kernel_size, padding=kernel_size // 2, bias=not batch_norm
            )
            if batch_norm:
                layers[f"conv_bn{i}"] = nn.BatchNorm2d(out)
            layers[f"conv_act{i}"] = activation()
            layers[f"pool{i}"] = POOLS[pool](2)
            in_channels = out
        layers["flatten"] = nn.Flatten()
        widths = [out_channels * height * width, *map(int, hidden_sizes), num_classes]
        layers.update(_dense_layers(widths, activation, batch_norm))
        self.layers = nn.Sequential(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)  # [B, C, H, W] -> logits [B, num_classes]


def build_model(
    model_cfg,
    activation_cfg,
    input_shape: Sequence[int],
    num_classes: int,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> nn.Module:
    """Build the network named by ``model_cfg.name`` for inputs of `input_shape` (C, H, W).

    `mean` and `std` (one value, or one per channel) add a :class:`Normalize` first
    unless they are all 0 and all 1. The weights are then initialised with the scheme
    ``model_cfg.init`` (``default``, the PyTorch initialisation, when unset).
    """
    act_kwargs = {k: v for k, v in activation_cfg.items() if k != "name"}
    create_activation(activation_cfg.name, **act_kwargs)  # fail here, before any layer is built

    def activation() -> nn.Module:
        return create_activation(activation_cfg.name, **act_kwargs)

    normalize = _normalize_layer(input_shape, mean, std)
    batch_norm = bool(model_cfg.get("batch_norm", False))
    if model_cfg.name == "mlp":
        model = MLP(
            input_shape,
            num_classes,
            list(model_cfg.hidden_sizes),
            activation,
            batch_norm=batch_norm,
            residual=bool(model_cfg.get("residual", False)),
            normalize=normalize,
        )
    elif model_cfg.name == "cnn":
        model = CNN(
            input_shape,
            num_classes,
            list(model_cfg.channels),
            list(model_cfg.hidden_sizes),
            activation,
            kernel_size=int(model_cfg.kernel_size),
            pool=model_cfg.pool,
            batch_norm=batch_norm,
            normalize=normalize,
        )
    else:
        raise ValueError(f"Unknown model {model_cfg.name!r}: expected one of {', '.join(MODELS)}.")
    init_weights(model, model_cfg.get("init", "default"), activation_cfg.name, act_kwargs)
    return model


def _normalize_layer(
    input_shape: Sequence[int], mean: Sequence[float] | None, std: Sequence[float] | None
) -> Normalize | None:
    if mean is None or std is None:
        return None
    channels = int(input_shape[0])
    mean, std = [float(m) for m in mean], [float(s) for s in std]
    for key, values in (("mean", mean), ("std", std)):
        if len(values) not in (1, channels):
            raise ValueError(
                f"dataset.{key} has {len(values)} values for {channels}-channel images: "
                f"give one value, or one per channel."
            )
    if all(m == 0.0 for m in mean) and all(s == 1.0 for s in std):
        return None
    return Normalize(mean * (channels // len(mean)), std * (channels // len(std)))


def init_weights(
    model: nn.Module, init: str, activation: str = "relu", activation_kwargs: dict | None = None
) -> None:
    """Initialise every weight layer of `model` in place with the scheme `init`.

    ``default`` keeps PyTorch's initialisation and touches no random number generator.
    Any other scheme draws from the global torch generator, in layer order, and sets
    biases to zero. Layers followed by `activation` get its gain (Xavier, orthogonal)
    or its nonlinearity (Kaiming, mode fan_in); the output layer gets the linear gain 1.
    """
    if init not in INITS:
        raise ValueError(f"Unknown initialisation {init!r}: expected one of {', '.join(INITS)}.")
    if init == "default":
        return
    key = ALIASES.get(activation.lower(), activation.lower())
    nonlinearity = GAIN_NONLINEARITY[key]
    slope = (activation_kwargs or {}).get("negative_slope", 0.01)
    param = slope if nonlinearity == "leaky_relu" else None

    modules = [module for module in model.modules() if _is_weight_layer(module)]
    for index, module in enumerate(modules):
        last = index == len(modules) - 1
        layer_nonlinearity, layer_param = ("linear", None) if last else (nonlinearity, param)
        gain = nn.init.calculate_gain(layer_nonlinearity, layer_param)
        weight = module.weight
        if init == "xavier_uniform":
            nn.init.xavier_uniform_(weight, gain=gain)
        elif init == "xavier_normal":
            nn.init.xavier_normal_(weight, gain=gain)
        elif init == "kaiming_uniform":
            nn.init.kaiming_uniform_(weight, a=layer_param or 0, nonlinearity=layer_nonlinearity)
        elif init == "kaiming_normal":
            nn.init.kaiming_normal_(weight, a=layer_param or 0, nonlinearity=layer_nonlinearity)
        else:
            nn.init.orthogonal_(weight, gain=gain)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def _is_weight_layer(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return isinstance(weight, nn.Parameter) and weight.dim() >= 2


def weight_layers(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """List ``(name, weight)`` for every module whose weight is a matrix or a kernel.

    The name is the module's own name (``fc1``), the last part of its dotted path,
    unless two modules share it, in which case the full path is used.
    """
    found = [
        (path, module.weight) for path, module in model.named_modules() if _is_weight_layer(module)
    ]
    short = [path.rsplit(".", 1)[-1] for path, _ in found]
    if len(set(short)) == len(short):
        return [(name, weight) for name, (_, weight) in zip(short, found)]
    return found


def activation_curve(activation: nn.Module, lo: float = -5.0, hi: float = 5.0, num: int = 501):
    """Evaluate `activation` and its derivative (by autograd) on ``num`` points of [lo, hi].

    Returns three float64 NumPy arrays ``(x, y, dy)``.
    """
    x = torch.linspace(lo, hi, num, dtype=torch.float64, requires_grad=True)
    y = activation(x)
    (dy,) = torch.autograd.grad(y.sum(), x)
    return x.detach().numpy(), y.detach().numpy(), dy.numpy()
