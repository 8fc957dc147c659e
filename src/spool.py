"""A run's tracking data that did not reach its MLflow server, kept on disk until it does.

When a tracking server stops responding, :class:`src.tracking.Tracker` appends every
operation it cannot send (params, metrics, tags, artifact files, images, the run's
final status) to the run's spool, a folder ``<tracking.spool_dir>/<run id>`` with

- ``spool.json``: the run id and the server's URI, without credentials;
- ``operations.jsonl``: one operation a line, in the order the run made them;
- ``progress.jsonl``: one line each time an operation is attempted, sent or given up;
- ``files/<seq>/``: the files of operation ``seq`` (artifacts and images).

Each line is flushed and synced to disk before the call returns, so a crash loses at
most the line it was writing, which the reader then ignores. A process that uses a
spool holds an exclusive lock on it (``flock``), so a job and a replay never send the
same spool at once.

:func:`replay_spool` sends what is left, in order, and is safe to run twice or after
a partial replay. Sent operations are skipped. Before an operation that may have
reached the server without its response coming back is sent again, the metric values
already stored for its keys and steps are left out. The command line replays spools::

    python -m src.spool [PATH ...]   # default: every spool under <project root>/spool
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from src.config import UserError
from src.tracking import (
    DEFAULT_SPOOL_DIR,
    MAX_METRICS_PER_BATCH,
    SERVER_SCHEMES,
    TrackingServerError,
    check_server,
    is_connection_error,
    redact_credentials,
    redact_uri,
)

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
META_FILE = "spool.json"
OPERATIONS_FILE = "operations.jsonl"
PROGRESS_FILE = "progress.jsonl"
FILES_DIR = "files"
LOCK_FILE = "lock"
REPLAY_COMMAND = "python -m src.spool"
IMAGE_FILE = "image.png"

# States of an operation in progress.jsonl. An operation without a state was never tried.
ATTEMPTED = "attempted"  # a send started; the server may have stored it
SENT = "sent"
SKIPPED = "skipped"  # not sent, on purpose: a final status that a later one replaced
REJECTED = "rejected"  # the server returned an error response; the operation stays in the spool
FINISHED_STATES = (SENT, SKIPPED, REJECTED)

# The "data" of an operation, by kind:
#   params:    {"params": [[key, value], ...]}
#   metrics:   {"metrics": [[key, value, timestamp_ms, step], ...]}
#   tags:      {"tags": [[key, value], ...]}
#   artifacts: {"artifact_path": folder or null, "description": text}, files in files/<seq>/
#   image:     {"key": key, "step": step, "timestamp": timestamp_ms}, files/<seq>/image.png
#   status:    {"status": "FINISHED" | "FAILED" | "KILLED", "end_time": ms}
KINDS = ("params", "metrics", "tags", "artifacts", "image", "status")


class SpoolError(UserError, ValueError):
    """A spool that cannot be used: not found, unreadable, locked, or without a usable URI."""


@dataclass
class Operation:
    """One tracking call of a run, as the spool stores it."""

    seq: int  # position in operations.jsonl, from 0
    kind: str  # one of KINDS
    data: dict[str, Any]


@dataclass
class Contents:
    """Counts of what a list of operations contains, for messages."""

    operations: int = 0
    metric_values: int = 0
    params: int = 0
    tags: int = 0
    files: int = 0
    status: str | None = None  # the last final status among them

    def add(self, operation: Operation, files: int = 0) -> None:
        self.operations += 1
        data = operation.data
        if operation.kind == "metrics":
            self.metric_values += len(data["metrics"])
        elif operation.kind == "params":
            self.params += len(data["params"])
        elif operation.kind == "tags":
            self.tags += len(data["tags"])
        elif operation.kind == "status":
            self.status = data["status"]
        self.files += files

    def describe(self) -> str:
        """Return e.g. ``3 operations (2400 metric values, 5 files, final status FINISHED)``."""
        parts = [
            _count(count, noun)
            for count, noun in [
                (self.metric_values, "metric value"),
                (self.params, "param"),
                (self.tags, "tag"),
                (self.files, "file"),
            ]
            if count
        ]
        if self.status:
            parts.append(f"final status {self.status}")
        details = f" ({', '.join(parts)})" if parts else ""
        return f"{_count(self.operations, 'operation')}{details}"


def _count(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _write_line(path: Path, record: dict[str, Any]) -> None:
    """Append `record` as one JSON line and sync it to disk before returning."""
    line = json.dumps(record, separators=(",", ":")) + "\n"
    with open(path, "a", encoding="utf-8") as file:
        file.write(line)
        file.flush()
        os.fsync(file.fileno())


def _read_lines(path: Path) -> list[dict[str, Any]]:
    """Read a JSON-lines file; a last line cut short by a crash is left out with a warning."""
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if number == len(lines) and not line.endswith("\n"):
                log.warning("Ignoring the incomplete last line %d of %s", number, path)
                break
            raise SpoolError(f"Spool file {path} is corrupt at line {number}: {err}") from None
    return records


class Spool:
    """The operations of one run that its server has not taken yet, in a folder on disk.

    Create a new one with :meth:`create`, read an existing one with :meth:`open`.
    Both hold the folder's lock until :meth:`unlock` or the end of the process.
    """

    def __init__(self, folder: Path, meta: dict[str, Any]):
        self.folder = folder
        self.meta = meta
        self.operations: list[Operation] = []
        self.states: dict[int, str] = {}  # seq -> last state in progress.jsonl
        self._lock_fd: int | None = None

    @property
    def run_id(self) -> str:
        return self.meta["run_id"]

    @property
    def tracking_uri(self) -> str:
        """The server's URI as the run used it, with ``***`` in place of credentials."""
        return self.meta["tracking_uri"]

    @classmethod
    def create(cls, folder: Path, run_id: str, tracking_uri: str) -> Spool:
        """Create an empty spool for run `run_id` in the new or empty folder `folder`, locked."""
        folder.mkdir(parents=True, exist_ok=True)
        if (folder / META_FILE).exists():
            raise SpoolError(f"Spool folder {folder} contains a spool already")
        meta = {
            "format": FORMAT_VERSION,
            "run_id": run_id,
            "tracking_uri": redact_uri(tracking_uri),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "host": os.uname().nodename,
            "pid": os.getpid(),
        }
        spool = cls(folder, meta)
        spool.lock()
        temporary = folder / f"{META_FILE}.tmp"
        temporary.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        os.replace(temporary, folder / META_FILE)  # a reader never sees half a file
        return spool

    @classmethod
    def open(cls, folder: Path, lock: bool = True) -> Spool:
        """Read the spool in `folder`, and lock it unless `lock` is false."""
        meta_path = folder / META_FILE
        if not meta_path.is_file():
            raise SpoolError(f"Not a spool: {meta_path} not found")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise SpoolError(f"Spool file {meta_path} is unreadable: {err}") from None
        if meta.get("format") != FORMAT_VERSION:
            raise SpoolError(
                f"Spool {folder} has format {meta.get('format')!r}; this version reads "
                f"format {FORMAT_VERSION} only"
            )
        spool = cls(folder, meta)
        if lock:
            spool.lock()
        spool._load()
        return spool

    def _load(self) -> None:
        self.operations = [
            Operation(record["seq"], record["kind"], record["data"])
            for record in _read_lines(self.folder / OPERATIONS_FILE)
        ]
        for expected, operation in enumerate(self.operations):
            if operation.seq != expected or operation.kind not in KINDS:
                raise SpoolError(
                    f"Spool file {self.folder / OPERATIONS_FILE} is corrupt: operation "
                    f"{expected} is {operation.seq}/{operation.kind!r}"
                )
        self.states = {}
        for record in _read_lines(self.folder / PROGRESS_FILE):
            self.states[record["seq"]] = record["state"]

    def lock(self) -> None:
        """Take the spool's exclusive lock, or raise SpoolError if another process holds it."""
        if self._lock_fd is not None:
            return
        fd = os.open(self.folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SpoolError(
                f"Spool {self.folder} is in use by another process (a running job or replay). "
                "Wait until it ends, then replay again."
            ) from None
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    def append(
        self, kind: str, data: dict[str, Any], write_files: Callable[[Path], None] | None = None
    ) -> Operation:
        """Add an operation at the end; `write_files` puts its files into the folder it gets."""
        operation = Operation(len(self.operations), kind, data)
        if write_files is not None:
            target = self.files_of(operation)
            target.mkdir(parents=True, exist_ok=True)
            write_files(target)
        # The line is written last: files without a line are never sent, never half of them.
        _write_line(
            self.folder / OPERATIONS_FILE, {"seq": operation.seq, "kind": kind, "data": data}
        )
        self.operations.append(operation)
        return operation

    def mark(self, operation: Operation, state: str, detail: str | None = None) -> None:
        record: dict[str, Any] = {"seq": operation.seq, "state": state, "time": time.time()}
        if detail:
            record["detail"] = detail
        _write_line(self.folder / PROGRESS_FILE, record)
        self.states[operation.seq] = state

    def files_of(self, operation: Operation) -> Path:
        return self.folder / FILES_DIR / str(operation.seq)

    def count_files(self, operation: Operation) -> int:
        folder = self.files_of(operation)
        return sum(1 for path in folder.rglob("*") if path.is_file()) if folder.is_dir() else 0

    def pending(self) -> list[Operation]:
        """Return the operations not sent, skipped or rejected yet, in order."""
        return [op for op in self.operations if self.states.get(op.seq) not in FINISHED_STATES]

    def has_pending(self) -> bool:
        return any(self.states.get(op.seq) not in FINISHED_STATES for op in self.operations)

    def rejected(self) -> list[Operation]:
        return [op for op in self.operations if self.states.get(op.seq) == REJECTED]

    def contents(self, operations: list[Operation]) -> Contents:
        contents = Contents()
        for operation in operations:
            contents.add(operation, self.count_files(operation))
        return contents

    def skip_final_status(self, reason: str) -> int:
        """Mark every pending final status as skipped, and return how many there were.

        A run that is reopened to resume it is RUNNING again, so the status that an
        earlier attempt could not send must not end it.
        """
        statuses = [op for op in self.pending() if op.kind == "status"]
        for operation in statuses:
            self.mark(operation, SKIPPED, reason)
        return len(statuses)

    def remove(self) -> None:
        """Delete the spool folder; call it only when every operation was sent."""
        self.unlock()
        shutil.rmtree(self.folder)


# ---------------------------------------------------------------------------
# Sending spooled operations


def _unstored_metric_rows(client: MlflowClient, run_id: str, rows: list[list]) -> list[list]:
    """Return the rows of `rows` whose key has no value stored at their step yet."""
    stored = {
        key: {metric.step for metric in client.get_metric_history(run_id, key)}
        for key in {row[0] for row in rows}
    }
    return [row for row in rows if row[3] not in stored[row[0]]]


def _image_stored(client: MlflowClient, run_id: str, data: dict[str, Any]) -> bool:
    """Tell whether an image with this key, step and timestamp is among the run's artifacts.

    MLflow names a stepped image ``images/<key>+step+<step>+timestamp+<ms>+<uuid>.png``,
    with ``/`` in the key replaced by ``~``.
    """
    prefix = f"{data['key'].replace('/', '~')}+step+{data['step']}+timestamp+{data['timestamp']}+"
    names = [Path(info.path).name for info in client.list_artifacts(run_id, "images")]
    return any(name.startswith(prefix) and name.endswith(".png") for name in names)


def send_operation(
    client: MlflowClient, spool: Spool, operation: Operation, uncertain: bool
) -> tuple[str, int]:
    """Send one spooled operation to the run; return its new state and the values left out.

    With `uncertain` (an earlier send may have reached the server), metric values and
    images that the server already stores are left out. A final status is skipped when
    the run on the server ended later than it, after a resumed attempt of the job.
    Raises MlflowException (or a requests error) when the server fails or rejects it.
    """
    run_id, data = spool.run_id, operation.data
    if operation.kind == "metrics":
        rows = data["metrics"]
        unstored = _unstored_metric_rows(client, run_id, rows) if uncertain else rows
        metrics = [Metric(key, value, timestamp, step) for key, value, timestamp, step in unstored]
        for start in range(0, len(metrics), MAX_METRICS_PER_BATCH):
            chunk = metrics[start : start + MAX_METRICS_PER_BATCH]
            client.log_batch(run_id, metrics=chunk, synchronous=True)
        return SENT, len(rows) - len(unstored)
    if operation.kind == "params":
        client.log_batch(run_id, params=[Param(key, value) for key, value in data["params"]])
    elif operation.kind == "tags":
        client.log_batch(run_id, tags=[RunTag(key, value) for key, value in data["tags"]])
    elif operation.kind == "artifacts":
        client.log_artifacts(run_id, str(spool.files_of(operation)), data["artifact_path"])
    elif operation.kind == "image":
        if uncertain and _image_stored(client, run_id, data):
            return SENT, 0
        from PIL import Image

        with Image.open(spool.files_of(operation) / IMAGE_FILE) as image:
            image.load()
            client.log_image(
                run_id, image, key=data["key"], step=data["step"],
                timestamp=data["timestamp"], synchronous=True,
            )  # fmt: skip
    elif operation.kind == "status":
        end_time = client.get_run(run_id).info.end_time
        if end_time is not None and end_time > data["end_time"]:
            log.info(
                "Not sending final status %s of run %s: the run ended later on the server",
                data["status"], run_id,
            )  # fmt: skip
            return SKIPPED, 0
        client.set_terminated(run_id, data["status"], end_time=data["end_time"])
    return SENT, 0


@dataclass
class SendResult:
    """Outcome of one pass over a spool's pending operations."""

    sent: Contents = field(default_factory=Contents)
    skipped_values: int = 0  # metric values left out because the server had them already
    rejected: int = 0  # operations the server rejected in this pass
    error: str | None = None  # the connection failure that stopped the pass, if any


def send_pending(spool: Spool, client: MlflowClient) -> SendResult:
    """Send the spool's pending operations in order, until done or the connection fails.

    Each operation is marked attempted before its request and sent after it, so a
    crash in between leaves it uncertain, and the next pass compares first. An
    operation that the server rejects is marked rejected, logged, and passed over.
    """
    result = SendResult()
    for operation in spool.pending():
        uncertain = spool.states.get(operation.seq) == ATTEMPTED
        if not uncertain:
            spool.mark(operation, ATTEMPTED)
        try:
            state, skipped = send_operation(client, spool, operation, uncertain)
        except (MlflowException, requests.RequestException) as err:
            message = redact_credentials(str(err))
            if is_connection_error(err):
                result.error = message
                return result
            spool.mark(operation, REJECTED, message)
            result.rejected += 1
            log.error(
                "The MLflow tracking server at %s rejected operation %d (%s) of run %s, "
                "which stays in spool %s: %s",
                redact_uri(client.tracking_uri), operation.seq, operation.kind, spool.run_id,
                spool.folder, message,
            )  # fmt: skip
            continue
        spool.mark(operation, state)
        result.skipped_values += skipped
        if state == SENT:
            result.sent.add(operation, spool.count_files(operation))
    return result


# ---------------------------------------------------------------------------
# Replay


@dataclass
class ReplayResult:
    """Outcome of :func:`replay_spool`: what it sent, and what is still in the spool."""

    path: Path
    run_id: str
    tracking_uri: str  # without credentials
    sent: Contents
    skipped_values: int  # metric values left out because the server had them already
    left: Contents  # operations still pending
    rejected: int  # operations the server rejected, in this replay or an earlier one
    error: str | None = None  # why sending stopped early, if it did

    @property
    def complete(self) -> bool:
        """True when every operation of the spool reached the server."""
        return self.left.operations == 0 and self.rejected == 0

    def summary(self) -> str:
        """Return one line for the command's output."""
        line = (
            f"{self.path}: sent {self.sent.describe()} to run {self.run_id} at {self.tracking_uri}"
        )
        if self.skipped_values:
            line += f", left out {self.skipped_values} metric values the server had already"
        if self.complete:
            return line + "; nothing left to send"
        if self.left.operations:
            line += f"; {self.left.describe()} left"
        if self.rejected:
            line += f"; {self.rejected} rejected by the server (see {PROGRESS_FILE})"
        if self.error:
            line += f": {self.error}"
        return line


def _replay_uri(spool: Spool, tracking_uri: str | None) -> str:
    """Return the URI to replay `spool` to: `tracking_uri`, else the one the run used.

    The spool stores that URI without credentials. When it had some, the full URI must
    come from `tracking_uri` or from ``$MLFLOW_TRACKING_URI`` naming the same server.
    """
    if tracking_uri:
        return tracking_uri
    recorded = spool.tracking_uri
    if "***@" not in recorded:
        return recorded
    environment = os.environ.get("MLFLOW_TRACKING_URI")
    if environment and redact_uri(environment) == recorded:
        return environment
    raise SpoolError(
        f"Spool {spool.folder} names the server {recorded} without its credentials. "
        "Pass the full URI with --tracking-uri, or set MLFLOW_TRACKING_URI to it."
    )


def replay_spool(
    path: Path | str, tracking_uri: str | None = None, health_check_timeout: float = 5.0
) -> ReplayResult:
    """Send the pending operations of spool `path` to its run, in order, and return the outcome.

    The server is the one the run used, or `tracking_uri`. A server that does not
    respond to ``GET /health`` within `health_check_timeout` seconds, or that fails midway,
    leaves the rest pending, and the result gives the reason. Raises SpoolError for a folder
    that is not a spool, a spool in use by another process, or a run the server
    does not have.
    """
    spool = Spool.open(Path(path))
    try:
        uri = _replay_uri(spool, tracking_uri)
        result = ReplayResult(
            path=spool.folder,
            run_id=spool.run_id,
            tracking_uri=redact_uri(uri),
            sent=Contents(),
            skipped_values=0,
            left=spool.contents(spool.pending()),
            rejected=len(spool.rejected()),
        )
        if not result.left.operations:
            return result
        if uri.startswith(SERVER_SCHEMES):
            try:
                check_server(uri, health_check_timeout)
            except TrackingServerError as err:
                result.error = str(err)
                return result
        client = MlflowClient(uri)
        _check_run_exists(client, spool, uri)
        _forget_artifact_repository(spool.run_id)
        log.info(
            "Replaying %s from %s to run %s at %s",
            result.left.describe(), spool.folder, spool.run_id, result.tracking_uri,
        )  # fmt: skip
        outcome = send_pending(spool, client)
        result.sent = outcome.sent
        result.skipped_values = outcome.skipped_values
        result.left = spool.contents(spool.pending())
        result.rejected = len(spool.rejected())
        result.error = outcome.error
        return result
    finally:
        spool.unlock()


def _forget_artifact_repository(run_id: str) -> None:
    """Drop MLflow's cached artifact repository of run `run_id`, which names a server.

    NOTE: MLflow 3.17 caches one artifact repository per run id for the whole process
    (``mlflow.tracking._tracking_service.utils._artifact_repos_cache``), whatever the
    client's URI. A replay to another URI than the run used in this process would
    upload its files to the old server without this.
    """
    from mlflow.tracking._tracking_service import utils

    cache = getattr(utils, "_artifact_repos_cache", None)
    if cache is not None:
        cache.pop(run_id, None)


def _check_run_exists(client: MlflowClient, spool: Spool, uri: str) -> None:
    try:
        client.get_run(spool.run_id)
    except MlflowException as err:
        if is_connection_error(err) or err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise SpoolError(
            f"Run {spool.run_id} of spool {spool.folder} not found at {redact_uri(uri)}. "
            "Pass the server that holds the run with --tracking-uri."
        ) from None


def find_spools(root: Path | str) -> list[Path]:
    """Return the spool folders at or under `root`, sorted; none if `root` does not exist."""
    root = Path(root)
    if (root / META_FILE).is_file():
        return [root]
    if not root.is_dir():
        return []
    return sorted(path.parent for path in root.rglob(META_FILE))


# ---------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=REPLAY_COMMAND,
        description=(
            "Send the tracking data that runs kept in spools while their MLflow tracking "
            "server was unreachable: metrics with their steps and timestamps, params, tags, "
            "artifacts and the final run status, in the order the run made them. Safe to "
            "run again: what reached the server is not sent twice. Exits with status 1 "
            "when anything is still unsent."
        ),
    )
    parser.add_argument(
        "paths",
        metavar="PATH",
        nargs="*",
        type=Path,
        help=f"a spool folder, or a folder to search for spools (default: {DEFAULT_SPOOL_DIR})",
    )
    parser.add_argument(
        "--tracking-uri",
        help="send to this server instead of the one each spool names; needed when the "
        "run's URI carried credentials, which spools do not store",
    )
    parser.add_argument(
        "--remove-sent",
        action="store_true",
        help="delete each spool whose operations all reached the server",
    )
    return parser


def _default_http_limits() -> None:
    """Cap MLflow's HTTP retries as jobs do, unless the environment sets them already."""
    from mlflow.environment_variables import (
        MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR,
        MLFLOW_HTTP_REQUEST_MAX_RETRIES,
        MLFLOW_HTTP_REQUEST_TIMEOUT,
    )

    from src.config import TrackingConfig

    defaults = TrackingConfig()
    os.environ.setdefault(MLFLOW_HTTP_REQUEST_TIMEOUT.name, str(defaults.http_request_timeout))
    os.environ.setdefault(
        MLFLOW_HTTP_REQUEST_MAX_RETRIES.name, str(defaults.http_request_max_retries)
    )
    os.environ.setdefault(
        MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR.name, str(defaults.http_request_backoff_factor)
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Replay the spools that the arguments name; exit 1 if anything is unsent, 2 on bad input."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S"
    )
    args = build_parser().parse_args(argv)
    roots = args.paths or [DEFAULT_SPOOL_DIR]
    missing = [root for root in args.paths if not root.exists()]
    if missing:
        log.error("Spool path not found: %s", ", ".join(str(root) for root in missing))
        raise SystemExit(2)
    spools = [spool for root in roots for spool in find_spools(root)]
    if not spools:
        print(f"No spools found under {', '.join(str(root) for root in roots)}")
        return

    _default_http_limits()
    unsent = 0
    for folder in spools:
        try:
            result = replay_spool(folder, args.tracking_uri)
        except SpoolError as err:
            log.error("%s", err)
            unsent += 1
            continue
        print(result.summary())
        if not result.complete:
            unsent += 1
        elif args.remove_sent:
            shutil.rmtree(folder)
            print(f"{folder}: removed")
    if unsent:
        log.error(
            "%d of %d spools still hold unsent data; run %s again once the server is up",
            unsent, len(spools), REPLAY_COMMAND,
        )  # fmt: skip
        raise SystemExit(1)


if __name__ == "__main__":
    main()
