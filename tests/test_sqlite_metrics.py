"""Plain-SQL metric writes leave what MLflow's own log_batch leaves, on a real SQLite store."""

from __future__ import annotations

import math
import sqlite3

import pytest
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from src.sqlite_metrics import RunNotActiveError, database_path, open_store
from src.tracking import Tracker


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    MlflowClient(uri).create_experiment("direct", artifact_location=str(folder / "artifacts"))
    return uri


@pytest.fixture
def client(tracking_uri) -> MlflowClient:
    return MlflowClient(tracking_uri)


def new_run(client: MlflowClient) -> str:
    experiment = client.get_experiment_by_name("direct")
    return client.create_run(experiment.experiment_id).info.run_id


# Values that exercise MLflow's rules: NaN, infinities, an exact duplicate, two values at
# one step, a later step with a smaller timestamp, and keys logged in several batches.
BATCHES = [
    [
        Metric("train/loss", 2.5, 1000, 1),
        Metric("train/loss", 2.4, 1001, 2),
        Metric("grad_mean/fc1", float("nan"), 1000, 1),
        Metric("grad_norm/fc1", float("inf"), 1000, 1),
        Metric("grad_norm/fc2", float("-inf"), 1000, 1),
    ],
    [
        Metric("train/loss", 2.4, 1001, 2),  # the same row again: stored once
        Metric("train/loss", 2.3, 1001, 2),  # another value at the same step and time
        Metric("train/loss", 2.2, 900, 3),  # a later step with an earlier timestamp
        Metric("grad_mean/fc1", 0.5, 1002, 2),
        Metric("grad_norm/fc1", 1.0, 999, 1),  # older than the infinity already stored
    ],
]


def rows(uri: str, run_id: str) -> tuple[list[tuple], list[tuple]]:
    """Return the run's rows of ``metrics`` and ``latest_metrics``, sorted."""
    with sqlite3.connect(database_path(uri)) as db:
        columns = "key, value, timestamp, step, is_nan"
        where = "WHERE run_uuid = ? ORDER BY key, step, timestamp, value"
        history = db.execute(f"SELECT {columns} FROM metrics {where}", (run_id,)).fetchall()
        latest = db.execute(f"SELECT {columns} FROM latest_metrics {where}", (run_id,)).fetchall()
    return history, latest


def test_same_rows_as_log_batch(tracking_uri, client):
    by_mlflow, by_sql = new_run(client), new_run(client)
    store = open_store(tracking_uri)
    assert store is not None
    for batch in BATCHES:
        client.log_batch(by_mlflow, metrics=batch)
        store.log(by_sql, batch)
    assert rows(tracking_uri, by_sql) == rows(tracking_uri, by_mlflow)
    assert client.get_run(by_sql).data.metrics == client.get_run(by_mlflow).data.metrics
    history = client.get_metric_history(by_sql, "grad_mean/fc1")
    assert math.isnan(history[0].value)


def test_resending_changes_nothing(tracking_uri, client):
    run_id = new_run(client)
    store = open_store(tracking_uri)
    for batch in BATCHES:
        store.log(run_id, batch)
    before = rows(tracking_uri, run_id)
    for batch in BATCHES:
        store.log(run_id, batch)
    assert rows(tracking_uri, run_id) == before


def test_deleted_run_refused_and_nothing_stored(tracking_uri, client):
    run_id = new_run(client)
    client.delete_run(run_id)
    store = open_store(tracking_uri)
    with pytest.raises(RunNotActiveError, match=f"{run_id} must be in the 'active' state"):
        store.log(run_id, BATCHES[0])
    assert rows(tracking_uri, run_id) == ([], [])


def test_missing_run_refused(tracking_uri):
    store = open_store(tracking_uri)
    with pytest.raises(RunNotActiveError, match="not found"):
        store.log("0" * 32, BATCHES[0])


def test_unknown_schema_falls_back_to_mlflow(tmp_path, caplog):
    path = tmp_path / "mlflow.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE metrics (key TEXT, value REAL, model_id TEXT)")
        db.execute("CREATE TABLE latest_metrics (key TEXT, value REAL)")
    with caplog.at_level("INFO", logger="src.sqlite_metrics"):
        assert open_store(f"sqlite:///{path}") is None
    assert "not the schema this tool writes directly" in caplog.text


@pytest.mark.parametrize(
    "uri",
    ["http://127.0.0.1:5000", "sqlite://", "sqlite:///:memory:", "sqlite:////tmp/x.db?mode=ro"],
)
def test_other_uris_not_written_directly(uri):
    assert open_store(uri) is None


def test_tracker_writes_directly(tracking_uri, client):
    run_id = new_run(client)
    tracker = Tracker(client, run_id, tracking_uri)
    assert tracker.direct is not None
    tracker.log_metrics(BATCHES[0])
    assert len(client.get_metric_history(run_id, "train/loss")) == 2
