"""Everything that talks to MLflow: the store, the run, params, metrics and artifacts."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
from mlflow.entities import Metric as MlflowMetric
from mlflow.entities import Param
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

if TYPE_CHECKING:
    from src.gradients import Metric

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_STORE_DIR = PROJECT_ROOT / "mlruns"
MAX_METRICS_PER_BATCH = 1000  # MLflow's limit for one log_batch call
MAX_PARAMS_PER_BATCH = 100  # MLflow's limit for one log_batch call


def default_tracking_uri(store_dir: Path = DEFAULT_STORE_DIR) -> str:
    """Return the SQLite URI of the local store, ``<store_dir>/mlflow.db``."""
    return f"sqlite:///{(store_dir / 'mlflow.db').resolve()}"


def resolve_tracking_uri(uri: str | None) -> str:
    """Pick the tracking URI: `uri`, else ``$MLFLOW_TRACKING_URI``, else the local store."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


def _local_artifact_root(tracking_uri: str) -> str | None:
    """Return the artifact folder beside a local SQLite store, or None for any other store.

    Without it, MLflow would put a SQLite store's artifacts under ``./mlruns``
    relative to the current folder, and jobs started from elsewhere would scatter them.
    """
    if not tracking_uri.startswith("sqlite:///"):
        return None
    db_path = Path(tracking_uri.removeprefix("sqlite:///"))
    return (db_path.parent / "artifacts").resolve().as_uri()


def get_or_create_experiment(client: MlflowClient, name: str, tracking_uri: str) -> str:
    """Return the id of experiment `name`, creating it if needed; safe against concurrent jobs."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name, artifact_location=_local_artifact_root(tracking_uri))
    except MlflowException:
        # Another job created it between the lookup and the create.
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def flatten_params(cfg: DictConfig | Mapping, prefix: str = "") -> dict[str, str]:
    """Flatten a resolved config into ``{"dotted.key": "value"}``; lists stay whole, as text."""
    container = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    params: dict[str, str] = {}
    for key, value in container.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            params.update(flatten_params(value, prefix=f"{dotted}."))
        else:
            params[dotted] = str(value)
    return params


class Tracker:
    """One MLflow run: buffered metrics, params, figures and files.

    Metrics are sent with ``log_batch`` in chunks of at most 1000, never one call
    per value: per-call logging to SQLite costs about 10 ms a value.
    """

    def __init__(self, client: MlflowClient, run_id: str):
        self.client = client
        self.run_id = run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        items = [Param(key, str(value)) for key, value in params.items()]
        for start in range(0, len(items), MAX_PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=items[start : start + MAX_PARAMS_PER_BATCH])

    def log_metrics(self, metrics: Iterable[Metric]) -> None:
        batch = [MlflowMetric(m.key, m.value, m.timestamp, m.step) for m in metrics]
        for start in range(0, len(batch), MAX_METRICS_PER_BATCH):
            chunk = batch[start : start + MAX_METRICS_PER_BATCH]
            self.client.log_batch(self.run_id, metrics=chunk, synchronous=True)

    def log_figure(self, figure, artifact_file: str) -> None:
        self.client.log_figure(self.run_id, figure, artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_file(self, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_dir(self, path: Path, artifact_path: str) -> None:
        """Log the files inside folder `path` under `artifact_path`."""
        self.client.log_artifacts(self.run_id, str(path), artifact_path)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, str(value))


@contextmanager
def start_run(
    tracking_uri: str,
    experiment_name: str,
    run_name: str,
    tags: Mapping[str, str] | None = None,
    parent_run_id: str | None = None,
) -> Iterator[Tracker]:
    """Open an MLflow run and end it FINISHED, or FAILED (KILLED on Ctrl-C) if the body raises."""
    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri)
    experiment_id = get_or_create_experiment(client, experiment_name, tracking_uri)
    mlflow.set_experiment(experiment_id=experiment_id)
    all_tags = dict(tags or {})
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id

    run = mlflow.start_run(run_name=run_name, tags=all_tags)
    log.info(
        "MLflow run %s (%s) in experiment %r at %s",
        run.info.run_id,
        run_name,
        experiment_name,
        tracking_uri,
    )
    try:
        yield Tracker(client, run.info.run_id)
    except KeyboardInterrupt:
        mlflow.end_run(status="KILLED")
        raise
    except BaseException:
        mlflow.end_run(status="FAILED")
        raise
    else:
        mlflow.end_run(status="FINISHED")
