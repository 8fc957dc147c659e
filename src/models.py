"""Networks built from config, and activations looked up by name."""

from __future__ import annotations

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


def create_activation(name: str, **kwargs) -> nn.Module:
    """Build the activation module called `name` (case-insensitive, aliases allowed)."""
    key = ALIASES.get(name.lower(), name.lower())
    if key not in ACTIVATIONS:
        known = ", ".join(sorted(ACTIVATIONS))
        raise ValueError(f"Unknown activation {name!r}: expected one of {known}.")
    return ACTIVATIONS[key](**kwargs)


class MLP(nn.Module):
    """Flatten, then linear layers ``fc1..fcN`` with an activation after each but the last.

    Module names (``fc1``, ``act1``, ...) are the layer names in metric keys.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        hidden_sizes: Sequence[int],
        activation: Callable[[], nn.Module],
    ):
        super().__init__()
        in_features = 1
        for dim in input_shape:
            in_features *= int(dim)
        widths = [in_features, *map(int, hidden_sizes), num_classes]

        layers: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten())
        for i, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:]), start=1):
            layers[f"fc{i}"] = nn.Linear(fan_in, fan_out)
            if i < len(widths) - 1:
                layers[f"act{i}"] = activation()
        self.layers = nn.Sequential(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)  # [B, C, H, W] -> logits [B, num_classes]


def build_model(
    model_cfg, activation_cfg, input_shape: Sequence[int], num_classes: int
) -> nn.Module:
    """Build the network named by ``model_cfg.name`` for inputs of `input_shape` (C, H, W)."""
    act_kwargs = {k: v for k, v in activation_cfg.items() if k != "name"}
    create_activation(activation_cfg.name, **act_kwargs)  # fail here, before any layer is built
    if model_cfg.name != "mlp":
        raise ValueError(f"Unknown model {model_cfg.name!r}: expected 'mlp'.")
    return MLP(
        input_shape,
        num_classes,
        list(model_cfg.hidden_sizes),
        lambda: create_activation(activation_cfg.name, **act_kwargs),
    )


def weight_layers(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """List ``(name, weight)`` for every module whose weight is a matrix or a kernel.

    The name is the module's own name (``fc1``), the last part of its dotted path,
    unless two modules share it, in which case the full path is used.
    """
    found = [
        (path, module.weight)
        for path, module in model.named_modules()
        if isinstance(getattr(module, "weight", None), nn.Parameter) and module.weight.dim() >= 2
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
