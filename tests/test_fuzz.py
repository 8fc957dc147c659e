"""Property-based fuzzing of every numeric and string config key, booleans and lists too.

Each example picks group options and overrides a few leaf keys of the composed
config with a value drawn to be valid, at a boundary, zero, negative, huge,
non-finite, of the wrong type, or random text. The keys come from the composed
config itself, so a key added later is fuzzed too. Every example must either
train a tiny run to the end or fail cleanly: Hydra's own composition error, or a
UserError raised before any MLflow run exists. A run that diverges must end
FAILED with its reason. No example may leave a run RUNNING.

Most examples call Hydra's compose API and ``train()`` in this process; a few go
through ``python -m src.train`` and check that no traceback reaches the user.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
from hydra.errors import HydraException
from hypothesis import HealthCheck, Phase, event, given, note, settings
from hypothesis import strategies as st
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.nodes import BooleanNode, FloatNode, IntegerNode, StringNode

from src.config import UserError, dataset_image_count, estimate_memory, validate
from src.loop import Divergence
from src.train import JobInfo, train
from tests.conftest import CONF_DIR, PROJECT_ROOT, compose_config

GROUPS = {
    group: sorted(path.stem for path in (CONF_DIR / group).glob("*.yaml"))
    for group in ("dataset", "model", "activation", "optimizer")
}
# Never fuzzed: the store must stay in tmp_path, and a download would reach the network.
FIXED_KEYS = {"tracking.uri", "dataset.download"}
# Keys that name a folder get only absolute paths in tmp_path, so that random text
# never writes into the repository (relative paths start at the project root).
PATH_SUFFIXES = ("dir", "root", "path", "folder")

# Small enough that a run takes about a second, whatever the group options.
TINY = {
    "trainer.epochs": "1",
    "trainer.batch_size": "16",
    "model.hidden_sizes": "[8]",
    "monitor.epoch_images": "false",
    "tracking.log_model": "false",
}
TINY_BY_OPTION = {
    "digits": {"dataset.train_size": "40", "dataset.test_size": "20"},
    "cnn": {"model.channels": "[4]"},
}

INTS = [0, 1, -1, 2, 3, 7, 255, 257, 2**31 - 1, 2**32, 2**63 - 1, 2**63, 10**30, -(2**63)]
FLOATS = ["0.0", "-0.0", "1e-300", "1e-08", "0.01", "0.5", "0.999", "1.0", "2.0", "-1.0",
          "1e308", "nan", "inf", "-inf"]  # fmt: skip
WRONG_TYPES = ["abc", "1.5", "true", "null", "[1]", "{a:1}", "''", "'1 2'"]
NAMES = sorted(
    {name for options in GROUPS.values() for name in options}
    | {"auto", "cpu", "cuda", "cuda:0", "cuda:x", "mps", "range", "log", "tensor", "dataloader",
       "max", "avg", "min", "default", "xavier_normal", "kaiming_uniform", "orthogonal", "swish",
       "torch.optim.SGD", "torch.optim.AdamW", "torch.optim.LBFGS", "torch.optim.RMSprop",
       "torch.optim.lr_scheduler.StepLR", "os.system", "", " ", "${trainer.epochs}", "${nope}"}
)  # fmt: skip
# Printable text without quote and backslash, so that it fits in a quoted Hydra value.
TEXT = st.text(
    st.characters(exclude_categories=("Cs", "Cc"), exclude_characters="'\\"), max_size=20
)


def leaf_keys(node: DictConfig, prefix: str = "") -> dict[str, str]:
    """Map every leaf key under `node` to its schema type: int, float, str, bool or list."""
    kinds = {IntegerNode: "int", FloatNode: "float", StringNode: "str", BooleanNode: "bool"}
    keys = {}
    for key in node:
        child = node._get_node(key)
        full_key = f"{prefix}{key}"
        if isinstance(child, DictConfig):
            keys.update(leaf_keys(child, f"{full_key}."))
        elif isinstance(child, ListConfig):
            element = child._metadata.element_type
            keys[full_key] = "float list" if element is float else "int list"
        elif type(child) in kinds:
            keys[full_key] = kinds[type(child)]
    return keys


def quoted(text: str) -> str:
    return f"'{text}'"


def near(default) -> list:
    """Return valid-looking values around a numeric default: itself, doubled, halved."""
    if isinstance(default, bool) or not isinstance(default, (int, float)):
        return []
    if isinstance(default, int):
        return [default, default + 1, default * 2, max(default // 2, 1)]
    return [default, default * 2, default / 2, default * 0.9]


def value_strategy(kind: str, key: str, default, tmp_dir: Path) -> st.SearchStrategy[str]:
    """Draw an override value for a key of schema type `kind`, as Hydra's grammar writes it.

    About a third of the draws stay near the key's `default`, so that many examples train.
    """
    wrong = st.sampled_from(WRONG_TYPES)
    nearby = near(default)
    if key.split(".")[-1].endswith(PATH_SUFFIXES):
        return st.sampled_from([str(tmp_dir / "missing"), str(tmp_dir / "a b")])
    if kind == "int":
        edge = st.one_of(st.sampled_from(INTS), st.integers(-5, 300)).map(str)
        valid = [st.sampled_from(nearby).map(str)] if nearby else []
        return st.one_of(*valid, edge, wrong)
    if kind == "float":
        finite = st.floats(allow_nan=False, allow_infinity=False).map(repr)
        edge = st.one_of(st.sampled_from(FLOATS), finite)
        valid = [st.sampled_from(nearby).map(repr)] if nearby else []
        return st.one_of(*valid, edge, wrong)
    if kind == "str":
        valid = st.just(quoted(default)) if isinstance(default, str) else st.sampled_from(NAMES)
        edge = st.one_of(st.sampled_from(NAMES).map(quoted), TEXT.map(quoted))
        return st.one_of(valid, edge, wrong)
    if kind == "bool":
        return st.one_of(st.sampled_from(["true", "false"]), wrong)
    element_kind = kind.split()[0]
    first = default[0] if default else 1
    element = value_strategy(element_kind, key, first, tmp_dir)
    valid = st.just(f"[{','.join(map(str, default or []))}]")
    items = st.lists(element, max_size=4).map(lambda values: f"[{','.join(values)}]")
    return st.one_of(valid, items, wrong)


@st.composite
def group_option(draw, options: list[str], default: str) -> str:
    """Draw a config group option: mostly the default, rarely one that does not exist."""
    pick = draw(st.integers(0, 99))
    if pick < 50:
        return default
    if pick < 96:
        return draw(st.sampled_from(options))
    return "no_such_option"


@st.composite
def fuzzed_overrides(draw, tmp_dir: Path, image_folder: Path) -> list[str]:
    """Draw group options, then new values for one to three of the composed config's keys."""
    defaults = {"dataset": "digits", "model": "mlp", "activation": "relu", "optimizer": "adam"}
    choices = {
        group: draw(group_option(options, defaults[group]), label=group)
        for group, options in GROUPS.items()
    }
    overrides = dict(choices)
    overrides.update(TINY)
    overrides.update(TINY_BY_OPTION.get(choices["dataset"], {}))
    overrides.update(TINY_BY_OPTION.get(choices["model"], {}))
    if choices["dataset"] == "image_folder":
        overrides.update({"dataset.root": str(image_folder), "dataset.image_size": "8"})
    elif choices["dataset"] in ("mnist", "fashion_mnist", "kmnist", "cifar10"):
        overrides["dataset.root"] = str(tmp_dir / "no_files")
    try:
        base = compose_config([f"{key}={value}" for key, value in overrides.items()])
    except HydraException:
        return [f"{key}={value}" for key, value in overrides.items()]  # an unknown option

    keys = {key: kind for key, kind in leaf_keys(base).items() if key not in FIXED_KEYS}
    chosen = draw(st.lists(st.sampled_from(sorted(keys)), min_size=1, max_size=3, unique=True))
    for key in chosen:
        default = OmegaConf.select(base, key)
        if isinstance(default, ListConfig):
            default = list(default)
        overrides[key] = draw(value_strategy(keys[key], key, default, tmp_dir), label=key)
    return [f"{key}={value}" for key, value in overrides.items()]


def too_large_to_train(cfg: DictConfig) -> bool:
    """Return True for a valid config whose run would take more than a few seconds."""
    images = dataset_image_count(cfg.dataset) or 0
    memory = estimate_memory(cfg)
    return (
        cfg.trainer.epochs > 3
        or images > 2000
        or cfg.dataset.get("image_size", 28) > 64
        or memory["parameters"] > 16 * 2_000_000
        or memory["activations"] > 2**28
    )


def all_runs(client: MlflowClient) -> list:
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments, max_results=50_000) if experiments else []


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """Two classes of seven random 8x8 greyscale PNG images."""
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    generator = torch.Generator().manual_seed(0)
    for label in ("a", "b"):
        (root / label).mkdir()
        for index in range(7):
            pixels = torch.randint(0, 256, (8, 8), generator=generator, dtype=torch.uint8)
            Image.fromarray(pixels.numpy()).save(root / label / f"{index}.png")
    return root


@pytest.fixture(scope="module")
def fuzz_store(tmp_path_factory) -> tuple[Path, str]:
    folder = tmp_path_factory.mktemp("fuzz")
    return folder, f"sqlite:///{folder}/mlflow.db"


def check_example(overrides: list[str], tracking_uri: str, tmp_dir: Path) -> None:
    """Compose and train one example in this process; fail on anything but a clean outcome."""
    note(f"overrides: {' '.join(overrides)}")
    try:
        cfg = compose_config([*overrides, f"tracking.uri={tracking_uri}"])
    except HydraException as err:
        event(f"Hydra rejected it: {type(err).__name__}")
        return

    client = MlflowClient(tracking_uri)
    runs_before = {run.info.run_id for run in all_runs(client)}
    message = ""
    try:
        validate(cfg)
        if too_large_to_train(cfg):
            event("valid, too large to train here")
            return
        train(cfg, JobInfo(run_name="fuzz", overrides=overrides))
        outcome = "trained"
    except UserError as err:
        message = f"{type(err).__name__}: {err}"
        note(message)
        outcome = f"rejected: {type(err).__name__}"
    except Divergence:
        outcome = "diverged"
    event(outcome)

    new_runs = [run for run in all_runs(client) if run.info.run_id not in runs_before]
    statuses = [run.info.status for run in new_runs]
    note(f"new runs: {statuses}")
    assert mlflow.active_run() is None, "train() left an active MLflow run"
    assert "RUNNING" not in statuses, "a run was left RUNNING"
    if outcome == "trained":
        assert statuses == ["FINISHED"]
    elif outcome == "diverged":
        assert statuses == ["FAILED"]
        assert "divergence" in new_runs[0].data.tags
    elif "dataset=image_folder" in overrides and statuses == ["FAILED"]:
        # NOTE: only an image folder's files tell its size, so the training loop, inside
        # the run, is what rejects a batch size that leaves batch norm a single image.
        assert "batch norm cannot normalise" in message
    else:
        assert statuses == [], "a run was created for a config that failed validation"


FUZZ_SETTINGS = dict(
    deadline=None,
    database=None,  # no .hypothesis folder in the repository
    suppress_health_check=[HealthCheck.too_slow],
)
# An example takes up to seconds, so shrinking a failure could take an hour: report it as drawn.
NO_SHRINKING = [Phase.explicit, Phase.reuse, Phase.generate]
EXAMPLE_NUMBERS = itertools.count()


def fuzz_in_process(data, image_folder: Path, fuzz_store: tuple[Path, str]) -> None:
    folder, tracking_uri = fuzz_store
    tmp_dir = folder / f"example{next(EXAMPLE_NUMBERS)}"
    overrides = data.draw(fuzzed_overrides(tmp_dir, image_folder), label="overrides")
    overrides.append(f"checkpoint.dir={tmp_dir}/checkpoints")
    threads = torch.get_num_threads()
    try:
        check_example(overrides, tracking_uri, tmp_dir)
    finally:
        torch.set_num_threads(threads)  # a fuzzed trainer.num_threads sets it per process


@settings(max_examples=25, derandomize=True, phases=NO_SHRINKING, **FUZZ_SETTINGS)
@given(data=st.data())
def test_fuzz_config_in_process(data, image_folder, fuzz_store):
    fuzz_in_process(data, image_folder, fuzz_store)


@pytest.mark.slow
@settings(max_examples=150, derandomize=True, phases=NO_SHRINKING, **FUZZ_SETTINGS)
@given(data=st.data())
def test_fuzz_config_in_process_long(data, image_folder, fuzz_store):
    fuzz_in_process(data, image_folder, fuzz_store)


def run_cli(overrides: list[str], tmp_dir: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    for name in ("MLFLOW_TRACKING_URI", "HYDRA_FULL_ERROR"):
        env.pop(name, None)
    isolated = [
        f"hydra.run.dir={tmp_dir}/run",
        f"tracking.uri=sqlite:///{tmp_dir}/mlflow.db",
        f"checkpoint.dir={tmp_dir}/checkpoints",
    ]
    return subprocess.run(
        [sys.executable, "-m", "src.train", *overrides, *isolated],
        cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def fuzz_cli(data, image_folder: Path, folder: Path) -> None:
    tmp_dir = folder / f"example{next(EXAMPLE_NUMBERS)}"
    overrides = data.draw(fuzzed_overrides(tmp_dir, image_folder), label="overrides")
    result = run_cli(overrides, tmp_dir)
    output = result.stdout + result.stderr
    note(output[-3000:])
    event(f"exit status {result.returncode}")
    assert result.returncode in (0, 1)
    assert "Traceback" not in output
    if not (tmp_dir / "mlflow.db").exists():
        return
    runs = all_runs(MlflowClient(f"sqlite:///{tmp_dir}/mlflow.db"))
    assert all(run.info.status != "RUNNING" for run in runs)
    if "Invalid config value" in output and "batch norm" not in output:
        assert runs == [], "a run was created for a config that failed validation"


@pytest.fixture(scope="module")
def cli_folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz_cli")


@settings(max_examples=3, derandomize=True, phases=NO_SHRINKING, **FUZZ_SETTINGS)
@given(data=st.data())
def test_fuzz_config_cli(data, image_folder, cli_folder):
    fuzz_cli(data, image_folder, cli_folder)


@pytest.mark.slow
@settings(max_examples=10, derandomize=True, phases=NO_SHRINKING, **FUZZ_SETTINGS)
@given(data=st.data())
def test_fuzz_config_cli_long(data, image_folder, cli_folder):
    fuzz_cli(data, image_folder, cli_folder)
