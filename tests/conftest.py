"""Shared fixtures: the real Hydra config, shrunk, and a temporary SQLite MLflow store."""

from __future__ import annotations

import os
from pathlib import Path

import mlflow
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from src.config import register_schemas
from src.tracking import default_tracking_uri

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = PROJECT_ROOT / "conf"

# Small enough for a run in a few seconds, large enough for every code path:
# 300 images in batches of 128 give 3 iterations an epoch, the last one partial.
TINY_OVERRIDES = [
    "trainer.epochs=2",
    "dataset.train_size=300",
    "dataset.test_size=100",
    "model.hidden_sizes=[32,16,16]",
]

register_schemas()


def compose_config(overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """Compose ``conf/config.yaml`` with Hydra's compose API, as ``python -m src.train`` would."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


@pytest.fixture
def tracking_uri(tmp_path) -> str:
    """A SQLite MLflow store of the test's own, in ``tmp_path/mlruns``."""
    store = tmp_path / "mlruns"
    store.mkdir()
    return default_tracking_uri(store)


@pytest.fixture
def tiny_cfg(tracking_uri) -> DictConfig:
    cfg = compose_config(TINY_OVERRIDES)
    cfg.tracking.uri = tracking_uri
    return cfg


@pytest.fixture(autouse=True, scope="session")
def checkpoint_dir(tmp_path_factory):
    """Keep every test's checkpoints, in-process and in subprocesses, out of the project."""
    folder = tmp_path_factory.mktemp("checkpoints")
    previous = os.environ.get("VG_CHECKPOINT_DIR")
    os.environ["VG_CHECKPOINT_DIR"] = str(folder)
    yield folder
    if previous is None:
        os.environ.pop("VG_CHECKPOINT_DIR", None)
    else:
        os.environ["VG_CHECKPOINT_DIR"] = previous


@pytest.fixture(autouse=True)
def no_open_mlflow_run():
    """Fail any test that leaves an MLflow run open, and close it for the next test."""
    yield
    run = mlflow.active_run()
    if run is not None:
        mlflow.end_run()
        pytest.fail(f"Test left MLflow run {run.info.run_id} open")
