"""Typed schemas for the Hydra config and the range checks that types cannot express.

The schemas make Hydra reject a wrong type (``trainer.epochs=abc``) while it
composes the config; :func:`validate` rejects values out of range
(``trainer.batch_size=0``, a negative learning rate) before any work starts.
Both name the offending key.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, ListConfig


class ConfigError(ValueError):
    """A config value that is out of range or inconsistent with another value."""


@dataclass
class TrainerConfig:
    epochs: int = 50  # passes over the training set
    batch_size: int = 128  # images per mini-batch; the last partial batch is kept
    device: str = "auto"  # "auto" picks CUDA when available, else the CPU; or a torch device
    num_threads: int = 1  # torch intra-op threads for this job


@dataclass
class MonitorConfig:
    stats_every: int = 1  # record per-layer gradient statistics every N iterations
    hist_every: int = 1  # record histograms every N epochs, from the epoch's last mini-batch
    hist_bins: int = 30  # histogram bins; in "log" mode 2 * (hist_bins // 2) + 1 bins
    hist_mode: str = "range"  # "range": each tensor's min..max; "log": fixed symmetric log edges
    hist_log_range: list[float] = field(default_factory=lambda: [1e-10, 1.0])  # |g| of log edges
    tiny: float = 1e-8  # |g| below this counts as tiny (grad_tiny_frac) and not active (health)
    log_bias: bool = False  # also log bias statistics per iteration, as grad_<stat>/<layer>.bias
    epoch_images: bool = True  # one histogram image per epoch, for the MLflow UI's step slider
    activations: bool = True  # forward hooks for dead-unit and saturation fractions
    saturation_eps: float = 0.01  # sigmoid/tanh outputs this close to a bound are saturated


@dataclass
class HealthConfig:
    vanish_ratio: float = 0.05  # layer error-signal RMS / output layer's below this: vanishing
    explode_ratio: float = 10.0  # layer error-signal RMS / output layer's above this: exploding
    vanish_abs: float = 1e-10  # layer error-signal RMS below this: vanishing
    explode_abs: float = 1e3  # layer error-signal RMS above this: exploding
    min_epochs_frac: float = 0.12  # share of epochs a layer must vanish (explode) in, over a run


@dataclass
class TrackingConfig:
    uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else SQLite under <project root>/mlruns
    experiment_name: str = "vanishing-gradients"
    log_model: bool = True  # log the trained network with mlflow.pytorch


@dataclass
class DigitsConfig:
    name: str = "digits"
    train_size: int = 5000  # training images, balanced over the ten classes
    test_size: int = 1000  # test images, from their own seed
    image_size: int = 28  # side of the square image in pixels
    train_seed: int = 1234
    test_seed: int = 5678


@dataclass
class MLPConfig:
    name: str = "mlp"
    hidden_sizes: list[int] = field(
        default_factory=lambda: [256, 128, 64]
    )  # widths, input side first


@dataclass
class ActivationConfig:
    name: str = MISSING  # a name known to src.models.ACTIVATIONS


@dataclass
class LeakyReLUConfig(ActivationConfig):
    negative_slope: float = 0.01


@dataclass
class ELUConfig(ActivationConfig):
    alpha: float = 1.0


@dataclass
class OptimizerConfig:
    _target_: str = MISSING  # a torch.optim class, instantiated with the model's parameters
    _partial_: bool = True
    lr: float = 1e-3  # learning rate
    weight_decay: float = 0.0


@dataclass
class AdamConfig(OptimizerConfig):
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8


@dataclass
class SGDConfig(OptimizerConfig):
    momentum: float = 0.0
    nesterov: bool = False


@dataclass
class Config:
    seed: int = 42  # seeds model initialisation and the per-epoch shuffling
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    dataset: Any = MISSING
    model: Any = MISSING
    activation: Any = MISSING
    optimizer: Any = MISSING


def register_schemas() -> None:
    """Register the schemas under the names that the YAML files' defaults lists use."""
    cs = ConfigStore.instance()
    cs.store(name="schema", node=Config)
    cs.store(group="schema/dataset", name="digits", node=DigitsConfig)
    cs.store(group="schema/model", name="mlp", node=MLPConfig)
    cs.store(group="schema/activation", name="base", node=ActivationConfig)
    cs.store(group="schema/activation", name="leaky_relu", node=LeakyReLUConfig)
    cs.store(group="schema/activation", name="elu", node=ELUConfig)
    cs.store(group="schema/optimizer", name="adam", node=AdamConfig)
    cs.store(group="schema/optimizer", name="sgd", node=SGDConfig)


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"Invalid config value {key}={value!r}: {allowed}.")


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError naming the key, its value and the allowed range for any bad value."""
    trainer, monitor = cfg.trainer, cfg.monitor
    _check(trainer.epochs >= 1, "trainer.epochs", trainer.epochs, "expected an integer >= 1")
    _check(
        trainer.batch_size >= 1,
        "trainer.batch_size",
        trainer.batch_size,
        "expected an integer >= 1",
    )
    cores = os.cpu_count() or 1
    _check(
        1 <= trainer.num_threads,
        "trainer.num_threads",
        trainer.num_threads,
        f"expected an integer >= 1 (this machine has {cores} cores)",
    )
    _check(
        trainer.device == "auto" or trainer.device.split(":")[0] in {"cpu", "cuda", "mps"},
        "trainer.device",
        trainer.device,
        "expected 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'",
    )
    for key in ("stats_every", "hist_every", "hist_bins"):
        value = monitor[key]
        _check(value >= 1, f"monitor.{key}", value, "expected an integer >= 1")
    _check(
        monitor.hist_mode in ("range", "log"),
        "monitor.hist_mode",
        monitor.hist_mode,
        "expected 'range' or 'log'",
    )
    log_range = list(monitor.hist_log_range)
    _check(
        len(log_range) == 2 and 0 < log_range[0] < log_range[1],
        "monitor.hist_log_range",
        log_range,
        "expected [min, max] gradient magnitudes with 0 < min < max, for example [1e-10,1.0]",
    )
    _check(monitor.tiny >= 0, "monitor.tiny", monitor.tiny, "expected a value >= 0")
    _check(
        0 < monitor.saturation_eps < 0.5,
        "monitor.saturation_eps",
        monitor.saturation_eps,
        "expected a value in (0, 0.5)",
    )
    health = cfg.health
    for key in health:
        _check(health[key] > 0, f"health.{key}", health[key], "expected a value > 0")
    _check(
        health.min_epochs_frac <= 1,
        "health.min_epochs_frac",
        health.min_epochs_frac,
        "expected a share of epochs in (0, 1]",
    )
    _check(
        health.vanish_ratio < 1 < health.explode_ratio,
        "health.vanish_ratio",
        health.vanish_ratio,
        f"expected vanish_ratio < 1 < explode_ratio (= {health.explode_ratio})",
    )

    _validate_dataset(cfg.dataset)
    _validate_model(cfg.model)
    _validate_activation(cfg.activation)
    _validate_optimizer(cfg.optimizer)


def _validate_dataset(dataset: DictConfig) -> None:
    for key in ("train_size", "test_size"):
        _check(dataset[key] >= 10, f"dataset.{key}", dataset[key], "expected an integer >= 10")
    _check(
        dataset.image_size >= 8,
        "dataset.image_size",
        dataset.image_size,
        "expected an integer >= 8 (pixels)",
    )


def _validate_model(model: DictConfig) -> None:
    sizes = model.hidden_sizes
    _check(
        isinstance(sizes, ListConfig) and all(int(w) >= 1 for w in sizes),
        "model.hidden_sizes",
        list(sizes) if isinstance(sizes, ListConfig) else sizes,
        "expected a list of positive layer widths, for example [256,128,64]",
    )


def _validate_activation(activation: DictConfig) -> None:
    from src.models import ACTIVATIONS, ALIASES  # imports torch, which only training needs

    name = str(activation.name).lower()
    _check(
        name in ACTIVATIONS or name in ALIASES,
        "activation.name",
        activation.name,
        f"expected one of {', '.join(sorted(ACTIVATIONS))}",
    )


def _validate_optimizer(optimizer: DictConfig) -> None:
    _check(optimizer.lr > 0, "optimizer.lr", optimizer.lr, "expected a learning rate > 0")
    _check(
        optimizer.weight_decay >= 0,
        "optimizer.weight_decay",
        optimizer.weight_decay,
        "expected a value >= 0",
    )
    if "momentum" in optimizer:
        _check(
            0 <= optimizer.momentum < 1,
            "optimizer.momentum",
            optimizer.momentum,
            "expected a value in [0, 1)",
        )
    if "betas" in optimizer:
        _check(
            len(optimizer.betas) == 2 and all(0 <= b < 1 for b in optimizer.betas),
            "optimizer.betas",
            list(optimizer.betas),
            "expected two values in [0, 1), for example [0.9,0.999]",
        )
    if "eps" in optimizer:
        _check(optimizer.eps > 0, "optimizer.eps", optimizer.eps, "expected a value > 0")
