"""Activation health: dead ReLU-family units and saturated sigmoid/tanh outputs.

Forward hooks on the activation modules accumulate, on the device, which units
were ever active during an epoch and how many outputs sat near a bound. The
hooks exist only while an :class:`ActivationMonitor` is attached, so switching
the monitor off costs nothing.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from src.gradients import Metric, count_below

# Activations whose output is positive exactly where their input is: a unit is
# active on a sample when its output is > 0, and dead when it never is.
SIGN_PRESERVING = (nn.ReLU, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.ReLU6, nn.CELU, nn.SELU)
# Bounded activations and their (lower, upper) bounds.
BOUNDS = {nn.Sigmoid: (0.0, 1.0), nn.Tanh: (-1.0, 1.0)}


class ActivationMonitor:
    """Record dead-unit and saturation fractions per activation module and epoch.

    Metric keys: ``act_dead_frac/<module>`` (sign-preserving activations: the
    fraction of units never active over the epoch's training batches) and
    ``act_saturated_frac/<module>`` (sigmoid and tanh: the fraction of outputs
    within `saturation_eps` of a bound). A unit is a feature of a linear layer's
    output, or a channel of a convolution's.
    """

    def __init__(self, model: nn.Module, saturation_eps: float = 0.01):
        self.saturation_eps = saturation_eps
        self.names: list[str] = []
        self._max_output: dict[str, torch.Tensor] = {}  # per unit, over the epoch
        self._saturated: dict[str, torch.Tensor] = {}
        self._total: dict[str, int] = {}
        self._handles = []
        for name, module in model.named_modules():
            if isinstance(module, SIGN_PRESERVING) or type(module) in BOUNDS:
                short = name.rsplit(".", 1)[-1]
                self.names.append(short)
                self._handles.append(module.register_forward_hook(self._hook(short)))

    def _hook(self, name: str):
        def hook(module: nn.Module, inputs, output: torch.Tensor) -> None:
            if not module.training:
                return
            output = output.detach()
            bounds = BOUNDS.get(type(module))
            if bounds is None:
                # A unit was active if its largest output over the epoch is > 0.
                units = output.movedim(1, -1).reshape(-1, output.shape[1])  # [samples, units]
                batch_max = units.amax(dim=0)
                previous = self._max_output.get(name)
                self._max_output[name] = (
                    batch_max if previous is None else torch.maximum(previous, batch_max)
                )
            else:
                # Saturated: |output - centre| >= half-width - eps, counted in float arithmetic.
                lo, hi = bounds
                centred = (output - (lo + hi) / 2).reshape(-1)
                inside = count_below([centred], (hi - lo) / 2 - self.saturation_eps)[0]
                saturated = output.numel() - inside
                self._saturated[name] = self._saturated.get(name, 0) + saturated
                self._total[name] = self._total.get(name, 0) + output.numel()

        return hook

    def drain(self, epoch: int) -> list[Metric]:
        """Return the epoch's fractions as metrics (step = epoch) and reset the counts."""
        now_ms = int(time.time() * 1000)
        metrics = []
        for name, max_output in self._max_output.items():
            dead = (max_output <= 0).float().mean().item()
            metrics.append(Metric(f"act_dead_frac/{name}", dead, epoch, now_ms))
        for name, saturated in self._saturated.items():
            fraction = float(saturated) / max(self._total[name], 1)
            metrics.append(Metric(f"act_saturated_frac/{name}", fraction, epoch, now_ms))
        self._max_output.clear()
        self._saturated.clear()
        self._total.clear()
        return metrics

    def remove(self) -> None:
        """Remove every hook from the model."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
