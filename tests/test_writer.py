"""The metric writer process against a real SQLite store: values, failures, a killed child."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from src.gradients import Metric
from src.tracking import Tracker, default_tracking_uri
from src.writer import MetricWriter, MetricWriterError
from tests.conftest import PROJECT_ROOT


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory) -> str:
    """One SQLite store for the module, because creating its schema takes seconds."""
    return default_tracking_uri(tmp_path_factory.mktemp("mlruns"))


@pytest.fixture
def run(tracking_uri) -> tuple[MlflowClient, str]:
    """A fresh run of its own in the module's store."""
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("writer")
    experiment_id = experiment.experiment_id if experiment else client.create_experiment("writer")
    return client, client.create_run(experiment_id).info.run_id


@pytest.fixture
def writer(tracking_uri, run):
    writer = MetricWriter(tracking_uri, run[1])
    yield writer
    if writer.alive:
        writer._process.kill()
        writer._process.join()


def epoch_metrics(epoch: int, iterations: int = 40, keys: int = 29) -> list[Metric]:
    """Return one epoch's values as the training loop logs them: every key at every step."""
    metrics = []
    for i in range(iterations):
        step = (epoch - 1) * iterations + i + 1
        for k in range(keys):
            metrics.append(Metric(f"grad_stat/{k}", step + k / 100, step, 1_700_000_000_000 + step))
    return metrics


def stored(client: MlflowClient, run_id: str, keys) -> set[tuple[str, float, int, int]]:
    return {
        (key, m.value, m.step, m.timestamp)
        for key in keys
        for m in client.get_metric_history(run_id, key)
    }


def as_rows(metrics) -> set[tuple[str, float, int, int]]:
    return {(m.key, m.value, m.step, m.timestamp) for m in metrics}


def test_writer_stores_every_value(writer, run):
    client, run_id = run
    sent = epoch_metrics(1) + epoch_metrics(2)  # 2320 values: chunks of 1000 in the child
    writer.log_batch(sent[:1160])
    writer.log_batch(sent[1160:])
    writer.log_batch([])
    writer.flush()
    maps = Path(f"/proc/{writer.pid}/maps")
    if maps.exists():  # Linux: the child has not loaded torch's libraries
        assert "libtorch" not in maps.read_text()
    writer.close()
    keys = {m.key for m in sent}
    assert stored(client, run_id, keys) == as_rows(sent)
    assert writer.unwritten() == []


def test_writer_sends_new_keys_later(writer, run):
    client, run_id = run
    first = [Metric("train/loss", 2.5, 1, 1000)]
    second = [Metric("train/loss", 2.0, 2, 2000), Metric("val/loss", 1.5, 1, 2000)]
    writer.log_batch(first)
    writer.flush()
    writer.log_batch(second)
    writer.close()
    assert stored(client, run_id, ["train/loss", "val/loss"]) == as_rows(first + second)


def test_flush_raises_child_failure(writer, run):
    client, run_id = run
    first = epoch_metrics(1, iterations=2)
    writer.log_batch(first)
    writer.flush()
    client.delete_run(run_id)  # the store now rejects values for the run
    second = epoch_metrics(2, iterations=2)
    writer.log_batch(second)
    with pytest.raises(MetricWriterError, match=rf"run {run_id}.*58 metric values.*not stored"):
        writer.flush(timeout=60)
    assert as_rows(writer.unwritten()) == as_rows(second)
    with pytest.raises(MetricWriterError):
        writer.log_batch(first)
    client.restore_run(run_id)
    assert stored(client, run_id, {m.key for m in first}) == as_rows(first)


def test_killed_child_reported_not_hung(writer, run):
    client, run_id = run
    sent = epoch_metrics(1) + epoch_metrics(2) + epoch_metrics(3)
    writer.log_batch(sent[:1160])
    writer.log_batch(sent[1160:2320])
    os.kill(writer.pid, signal.SIGKILL)
    writer._process.join(10)
    start = time.monotonic()
    with pytest.raises(MetricWriterError, match=r"exited with code -9"):
        writer.log_batch(sent[2320:])
    with pytest.raises(MetricWriterError, match=r"exited with code -9"):
        writer.flush()
    assert time.monotonic() - start < 5
    # Each value is either in the store or returned as unwritten: none is lost.
    in_store = stored(client, run_id, {m.key for m in sent})
    unwritten = as_rows(writer.unwritten())
    assert in_store | unwritten == as_rows(sent[:2320])
    assert not in_store & unwritten
    with pytest.raises(MetricWriterError):
        writer.close()
    assert not writer.alive


def test_writer_rejects_server_uri():
    with pytest.raises(ValueError, match="SQLite stores only") as raised:
        MetricWriter("http://user:secret@127.0.0.1:5000", "0" * 32)
    assert "secret" not in str(raised.value)


def test_tracker_hands_metrics_to_writer(writer, tracking_uri, run):
    client, run_id = run
    tracker = Tracker(client, run_id, tracking_uri, writer=writer)
    sent = epoch_metrics(1, iterations=3)
    tracker.log_metrics(sent)
    tracker.flush()
    assert stored(client, run_id, {m.key for m in sent}) == as_rows(sent)
    writer.close()


def test_tracker_stores_values_of_dead_writer(writer, tracking_uri, run, caplog):
    client, run_id = run
    tracker = Tracker(client, run_id, tracking_uri, writer=writer)
    first, second = epoch_metrics(1, iterations=3), epoch_metrics(2, iterations=3)
    tracker.log_metrics(first)
    os.kill(writer.pid, signal.SIGKILL)
    writer._process.join(10)
    with caplog.at_level(logging.ERROR, logger="src.tracking"):
        tracker.log_metrics(second)  # the tracker notices and sends from this process
        tracker.flush()
    assert tracker.writer is None
    assert "exited with code -9" in caplog.text
    assert stored(client, run_id, {m.key for m in first}) == as_rows(first + second)


def test_open_writer_stored_at_exit(tracking_uri, run):
    client, run_id = run
    script = textwrap.dedent(
        f"""
        from types import SimpleNamespace
        from src.writer import MetricWriter
        writer = MetricWriter({tracking_uri!r}, {run_id!r})
        writer.log_batch([SimpleNamespace(key="train/loss", value=float(step), step=step,
                                          timestamp=1000 + step) for step in range(1, 101)])
        """
    )  # the script ends without flush or close
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=PROJECT_ROOT, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    history = client.get_metric_history(run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(1, 101))


def test_child_exits_with_killed_parent(tracking_uri, run):
    script = textwrap.dedent(
        f"""
        import os, signal
        from types import SimpleNamespace
        from src.writer import MetricWriter
        writer = MetricWriter({tracking_uri!r}, {run[1]!r})
        writer.log_batch([SimpleNamespace(key="train/loss", value=1.0, step=1, timestamp=1000)])
        writer.flush()
        print(writer.pid, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=PROJECT_ROOT, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    child = int(result.stdout.split()[0])
    deadline = time.monotonic() + 10
    while Path(f"/proc/{child}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not Path(f"/proc/{child}").exists() or _is_zombie(child)


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True
