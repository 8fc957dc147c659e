"""Everything that talks to MLflow: the store, the run, params, metrics and artifacts.

A tracking server (``http(s)://`` URI) gets two guards that a local store does not
need. :func:`connect_tracking` checks that it responds before any work starts and
caps MLflow's HTTP retries, and :class:`Tracker` keeps what a lost server did not
take in a spool on disk (:mod:`src.spool`) until the server responds again.
Credentials inside a URI (``user:password@``) are redacted from the params, tags
and text artifacts that this module sends, and from every log record of a process
that called :func:`connect_tracking`.
"""

from __future__ import annotations

import logging
import math
import os
import platform
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import requests
from mlflow.entities import Metric as MlflowMetric
from mlflow.entities import Param, RunTag
from mlflow.environment_variables import (
    MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR,
    MLFLOW_HTTP_REQUEST_MAX_RETRIES,
    MLFLOW_HTTP_REQUEST_TIMEOUT,
    MLFLOW_RUN_ID,
    MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT,
    MLFLOW_TRACKING_CLIENT_CERT_PATH,
    MLFLOW_TRACKING_INSECURE_TLS,
    MLFLOW_TRACKING_SERVER_CERT_PATH,
)
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from src.config import ConfigError, UserError
from src.sqlite_metrics import database_path, open_store

if TYPE_CHECKING:
    import torch

    from src.gradients import Metric
    from src.spool import Operation, Spool
    from src.writer import MetricWriter

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_STORE_DIR = PROJECT_ROOT / "mlruns"
MAX_METRICS_PER_BATCH = 1000  # MLflow's limit for one log_batch call
MAX_PARAMS_PER_BATCH = 100  # MLflow's limit for one log_batch call
MAX_TAGS_PER_BATCH = 100  # MLflow's limit for one log_batch call
SERVER_SCHEMES = ("http://", "https://")
# MLflow 3 rejects more retries, or a larger backoff factor, than these.
MAX_HTTP_RETRIES = 10
MAX_HTTP_BACKOFF_FACTOR = 120
DEFAULT_SPOOL_DIR = PROJECT_ROOT / "spool"
MAX_SPOOL_WAIT = 86_400  # seconds; one day bounds every spool_* wait

# The userinfo part of any URI in a text: "user:password@" in "https://user:password@host/",
# also as Hydra's log of a job's overrides escapes it: "https\://user\:password@host".
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*\\?://)[^\s/@'\"]+@")
_TEXT_SUFFIXES = {".yaml", ".yml", ".json", ".log", ".txt", ".md", ".csv"}


class TrackingServerError(UserError, RuntimeError):
    """A tracking server that cannot be reached or stopped responding, named in the message."""


# ---------------------------------------------------------------------------
# The store and its URI


def default_tracking_uri(store_dir: Path = DEFAULT_STORE_DIR) -> str:
    """Return the SQLite URI of the local store, ``<store_dir>/mlflow.db``."""
    return f"sqlite:///{(store_dir / 'mlflow.db').resolve()}"


def resolve_tracking_uri(uri: str | None) -> str:
    """Pick the tracking URI: `uri`, else ``$MLFLOW_TRACKING_URI``, else the local store."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


def redact_credentials(text: str) -> str:
    """Replace the ``user:password@`` of every URI in `text` with ``***@``."""
    return _USERINFO.sub(r"\g<scheme>***@", text)


def redact_uri(uri: str) -> str:
    """Return `uri` without its credentials, fit for logs, tags and error messages."""
    return redact_credentials(uri)


def redact_record(record: logging.LogRecord) -> logging.LogRecord:
    """Redact URI credentials from a log record's message, traceback and stack, in place."""
    message = record.getMessage()
    redacted = redact_credentials(message)
    if redacted != message:
        record.msg, record.args = redacted, ()
    if record.exc_info and not record.exc_text:
        record.exc_text = logging.Formatter().formatException(record.exc_info)
    if record.exc_text:
        record.exc_text = redact_credentials(record.exc_text)
    if record.stack_info:
        record.stack_info = redact_credentials(record.stack_info)
    return record


def install_log_redaction() -> None:
    """Make every log record of this process pass through redact_record, once.

    A record factory, unlike a handler filter, outlives the handlers that Hydra and
    its launchers configure anew for each job, and covers loggers that do not
    propagate. MLflow's error messages repeat the tracking URI, credentials included.
    """
    factory = logging.getLogRecordFactory()
    if getattr(factory, "redacts_credentials", False):
        return

    def make_record(*args: Any, **kwargs: Any) -> logging.LogRecord:
        return redact_record(factory(*args, **kwargs))

    make_record.redacts_credentials = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(make_record)


# ---------------------------------------------------------------------------
# A tracking server: checks before the first request, limits on retries


def validate_tracking(tracking_cfg: DictConfig) -> None:
    """Raise ConfigError naming the key, its value and the allowed range for any bad value."""
    checks = [
        (
            "health_check_timeout",
            lambda v: 0 < v < math.inf,
            "expected finite seconds > 0",
        ),
        ("http_request_timeout", lambda v: v is None or v >= 1, "expected seconds >= 1, or null"),
        (
            "http_request_max_retries",
            lambda v: v is None or 0 <= v <= MAX_HTTP_RETRIES,
            f"expected an integer in [0, {MAX_HTTP_RETRIES}] (MLflow's limit), or null",
        ),
        (
            "http_request_backoff_factor",
            lambda v: v is None or 0 <= v <= MAX_HTTP_BACKOFF_FACTOR,
            f"expected seconds in [0, {MAX_HTTP_BACKOFF_FACTOR}] (MLflow's limit), or null",
        ),
        (
            "spool_dir",
            lambda v: isinstance(v, str) and v.strip() != "" and "\0" not in v,
            "expected the path of a folder",
        ),
        (
            "spool_retry_wait",
            lambda v: 0 < v <= MAX_SPOOL_WAIT,
            f"expected seconds in (0, {MAX_SPOOL_WAIT}]",
        ),
        (
            "spool_retry_max_wait",
            lambda v: tracking_cfg.spool_retry_wait <= v <= MAX_SPOOL_WAIT,
            f"expected seconds in [tracking.spool_retry_wait, {MAX_SPOOL_WAIT}]",
        ),
        (
            "spool_final_timeout",
            lambda v: 0 <= v <= MAX_SPOOL_WAIT,
            f"expected seconds in [0, {MAX_SPOOL_WAIT}]",
        ),
    ]
    for key, ok, allowed in checks:
        value = tracking_cfg[key]
        if not ok(value):
            raise ConfigError(f"Invalid config value tracking.{key}={value!r}: {allowed}.")
    uri = resolve_tracking_uri(tracking_cfg.uri)
    if uri.startswith(SERVER_SCHEMES):
        check_spool_dir(resolve_spool_dir(tracking_cfg.spool_dir), tracking_cfg.spool_dir)
    check_store_uri(uri)


def check_store_uri(uri: str) -> None:
    """Raise ConfigError for a plain-folder store, which MLflow 3 rejects, or a read-only file."""
    scheme = uri.split(":", 1)[0] if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", uri) else ""
    if scheme in ("", "file"):
        raise ConfigError(
            f"Invalid tracking URI {redact_uri(uri)!r}: MLflow 3 rejects a plain-folder store. "
            "Use a SQLite file, for example sqlite:///mlruns/mlflow.db, or a tracking server "
            "at http://HOST:PORT."
        )
    path = database_path(uri)
    if path is None:
        return
    # SQLite writes a journal file beside the database, so its folder must be writable too.
    for needed in (path, path.parent):
        if needed.exists() and not os.access(needed, os.R_OK | os.W_OK):
            raise ConfigError(
                f"Invalid tracking URI {redact_uri(uri)!r}: this process cannot read and "
                f"write {needed}. Fix its permissions or pick another store."
            )


def resolve_spool_dir(spool_dir: str) -> Path:
    """Return the spool folder as an absolute path; relative paths start at the project root."""
    path = Path(spool_dir).expanduser()
    return path if path.is_absolute() else PROJECT_ROOT / path


def check_spool_dir(folder: Path, value: str) -> None:
    """Raise ConfigError unless this process can write folder `folder`, or create it.

    Nothing is created here: a run creates its spool only when its server fails.
    """
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        problem = f"{existing} is not a folder"
    elif not os.access(existing, os.W_OK | os.X_OK):
        problem = f"{existing} is not writable"
    else:
        return
    raise ConfigError(
        f"Invalid config value tracking.spool_dir={value!r}: {problem}, so a run could not "
        f"keep its tracking data in {folder} while the server is unreachable. "
        "Set tracking.spool_dir to a folder this job can write."
    )


@dataclass(frozen=True)
class SpoolSettings:
    """Spool folder and retry timing of runs whose tracking server stops responding."""

    folder: Path = DEFAULT_SPOOL_DIR  # one subfolder per run
    retry_wait: float = 2.0  # seconds before the first retry; doubles after each failed retry
    retry_max_wait: float = 60.0  # seconds, the longest wait between two retries
    final_timeout: float = 10.0  # seconds the end of a run waits for the server
    probe_timeout: float = 5.0  # seconds a GET /health probe waits to connect, and to respond

    @classmethod
    def from_config(cls, tracking_cfg: DictConfig) -> SpoolSettings:
        return cls(
            folder=resolve_spool_dir(tracking_cfg.spool_dir),
            retry_wait=tracking_cfg.spool_retry_wait,
            retry_max_wait=tracking_cfg.spool_retry_max_wait,
            final_timeout=tracking_cfg.spool_final_timeout,
            probe_timeout=tracking_cfg.health_check_timeout,
        )


# The settings that start_run gives the runs of this process, from the last connect_tracking.
_spool_settings = SpoolSettings()


def configure_http_requests(tracking_cfg: DictConfig) -> None:
    """Export the ``tracking.http_request_*`` limits as MLflow's environment variables.

    MLflow reads them at every request, so they hold for this process and for the
    processes it starts. A null value keeps what the environment, or MLflow's
    default, sets: 7 retries with a backoff factor of 2 and a 120 s timeout, which
    retries for about four minutes before a lost server raises. The ``tracking.spool_*``
    settings are kept likewise, for the runs that :func:`start_run` opens in this process.
    """
    global _spool_settings
    settings = [
        (MLFLOW_HTTP_REQUEST_TIMEOUT, tracking_cfg.http_request_timeout),
        (MLFLOW_HTTP_REQUEST_MAX_RETRIES, tracking_cfg.http_request_max_retries),
        (MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR, tracking_cfg.http_request_backoff_factor),
    ]
    for variable, value in settings:
        if value is not None:
            os.environ[variable.name] = str(value)
    _spool_settings = SpoolSettings.from_config(tracking_cfg)


def check_server(uri: str, timeout: float) -> None:
    """Raise TrackingServerError unless the MLflow server at `uri` responds to ``GET /health``.

    One request without retries, so a refused connection fails at once. A host that
    does not accept, or a server that does not respond, fails after `timeout` seconds.
    The timeout does not cover the host name lookup. TLS follows MLflow's own
    variables (MLFLOW_TRACKING_SERVER_CERT_PATH, MLFLOW_TRACKING_INSECURE_TLS,
    MLFLOW_TRACKING_CLIENT_CERT_PATH), as the requests that follow will.
    """
    display_uri = redact_uri(uri)
    hint = "Start the server, or fix tracking.uri or MLFLOW_TRACKING_URI."
    verify: bool | str = MLFLOW_TRACKING_SERVER_CERT_PATH.get() or not (
        MLFLOW_TRACKING_INSECURE_TLS.get()
    )
    try:
        response = requests.get(
            f"{uri.rstrip('/')}/health",
            timeout=(timeout, timeout),
            verify=verify,
            cert=MLFLOW_TRACKING_CLIENT_CERT_PATH.get(),
        )
    except requests.Timeout as err:
        raise TrackingServerError(
            f"MLflow tracking server at {display_uri} did not respond within {timeout:g} s "
            f"({redact_credentials(str(err))}). {hint}"
        ) from None
    except requests.RequestException as err:
        raise TrackingServerError(
            f"Cannot reach the MLflow tracking server at {display_uri}: "
            f"{redact_credentials(str(err))}. {hint}"
        ) from None
    if response.status_code != 200:
        raise TrackingServerError(
            f"{display_uri} is not an MLflow tracking server: GET /health returned HTTP "
            f"{response.status_code}. {hint}"
        )


def connect_tracking(tracking_cfg: DictConfig) -> str:
    """Return the tracking URI after checking the ``tracking`` config and, for a server, its health.

    Call it before any work, so that a wrong or unreachable server ends the job within
    about ``tracking.health_check_timeout`` seconds instead of after MLflow's retries.
    Raises ConfigError for a bad value, TrackingServerError for a server that does not respond.
    """
    validate_tracking(tracking_cfg)
    install_log_redaction()
    uri = resolve_tracking_uri(tracking_cfg.uri)
    is_server = uri.startswith(SERVER_SCHEMES)
    if tracking_cfg.require_server and not is_server:
        raise ConfigError(
            f"Invalid tracking URI {redact_uri(uri)!r}: tracking=server expects an MLflow "
            "tracking server at http://HOST:PORT or https://HOST. Set tracking.uri or "
            "MLFLOW_TRACKING_URI."
        )
    if redact_uri(uri) != uri:
        # MLflow prints each run's URL, built from the URI, to stdout, past any log redaction.
        os.environ[MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT.name] = "true"
    if is_server:
        configure_http_requests(tracking_cfg)
        check_server(uri, tracking_cfg.health_check_timeout)
        log.info("MLflow tracking server at %s is up", redact_uri(uri))
    return uri


def _local_artifact_root(tracking_uri: str) -> str | None:
    """Return the artifact folder beside a local SQLite store, or None for any other store.

    Without it, MLflow would put a SQLite store's artifacts under ``./mlruns``
    relative to the current folder, and jobs started from elsewhere would scatter them.
    A server gets None, so its own artifact root applies (``mlflow-artifacts:/`` with
    ``--serve-artifacts``).
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


# ---------------------------------------------------------------------------
# Where a job ran


def git_state(root: Path = PROJECT_ROOT) -> tuple[str, str]:
    """Return the commit checked out in `root` and ``"true"`` if tracked files differ from it.

    Both are ``"unknown"`` where git is missing or `root` is no git checkout. Untracked
    files do not count, as with ``git describe --dirty``.
    """
    try:
        commit = _git(root, "rev-parse", "HEAD")
        changes = _git(root, "status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError) as err:
        log.warning("Git commit of %s unknown: %s", root, err)
        return "unknown", "unknown"
    return commit, "true" if changes else "false"


def _git(root: Path, *args: str) -> str:
    result = subprocess.run(
        ["git", "-C", str(root), *args], capture_output=True, text=True, check=True, timeout=30
    )
    return result.stdout.strip()


def process_tags() -> dict[str, str]:
    """Return tags that identify this process, so that a command can tell a dead run's owner."""
    tags = {"process.host": os.uname().nodename, "process.pid": str(os.getpid())}
    start = process_start_ticks(os.getpid())
    if start is not None:
        tags["process.start_ticks"] = str(start)
    return tags


def process_start_ticks(pid: int) -> int | None:
    """Return when process `pid` started, in clock ticks since boot; None if unknown or gone.

    With the pid it identifies a process even after the pid is reused (Linux only).
    """
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(text.rsplit(")", 1)[1].split()[19])  # field 22; the name may hold spaces


def run_environment_tags(device: torch.device, seed: int) -> dict[str, str]:
    """Return tags that record where and with what a job ran, so that it can be repeated.

    They are the host, the device, the Python, torch and CUDA versions, the seed and the code.

    ``cuda.version`` is the CUDA version torch was built with, ``none`` for a CPU-only
    build. ``git.commit`` is also written as MLflow's ``mlflow.source.git.commit`` so the
    UI shows it, and ``git.dirty`` is ``true`` when tracked files differ from it.
    """
    import torch

    commit, dirty = git_state()
    tags = {
        "host": socket.gethostname(),
        "device": str(device),
        "python.version": platform.python_version(),
        "torch.version": torch.__version__,
        "cuda.version": torch.version.cuda or "none",
        "seed": str(seed),
        "git.commit": commit,
        "git.dirty": dirty,
    }
    if device.type == "cuda":
        tags["device.name"] = torch.cuda.get_device_name(device)
    if commit != "unknown":
        tags["mlflow.source.git.commit"] = commit
    return tags


# ---------------------------------------------------------------------------
# One run


def is_connection_error(err: BaseException) -> bool:
    """Tell a failed connection, or retries that ran out, from an error response of the server.

    MLflow raises its HTTP failures as MlflowException chained to the requests error.
    """
    cause: BaseException | None = err
    while cause is not None:
        if isinstance(cause, requests.RequestException):
            return True
        cause = cause.__cause__ or cause.__context__
    return False


class SpooledDataError(TrackingServerError):
    """A run that ended with tracking data its server did not take, kept in a spool on disk."""


class Tracker:
    """One MLflow run: buffered metrics, params, figures and files.

    Metrics are sent with ``log_batch`` in chunks of at most 1000, never one call
    per value: per-call logging to SQLite costs about 10 ms a value. Into a local
    SQLite store of the known schema they are written with plain SQL instead
    (:mod:`src.sqlite_metrics`), which is about a hundred times faster than ``log_batch``.

    With `spool` settings, which :func:`start_run` gives a run on a tracking server,
    a request that fails on the connection (after MLflow's own retries) does not stop
    the job. That operation, and every later one until the server responds again, goes
    to the run's spool on disk (:mod:`src.spool`), in order. The tracker retries the
    server after ``retry_wait`` seconds, doubling the wait after each failed retry up to
    ``retry_max_wait``, so that a long outage costs an epoch a file append and not
    MLflow's retries. Without `spool`, such a failure raises TrackingServerError.
    """

    def __init__(
        self,
        client: MlflowClient,
        run_id: str,
        tracking_uri: str | None = None,
        spool: SpoolSettings | None = None,
        writer: MetricWriter | None = None,
    ):
        self.client = client
        self.run_id = run_id
        self.tracking_uri = tracking_uri or client.tracking_uri
        self.writer = writer  # stores metrics from a child process; None: log_metrics sends them
        # Plain SQL into a local SQLite store; None: MLflow's log_batch.
        self.direct = open_store(self.tracking_uri) if writer is None else None
        self.spool_settings = spool
        self.spool: Spool | None = None  # created at the first request that fails
        self._retry_wait = 0.0  # seconds between the last failed retry and the next
        self._next_retry = 0.0  # time.monotonic() of the next retry

    def log_params(self, params: Mapping[str, Any]) -> None:
        items = [Param(key, redact_credentials(str(value))) for key, value in params.items()]
        for start in range(0, len(items), MAX_PARAMS_PER_BATCH):
            chunk = items[start : start + MAX_PARAMS_PER_BATCH]
            self._send(
                "params",
                partial(self.client.log_batch, self.run_id, params=chunk),
                partial(_key_value_rows, "params", chunk),
            )

    def log_metrics(self, metrics: Iterable[Metric]) -> None:
        """Send `metrics` in chunks of at most 1000, keeping each value's step and timestamp.

        The training loop calls this once an epoch. While the server is unreachable the
        values go to the spool instead, and the call returns at once. With a `writer`,
        the values go to its child process, and :meth:`flush` waits until it stored them.
        """
        if self.writer is not None:
            from src.writer import MetricWriterError

            metrics = list(metrics)
            try:
                self.writer.log_batch(metrics)
                return
            except MetricWriterError as err:
                metrics = self._stop_writer(err) + metrics
        if self.direct is not None:
            self.direct.log(self.run_id, metrics)
            return
        batch = [MlflowMetric(m.key, m.value, m.timestamp, m.step) for m in metrics]
        for start in range(0, len(batch), MAX_METRICS_PER_BATCH):
            chunk = batch[start : start + MAX_METRICS_PER_BATCH]
            self._send(
                "metrics",
                partial(self.client.log_batch, self.run_id, metrics=chunk, synchronous=True),
                partial(_metric_rows, chunk),
            )

    def flush(self) -> None:
        """Wait until the `writer`, if any, has stored every metric value it was given.

        When the writer failed or died, the values it did not store are sent from
        this process instead, after an error in the log, so that none is lost.
        """
        if self.writer is None:
            return
        from src.writer import MetricWriterError

        try:
            self.writer.flush()
        except MetricWriterError as err:
            self.log_metrics(self._stop_writer(err))

    def _stop_writer(self, err: Exception) -> list:
        """Log `err`, stop the writer and return the values it did not store."""
        from src.writer import MetricWriterError

        log.error("%s They are sent from the training process instead.", err)
        unwritten = self.writer.unwritten()
        try:
            self.writer.close()
        except MetricWriterError:
            pass  # the failure is logged above
        self.writer = None
        self.direct = open_store(self.tracking_uri)
        return unwritten

    def log_figure(self, figure, artifact_file: str) -> None:
        folder, name = _split_artifact_file(artifact_file)
        self._send(
            "artifacts",
            partial(self.client.log_figure, self.run_id, figure, artifact_file),
            partial(_artifacts_data, folder, artifact_file),
            lambda target: figure.savefig(target / name),
        )

    def log_text(self, text: str, artifact_file: str) -> None:
        text = redact_credentials(text)
        folder, name = _split_artifact_file(artifact_file)
        self._send(
            "artifacts",
            partial(self.client.log_text, self.run_id, text, artifact_file),
            partial(_artifacts_data, folder, artifact_file),
            lambda target: (target / name).write_text(text, encoding="utf-8"),
        )

    def log_file(self, path: Path, artifact_path: str | None = None) -> None:
        with _redacted_copy(path) as upload:
            self._send(
                "artifacts",
                partial(self.client.log_artifact, self.run_id, str(upload), artifact_path),
                partial(_artifacts_data, artifact_path, f"{artifact_path or '.'}/{path.name}"),
                lambda target: shutil.copy2(upload, target / upload.name),
            )

    def log_dir(self, path: Path, artifact_path: str) -> None:
        """Log the files inside folder `path` under `artifact_path`."""
        with _redacted_copy(path) as upload:
            self._send(
                "artifacts",
                partial(self.client.log_artifacts, self.run_id, str(upload), artifact_path),
                partial(_artifacts_data, artifact_path, f"{artifact_path}/"),
                lambda target: shutil.copytree(upload, target, dirs_exist_ok=True),
            )

    def log_image(self, image, key: str, step: int) -> None:
        """Log `image` (an array or PIL image) under `key` at `step`, for the UI's step slider."""
        from src.spool import IMAGE_FILE

        timestamp = int(time.time() * 1000)
        self._send(
            "image",
            partial(
                self.client.log_image,
                self.run_id,
                image,
                key=key,
                step=step,
                timestamp=timestamp,
                synchronous=True,
            ),  # fmt: skip
            partial(dict, key=key, step=step, timestamp=timestamp),
            lambda target: mlflow.Image(image).save(str(target / IMAGE_FILE)),
        )

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        items = [RunTag(key, redact_credentials(str(value))) for key, value in tags.items()]
        for start in range(0, len(items), MAX_TAGS_PER_BATCH):
            chunk = items[start : start + MAX_TAGS_PER_BATCH]
            self._send(
                "tags",
                partial(self.client.log_batch, self.run_id, tags=chunk),
                partial(_key_value_rows, "tags", chunk),
            )

    def end(self, status: str) -> None:
        """Send what the writer and the spool contain, waiting for the server, then `status`.

        The wait is at most ``final_timeout`` seconds, plus MLflow's retries of a request
        that fails during it. A status that cannot be sent goes to the spool, last.
        """
        self.flush()
        if self._has_pending():
            self._final_retry()
            self._next_retry = math.inf  # the final attempt is over: the status joins the spool
        end_time = int(time.time() * 1000)
        self._send(
            "status",
            partial(self.client.set_terminated, self.run_id, status, end_time),
            partial(dict, status=status, end_time=end_time),
        )
        if self.spool is None:
            return
        if self._has_pending() or self.spool.rejected():
            self.spool.unlock()  # a replay may start as soon as this process ends
        else:
            self.spool.remove()
            log.info("Every spooled operation of run %s was sent; removed its spool", self.run_id)

    def unsent_message(self) -> str | None:
        """Return what the spool still contains, where it is and how to replay it; None if empty."""
        if self.spool is None or not (self._has_pending() or self.spool.rejected()):
            return None
        from src.spool import REPLAY_COMMAND

        left = self.spool.contents(self.spool.pending())
        message = (
            f"The MLflow tracking server at {redact_uri(self.tracking_uri)} did not take "
            f"{left.describe()} of run {self.run_id}. They are kept in the spool "
            f"{self.spool.folder}"
        )
        rejected = self.spool.rejected()
        if rejected:
            message += f", with {len(rejected)} operations the server rejected"
        return (
            f"{message}. Once the server is up, send them from {PROJECT_ROOT} with: "
            f"{REPLAY_COMMAND} {self.spool.folder}"
        )

    def spooled_metric_steps(self) -> dict[str, int]:
        """Return the last step of each metric key among the values still in the spool."""
        steps: dict[str, int] = {}
        for operation in self.spool.pending() if self.spool is not None else []:
            for key, _, _, step in operation.data.get("metrics", []):
                steps[key] = max(step, steps.get(key, step))
        return steps

    def resume_spool(self) -> None:
        """Take over the spool that an earlier attempt of this run left, and send it first.

        Call it when a run is reopened to resume it. The earlier attempt's final status
        is skipped, because the run goes on.
        """
        from src.spool import META_FILE, Spool, SpoolError

        if self.spool_settings is None:
            return
        folder = self.spool_settings.folder / self.run_id
        if not (folder / META_FILE).is_file():
            return
        try:
            spool = Spool.open(folder)
        except SpoolError as err:
            log.warning("Not taking over the spool of run %s: %s", self.run_id, err)
            return
        spool.skip_final_status("the run was reopened")
        self.spool = spool
        if self._has_pending():
            log.info(
                "Run %s has %s left in spool %s by an earlier attempt; sending them first",
                self.run_id, spool.contents(spool.pending()).describe(), folder,
            )  # fmt: skip
            self._retry()

    def _send(
        self,
        kind: str,
        send: Callable[[], Any],
        data: Callable[[], dict[str, Any]],
        write_files: Callable[[Path], Any] | None = None,
    ) -> None:
        """Run `send`, or spool the operation that `data` and `write_files` describe.

        While operations are spooled, new ones join them, so the server gets them all in order.
        """
        if self._has_pending():
            self._spool(kind, data, write_files)
            if time.monotonic() >= self._next_retry:
                self._retry()
            return
        try:
            send()
        except (MlflowException, requests.RequestException) as err:
            if not is_connection_error(err):
                raise
            display_uri = redact_uri(self.tracking_uri)
            reason = redact_credentials(str(err))
            if self.spool_settings is None:
                raise TrackingServerError(
                    f"Sending {kind} to the MLflow tracking server at {display_uri} failed: "
                    f"{reason}"
                ) from None
            from src.spool import ATTEMPTED

            operation = self._spool(kind, data, write_files)
            self.spool.mark(operation, ATTEMPTED)  # it may have reached the server
            self._retry_wait = self.spool_settings.retry_wait
            self._next_retry = time.monotonic() + self._retry_wait
            log.warning(
                "Sending %s to the MLflow tracking server at %s failed: %s. The job goes on, "
                "and run %s keeps its tracking data in the spool %s until the server responds; "
                "next retry in %g s",
                kind, display_uri, reason, self.run_id, self.spool.folder, self._retry_wait,
            )  # fmt: skip

    def _spool(
        self,
        kind: str,
        data: Callable[[], dict[str, Any]],
        write_files: Callable[[Path], Any] | None,
    ) -> Operation:
        try:
            if self.spool is None:
                self.spool = self._create_spool()
            return self.spool.append(kind, data(), write_files)
        except OSError as err:
            folder = self.spool.folder if self.spool is not None else self.spool_settings.folder
            raise TrackingServerError(
                f"The MLflow tracking server at {redact_uri(self.tracking_uri)} is unreachable, "
                f"and run {self.run_id} cannot keep its data in the spool folder {folder}: {err}. "
                "Set tracking.spool_dir to a folder this job can write, on a disk with free space."
            ) from None

    def _create_spool(self) -> Spool:
        """Create this run's spool, in another folder if a live process locks the usual one."""
        from src.spool import Spool, SpoolError

        root = self.spool_settings.folder
        try:
            return Spool.create(root / self.run_id, self.run_id, self.tracking_uri)
        except SpoolError:
            return Spool.create(
                root / f"{self.run_id}-{os.getpid()}", self.run_id, self.tracking_uri
            )

    def _has_pending(self) -> bool:
        return self.spool is not None and self.spool.has_pending()

    def _retry(self) -> None:
        """Send the spool if the server responds; otherwise wait twice as long for the next try."""
        from src.spool import send_pending

        display_uri = redact_uri(self.tracking_uri)
        error = "no response to GET /health"
        if self._server_responds():
            result = send_pending(self.spool, self.client)
            if not self._has_pending():
                log.info(
                    "The MLflow tracking server at %s responds again: sent %s from spool %s",
                    display_uri, result.sent.describe(), self.spool.folder,
                )  # fmt: skip
                return
            error = result.error or error
        settings = self.spool_settings
        doubled = max(2 * self._retry_wait, settings.retry_wait)
        self._retry_wait = min(doubled, settings.retry_max_wait)
        self._next_retry = time.monotonic() + self._retry_wait
        log.info(
            "The MLflow tracking server at %s is still unreachable (%s): %s of run %s "
            "spooled; next retry in %g s",
            display_uri, error, self.spool.contents(self.spool.pending()).describe(),
            self.run_id, self._retry_wait,
        )  # fmt: skip

    def _final_retry(self) -> None:
        """Try the server for up to ``final_timeout`` seconds, about once a second."""
        from src.spool import send_pending

        timeout = self.spool_settings.final_timeout
        log.info(
            "Waiting up to %g s for the MLflow tracking server at %s to take the %s "
            "spooled for run %s",
            timeout, redact_uri(self.tracking_uri),
            self.spool.contents(self.spool.pending()).describe(), self.run_id,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while True:
            if self._server_responds():
                send_pending(self.spool, self.client)
                if not self._has_pending():
                    return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            time.sleep(min(1.0, remaining))

    def _server_responds(self) -> bool:
        try:
            check_server(self.tracking_uri, self.spool_settings.probe_timeout)
        except TrackingServerError:
            return False
        return True


def _metric_rows(chunk: list[MlflowMetric]) -> dict[str, Any]:
    return {"metrics": [[m.key, float(m.value), int(m.timestamp), int(m.step)] for m in chunk]}


def _key_value_rows(name: str, chunk: list) -> dict[str, Any]:
    return {name: [[item.key, item.value] for item in chunk]}


def _artifacts_data(artifact_path: str | None, description: str) -> dict[str, Any]:
    return {"artifact_path": artifact_path, "description": description}


def _split_artifact_file(artifact_file: str) -> tuple[str | None, str]:
    """Split ``figures/loss.png`` into ``("figures", "loss.png")``; a bare name has no folder."""
    folder, _, name = artifact_file.rpartition("/")
    return folder or None, name


@contextmanager
def _redacted_copy(path: Path) -> Iterator[Path]:
    """Yield `path`, or a copy in a temporary folder whose text files carry no URI credentials.

    Hydra writes command-line overrides, ``tracking.uri`` among them, into the job's
    ``.hydra`` files unchanged; their copies in MLflow must not show a password.
    """
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    if not any(_text_with_credentials(p) is not None for p in files):
        yield path
        return
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / path.name
        if path.is_file():
            shutil.copy2(path, copy)
        else:
            shutil.copytree(path, copy)
        for file in [copy] if copy.is_file() else copy.rglob("*"):
            text = _text_with_credentials(file) if file.is_file() else None
            if text is not None:
                file.write_text(redact_credentials(text))
        yield copy


def _text_with_credentials(path: Path) -> str | None:
    """Return the text of `path` if it is a small text file with a URI that carries credentials."""
    if path.suffix not in _TEXT_SUFFIXES or path.stat().st_size > 10_000_000:
        return None
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError):
        return None
    return text if _USERINFO.search(text) else None


@contextmanager
def start_run(
    tracking_uri: str,
    experiment_name: str,
    run_name: str,
    tags: Mapping[str, str] | None = None,
    parent_run_id: str | None = None,
    run_id: str | None = None,
    metric_writer: bool = False,
) -> Iterator[Tracker]:
    """Open an MLflow run and end it FINISHED, or FAILED if the body raises.

    A run stopped by Ctrl-C, SIGTERM (raised as KeyboardInterrupt) or SystemExit
    (a scheduler's requeue) ends KILLED. With `run_id`, the existing run is reopened
    (status RUNNING again) instead of a new one created, to resume it, and what an
    earlier attempt left in the run's spool is sent first.

    On a tracking server, what the server does not take goes to the run's spool (see
    :class:`Tracker`), with the settings of the last :func:`connect_tracking`. At the
    end the run waits up to ``tracking.spool_final_timeout`` seconds for the server.
    Whatever is still spooled then is logged as an error that names the spool and the
    command that replays it, and raised as SpooledDataError after a body that
    succeeded. After a body that raised, the body's exception propagates.
    """
    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri)
    experiment_id = get_or_create_experiment(client, experiment_name, tracking_uri)
    mlflow.set_experiment(experiment_id=experiment_id)
    all_tags = {key: redact_credentials(str(value)) for key, value in (tags or {}).items()}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id

    reopened = run_id is not None
    if run_id is None:
        run = mlflow.start_run(run_name=run_name, tags=all_tags)
        run_id = run.info.run_id
    else:
        mlflow.start_run(run_id=run_id)
    log.info(
        "MLflow run %s (%s) in experiment %r at %s",
        run_id,
        run_name,
        experiment_name,
        redact_uri(tracking_uri),
    )
    spool = _spool_settings if tracking_uri.startswith(SERVER_SCHEMES) else None
    writer = None
    if metric_writer and tracking_uri.startswith("sqlite:"):
        from src.writer import MetricWriter, can_start_child

        if can_start_child():
            writer = MetricWriter(tracking_uri, run_id)
        else:
            log.warning(
                "A job in a joblib worker process cannot start the metric writer's child "
                "process (tracking.metric_writer), so this job writes its metrics itself"
            )
    tracker = Tracker(client, run_id, tracking_uri, spool=spool, writer=writer)
    if reopened:
        tracker.resume_spool()
    try:
        yield tracker
    except (KeyboardInterrupt, SystemExit):
        _end_run(tracker, "KILLED", body_failed=True)
        raise
    except BaseException:
        _end_run(tracker, "FAILED", body_failed=True)
        raise
    else:
        _end_run(tracker, "FINISHED", body_failed=False)
    finally:
        if tracker.writer is not None:
            _close_writer(tracker.writer)
        _close_direct(tracker)


def _close_direct(tracker: Tracker) -> None:
    if tracker.direct is not None:
        tracker.direct.close()
        tracker.direct = None


def _close_writer(writer) -> None:
    """Stop the writer's child, logging instead of raising: the run has ended already."""
    from src.writer import MetricWriterError

    try:
        writer.close(timeout=60)
    except MetricWriterError as err:
        log.error("%s", err)


def _end_run(tracker: Tracker, status: str, body_failed: bool) -> None:
    """End the run with `status`, leave MLflow's active run, and report what stays spooled.

    After a body that failed, an error of the store is logged, not raised, so that the
    body's exception is the one that propagates.
    """
    try:
        tracker.end(status)
    except Exception as err:
        if not body_failed:
            raise
        log.error(
            "Could not mark run %s %s at %s, so it stays RUNNING there: %s",
            tracker.run_id,
            status,
            redact_uri(tracker.tracking_uri),
            redact_credentials(str(err)),
        )
    finally:
        _leave_active_run(tracker.run_id)
    message = tracker.unsent_message()
    if message is None:
        return
    log.error("%s", message)
    if not body_failed:
        raise SpooledDataError(message)


def _leave_active_run(run_id: str) -> None:
    """Remove run `run_id` from MLflow's fluent active-run stack without a request.

    NOTE: MLflow 3.17 has no public call for this: ``mlflow.end_run`` pops the stack,
    then sends the status, which would wait out MLflow's retries once more when the
    server is gone. This uses ``mlflow.tracking.fluent._active_run_stack`` instead, and
    falls back on ``mlflow.end_run`` (errors logged) if that name goes away.
    """
    from mlflow.tracking import fluent

    stack_variable = getattr(fluent, "_active_run_stack", None)
    if stack_variable is None:
        try:
            mlflow.end_run()
        except MlflowException as err:
            log.debug("Leaving the active run %s: %s", run_id, redact_credentials(str(err)))
        return
    stack = stack_variable.get()
    if stack and stack[-1].info.run_id == run_id:
        stack.pop()
        fluent._last_active_run_id.set(run_id)
        MLFLOW_RUN_ID.unset()
