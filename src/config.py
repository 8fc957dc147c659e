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
    require_server: bool = False  # reject a URI that is not http(s)://, so nothing logs locally
    health_check_timeout: float = 5.0  # seconds a server gets to respond to GET /health
    # MLflow's HTTP client limits, exported as MLFLOW_HTTP_REQUEST_*; null keeps MLflow's own.
    http_request_timeout: int | None = 30  # seconds to connect, and to get a response, per request
    http_request_max_retries: int | None = 3  # retries of a failed request, at most 10
    http_request_backoff_factor: int | None = 1  # seconds; retries wait 0, 2, 4, ... x this


@dataclass
class CheckpointConfig:
    every: int = 1  # write a checkpoint every N epochs (and after the last); 0: none
    resume: bool = False  # continue this job's last checkpoint, into the same MLflow run
    dir: str = "checkpoints"  # folder of the checkpoints; relative paths start at the project root


@dataclass
class DatasetConfig:
    name: str = MISSING  # digits, uci_digits, mnist, fashion_mnist, kmnist, cifar10, image_folder
    val_fraction: float = 0.0  # share of the training set held out for val/*; 0: val/* is test/*
    split_seed: int = 0  # seeds the held-out shares (validation, and test where there is none)
    mean: list[float] = field(default_factory=lambda: [0.0])  # pixel mean, one per channel or one
    std: list[float] = field(default_factory=lambda: [1.0])  # pixel standard deviation, likewise
    loader: str = "auto"  # "tensor": device tensors; "dataloader": streamed; "auto": by size
    memory_budget_mb: float = 2048.0  # "auto" keeps all images as float32 tensors up to this
    num_workers: int = 2  # DataLoader worker processes on the streamed path


@dataclass
class DigitsConfig(DatasetConfig):
    name: str = "digits"
    train_size: int = 5000  # training images, balanced over the ten classes
    test_size: int = 1000  # test images, from their own seed
    image_size: int = 28  # side of the square image in pixels
    train_seed: int = 1234
    test_seed: int = 5678


@dataclass
class UCIDigitsConfig(DatasetConfig):
    name: str = "uci_digits"
    image_size: int = 28  # side in pixels that the 8x8 originals are resampled to
    test_fraction: float = 0.2  # share of the 1797 images held out as the test split


@dataclass
class TorchvisionConfig(DatasetConfig):
    name: str = MISSING  # mnist, fashion_mnist, kmnist or cifar10
    root: str = "data"  # folder of the dataset files; relative paths start at the project root
    download: bool = False  # let torchvision download missing files (needs internet access)


@dataclass
class ImageFolderConfig(DatasetConfig):
    name: str = "image_folder"
    root: str = "data/images"  # <root>/<class name>/<image>; relative to the project root
    test_root: str | None = None  # same layout for the test split; None: hold out test_fraction
    test_fraction: float = 0.2  # share of root's images held out as the test split
    image_size: int = 28  # side in pixels that every image is resized to
    channels: int = 1  # 1: greyscale, 3: RGB


@dataclass
class ModelConfig:
    name: str = MISSING  # mlp or cnn
    hidden_sizes: list[int] = field(
        default_factory=lambda: [256, 128, 64]
    )  # widths of the fully connected hidden layers, input side first
    batch_norm: bool = False  # batch normalisation before each hidden activation
    init: str = "default"  # weight initialisation, one of src.models.INITS


@dataclass
class MLPConfig(ModelConfig):
    name: str = "mlp"
    residual: bool = False  # skip connections around the hidden layers after fc1 (equal widths)


@dataclass
class CNNConfig(ModelConfig):
    name: str = "cnn"
    channels: list[int] = field(default_factory=lambda: [16, 32])  # one conv block per entry
    kernel_size: int = 3  # odd, with "same" padding
    pool: str = "max"  # "max" or "avg" pooling by 2 after each convolution


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
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    dataset: Any = MISSING
    model: Any = MISSING
    activation: Any = MISSING
    optimizer: Any = MISSING


def register_schemas() -> None:
    """Register the schemas under the names that the YAML files' defaults lists use."""
    cs = ConfigStore.instance()
    cs.store(name="schema", node=Config)
    cs.store(group="schema/dataset", name="digits", node=DigitsConfig)
    cs.store(group="schema/dataset", name="uci_digits", node=UCIDigitsConfig)
    cs.store(group="schema/dataset", name="torchvision", node=TorchvisionConfig)
    cs.store(group="schema/dataset", name="image_folder", node=ImageFolderConfig)
    cs.store(group="schema/model", name="mlp", node=MLPConfig)
    cs.store(group="schema/model", name="cnn", node=CNNConfig)
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
        1 <= trainer.num_threads <= cores,
        "trainer.num_threads",
        trainer.num_threads,
        f"expected an integer from 1 to the {cores} cores of this machine",
    )
    _check(cfg.seed >= 0, "seed", cfg.seed, "expected an integer >= 0")
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
        monitor.hist_every <= trainer.epochs,
        "monitor.hist_every",
        monitor.hist_every,
        f"expected at most trainer.epochs ({trainer.epochs}), or no histogram is recorded",
    )
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
    _check(
        0 <= monitor.tiny < float("inf"),
        "monitor.tiny",
        monitor.tiny,
        "expected a finite value >= 0",
    )
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
    _validate_model(cfg.model, cfg.dataset)
    _validate_activation(cfg.activation)
    _validate_optimizer(cfg.optimizer)


def _validate_dataset(dataset: DictConfig) -> None:
    from src.data import input_shape_of  # imports torch, which only training needs
    from src.splits import LOADERS

    for key in ("train_size", "test_size"):
        if key in dataset:
            _check(dataset[key] >= 10, f"dataset.{key}", dataset[key], "expected an integer >= 10")
    if "image_size" in dataset:
        _check(
            dataset.image_size >= 8,
            "dataset.image_size",
            dataset.image_size,
            "expected an integer >= 8 (pixels)",
        )
    if "channels" in dataset:
        _check(dataset.channels in (1, 3), "dataset.channels", dataset.channels, "expected 1 or 3")
    if "test_fraction" in dataset:
        _check(
            0 < dataset.test_fraction < 1,
            "dataset.test_fraction",
            dataset.test_fraction,
            "expected a share in (0, 1)",
        )
    _check(
        0 <= dataset.val_fraction < 1,
        "dataset.val_fraction",
        dataset.val_fraction,
        "expected a share in [0, 1); 0 validates on the test split",
    )
    _check(
        dataset.loader in LOADERS,
        "dataset.loader",
        dataset.loader,
        f"expected one of {', '.join(LOADERS)}",
    )
    _check(
        dataset.memory_budget_mb > 0,
        "dataset.memory_budget_mb",
        dataset.memory_budget_mb,
        "expected a size in MiB > 0",
    )
    _check(dataset.num_workers >= 0, "dataset.num_workers", dataset.num_workers, "expected >= 0")

    try:
        channels = input_shape_of(dataset)[0]
    except ValueError:
        raise ConfigError(
            f"Invalid config value dataset.name={dataset.name!r}: expected one of digits, "
            "uci_digits, mnist, fashion_mnist, kmnist, cifar10, image_folder."
        ) from None
    for key in ("mean", "std"):
        values = list(dataset[key])
        _check(
            len(values) in (1, channels),
            f"dataset.{key}",
            values,
            f"expected one value, or one per channel ({channels})",
        )
    _check(all(s > 0 for s in dataset.std), "dataset.std", list(dataset.std), "expected values > 0")


def _validate_model(model: DictConfig, dataset: DictConfig) -> None:
    from src.data import input_shape_of
    from src.models import INITS, MODELS, POOLS, conv_output_shape

    _check(model.name in MODELS, "model.name", model.name, f"expected one of {', '.join(MODELS)}")
    sizes = model.hidden_sizes
    _check(
        isinstance(sizes, ListConfig) and all(int(w) >= 1 for w in sizes),
        "model.hidden_sizes",
        list(sizes) if isinstance(sizes, ListConfig) else sizes,
        "expected a list of positive layer widths, for example [256,128,64]",
    )
    _check(model.init in INITS, "model.init", model.init, f"expected one of {', '.join(INITS)}")
    if model.get("residual", False):
        _check(
            len(sizes) >= 1 and len(set(sizes)) == 1,
            "model.hidden_sizes",
            list(sizes),
            "expected equal widths with model.residual=true, for example [64,64,64,64]",
        )
    if model.name != "cnn":
        return

    channels = model.channels
    _check(
        isinstance(channels, ListConfig) and len(channels) >= 1 and all(c >= 1 for c in channels),
        "model.channels",
        list(channels) if isinstance(channels, ListConfig) else channels,
        "expected a non-empty list of positive channel counts, for example [16,32]",
    )
    _check(
        model.kernel_size >= 1 and model.kernel_size % 2 == 1,
        "model.kernel_size",
        model.kernel_size,
        "expected an odd integer >= 1",
    )
    _check(model.pool in POOLS, "model.pool", model.pool, f"expected one of {', '.join(POOLS)}")
    input_shape = input_shape_of(dataset)
    _, height, width = conv_output_shape(input_shape, list(channels))
    _check(
        height >= 1 and width >= 1,
        "model.channels",
        list(channels),
        f"expected at most {min(input_shape[1:]).bit_length() - 1} convolution blocks, "
        f"because each halves the {input_shape[1]}x{input_shape[2]} input images",
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
