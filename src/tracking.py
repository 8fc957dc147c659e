"""Everything that talks to MLflow: the store, the run, params, metrics and artifacts.

A tracking server (``http(s)://`` URI) gets two guards that a local store does not
need. :func:`connect_tracking` checks that it responds before any work starts and
caps MLflow's HTTP retries, and :class:`Tracker` turns a lost connection into one
error that names the server and what was not sent. Credentials inside a URI
(``user:password@``) are redacted from the params, tags and text artifacts that
this module sends, and from every log record of a process that called
:func:`connect_tracking`.
"""

from __future__ import annotations

import logging
import os
import platform
import re
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import requests
from mlflow.entities import Metric as MlflowMetric
from mlflow.entities import Param
from mlflow.environment_variables import (
    MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR,
    MLFLOW_HTTP_REQUEST_MAX_RETRIES,
    MLFLOW_HTTP_REQUEST_TIMEOUT,
    MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT,
    MLFLOW_TRACKING_CLIENT_CERT_PATH,
    MLFLOW_TRACKING_INSECURE_TLS,
    MLFLOW_TRACKING_SERVER_CERT_PATH,
)
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from src.config import ConfigError

if TYPE_CHECKING:
    import torch

    from src.gradients import Metric

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_STORE_DIR = PROJECT_ROOT / "mlruns"
MAX_METRICS_PER_BATCH = 1000  # MLflow's limit for one log_batch call
MAX_PARAMS_PER_BATCH = 100  # MLflow's limit for one log_batch call
SERVER_SCHEMES = ("http://", "https://")
# MLflow 3 rejects more retries, or a larger backoff factor, than these.
MAX_HTTP_RETRIES = 10
MAX_HTTP_BACKOFF_FACTOR = 120

# The userinfo part of any URI in a text: "user:password@" in "https://user:password@host/",
# also as Hydra's log of a job's overrides escapes it: "https\://user\:password@host".
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*\\?://)[^\s/@'\"]+@")
_TEXT_SUFFIXES = {".yaml", ".yml", ".json", ".log", ".txt", ".md", ".csv"}


class TrackingServerError(RuntimeError):
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
        ("health_check_timeout", lambda v: v > 0, "expected seconds > 0"),
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
    ]
    for key, ok, allowed in checks:
        value = tracking_cfg[key]
        if not ok(value):
            raise ConfigError(f"Invalid config value tracking.{key}={value!r}: {allowed}.")


def configure_http_requests(tracking_cfg: DictConfig) -> None:
    """Export the ``tracking.http_request_*`` limits as MLflow's environment variables.

    MLflow reads them at every request, so they hold for this process and for the
    processes it starts. A null value keeps what the environment, or MLflow's
    default, sets: 7 retries with a backoff factor of 2 and a 120 s timeout, which
    retries for about four minutes before a lost server raises.
    """
    settings = [
        (MLFLOW_HTTP_REQUEST_TIMEOUT, tracking_cfg.http_request_timeout),
        (MLFLOW_HTTP_REQUEST_MAX_RETRIES, tracking_cfg.http_request_max_retries),
        (MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR, tracking_cfg.http_request_backoff_factor),
    ]
    for variable, value in settings:
        if value is not None:
            os.environ[variable.name] = str(value)


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


def _is_connection_error(err: BaseException) -> bool:
    """Tell a failed connection, or retries that ran out, from an error response of the server.

    MLflow raises its HTTP failures as MlflowException chained to the requests error.
    """
    cause: BaseException | None = err
    while cause is not None:
        if isinstance(cause, requests.RequestException):
            return True
        cause = cause.__cause__ or cause.__context__
    return False


class Tracker:
    """One MLflow run: buffered metrics, params, figures and files.

    Metrics are sent with ``log_batch`` in chunks of at most 1000, never one call
    per value: per-call logging to SQLite costs about 10 ms a value.

    When a request fails on the connection, the call raises TrackingServerError
    naming the server and what was not sent. Later calls then send nothing and log
    an error for what they skipped, so that clean-up code after the failure ends
    quickly instead of waiting out MLflow's retries once a call.
    """

    def __init__(self, client: MlflowClient, run_id: str, tracking_uri: str | None = None):
        self.client = client
        self.run_id = run_id
        self.tracking_uri = tracking_uri or client.tracking_uri
        self.connection_error: TrackingServerError | None = None

    def log_params(self, params: Mapping[str, Any]) -> None:
        items = [Param(key, redact_credentials(str(value))) for key, value in params.items()]
        for start in range(0, len(items), MAX_PARAMS_PER_BATCH):
            chunk = items[start : start + MAX_PARAMS_PER_BATCH]
            self._send("params", self.client.log_batch, self.run_id, params=chunk)

    def log_metrics(self, metrics: Iterable[Metric]) -> None:
        """Send `metrics` in chunks, and on a lost connection raise naming how many were not sent.

        The training loop calls this once an epoch, so the count is that epoch's.
        Chunks sent before the failure stay stored.
        """
        batch = [MlflowMetric(m.key, m.value, m.timestamp, m.step) for m in metrics]
        for start in range(0, len(batch), MAX_METRICS_PER_BATCH):
            chunk = batch[start : start + MAX_METRICS_PER_BATCH]
            unsent = batch[start:]
            description = (
                f"metrics: {len(unsent)} of the {len(batch)} metric values of this batch, "
                f"up to step {max(m.step for m in unsent)}, were not sent"
            )
            self._send(
                description, self.client.log_batch, self.run_id, metrics=chunk, synchronous=True
            )

    def log_figure(self, figure, artifact_file: str) -> None:
        self._send(artifact_file, self.client.log_figure, self.run_id, figure, artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        text = redact_credentials(text)
        self._send(artifact_file, self.client.log_text, self.run_id, text, artifact_file)

    def log_file(self, path: Path, artifact_path: str | None = None) -> None:
        description = f"{artifact_path or '.'}/{path.name}"
        with _redacted_copy(path) as upload:
            self._send(
                description, self.client.log_artifact, self.run_id, str(upload), artifact_path
            )

    def log_dir(self, path: Path, artifact_path: str) -> None:
        """Log the files inside folder `path` under `artifact_path`."""
        with _redacted_copy(path) as upload:
            self._send(
                f"{artifact_path}/", self.client.log_artifacts, self.run_id, str(upload),
                artifact_path,
            )  # fmt: skip

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        for key, value in tags.items():
            self._send(
                f"tag {key}", self.client.set_tag, self.run_id, key,
                redact_credentials(str(value)),
            )  # fmt: skip

    def _send(self, description: str, call: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        display_uri = redact_uri(self.tracking_uri)
        if self.connection_error is not None:
            log.error("Not sent to %s after the earlier failure: %s", display_uri, description)
            return
        try:
            call(*args, **kwargs)
        except MlflowException as err:
            if not _is_connection_error(err):
                raise
            self.connection_error = TrackingServerError(
                f"Sending to the MLflow tracking server at {display_uri} failed, {description}: "
                f"{redact_credentials(str(err))}"
            )
            raise self.connection_error from None


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
) -> Iterator[Tracker]:
    """Open an MLflow run and end it FINISHED, or FAILED if the body raises.

    A run stopped by Ctrl-C, SIGTERM (raised as KeyboardInterrupt) or SystemExit
    (a scheduler's requeue) ends KILLED. With `run_id`, the existing run is reopened
    (status RUNNING again) instead of a new one created, to resume it. When the store
    cannot take the final status either (a server that went away), the error is
    logged, the run stays RUNNING, and the body's exception propagates.
    """
    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri)
    experiment_id = get_or_create_experiment(client, experiment_name, tracking_uri)
    mlflow.set_experiment(experiment_id=experiment_id)
    all_tags = {key: redact_credentials(str(value)) for key, value in (tags or {}).items()}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id

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
    try:
        yield Tracker(client, run_id, tracking_uri)
    except (KeyboardInterrupt, SystemExit):
        _end_run(run_id, "KILLED", tracking_uri)
        raise
    except BaseException:
        _end_run(run_id, "FAILED", tracking_uri)
        raise
    else:
        mlflow.end_run(status="FINISHED")


def _end_run(run_id: str, status: str, tracking_uri: str) -> None:
    """End the active run with `status`, logging instead of raising if the store fails."""
    try:
        mlflow.end_run(status=status)
    except MlflowException as err:
        log.error(
            "Could not mark run %s %s at %s, so it stays RUNNING there: %s",
            run_id,
            status,
            redact_uri(tracking_uri),
            redact_credentials(str(err)),
        )
