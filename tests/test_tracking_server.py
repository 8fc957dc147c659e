"""Training against a real ``mlflow server`` on 127.0.0.1: artifacts, credentials, faults.

The server keeps its store in SQLite and serves artifacts itself (``--serve-artifacts``),
as a team server would. Faults are real too: a port with nothing listening, and a socket
that accepts but never responds. tests/test_spool.py stops a server in the middle of a run.
"""

from __future__ import annotations

import io
import logging
import multiprocessing
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.environment_variables import (
    MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR,
    MLFLOW_HTTP_REQUEST_MAX_RETRIES,
    MLFLOW_HTTP_REQUEST_TIMEOUT,
    MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT,
)
from mlflow.tracking import MlflowClient

from src import tracking
from src.config import ConfigError
from src.tracking import (
    TrackingServerError,
    connect_tracking,
    get_or_create_experiment,
    git_state,
    install_log_redaction,
    redact_credentials,
    run_environment_tags,
)
from src.train import JobInfo, train
from tests.conftest import PROJECT_ROOT, TINY_OVERRIDES, compose_config
from tests.mlflow_server import free_port, running_mlflow_server

SECRET = "s3cret-pw"
FAIL_FAST_BOUND_S = 15  # an unreachable server must end the job within this


# The variables that connect_tracking exports.
HTTP_VARIABLES = (
    MLFLOW_HTTP_REQUEST_TIMEOUT,
    MLFLOW_HTTP_REQUEST_MAX_RETRIES,
    MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR,
    MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT,
)


@pytest.fixture(autouse=True)
def isolated_http_env(monkeypatch):
    """Undo the MLflow variables and spool settings that connect_tracking sets, after each test."""
    for variable in HTTP_VARIABLES:
        monkeypatch.setenv(variable.name, "0")
        monkeypatch.delenv(variable.name)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(tracking, "_spool_settings", tracking._spool_settings)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_mlflow_server(tmp_path_factory.mktemp("mlflow-server")) as running:
        yield running


def server_cfg(uri: str | None, *overrides: str):
    """Return the tiny config with ``tracking=server`` pointed at `uri`."""
    cfg = compose_config([*TINY_OVERRIDES, "tracking=server", *overrides])
    cfg.tracking.uri = uri
    return cfg


def only_run(client: MlflowClient, experiment_name: str):
    experiment = client.get_experiment_by_name(experiment_name)
    (run,) = client.search_runs([experiment.experiment_id])
    return run


def artifact_paths(client: MlflowClient, run_id: str, path: str | None = None) -> list[str]:
    paths = []
    for info in client.list_artifacts(run_id, path):
        paths += artifact_paths(client, run_id, info.path) if info.is_dir else [info.path]
    return paths


def with_credentials(uri: str) -> str:
    return uri.replace("http://", f"http://alice:{SECRET}@")


# --- Redaction and environment tags, without a server ----------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("http://alice:pw@host:5000", "http://***@host:5000"),
        ("uri=https://token@host/path x", "uri=https://***@host/path x"),
        ("postgresql+psycopg2://u:p@db/mlflow", "postgresql+psycopg2://***@db/mlflow"),
        ("http://host:5000/a@b", "http://host:5000/a@b"),
        ("tracking.uri=http\\://u\\:p@h\\:1", "tracking.uri=http\\://***@h\\:1"),
        ("sqlite:////tmp/mlflow.db", "sqlite:////tmp/mlflow.db"),
        ("alice@example.org", "alice@example.org"),
    ],
)
def test_redact_credentials_cases(text, expected):
    assert redact_credentials(text) == expected


def test_log_redaction_covers_args_and_traceback():
    install_log_redaction()
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger("tests.redaction")
    logger.addHandler(handler)
    try:
        raise RuntimeError(f"API request to http://alice:{SECRET}@h/api failed")
    except RuntimeError:
        logger.exception("Failed at %s", f"http://alice:{SECRET}@h")
    finally:
        logger.removeHandler(handler)
    output = stream.getvalue()
    assert SECRET not in output
    assert "Failed at http://***@h" in output
    assert "API request to http://***@h/api failed" in output


def test_environment_tags_match_git_and_torch():
    tags = run_environment_tags(torch.device("cpu"), seed=7)
    head = subprocess.run(
        ["git", "-C", str(PROJECT_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    assert tags["git.commit"] == head
    assert tags["mlflow.source.git.commit"] == head
    assert tags["git.dirty"] in {"true", "false"}
    assert tags["host"] == socket.gethostname()
    assert tags["device"] == "cpu"
    assert tags["torch.version"] == torch.__version__
    assert tags["cuda.version"] == (torch.version.cuda or "none")
    assert tags["seed"] == "7"


def test_git_state_outside_repository(tmp_path):
    assert git_state(tmp_path) == ("unknown", "unknown")


def test_git_state_without_git_binary(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no git on the PATH
    assert git_state() == ("unknown", "unknown")
    tags = run_environment_tags(torch.device("cpu"), seed=0)
    assert tags["git.commit"] == "unknown"
    assert "mlflow.source.git.commit" not in tags


# --- Fail fast ---------------------------------------------------------------------------


def test_unreachable_server_fails_fast():
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    start = time.monotonic()
    with pytest.raises(TrackingServerError, match="Cannot reach") as info:
        train(server_cfg(uri))
    elapsed = time.monotonic() - start
    assert uri in str(info.value)
    assert elapsed < FAIL_FAST_BOUND_S


def test_silent_server_times_out():
    # The kernel accepts the connection into its backlog, and no process ever reads or replies.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        uri = f"http://127.0.0.1:{listener.getsockname()[1]}"
        start = time.monotonic()
        with pytest.raises(TrackingServerError, match="did not respond within 1 s") as info:
            train(server_cfg(uri, "tracking.health_check_timeout=1"))
        elapsed = time.monotonic() - start
    assert uri in str(info.value)
    assert elapsed < 1 + FAIL_FAST_BOUND_S


def test_server_option_rejects_local_store():
    with pytest.raises(ConfigError, match="MLFLOW_TRACKING_URI") as info:
        train(server_cfg(None))
    assert "sqlite:///" in str(info.value)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("tracking.http_request_max_retries=11", "tracking.http_request_max_retries"),
        ("tracking.http_request_timeout=0", "tracking.http_request_timeout"),
        ("tracking.health_check_timeout=0", "tracking.health_check_timeout"),
        ("tracking.http_request_backoff_factor=-1", "tracking.http_request_backoff_factor"),
        ("tracking.health_check_timeout=inf", "tracking.health_check_timeout"),
        ("tracking.spool_dir=''", "tracking.spool_dir"),
        ("tracking.spool_retry_wait=0", "tracking.spool_retry_wait"),
        ("tracking.spool_retry_wait=nan", "tracking.spool_retry_wait"),
        ("tracking.spool_retry_max_wait=1", "tracking.spool_retry_max_wait"),
        ("tracking.spool_final_timeout=-1", "tracking.spool_final_timeout"),
        ("tracking.spool_final_timeout=inf", "tracking.spool_final_timeout"),
    ],
)
def test_tracking_config_rejects_out_of_range(override, key):
    with pytest.raises(ConfigError, match=key):
        connect_tracking(server_cfg("http://127.0.0.1:1", override).tracking)


def test_spool_dir_must_be_writable(tmp_path):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    cfg = server_cfg("http://127.0.0.1:1", f"tracking.spool_dir={not_a_folder}/spool")
    with pytest.raises(ConfigError, match=f"tracking.spool_dir=.*{not_a_folder} is not a folder"):
        connect_tracking(cfg.tracking)


def test_connect_exports_http_limits(server):
    assert connect_tracking(server_cfg(server.uri).tracking) == server.uri
    assert os.environ[MLFLOW_HTTP_REQUEST_TIMEOUT.name] == "30"
    assert os.environ[MLFLOW_HTTP_REQUEST_MAX_RETRIES.name] == "3"
    assert os.environ[MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR.name] == "1"


def test_cli_multirun_unreachable_exits_fast(tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    env.pop("MLFLOW_TRACKING_URI", None)
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "src.train", "-m", "activation=relu,sigmoid", *TINY_OVERRIDES,
         "tracking=server", f"tracking.uri={uri}", f"hydra.sweep.dir={tmp_path}/sweep"],
        cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    elapsed = time.monotonic() - start
    assert result.returncode != 0
    assert f"Cannot reach the MLflow tracking server at {uri}" in result.stdout + result.stderr
    assert not (tmp_path / "sweep").exists(), "no job may start"
    # Python, torch and mlflow imports take most of it; the check itself takes milliseconds.
    assert elapsed < 60, f"took {elapsed:.1f} s"


# --- A run through the server ------------------------------------------------------------


@pytest.fixture(scope="module")
def served_run(server):
    """One tiny run with its model through the server, shared by the read-back tests."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        for variable in HTTP_VARIABLES:
            monkeypatch.setenv(variable.name, "0")
            monkeypatch.delenv(variable.name)
        train(server_cfg(server.uri, "tracking.experiment_name=served", "seed=3"))
    client = MlflowClient(server.uri)
    return client, only_run(client, "served")


def test_run_artifacts_served_by_server(server, served_run):
    client, run = served_run
    assert run.info.status == "FINISHED"
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/")
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) == 3 * 2
    assert "gradients/histograms.npz" in artifact_paths(client, run.info.run_id)
    # The served files are in the server's artifact folder, not beside the client.
    stored = list((server.folder / "artifacts").rglob("histograms.npz"))
    assert len(stored) == 1


def test_model_loads_through_server(server, served_run):
    _, run = served_run
    mlflow.set_tracking_uri(server.uri)
    model = mlflow.pytorch.load_model(f"runs:/{run.info.run_id}/model")
    assert tuple(model(torch.zeros(2, 1, 28, 28)).shape) == (2, 10)


def test_run_tags_record_environment(served_run):
    _, run = served_run
    tags = run.data.tags
    for key in ("host", "device", "torch.version", "cuda.version", "git.commit", "git.dirty"):
        assert tags[key], key
    assert tags["seed"] == "3"
    assert tags["mlflow.source.git.commit"] == tags["git.commit"]


def test_credentials_never_logged(server, tmp_path, caplog, capsys):
    uri = with_credentials(server.uri)
    cfg = server_cfg(uri, "tracking.experiment_name=credentials", "tracking.log_model=false")
    job_dir = tmp_path / "job"
    (job_dir / ".hydra").mkdir(parents=True)
    (job_dir / ".hydra" / "overrides.yaml").write_text(f"- tracking.uri={uri}\n")
    (job_dir / "train.log").write_text(f"a line naming {uri}\n")
    with caplog.at_level(logging.INFO):
        train(cfg, JobInfo(overrides=[f"tracking.uri={uri}"], output_dir=job_dir))
    client = MlflowClient(server.uri)
    run = only_run(client, "credentials")

    assert run.data.params["tracking.uri"] == server.uri.replace("http://", "http://***@")
    assert all(SECRET not in value for value in run.data.params.values())
    assert all(SECRET not in value for value in run.data.tags.values())
    texts = [p for p in artifact_paths(client, run.info.run_id) if p.endswith((".yaml", ".log"))]
    assert {"config/config.yaml", "config/overrides.yaml", "config/hydra/overrides.yaml",
            "logs/train.log"} <= set(texts)  # fmt: skip
    for path in texts:
        local = client.download_artifacts(run.info.run_id, path, str(tmp_path / "download"))
        assert SECRET not in Path(local).read_text(), path
    assert "http://***@127.0.0.1" in caplog.text
    assert SECRET not in caplog.text
    printed = capsys.readouterr()
    assert SECRET not in printed.out + printed.err


# --- The experiment, created once -------------------------------------------------------


class FirstLookupMisses:
    """An MlflowClient whose first experiment lookup misses, as when another job creates it."""

    def __init__(self, client: MlflowClient):
        self.client = client
        self.lookups = 0

    def get_experiment_by_name(self, name: str):
        self.lookups += 1
        return None if self.lookups == 1 else self.client.get_experiment_by_name(name)

    def create_experiment(self, name: str, artifact_location: str | None = None) -> str:
        return self.client.create_experiment(name, artifact_location=artifact_location)


def test_create_race_returns_existing(server):
    client = MlflowClient(server.uri)
    existing = client.create_experiment("raced")
    racing = FirstLookupMisses(client)
    assert get_or_create_experiment(racing, "raced", server.uri) == existing
    assert racing.lookups == 2, "the create failed and the guard looked the experiment up again"


def create_when_released(uri: str, name: str, barrier, results) -> None:
    """Wait for every process at `barrier`, then get or create experiment `name` at `uri`."""
    client = MlflowClient(uri)
    barrier.wait()
    results.put(get_or_create_experiment(client, name, uri))


@pytest.mark.slow
def test_concurrent_processes_create_experiment_once(server):
    processes = 8
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(processes)
    results = context.Queue()
    workers = [
        context.Process(
            target=create_when_released, args=(server.uri, "stampede", barrier, results)
        )
        for _ in range(processes)
    ]
    for worker in workers:
        worker.start()
    ids = [results.get(timeout=120) for _ in workers]
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0

    assert len(set(ids)) == 1
    found = MlflowClient(server.uri).search_experiments(filter_string="name = 'stampede'")
    assert [e.experiment_id for e in found] == ids[:1]
