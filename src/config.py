"""Typed schemas for the Hydra config and the range checks that types cannot express.

The schemas make Hydra reject a wrong type (``trainer.epochs=abc``) while it
composes the config; :func:`validate` rejects values out of range
(``trainer.batch_size=0``, a negative learning rate), names that nothing knows,
non-finite floats and values that do not fit each other, before any work starts.
Both name the offending key. Errors in what the user gave derive from
:class:`UserError`, whose message is complete: entry points print it without a
traceback.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, ListConfig

NUM_CLASSES = 10  # every dataset but an image folder has ten classes
UCI_DIGITS_SIZE = 1797  # images in scikit-learn's copy of the UCI handwritten digits
# (training, test) images of the published files that the file-based datasets read.
PUBLISHED_SIZES = {
    "mnist": (60_000, 10_000),
    "fashion_mnist": (60_000, 10_000),
    "kmnist": (60_000, 10_000),
    "cifar10": (50_000, 10_000),
}
MAX_SEED = 2**63 - 1  # torch.manual_seed and the synthetic digits take seeds up to this
MAX_SPLIT_SEED = 2**32 - 1  # scikit-learn's random_state is a NumPy RandomState seed
# Histograms are kept per layer and epoch and drawn as figures a few hundred pixels
# wide, so more bins only cost memory and plotting time.
MAX_HIST_BINS = 1000
MAX_EXPERIMENT_NAME_LENGTH = 500  # MLflow 3 rejects longer experiment names
DEVICE_PATTERN = re.compile(r"(cpu|cuda|mps)(:\d+)?")
OVERRIDE_GRAMMAR_URL = "https://hydra.cc/docs/advanced/override_grammar/basic/"


class UserError(Exception):
    """An error in the user's input (config, files, server), with a message that names the fix."""


class ConfigError(UserError, ValueError):
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
    # Compute them on a thread beside training; null: on for the CPU with a torch.optim optimizer.
    stats_thread: bool | None = None
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
    # What a run does when its server stops responding: keep the data in a local spool, retry.
    spool_dir: str = "spool"  # one folder per run of unsent data; relative to the project root
    spool_retry_wait: float = 2.0  # seconds before the first retry; doubles after each failed one
    spool_retry_max_wait: float = 60.0  # seconds, the longest wait between two retries
    spool_final_timeout: float = 10.0  # seconds the run's end waits for the server to come back
    # Store a SQLite store's metrics from a child process on a free core. null uses it only
    # where a core is free: the default launcher, with trainer.num_threads below the cores.
    metric_writer: bool | None = None


@dataclass
class CheckpointConfig:
    every: int = 1  # write a checkpoint every N epochs (and after the last); 0: none
    min_interval: float = 30.0  # seconds since the last checkpoint (or the start) before another
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


# The schema each name needs: ``dataset=digits dataset.name=mnist`` has no dataset.root.
DATASET_SCHEMAS = {
    "digits": DigitsConfig,
    "uci_digits": UCIDigitsConfig,
    "mnist": TorchvisionConfig,
    "fashion_mnist": TorchvisionConfig,
    "kmnist": TorchvisionConfig,
    "cifar10": TorchvisionConfig,
    "image_folder": ImageFolderConfig,
}
MODEL_SCHEMAS = {"mlp": MLPConfig, "cnn": CNNConfig}


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


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def usable_cores() -> int:
    """Return the cores this process may use: CPU affinity and cgroup quota, as joblib counts."""
    from joblib import cpu_count

    return cpu_count()


def physical_memory_bytes() -> int | None:
    """Return this machine's physical memory in bytes, or None where the OS does not report it."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def full_error_requested() -> bool:
    """Return True when HYDRA_FULL_ERROR=1 requests full tracebacks, as Hydra reads it."""
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


def validate(cfg: DictConfig, machine: bool = True) -> None:
    """Raise ConfigError naming the key, its value and the allowed range for any bad value.

    Checks what the schema's types cannot: ranges, names, non-finite floats,
    interpolations that do not resolve, and values that must fit each other or the
    dataset's size. With `machine`, also checks the values against this machine
    (cores, memory, GPUs); a sweep whose jobs run on other machines leaves that to
    each job. Reads only the config, never the dataset files, so it is cheap enough
    to run before every job.
    """
    _resolve_interpolations(cfg)
    cores = usable_cores() if machine else None
    _validate_trainer(cfg.trainer, cores)
    _check(0 <= cfg.seed <= MAX_SEED, "seed", cfg.seed, f"expected an integer from 0 to {MAX_SEED}")
    _validate_monitor(cfg.monitor, cfg.trainer.epochs)
    _validate_health(cfg.health)
    _validate_dataset(cfg.dataset)
    _validate_model(cfg.model, cfg.dataset)
    _validate_activation(cfg.activation)
    _validate_optimizer(cfg.optimizer)
    _validate_tracking(cfg.tracking)
    _validate_training_set(cfg)
    if machine:
        _validate_workers(cfg.dataset, cores)
        _validate_memory(cfg)


def _resolve_interpolations(cfg: DictConfig) -> None:
    """Resolve every interpolation outside ``hydra``, so that a broken one names its key here."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    for key in cfg:
        if key == "hydra":  # Hydra's own node resolves only inside a running job
            continue
        try:
            node = cfg._get_node(key)
            if isinstance(node, (DictConfig, ListConfig)):
                OmegaConf.to_container(node, resolve=True, throw_on_missing=True)
            else:
                cfg[key]  # noqa: B018 (resolving is the check)
        except OmegaConfBaseException as err:
            full_key = getattr(err, "full_key", None) or key
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ConfigError(
                f"Invalid config value {full_key}: {reason}. Fix the value or the "
                "${...} interpolation in it."
            ) from None


def _validate_trainer(trainer: DictConfig, cores: int | None) -> None:
    _check(trainer.epochs >= 1, "trainer.epochs", trainer.epochs, "expected an integer >= 1")
    _check(
        trainer.batch_size >= 1,
        "trainer.batch_size",
        trainer.batch_size,
        "expected an integer >= 1",
    )
    _check(
        trainer.num_threads >= 1 and (cores is None or trainer.num_threads <= cores),
        "trainer.num_threads",
        trainer.num_threads,
        "expected an integer >= 1"
        if cores is None
        else f"expected an integer from 1 to the {cores} cores this process may use",
    )
    device = trainer.device
    _check(
        device == "auto" or DEVICE_PATTERN.fullmatch(device) is not None,
        "trainer.device",
        device,
        "expected 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'",
    )
    if cores is not None and device != "auto":
        _check_device_available(device)


def _check_device_available(device: str) -> None:
    import torch

    kind, _, index = device.partition(":")
    if kind == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        _check(
            count > 0,
            "trainer.device",
            device,
            "CUDA is not available on this machine; use trainer.device=auto or cpu",
        )
        _check(
            int(index or 0) < count,
            "trainer.device",
            device,
            f"expected a GPU index from 0 to {count - 1}, the GPUs of this machine",
        )
    elif kind == "mps":
        _check(
            torch.backends.mps.is_available(),
            "trainer.device",
            device,
            "MPS is not available on this machine; use trainer.device=auto or cpu",
        )


def _validate_monitor(monitor: DictConfig, epochs: int) -> None:
    for key in ("stats_every", "hist_every"):
        value = monitor[key]
        _check(value >= 1, f"monitor.{key}", value, "expected an integer >= 1")
    _check(
        1 <= monitor.hist_bins <= MAX_HIST_BINS,
        "monitor.hist_bins",
        monitor.hist_bins,
        f"expected an integer from 1 to {MAX_HIST_BINS}",
    )
    _check(
        monitor.hist_every <= epochs,
        "monitor.hist_every",
        monitor.hist_every,
        f"expected at most trainer.epochs ({epochs}), or no histogram is recorded",
    )
    _check(
        monitor.hist_mode in ("range", "log"),
        "monitor.hist_mode",
        monitor.hist_mode,
        "expected 'range' or 'log'",
    )
    log_range = list(monitor.hist_log_range)
    _check(
        len(log_range) == 2 and all(map(_finite, log_range)) and 0 < log_range[0] < log_range[1],
        "monitor.hist_log_range",
        log_range,
        "expected finite [min, max] gradient magnitudes with 0 < min < max, for example "
        "[1e-10,1.0]",
    )
    _check(
        _finite(monitor.tiny) and monitor.tiny >= 0,
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


def _validate_health(health: DictConfig) -> None:
    for key in health:
        _check(health[key] > 0, f"health.{key}", health[key], "expected a value > 0")
    # An infinite explode_* threshold turns that test off; the others need a finite value.
    for key in ("vanish_ratio", "vanish_abs", "min_epochs_frac"):
        _check(_finite(health[key]), f"health.{key}", health[key], "expected a finite value > 0")
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
    _check(
        health.vanish_abs < health.explode_abs,
        "health.vanish_abs",
        health.vanish_abs,
        f"expected a value below health.explode_abs ({health.explode_abs})",
    )


def _validate_dataset(dataset: DictConfig) -> None:
    from src.data import MAX_IMAGE_SIZE, MIN_IMAGE_SIZE, input_shape_of
    from src.splits import LOADERS

    name = dataset.name
    _check(
        name in DATASET_SCHEMAS,
        "dataset.name",
        name,
        f"expected one of {', '.join(DATASET_SCHEMAS)}",
    )
    _check_schema_keys("dataset", dataset, DATASET_SCHEMAS[name])
    for key in ("train_size", "test_size"):
        if key in dataset:
            _check(
                dataset[key] >= NUM_CLASSES,
                f"dataset.{key}",
                dataset[key],
                f"expected an integer >= {NUM_CLASSES}, one image for each class",
            )
    for key in ("train_seed", "test_seed"):
        if key in dataset:
            _check(
                0 <= dataset[key] <= MAX_SEED,
                f"dataset.{key}",
                dataset[key],
                f"expected an integer from 0 to {MAX_SEED}",
            )
    _check(
        0 <= dataset.split_seed <= MAX_SPLIT_SEED,
        "dataset.split_seed",
        dataset.split_seed,
        f"expected an integer from 0 to {MAX_SPLIT_SEED} (scikit-learn's random_state)",
    )
    if "image_size" in dataset:
        high = MAX_IMAGE_SIZE if name == "digits" else None
        _check(
            dataset.image_size >= MIN_IMAGE_SIZE and (high is None or dataset.image_size <= high),
            "dataset.image_size",
            dataset.image_size,
            f"expected an integer from {MIN_IMAGE_SIZE} to {high} (pixels)"
            if high
            else f"expected an integer >= {MIN_IMAGE_SIZE} (pixels)",
        )
    if "channels" in dataset:
        _check(dataset.channels in (1, 3), "dataset.channels", dataset.channels, "expected 1 or 3")
    for key in ("root", "test_root"):
        if dataset.get(key) is not None:
            _check(
                dataset[key].strip() != "",
                f"dataset.{key}",
                dataset[key],
                "expected a folder; relative paths start at the project root",
            )
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
        _finite(dataset.memory_budget_mb) and dataset.memory_budget_mb > 0,
        "dataset.memory_budget_mb",
        dataset.memory_budget_mb,
        "expected a finite size in MiB > 0; dataset.loader=tensor keeps any dataset in memory",
    )
    _check(dataset.num_workers >= 0, "dataset.num_workers", dataset.num_workers, "expected >= 0")

    channels = input_shape_of(dataset)[0]
    for key in ("mean", "std"):
        values = list(dataset[key])
        _check(
            len(values) in (1, channels) and all(map(_finite, values)),
            f"dataset.{key}",
            values,
            f"expected one finite value, or one per channel ({channels})",
        )
    _check(all(s > 0 for s in dataset.std), "dataset.std", list(dataset.std), "expected values > 0")


def _check_schema_keys(group: str, node: DictConfig, schema: type) -> None:
    """Reject a ``<group>.name`` whose option needs keys that the selected config lacks.

    ``dataset=digits dataset.name=mnist`` keeps the digits keys, so reading MNIST
    would fail for want of ``dataset.root``: the group option, not the name, picks one.
    """
    missing = [f"{group}.{item.name}" for item in fields(schema) if item.name not in node]
    _check(
        not missing,
        f"{group}.name",
        node.name,
        f"the selected {group} config lacks {', '.join(missing)}. Pick another {group} with "
        f"{group}={node.name}, not with {group}.name",
    )


def _validate_model(model: DictConfig, dataset: DictConfig) -> None:
    from src.data import input_shape_of
    from src.models import INITS, MODELS, POOLS, conv_output_shape

    _check(model.name in MODELS, "model.name", model.name, f"expected one of {', '.join(MODELS)}")
    _check_schema_keys("model", model, MODEL_SCHEMAS[model.name])
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
    input_shape = input_shape_of(dataset)
    side = min(input_shape[1:])
    largest_kernel = side if side % 2 == 1 else side - 1
    _check(
        1 <= model.kernel_size <= largest_kernel and model.kernel_size % 2 == 1,
        "model.kernel_size",
        model.kernel_size,
        f"expected an odd integer from 1 to {largest_kernel}, within the "
        f"{input_shape[1]}x{input_shape[2]} input images",
    )
    _check(model.pool in POOLS, "model.pool", model.pool, f"expected one of {', '.join(POOLS)}")
    _, height, width = conv_output_shape(input_shape, list(channels))
    _check(
        height >= 1 and width >= 1,
        "model.channels",
        list(channels),
        f"expected at most {side.bit_length() - 1} convolution blocks, "
        f"because each halves the {input_shape[1]}x{input_shape[2]} input images",
    )


def _validate_activation(activation: DictConfig) -> None:
    """Check the name and that the activation's module takes every other key as an argument.

    ``activation=elu activation.name=relu`` keeps ``alpha``, which ``nn.ReLU`` rejects.
    """
    import inspect

    from src.models import ACTIVATIONS, ALIASES  # imports torch, which only training needs

    name = str(activation.name).lower()
    _check(
        name in ACTIVATIONS or name in ALIASES,
        "activation.name",
        activation.name,
        f"expected one of {', '.join(sorted(ACTIVATIONS))}",
    )
    module = ACTIVATIONS[ALIASES.get(name, name)]
    accepted = inspect.signature(module).parameters
    for key in activation:
        if key == "name":
            continue
        value = activation[key]
        _check(
            key in accepted,
            f"activation.{key}",
            value,
            f"{activation.name} takes no argument {key!r}. Pick another activation with "
            f"activation={name}, not with activation.name",
        )
        _check(
            isinstance(value, bool) or not isinstance(value, (int, float)) or _finite(value),
            f"activation.{key}",
            value,
            "expected a finite number",
        )


def _validate_optimizer(optimizer: DictConfig) -> None:
    import inspect

    optimizer_class = _optimizer_class(optimizer._target_)
    _check(
        optimizer_class is not None,
        "optimizer._target_",
        optimizer._target_,
        "expected a torch.optim optimizer class, for example torch.optim.SGD",
    )
    _check(
        optimizer._partial_ is True,
        "optimizer._partial_",
        optimizer._partial_,
        "expected true: the training code passes the model's parameters",
    )
    accepted = inspect.signature(optimizer_class).parameters
    for key in optimizer:
        if key in ("_target_", "_partial_"):
            continue
        _check(
            key in accepted,
            f"optimizer.{key}",
            optimizer[key],
            f"{optimizer._target_} takes no argument {key!r}. Pick another optimizer with "
            "optimizer=NAME, not with optimizer._target_",
        )

    _check(
        _finite(optimizer.lr) and optimizer.lr > 0,
        "optimizer.lr",
        optimizer.lr,
        "expected a finite learning rate > 0",
    )
    _check(
        _finite(optimizer.weight_decay) and optimizer.weight_decay >= 0,
        "optimizer.weight_decay",
        optimizer.weight_decay,
        "expected a finite value >= 0",
    )
    if "momentum" in optimizer:
        _check(
            0 <= optimizer.momentum < 1,
            "optimizer.momentum",
            optimizer.momentum,
            "expected a value in [0, 1)",
        )
    if optimizer.get("nesterov", False):
        _check(
            optimizer.get("momentum", 0) > 0,
            "optimizer.nesterov",
            True,
            f"Nesterov momentum needs optimizer.momentum > 0 (it is "
            f"{optimizer.get('momentum', 0)})",
        )
    if "betas" in optimizer:
        _check(
            len(optimizer.betas) == 2 and all(0 <= b < 1 for b in optimizer.betas),
            "optimizer.betas",
            list(optimizer.betas),
            "expected two values in [0, 1), for example [0.9,0.999]",
        )
    if "eps" in optimizer:
        _check(
            _finite(optimizer.eps) and optimizer.eps > 0,
            "optimizer.eps",
            optimizer.eps,
            "expected a finite value > 0",
        )


def _optimizer_class(target: str) -> type | None:
    """Return the torch.optim optimizer class that `target` names, or None.

    Imports nothing outside torch.optim, so a mistyped name cannot run other code.
    """
    import importlib

    import torch

    module_name, _, name = target.rpartition(".")
    if module_name != "torch.optim" and not module_name.startswith("torch.optim."):
        return None
    try:
        candidate = getattr(importlib.import_module(module_name), name, None)
    except (ImportError, ValueError):
        return None
    is_optimizer = isinstance(candidate, type) and issubclass(candidate, torch.optim.Optimizer)
    return candidate if is_optimizer else None


def _validate_tracking(tracking: DictConfig) -> None:
    from src.tracking import validate_tracking  # imports mlflow, which every run needs anyway

    validate_tracking(tracking)
    name = tracking.experiment_name
    _check(
        name.strip() != "" and len(name) <= MAX_EXPERIMENT_NAME_LENGTH,
        "tracking.experiment_name",
        name,
        f"expected a name of 1 to {MAX_EXPERIMENT_NAME_LENGTH} characters, not only spaces",
    )


def training_set_size(dataset: DictConfig) -> int | None:
    """Return how many training images remain after the validation share, from the config alone.

    Counts held-out shares as src.splits does: ``ceil(fraction * images)``. Returns
    None for an image folder, whose size only its files tell. The MNIST family and
    CIFAR-10 count the published files.
    """
    name = dataset.name
    if name == "digits":
        size = dataset.train_size
    elif name == "uci_digits":
        size = UCI_DIGITS_SIZE - math.ceil(dataset.test_fraction * UCI_DIGITS_SIZE)
    elif name in PUBLISHED_SIZES:
        size = PUBLISHED_SIZES[name][0]
    else:
        return None
    return size - math.ceil(dataset.val_fraction * size)


def _validate_training_set(cfg: DictConfig) -> None:
    """Check the values that must fit the training set's size, where the config gives it."""
    dataset, trainer = cfg.dataset, cfg.trainer
    num_train = training_set_size(dataset)
    if num_train is None:
        return  # an image folder: the training loop checks the batch norm case itself

    if dataset.name == "uci_digits":
        before_val = UCI_DIGITS_SIZE - math.ceil(dataset.test_fraction * UCI_DIGITS_SIZE)
        _check(
            before_val >= NUM_CLASSES,
            "dataset.test_fraction",
            dataset.test_fraction,
            f"it holds out all but {before_val} of the {UCI_DIGITS_SIZE} images, fewer than one "
            f"training image for each of the {NUM_CLASSES} classes; expected a smaller share",
        )
    _check(
        num_train >= NUM_CLASSES,
        "dataset.val_fraction",
        dataset.val_fraction,
        f"it leaves {num_train} training images, fewer than one for each of the "
        f"{NUM_CLASSES} classes; expected a smaller share",
    )

    if cfg.model.batch_norm and len(cfg.model.hidden_sizes) > 0:
        check_batch_norm_batches(num_train, trainer.batch_size)

    iterations = trainer.epochs * math.ceil(num_train / trainer.batch_size)
    _check(
        cfg.monitor.stats_every <= iterations,
        "monitor.stats_every",
        cfg.monitor.stats_every,
        f"expected at most the {iterations} iterations of the run (trainer.epochs x "
        f"{math.ceil(num_train / trainer.batch_size)} per epoch), or no gradient statistics "
        "are recorded",
    )


def check_batch_norm_batches(num_train: int, batch_size: int) -> None:
    """Raise ConfigError when batch norm would meet a mini-batch of a single image.

    Batch norm cannot normalise one sample in training mode, and the training loop
    keeps the last partial mini-batch, of ``num_train % batch_size`` images.
    """
    smallest = num_train % batch_size or batch_size
    if smallest != 1:
        return
    if batch_size == 1:
        raise ConfigError(
            "Invalid config value trainer.batch_size=1: expected at least 2 with "
            "model.batch_norm=true, because batch norm cannot normalise a single image."
        )
    candidates = itertools.chain([batch_size - 1], itertools.count(batch_size + 1))
    suggestion = next(b for b in candidates if b >= 2 and (num_train % b or b) != 1)
    raise ConfigError(
        f"Invalid config value trainer.batch_size={batch_size}: the {num_train} training "
        "images leave a last mini-batch of one image, which batch norm cannot normalise. "
        f"Choose another batch size, for example trainer.batch_size={suggestion}, or "
        "another dataset.val_fraction."
    )


def _validate_workers(dataset: DictConfig, cores: int) -> None:
    """Reject more DataLoader workers than cores, where the run starts workers at all."""
    from src.data import input_shape_of
    from src.splits import estimate_megabytes

    images = dataset_image_count(dataset)
    streamed = dataset.loader == "dataloader" or (
        dataset.loader == "auto"
        and images is not None
        and estimate_megabytes(images, input_shape_of(dataset)) > dataset.memory_budget_mb
    )
    # An image folder is read through a DataLoader on the tensor path too.
    if streamed or dataset.name == "image_folder":
        _check(
            dataset.num_workers <= cores,
            "dataset.num_workers",
            dataset.num_workers,
            f"expected at most the {cores} cores this process may use",
        )


def dataset_image_count(dataset: DictConfig) -> int | None:
    """Return how many images (training and test) the dataset reads, or None for a folder."""
    if dataset.name == "digits":
        return dataset.train_size + dataset.test_size
    if dataset.name == "uci_digits":
        return UCI_DIGITS_SIZE
    if dataset.name in PUBLISHED_SIZES:
        return sum(PUBLISHED_SIZES[dataset.name])
    return None


def _validate_memory(cfg: DictConfig) -> None:
    """Reject a run whose estimated memory exceeds this machine's physical memory.

    A run that large would be killed by the OS, without a message, after minutes of
    work. The estimate counts the images as float32, four copies of every parameter
    (weights, gradients and the two optimizer states that Adam keeps) and the
    activations of one mini-batch. It leaves out the frameworks' own memory.
    """
    total_memory = physical_memory_bytes()
    if total_memory is None:
        return
    parts = estimate_memory(cfg)
    needed = sum(parts.values())
    if needed <= total_memory:
        return
    largest = max(parts, key=parts.get)
    keys = {
        "images": "dataset.train_size, dataset.test_size or dataset.image_size",
        "parameters": "model.hidden_sizes or model.channels",
        "activations": "trainer.batch_size, model.hidden_sizes or model.channels",
    }[largest]
    gib = 2**30
    raise ConfigError(
        f"Invalid config: the run needs an estimated {needed / gib:.1f} GiB of memory "
        f"(images {parts['images'] / gib:.1f} GiB, parameters with their gradients and "
        f"optimizer state {parts['parameters'] / gib:.1f} GiB, activations "
        f"{parts['activations'] / gib:.1f} GiB), more than the {total_memory / gib:.1f} GiB "
        f"of this machine. Lower {keys}."
    )


def estimate_memory(cfg: DictConfig) -> dict[str, int]:
    """Estimate the memory a run uses, in bytes: ``images``, ``parameters`` and ``activations``.

    Every count is exact arithmetic on the config, however large the values.
    """
    from src.data import input_shape_of

    input_shape = input_shape_of(cfg.dataset)
    pixels = math.prod(input_shape)
    images = dataset_image_count(cfg.dataset) or 0
    num_train = training_set_size(cfg.dataset)
    batch = cfg.trainer.batch_size if num_train is None else min(cfg.trainer.batch_size, num_train)
    num_classes = NUM_CLASSES if cfg.dataset.name != "image_folder" else 1
    parameters, activations_per_image = _model_size(cfg.model, input_shape, num_classes)
    return {
        "images": images * pixels * 4,
        "parameters": parameters * 4 * 4,
        # The input, then each layer's output with its batch norm and activation outputs.
        "activations": batch * (pixels + 3 * activations_per_image) * 4,
    }


def _model_size(
    model: DictConfig, input_shape: tuple[int, int, int], num_classes: int
) -> tuple[int, int]:
    """Return (parameters, layer outputs per image) of the network that src.models builds.

    A layer before batch norm has no bias, and the batch norm has a weight and a bias
    per channel. The output layer always has a bias.
    """
    channels, height, width = input_shape
    batch_norm = bool(model.batch_norm)
    per_channel = 2 if batch_norm else 1  # batch norm's weight and bias, or the layer's bias
    parameters = outputs = 0
    kernel = model.kernel_size if model.name == "cnn" else 1
    for out_channels in model.channels if model.name == "cnn" else []:
        parameters += channels * out_channels * kernel * kernel + per_channel * out_channels
        outputs += out_channels * height * width
        channels, height, width = out_channels, height // 2, width // 2
    widths = [channels * height * width, *model.hidden_sizes]
    for fan_in, fan_out in zip(widths[:-1], widths[1:]):
        parameters += fan_in * fan_out + per_channel * fan_out
        outputs += fan_out
    parameters += widths[-1] * num_classes + num_classes
    return parameters, outputs + num_classes


def exit_on_bad_override(entry_point: Callable[[], Any]) -> Callable[[], Any]:
    """Wrap a ``@hydra.main`` entry point so that an override Hydra cannot parse is named.

    For most syntax errors Hydra's message names only the unexpected token (``no
    viable alternative at input '[1'``), and an override with an empty key
    (``=3``) gets a traceback. This exits with status 1 and one message that
    quotes the whole override first. With HYDRA_FULL_ERROR=1, Hydra reports it.
    """

    @functools.wraps(entry_point)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not args and not kwargs and not full_error_requested():
            message = _bad_override_message(sys.argv[1:])
            if message is not None:
                raise SystemExit(message)
        return entry_point(*args, **kwargs)

    return wrapper


def _bad_override_message(argv: list[str]) -> str | None:
    """Return a message naming the first override in `argv` that Hydra cannot parse, or None."""
    # NOTE: Hydra 1.3 keeps its command-line parser in hydra._internal, a private module.
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    args, _ = get_args_parser().parse_known_args(argv)
    parser = OverridesParser.create()
    for override in args.overrides or []:
        try:
            parsed = parser.parse_overrides([override])[0]
        except OverrideParseException as err:
            return (
                f"Invalid override {override!r}: {_parse_error_reason(err.message)}. "
                f"Expected key=value; quote a value with special characters, as in "
                f"key='a value'. Syntax: {OVERRIDE_GRAMMAR_URL}"
            )
        if parsed.key_or_group == "":
            return f"Invalid override {override!r}: expected a key before '=', as in key=value."
    return None


def _parse_error_reason(message: str) -> str:
    """Return the reason in Hydra's parse error `message`, without the override or the link."""
    lines = [line for line in message.splitlines() if line.strip()]
    prefix = "LexerNoViableAltException: "
    if lines[0].startswith(prefix) and len(lines) > 1 and "^" in lines[1]:
        position = lines[1].index("^") - len(prefix)
        rest = lines[0][len(prefix) + position :]
        return f"the text from position {position + 1} on ({rest!r}) is not valid override syntax"
    reasons = [line for line in lines if not line.startswith(("See https://", "Error parsing"))]
    return reasons[0] if reasons else "Hydra cannot parse it"
