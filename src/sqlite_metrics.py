"""Store metric values in MLflow's SQLite store with plain SQL, a hundred times faster.

MLflow's ``log_batch`` into SQLite goes through SQLAlchemy's ORM and costs 0.07
to 0.16 ms of Python time a value. A reference run logs about 58,000 values, so
logging took about as long as the training itself. :class:`SqliteMetricStore`
writes the same rows with one ``executemany`` per batch (about 6 µs a value,
most of it inside SQLite, which releases the GIL) and keeps MLflow's semantics:

- a value goes to ``metrics`` unless an identical row (key, value, step,
  timestamp) is already there, as with MLflow's primary key and duplicate
  handling, so resending a batch changes nothing;
- ``latest_metrics`` keeps, per key, the value with the largest (step,
  timestamp, value), as MLflow's ``_update_latest_metrics_if_necessary`` does;
- NaN is stored as 0 with ``is_nan`` set, and infinities as the largest finite
  doubles, as MLflow's ``sanitize_metric_value`` does;
- a run that is deleted or missing is rejected with MLflow's message.

The tables are MLflow's, not a public API. The store is used only when the
columns and primary keys of ``metrics`` and ``latest_metrics`` are exactly the
ones this module writes; otherwise :func:`open_store` returns None, and callers
use ``MlflowClient.log_batch``. ``tests/test_sqlite_metrics.py`` checks that
both ways leave the same rows, on the MLflow version installed.
"""

from __future__ import annotations

import logging
import math
import sqlite3
from collections.abc import Iterable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# The schema this module writes, as PRAGMA table_info reports it: column -> position in the
# primary key (0: not in it). MLflow 3.17, the version tested here, uses exactly these.
EXPECTED_COLUMNS = {
    "metrics": {
        "key": 1, "value": 5, "timestamp": 2, "run_uuid": 4, "step": 3, "is_nan": 6,
    },
    "latest_metrics": {
        "key": 1, "value": 0, "timestamp": 0, "step": 0, "is_nan": 0, "run_uuid": 2,
    },
}  # fmt: skip
MAX_DOUBLE = 1.7976931348623157e308  # what MLflow stores in place of an infinity
BUSY_TIMEOUT_SECONDS = 60.0  # how long a write waits for another process's write to end

_INSERT_VALUES = (
    "INSERT OR IGNORE INTO metrics (key, value, timestamp, step, is_nan, run_uuid) "
    "VALUES (?, ?, ?, ?, ?, ?)"
)
_UPSERT_LATEST = (
    "INSERT INTO latest_metrics (key, value, timestamp, step, is_nan, run_uuid) "
    "VALUES (?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (key, run_uuid) DO UPDATE SET value = excluded.value, "
    "timestamp = excluded.timestamp, step = excluded.step, is_nan = excluded.is_nan "
    "WHERE (excluded.step, excluded.timestamp, excluded.value) "
    "> (latest_metrics.step, latest_metrics.timestamp, latest_metrics.value)"
)


class RunNotActiveError(RuntimeError):
    """The run is deleted or not in the store; MLflow rejects values for it likewise."""


def database_path(tracking_uri: str) -> Path | None:
    """Return the file of a ``sqlite:///`` tracking URI, or None for any other URI.

    In-memory databases and URIs with query parameters return None: this module
    cannot see what MLflow's engine would make of them.
    """
    prefix = "sqlite:///"
    if not tracking_uri.startswith(prefix) or "?" in tracking_uri:
        return None
    path = tracking_uri[len(prefix) :]
    if not path or path == ":memory:":
        return None
    return Path(path)  # sqlite:////abs/file gives "/abs/file"; sqlite:///rel/file a relative path


def open_store(tracking_uri: str) -> SqliteMetricStore | None:
    """Return a store for `tracking_uri` when it is a SQLite file with the known schema.

    Returns None (and logs why at debug level) otherwise, so that the caller keeps
    MLflow's ``log_batch``.
    """
    path = database_path(tracking_uri)
    if path is None or not path.is_file():
        return None
    try:
        store = SqliteMetricStore(path)
    except sqlite3.Error as err:
        log.debug("Metrics go through MLflow's log_batch: cannot open %s: %s", path, err)
        return None
    mismatch = store.schema_mismatch()
    if mismatch is not None:
        store.close()
        log.info(
            "Metrics go through MLflow's log_batch, which is slower: %s in %s is not the "
            "schema this tool writes directly (%s)", path.name, path.parent, mismatch,
        )  # fmt: skip
        return None
    return store


class SqliteMetricStore:
    """Write metric values of MLflow runs into the SQLite database at `path`.

    Each instance has its own connection; use it from one thread at a time.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        # isolation_level=None: transactions are opened and ended by the statements below.
        self._db = sqlite3.connect(
            self.path, timeout=BUSY_TIMEOUT_SECONDS, isolation_level=None, check_same_thread=False
        )

    def close(self) -> None:
        self._db.close()

    def schema_mismatch(self) -> str | None:
        """Describe how the tables differ from EXPECTED_COLUMNS, or return None when they match."""
        for table, expected in EXPECTED_COLUMNS.items():
            rows = self._db.execute(f"PRAGMA table_info({table})").fetchall()
            columns = {row[1]: row[5] for row in rows}  # name -> position in the primary key
            if columns != expected:
                return f"table {table} has columns {columns}, expected {expected}"
        return None

    def log(self, run_id: str, metrics: Iterable[Any]) -> int:
        """Store `metrics` (objects with key, value, step, timestamp) in run `run_id`.

        One transaction: either every value is stored or none. Returns how many
        values were given. Raises RunNotActiveError for a deleted or missing run.
        """
        rows = [_row(m, run_id) for m in metrics]
        if not rows:
            return 0
        latest: dict[str, tuple] = {}
        for row in rows:
            best = latest.get(row[0])
            if best is None or (row[3], row[2], row[1]) > (best[3], best[2], best[1]):
                latest[row[0]] = row
        db = self._db
        db.execute("BEGIN IMMEDIATE")  # take the write lock now, not on the first insert
        try:
            self._check_active(run_id)
            db.executemany(_INSERT_VALUES, rows)
            db.executemany(_UPSERT_LATEST, list(latest.values()))
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        return len(rows)

    def _check_active(self, run_id: str) -> None:
        found = self._db.execute(
            "SELECT lifecycle_stage FROM runs WHERE run_uuid = ?", (run_id,)
        ).fetchone()
        if found is None:
            raise RunNotActiveError(f"Run with id={run_id} not found in {self.path}")
        if found[0] != "active":
            raise RunNotActiveError(
                f"The run {run_id} must be in the 'active' state. Current state is {found[0]}."
            )


def _row(metric: Any, run_id: str) -> tuple:
    value = float(metric.value)
    is_nan = math.isnan(value)
    if is_nan:
        value = 0.0
    elif math.isinf(value):
        value = MAX_DOUBLE if value > 0 else -MAX_DOUBLE
    return (metric.key, value, int(metric.timestamp), int(metric.step), int(is_nan), run_id)
