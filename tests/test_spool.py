"""A tracking server that stops during a run: the spool, its replay, and whole training runs.

Everything runs against a real ``mlflow server`` on 127.0.0.1 (SQLite store, served
artifacts). A server that is down is a real one stopped, or a port with nothing
listening, so every failure is a refused connection, as after a server crash.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import matplotlib
import numpy as np
import pytest
from mlflow.environment_variables import (
    MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR,
    MLFLOW_HTTP_REQUEST_MAX_RETRIES,
    MLFLOW_HTTP_REQUEST_TIMEOUT,
    MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT,
)
from mlflow.tracking import MlflowClient

from src import tracking
from src.gradients import Metric
from src.spool import (
    ATTEMPTED,
    OPERATIONS_FILE,
    REPLAY_COMMAND,
    Spool,
    SpoolError,
    find_spools,
    main,
    replay_spool,
)
from src.tracking import (
    SpooledDataError,
    SpoolSettings,
    Tracker,
    TrackingServerError,
    configure_http_requests,
    start_run,
)
from src.train import train
from tests.conftest import PROJECT_ROOT, TINY_OVERRIDES, compose_config
from tests.mlflow_server import MlflowServer, free_port, running_mlflow_server

matplotlib.use("Agg")
from matplotlib import pyplot as plt  # noqa: E402

HTTP_VARIABLES = (
    MLFLOW_HTTP_REQUEST_TIMEOUT,
    MLFLOW_HTTP_REQUEST_MAX_RETRIES,
    MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR,
    MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT,
)


@pytest.fixture(autouse=True)
def isolated_tracking_state(monkeypatch):
    """Undo the MLflow variables and the spool settings that connect_tracking sets."""
    for variable in HTTP_VARIABLES:
        monkeypatch.setenv(variable.name, "0")
        monkeypatch.delenv(variable.name)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(tracking, "_spool_settings", tracking._spool_settings)


@pytest.fixture
def no_http_retries(monkeypatch):
    """Let a request to a stopped server fail at once instead of after MLflow's retries."""
    monkeypatch.setenv(MLFLOW_HTTP_REQUEST_MAX_RETRIES.name, "0")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_mlflow_server(tmp_path_factory.mktemp("mlflow-server")) as running:
        yield running


def dead_uri() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens there


def new_run(uri: str, name: str) -> str:
    client = MlflowClient(uri)
    experiment_id = client.create_experiment(f"{name}-{time.time_ns()}")
    return client.create_run(experiment_id).info.run_id


def spooling_tracker(run_id: str, folder: Path, uri: str | None = None, **settings) -> Tracker:
    """Return a Tracker for `run_id` whose server is `uri`, by default a port nothing listens on."""
    uri = uri or dead_uri()
    options = {"retry_wait": 60.0, "retry_max_wait": 60.0, "final_timeout": 0.0}
    options.update(settings)
    return Tracker(MlflowClient(uri), run_id, uri, spool=SpoolSettings(folder=folder, **options))


def metric_steps(client: MlflowClient, run_id: str) -> dict[str, list[int]]:
    """Return every metric key of the run with the steps of its full history, sorted."""
    run = client.get_run(run_id)
    return {
        key: sorted(m.step for m in client.get_metric_history(run_id, key))
        for key in run.data.metrics
    }


def artifact_paths(client: MlflowClient, run_id: str, path: str | None = None) -> list[str]:
    paths = []
    for info in client.list_artifacts(run_id, path):
        paths += artifact_paths(client, run_id, info.path) if info.is_dir else [info.path]
    return sorted(paths)


# --- The spool file ----------------------------------------------------------------------


def test_spool_ignores_truncated_last_line(tmp_path):
    spool = Spool.create(tmp_path / "run", "abc", "http://127.0.0.1:1")
    spool.append("tags", {"tags": [["a", "1"]]})
    spool.append("tags", {"tags": [["b", "2"]]})
    spool.unlock()
    with open(tmp_path / "run" / OPERATIONS_FILE, "a") as file:
        file.write('{"seq": 2, "kind": "ta')  # a crash in the middle of a line
    reopened = Spool.open(tmp_path / "run")
    assert [op.seq for op in reopened.pending()] == [0, 1]
    reopened.unlock()


def test_spool_rejects_corrupt_middle_line(tmp_path):
    spool = Spool.create(tmp_path / "run", "abc", "http://127.0.0.1:1")
    spool.unlock()
    (tmp_path / "run" / OPERATIONS_FILE).write_text('garbage\n{"seq": 0}\n')
    with pytest.raises(SpoolError, match="corrupt at line 1"):
        Spool.open(tmp_path / "run")


def test_spool_lock_is_exclusive(tmp_path):
    spool = Spool.create(tmp_path / "run", "abc", "http://127.0.0.1:1")
    with pytest.raises(SpoolError, match="in use by another process"):
        Spool.open(tmp_path / "run")
    spool.unlock()
    Spool.open(tmp_path / "run").unlock()


def test_find_spools_nested_and_missing(tmp_path):
    for name in ("b", "a/deeper"):
        Spool.create(tmp_path / name, name, "http://127.0.0.1:1").unlock()
    assert find_spools(tmp_path) == [tmp_path / "a" / "deeper", tmp_path / "b"]
    assert find_spools(tmp_path / "b") == [tmp_path / "b"]
    assert find_spools(tmp_path / "missing") == []


# --- A tracker whose server is down, replayed to a live one ------------------------------


def log_every_kind(tracker: Tracker, tmp_path: Path) -> dict:
    """Log one operation of each kind through `tracker`; return what was logged."""
    files = tmp_path / "files"
    (files / "hydra").mkdir(parents=True)
    (files / "hydra" / "overrides.yaml").write_text("- seed=1\n")
    (files / "train.log").write_text("a log line\n")
    metrics = [
        Metric("train/loss", 1.0 / step, step, 1_700_000_000_000 + step) for step in (1, 2, 3)
    ]
    metrics.append(Metric("test/accuracy", float("nan"), 1, 1_700_000_000_500))
    figure, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])

    tracker.log_params({"optimizer.lr": 0.001, "tracking.uri": "http://alice:pw@host:5000"})
    tracker.log_metrics(metrics)
    tracker.set_tags({"gradient_health": "healthy"})
    tracker.log_text("fc1 healthy\n", "health/verdict.txt")
    tracker.log_figure(figure, "figures/loss.png")
    tracker.log_file(files / "train.log", "logs")
    tracker.log_dir(files / "hydra", "config/hydra")
    tracker.log_image(np.zeros((8, 8, 3), dtype=np.uint8), key="gradient_histograms", step=2)
    plt.close(figure)
    return {"metrics": metrics}


EXPECTED_ARTIFACTS = [
    "config/hydra/overrides.yaml",
    "figures/loss.png",
    "health/verdict.txt",
    "logs/train.log",
]


def test_every_kind_spooled_then_replayed(server, tmp_path, no_http_retries):
    run_id = new_run(server.uri, "every-kind")
    tracker = spooling_tracker(run_id, tmp_path / "spool")
    logged = log_every_kind(tracker, tmp_path)
    tracker.end("FINISHED")
    message = tracker.unsent_message()
    folder = tmp_path / "spool" / run_id

    assert f"spool {folder}" in message
    assert f"{REPLAY_COMMAND} {folder}" in message
    assert "4 metric values" in message
    assert "final status FINISHED" in message
    assert find_spools(tmp_path / "spool") == [folder]

    result = replay_spool(folder, tracking_uri=server.uri)
    client = MlflowClient(server.uri)
    run = client.get_run(run_id)
    assert result.complete
    assert result.sent.metric_values == 4
    assert run.info.status == "FINISHED"
    assert run.data.params == {"optimizer.lr": "0.001", "tracking.uri": "http://***@host:5000"}
    assert run.data.tags["gradient_health"] == "healthy"
    history = {m.step: m for m in client.get_metric_history(run_id, "train/loss")}
    for metric in logged["metrics"][:3]:
        assert history[metric.step].value == metric.value
        assert history[metric.step].timestamp == metric.timestamp
    assert np.isnan(client.get_metric_history(run_id, "test/accuracy")[0].value)
    paths = artifact_paths(client, run_id)
    assert [p for p in paths if not p.startswith("images/")] == EXPECTED_ARTIFACTS
    images = [p for p in paths if p.startswith("images/gradient_histograms+step+2+")]
    assert len(images) == 2  # MLflow stores a PNG and a compressed WebP per image


def test_replay_twice_adds_nothing(server, tmp_path, no_http_retries):
    run_id = new_run(server.uri, "twice")
    tracker = spooling_tracker(run_id, tmp_path / "spool")
    log_every_kind(tracker, tmp_path)
    tracker.end("FINISHED")
    folder = tmp_path / "spool" / run_id
    replay_spool(folder, tracking_uri=server.uri)
    client = MlflowClient(server.uri)
    before = (metric_steps(client, run_id), artifact_paths(client, run_id))

    again = replay_spool(folder, tracking_uri=server.uri)
    assert again.complete
    assert again.sent.operations == 0
    assert (metric_steps(client, run_id), artifact_paths(client, run_id)) == before


def test_uncertain_metrics_not_duplicated(server, tmp_path):
    # The batch reached the server, but its response did not reach the job.
    run_id = new_run(server.uri, "uncertain")
    client = MlflowClient(server.uri)
    rows = [["train/loss", 0.5, 1_700_000_000_000 + step, step] for step in (1, 2, 3)]
    spool = Spool.create(tmp_path / run_id, run_id, server.uri)
    sent = spool.append("metrics", {"metrics": rows[:2]})
    spool.mark(sent, ATTEMPTED)
    tracker = Tracker(client, run_id, server.uri)
    tracker.log_metrics([Metric(k, v, step, ts) for k, v, ts, step in rows[:2]])
    spool.append("metrics", {"metrics": rows[2:]})
    spool.unlock()

    result = replay_spool(tmp_path / run_id)
    assert result.complete
    assert result.skipped_values == 2
    assert metric_steps(client, run_id) == {"train/loss": [1, 2, 3]}


def test_partial_replay_resumes_after_crash(server, tmp_path):
    run_id = new_run(server.uri, "partial")
    client = MlflowClient(server.uri)
    spool = Spool.create(tmp_path / run_id, run_id, server.uri)
    for step in (1, 2, 3):
        spool.append("metrics", {"metrics": [["train/loss", 1.0, 1_700_000_000_000, step]]})
    spool.unlock()
    # A replay that died after sending the first operation and starting the second.
    crashed = Spool.open(tmp_path / run_id)
    first, second, _ = crashed.operations
    crashed.mark(first, ATTEMPTED)
    Tracker(client, run_id, server.uri).log_metrics([Metric("train/loss", 1.0, 1, 0)])
    crashed.mark(first, "sent")
    crashed.mark(second, ATTEMPTED)
    crashed.unlock()

    result = replay_spool(tmp_path / run_id)
    assert result.complete
    assert result.sent.operations == 2
    assert metric_steps(client, run_id) == {"train/loss": [1, 2, 3]}


def test_replay_to_down_server_keeps_spool(tmp_path):
    spool = Spool.create(tmp_path / "run", "abc", dead_uri())
    spool.append("tags", {"tags": [["a", "1"]]})
    spool.unlock()
    start = time.monotonic()
    result = replay_spool(tmp_path / "run", health_check_timeout=1)
    assert time.monotonic() - start < 5
    assert not result.complete
    assert result.left.operations == 1
    assert "Cannot reach the MLflow tracking server" in result.error


def test_replay_unknown_run_rejected(server, tmp_path):
    spool = Spool.create(tmp_path / "run", "0" * 32, server.uri)
    spool.append("tags", {"tags": [["a", "1"]]})
    spool.unlock()
    with pytest.raises(SpoolError, match="not found at"):
        replay_spool(tmp_path / "run")
    assert Spool.open(tmp_path / "run", lock=False).has_pending()


def test_replay_needs_uri_with_credentials(tmp_path):
    spool = Spool.create(tmp_path / "run", "abc", "http://alice:pw@127.0.0.1:1")
    spool.append("tags", {"tags": [["a", "1"]]})
    spool.unlock()
    assert "pw" not in (tmp_path / "run" / "spool.json").read_text()
    with pytest.raises(SpoolError, match="--tracking-uri"):
        replay_spool(tmp_path / "run")


def test_outage_costs_no_retries(server, tmp_path, no_http_retries):
    run_id = new_run(server.uri, "backoff")
    tracker = spooling_tracker(run_id, tmp_path / "spool", retry_wait=60.0)
    tracker.log_metrics([Metric("train/loss", 1.0, 1, 0)])  # the first failure starts the spool
    probes = []
    original = tracker._server_responds
    tracker._server_responds = lambda: probes.append(1) or original()
    start = time.monotonic()
    for step in range(2, 52):
        tracker.log_metrics([Metric("train/loss", 1.0, step, 0)])
    elapsed = time.monotonic() - start
    assert probes == [], "no retry before retry_wait has passed"
    assert elapsed < 2, f"50 spooled calls took {elapsed:.1f} s"
    assert tracker.spool.contents(tracker.spool.pending()).metric_values == 51
    assert tracker.spooled_metric_steps() == {"train/loss": 51}
    tracker.spool.unlock()


def test_final_timeout_bounds_end(tmp_path, no_http_retries):
    tracker = spooling_tracker("abc", tmp_path / "spool", final_timeout=1.0)
    tracker.set_tags({"a": "1"})
    start = time.monotonic()
    tracker.end("FAILED")
    elapsed = time.monotonic() - start
    assert 1.0 <= elapsed < 4, f"end took {elapsed:.1f} s"
    kinds = [op.kind for op in Spool.open(tmp_path / "spool" / "abc").pending()]
    assert kinds == ["tags", "status"]


def test_reopened_run_sends_old_spool_first(server, tmp_path, no_http_retries):
    run_id = new_run(server.uri, "reopen")
    cfg = compose_config(
        ["tracking=server", f"tracking.uri={server.uri}", f"tracking.spool_dir={tmp_path}"]
    )
    # An earlier attempt of the job lost its server, and was killed.
    earlier = spooling_tracker(run_id, tmp_path)
    earlier.log_metrics([Metric("train/loss", 1.0, 1, 0)])
    earlier.end("KILLED")
    client = MlflowClient(server.uri)
    experiment = client.get_experiment(client.get_run(run_id).info.experiment_id)

    configure_http_requests(cfg.tracking)
    with start_run(server.uri, experiment.name, "reopen", run_id=run_id) as tracker:
        assert metric_steps(client, run_id) == {"train/loss": [1]}
        assert client.get_run(run_id).info.status == "RUNNING", "KILLED was not sent"
        tracker.log_metrics([Metric("train/loss", 1.0, 2, 0)])
    assert client.get_run(run_id).info.status == "FINISHED"
    assert metric_steps(client, run_id) == {"train/loss": [1, 2]}
    assert not (tmp_path / run_id).exists(), "a spool that was sent is removed"


def test_without_spool_settings_raises(server, no_http_retries):
    run_id = new_run(server.uri, "no-spool")
    uri = dead_uri()
    tracker = Tracker(MlflowClient(uri), run_id, uri)
    with pytest.raises(TrackingServerError, match=uri):
        tracker.set_tags({"a": "1"})


# --- The replay command ------------------------------------------------------------------


def test_cli_exit_status_follows_result(server, tmp_path, no_http_retries, capsys):
    run_id = new_run(server.uri, "cli")
    tracker = spooling_tracker(run_id, tmp_path / "spool")
    tracker.set_tags({"a": "1"})
    tracker.end("FINISHED")

    with pytest.raises(SystemExit) as down:
        main([str(tmp_path / "spool")])  # the spool names the dead port
    assert down.value.code == 1
    main([str(tmp_path / "spool"), "--tracking-uri", server.uri, "--remove-sent"])
    output = capsys.readouterr().out
    assert f"sent 2 operations (1 tag, final status FINISHED) to run {run_id}" in output
    assert not (tmp_path / "spool" / run_id).exists()
    with pytest.raises(SystemExit) as missing:
        main([str(tmp_path / "missing")])
    assert missing.value.code == 2


# --- Whole training runs against a server that stops ------------------------------------


# NOTE: the model (mlflow.pytorch.log_model) and the epoch images (reports.log_epoch_images
# calls MlflowClient.log_image) do not go through the Tracker, so a server that is down
# when they are logged fails the job there. These runs leave them out.
NOT_SPOOLED = ["tracking.log_model=false", "monitor.epoch_images=false"]


def server_cfg(uri: str, tmp_path: Path, *overrides: str):
    return compose_config(
        [
            *TINY_OVERRIDES,
            *NOT_SPOOLED,
            "tracking=server",
            f"tracking.uri={uri}",
            f"tracking.spool_dir={tmp_path / 'spool'}",
            "tracking.http_request_max_retries=0",  # a stopped server fails a request at once
            *overrides,
        ]
    )


def stop_at_epoch(monkeypatch, server: MlflowServer, epoch: int, then=None) -> list:
    """Stop `server` when the loop logs epoch `epoch`, and call `then(epoch)` at every epoch.

    Returns the list of metric batches that the loop logged, one an epoch.
    """
    batches: list[list[Metric]] = []
    original = Tracker.log_metrics

    def log_metrics(self, metrics):
        metrics = list(metrics)
        batches.append(metrics)
        if len(batches) == epoch:
            server.stop()
        if then is not None:
            then(len(batches))
        original(self, metrics)

    monkeypatch.setattr(Tracker, "log_metrics", log_metrics)
    return batches


def run_of(client: MlflowClient, experiment_name: str):
    experiment = client.get_experiment_by_name(experiment_name)
    (run,) = client.search_runs([experiment.experiment_id])
    return run


@pytest.mark.slow
def test_server_restart_mid_run_loses_nothing(tmp_path, monkeypatch, caplog, no_http_retries):
    folder = tmp_path / "server"
    server = MlflowServer(folder)
    server.start()
    overrides = ("trainer.epochs=6", "tracking.spool_retry_wait=0.2",
                 "tracking.spool_retry_max_wait=0.5")  # fmt: skip
    try:
        train(server_cfg(server.uri, tmp_path, "tracking.experiment_name=steady", *overrides))
        restarted = threading.Event()
        again = MlflowServer(folder, port=server.port)

        def restart() -> None:
            time.sleep(2)
            again.start()
            restarted.set()

        def wait_for_restart(epoch: int) -> None:
            if epoch == 2:
                threading.Thread(target=restart, daemon=True).start()
            if epoch == 5:  # the run goes on while the server is down, then finds it back
                assert restarted.wait(timeout=120), "the server did not restart"
                time.sleep(0.6)  # past spool_retry_max_wait, so this epoch retries

        stop_at_epoch(monkeypatch, server, epoch=2, then=wait_for_restart)
        with caplog.at_level(logging.INFO, logger="src.tracking"):
            train(server_cfg(server.uri, tmp_path, "tracking.experiment_name=flaky", *overrides))
        monkeypatch.undo()

        client = MlflowClient(again.uri)
        steady, flaky = run_of(client, "steady"), run_of(client, "flaky")
        assert flaky.info.status == "FINISHED"
        expected = metric_steps(client, steady.info.run_id)
        assert sum(len(steps) for steps in expected.values()) > 100
        assert metric_steps(client, flaky.info.run_id) == expected
        assert params_but_experiment(flaky) == params_but_experiment(steady)
        assert artifact_shapes(client, flaky) == artifact_shapes(client, steady)
        assert "keeps its tracking data in the spool" in caplog.text
        assert "responds again" in caplog.text
        assert find_spools(tmp_path / "spool") == [], "a spool that was sent is removed"
    finally:
        server.stop()
        if "again" in locals():
            again.stop()


def params_but_experiment(run) -> dict[str, str]:
    return {k: v for k, v in run.data.params.items() if k != "tracking.experiment_name"}


def artifact_shapes(client: MlflowClient, run) -> list[str]:
    """Return the run's artifact paths without the timestamps and uuids of MLflow's images."""
    return sorted(p.split("+timestamp+")[0] for p in artifact_paths(client, run.info.run_id))


@pytest.mark.slow
def test_server_down_until_end_then_replay(tmp_path, monkeypatch, caplog, no_http_retries):
    folder = tmp_path / "server"
    server = MlflowServer(folder)
    server.start()
    try:
        overrides = ("trainer.epochs=4", "tracking.spool_final_timeout=1")
        train(server_cfg(server.uri, tmp_path, "tracking.experiment_name=steady", *overrides))
        batches = stop_at_epoch(monkeypatch, server, epoch=2)
        with caplog.at_level(logging.INFO), pytest.raises(SpooledDataError) as info:
            train(server_cfg(server.uri, tmp_path, "tracking.experiment_name=down", *overrides))
        monkeypatch.undo()
    finally:
        server.stop()
    (spool_folder,) = find_spools(tmp_path / "spool")
    message = str(info.value)
    spooled = Spool.open(spool_folder, lock=False)
    contents = spooled.contents(spooled.pending())
    unsent_values = sum(len(batch) for batch in batches[1:])
    assert f"spool {spool_folder}" in message
    assert f"{REPLAY_COMMAND} {spool_folder}" in message
    assert f"{contents.metric_values} metric values" in message
    assert f"{contents.files} files" in message
    assert message in caplog.text, "the error is also logged"
    assert contents.metric_values >= unsent_values  # the epochs' values and time/fit_seconds
    assert contents.status == "FINISHED"

    with running_mlflow_server(folder) as again:
        client = MlflowClient(again.uri)
        down = run_of(client, "down")
        assert down.info.status == "RUNNING"
        result = replay_spool(spool_folder, tracking_uri=again.uri)
        assert result.complete
        steady = run_of(client, "steady")
        down = run_of(client, "down")
        assert down.info.status == "FINISHED"
        expected = metric_steps(client, steady.info.run_id)
        assert metric_steps(client, down.info.run_id) == expected
        assert artifact_shapes(client, down) == artifact_shapes(client, steady)

        again_result = replay_spool(spool_folder, tracking_uri=again.uri)
        assert again_result.sent.operations == 0
        assert metric_steps(client, down.info.run_id) == expected


@pytest.mark.slow
def test_cli_job_fails_then_cli_replays(tmp_path):
    """A real job process: the server stops during its run, it exits non-zero, a replay fixes it."""
    folder = tmp_path / "server"
    server = MlflowServer(folder)
    server.start()
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    env.pop("MLFLOW_TRACKING_URI", None)
    command = [
        sys.executable, "-m", "src.train", *TINY_OVERRIDES, "trainer.epochs=40",
        "tracking=server", f"tracking.uri={server.uri}", "tracking.experiment_name=cli",
        f"tracking.spool_dir={tmp_path / 'spool'}", "tracking.spool_final_timeout=1",
        "tracking.http_request_max_retries=0",
        *NOT_SPOOLED, f"hydra.run.dir={tmp_path / 'run'}",
    ]  # fmt: skip
    try:
        job = subprocess.Popen(
            command, cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        client = MlflowClient(server.uri)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and job.poll() is None:
            experiment = _experiment_or_none(client, "cli")
            if experiment and client.search_runs([experiment.experiment_id]):
                break
            time.sleep(0.1)
        server.stop()
        output, _ = job.communicate(timeout=300)
    finally:
        server.stop()
    assert job.returncode != 0, output
    (spool_folder,) = find_spools(tmp_path / "spool")
    assert f"{REPLAY_COMMAND} {spool_folder}" in output

    with running_mlflow_server(folder) as again:
        replay = subprocess.run(
            [sys.executable, "-m", "src.spool", str(tmp_path / "spool"),
             "--tracking-uri", again.uri],
            cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert replay.returncode == 0, replay.stdout + replay.stderr
        assert "nothing left to send" in replay.stdout
        run = run_of(MlflowClient(again.uri), "cli")
        assert run.info.status == "FINISHED"
        losses = MlflowClient(again.uri).get_metric_history(run.info.run_id, "train/loss")
        assert sorted(m.step for m in losses) == list(range(1, 40 * 3 + 1))


def _experiment_or_none(client: MlflowClient, name: str):
    try:
        return client.get_experiment_by_name(name)
    except Exception:  # the server may be busy starting the run
        return None
