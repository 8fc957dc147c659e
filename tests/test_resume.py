"""Checkpoints, resuming into the same run, runs that tell the truth, and stale runs.

Histories are compared with an uninterrupted run of the same seed: same steps and
same values for every metric key (the time/* keys measure the clock, not the run).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from src import checkpoint as ckpt
from src.checkpoint import CHECKPOINT_FILE, CheckpointError, SkipLogged, VariantLock
from src.config import ConfigError
from src.gradients import GradientMonitor, Metric
from src.runs import main as runs_main
from src.sweep import job_run_name
from src.tracking import default_tracking_uri, process_tags
from src.train import JobInfo, train
from tests.conftest import PROJECT_ROOT, compose_config

# 600 images in batches of 128: 5 iterations an epoch, the last one partial.
OVERRIDES = [
    "trainer.epochs=6",
    "dataset.train_size=600",
    "dataset.test_size=100",
    "model.hidden_sizes=[32,16,16]",
    "monitor.epoch_images=false",
    "tracking.log_model=false",
    "checkpoint.min_interval=0",  # a checkpoint every epoch
]
SLOW_OVERRIDES = [  # enough work an epoch for a signal to land in the middle of training
    "trainer.epochs=20",
    "dataset.train_size=3000",
    "dataset.test_size=100",
    "model.hidden_sizes=[128,64,64]",
    "monitor.epoch_images=false",
    "tracking.log_model=false",
    "checkpoint.min_interval=0",
]


def configure(tmp_path: Path, overrides: list[str], name: str = "store"):
    cfg = compose_config(overrides)
    cfg.tracking.uri = default_tracking_uri(_mkdir(tmp_path / name))
    cfg.checkpoint.dir = str(tmp_path / f"{name}-checkpoints")
    return cfg


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def only_run(uri: str):
    client = MlflowClient(uri)
    experiments = client.search_experiments()
    runs = client.search_runs([e.experiment_id for e in experiments])
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return client, runs[0]


def histories(client: MlflowClient, run_id: str) -> dict[str, list[tuple[int, float]]]:
    """Every metric key's (step, value) pairs, in step order, without the clock's time/* keys."""
    run = client.get_run(run_id)
    found = {}
    for key in run.data.metrics:
        if key.startswith("time/"):
            continue
        pairs = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
        found[key] = pairs
    return found


def assert_same_histories(resumed: dict, reference: dict) -> None:
    assert resumed.keys() == reference.keys()
    for key in reference:
        steps = [s for s, _ in resumed[key]]
        assert len(steps) == len(set(steps)), f"{key}: duplicated steps"
        assert resumed[key] == reference[key], f"{key} differs from the uninterrupted run"


CASES = {
    "fast": OVERRIDES,
    "slow": SLOW_OVERRIDES,
    "slow_sigmoid": [*SLOW_OVERRIDES, "activation=sigmoid"],
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Histories of uninterrupted in-process runs of CASES, trained when first asked for."""
    found = {}

    def history_of(label: str) -> dict:
        if label not in found:
            cfg = configure(tmp_path_factory.mktemp(f"reference-{label}"), CASES[label])
            train(cfg, JobInfo(run_name="defaults"))
            client, run = only_run(cfg.tracking.uri)
            found[label] = histories(client, run.info.run_id)
        return found[label]

    return history_of


# ---------------------------------------------------------------------------
# The checkpoint file


def test_checkpoint_written_each_epoch_and_loads_weights_only(tmp_path):
    cfg = configure(tmp_path, OVERRIDES)
    cfg.checkpoint.every = 4
    train(cfg, JobInfo(run_name="defaults", output_dir=_mkdir(tmp_path / "job")))
    folder = ckpt.checkpoint_dir(cfg, "defaults", PROJECT_ROOT)
    payload = torch.load(folder / CHECKPOINT_FILE, weights_only=True)
    # every=4 over 6 epochs: written after epoch 4, and after the last one.
    assert payload["epoch"] == 6
    assert payload["global_step"] == 30
    _, run = only_run(cfg.tracking.uri)
    assert payload["run_id"] == run.info.run_id
    assert set(payload["model"]) == set(
        k for k in payload["model"] if k.endswith(("weight", "bias"))
    )
    assert payload["optimizer"]["state"]  # Adam's moments
    assert len(payload["histograms"]["epochs"]) == 6
    assert run.data.tags["checkpoint.dir"] == str(folder)
    # The job folder's marker names the checkpoint folder, for a requeue to find.
    assert ckpt.read_marker(tmp_path / "job")["checkpoint_dir"] == str(folder)
    assert not list(folder.glob("*.tmp"))


def test_no_checkpoint_with_every_zero(tmp_path):
    cfg = configure(tmp_path, OVERRIDES)
    cfg.checkpoint.every = 0
    train(cfg, JobInfo(run_name="defaults"))
    assert not (tmp_path / "store-checkpoints").exists()


@pytest.mark.parametrize(
    ("every", "min_interval", "expected"),
    [(1, 0.0, [1, 2, 3, 4, 5, 6]), (4, 0.0, [4, 6]), (1, 3600.0, [6]), (0, 0.0, [])],
)
def test_checkpoint_due(tmp_path, every, min_interval, expected):
    cfg = configure(tmp_path, OVERRIDES)
    cfg.checkpoint.every, cfg.checkpoint.min_interval = every, min_interval
    checkpointer = ckpt.Checkpointer(cfg, "defaults", PROJECT_ROOT, None)
    assert [epoch for epoch in range(1, 7) if checkpointer.due(epoch)] == expected


@pytest.mark.parametrize("value", ["-1", "nan", "inf"])
def test_bad_min_interval_rejected(tmp_path, value):
    cfg = configure(tmp_path, [*OVERRIDES, f"checkpoint.min_interval={value}"])
    with pytest.raises(ConfigError, match=f"checkpoint.min_interval={value}"):
        ckpt.validate_checkpoint(cfg)


def test_new_run_removes_earlier_checkpoint(tmp_path):
    # A finished run leaves its checkpoint. A new run that dies before its first checkpoint
    # must not leave that file behind, because a resume would take it for its own.
    cfg = configure(tmp_path, OVERRIDES)
    train(cfg, JobInfo(run_name="defaults"))
    folder = ckpt.checkpoint_dir(cfg, "defaults", PROJECT_ROOT)
    assert (folder / CHECKPOINT_FILE).is_file()
    checkpointer = ckpt.Checkpointer(cfg, "defaults", PROJECT_ROOT, None)
    checkpointer.acquire()
    checkpointer.discard_earlier()
    checkpointer.release()
    assert not (folder / CHECKPOINT_FILE).exists()


def test_checkpoint_folder_found_whatever_override_order(tmp_path):
    cfg = configure(tmp_path, [*OVERRIDES, "activation=tanh", "optimizer.lr=0.01"])
    first = ckpt.checkpoint_dir(cfg, "activation=tanh,optimizer.lr=0.01", PROJECT_ROOT)
    first.mkdir(parents=True)
    again = ckpt.checkpoint_dir(cfg, "optimizer.lr=0.01,activation=tanh", PROJECT_ROOT)
    assert again == first


def test_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "c" / CHECKPOINT_FILE
    ckpt.save_atomic({"format": 1, "epoch": 1}, path)

    def broken_save(obj, handle):
        handle.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_atomic({"format": 1, "epoch": 2}, path)
    assert torch.load(path, weights_only=True)["epoch"] == 1
    assert [p.name for p in path.parent.iterdir()] == [CHECKPOINT_FILE]


def test_corrupt_checkpoint_is_named(tmp_path):
    path = tmp_path / CHECKPOINT_FILE
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=f"Cannot read checkpoint {path}.*Delete it"):
        ckpt.load(path)


def test_variant_hash_ignores_run_settings():
    base = compose_config(OVERRIDES)
    same = compose_config(
        OVERRIDES + ["trainer.num_threads=2", "checkpoint.resume=true", "tracking=server"]
    )
    other = compose_config(OVERRIDES + ["optimizer.lr=0.01"])
    assert ckpt.variant_hash(base) == ckpt.variant_hash(same)
    assert ckpt.variant_hash(base) != ckpt.variant_hash(other)


def test_skip_logged_sends_only_new_steps():
    sent = []

    class Sink:
        def log_metrics(self, metrics):
            sent.extend(metrics)

    sink = SkipLogged(Sink(), {"train/loss": 3, "val/loss": 1})
    sink.log_metrics(
        [Metric("train/loss", 0.5, step, 0) for step in (3, 4)]
        + [Metric("val/loss", 0.1, 1, 0), Metric("val/loss", 0.1, 2, 0)]
        + [Metric("grad_norm/fc1", 1.0, 3, 0)]
    )
    assert [(m.key, m.step) for m in sent] == [
        ("train/loss", 4),
        ("val/loss", 2),
        ("grad_norm/fc1", 3),
    ]


# ---------------------------------------------------------------------------
# Resuming in-process


def interrupt_at(monkeypatch, step: int) -> None:
    """Make training raise KeyboardInterrupt right after recording iteration `step`."""
    original = GradientMonitor.record

    def record(self, loss, global_step, epoch, last_in_epoch):
        original(self, loss, global_step, epoch, last_in_epoch)
        if global_step == step:
            raise KeyboardInterrupt("test interrupt")

    monkeypatch.setattr(GradientMonitor, "record", record)


def test_interrupted_run_is_killed_flushed_and_resumes_identically(
    tmp_path, monkeypatch, reference
):
    cfg = configure(tmp_path, OVERRIDES)
    interrupt_at(monkeypatch, 13)  # in epoch 3, after checkpoints of epochs 1 and 2
    with pytest.raises(KeyboardInterrupt):
        train(cfg, JobInfo(run_name="defaults"))
    client, run = only_run(cfg.tracking.uri)
    assert run.info.status == "KILLED"
    # The iterations of the unfinished epoch were sent before the run ended.
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert steps == list(range(1, 14))
    monkeypatch.undo()

    cfg.checkpoint.resume = True
    metrics = train(cfg, JobInfo(run_name="defaults"))
    client, resumed = only_run(cfg.tracking.uri)
    assert resumed.info.run_id == run.info.run_id
    assert resumed.info.status == "FINISHED"
    assert resumed.data.tags["resume.attempts"] == "2"
    assert resumed.data.tags["resume.from_epoch"] == "2"
    assert_same_histories(histories(client, run.info.run_id), reference("fast"))
    assert metrics["test/accuracy"] == reference("fast")["test/accuracy"][-1][1]
    (fit_seconds,) = client.get_metric_history(run.info.run_id, "time/fit_seconds")
    assert fit_seconds.step == 0


def test_resume_without_checkpoint_starts_a_new_run(tmp_path, caplog):
    cfg = configure(tmp_path, OVERRIDES)
    cfg.trainer.epochs = 1
    cfg.checkpoint.resume = True
    with caplog.at_level("INFO"):
        train(cfg, JobInfo(run_name="defaults"))
    assert "No checkpoint at" in caplog.text
    _, run = only_run(cfg.tracking.uri)
    assert run.info.status == "FINISHED"


def test_resume_of_a_finished_run_does_nothing(tmp_path, caplog):
    cfg = configure(tmp_path, OVERRIDES)
    cfg.trainer.epochs = 2
    first = train(cfg, JobInfo(run_name="defaults"))
    client, run = only_run(cfg.tracking.uri)
    before = histories(client, run.info.run_id)
    cfg.checkpoint.resume = True
    with caplog.at_level("INFO"):
        again = train(cfg, JobInfo(run_name="defaults"))
    assert "finished already" in caplog.text
    assert again == first
    client, same = only_run(cfg.tracking.uri)
    assert same.info.status == "FINISHED"
    assert histories(client, run.info.run_id) == before


def test_resume_into_another_store_is_refused(tmp_path):
    cfg = configure(tmp_path, OVERRIDES)
    cfg.trainer.epochs = 1
    train(cfg, JobInfo(run_name="defaults"))
    cfg.tracking.uri = default_tracking_uri(_mkdir(tmp_path / "other"))
    cfg.checkpoint.resume = True
    with pytest.raises(CheckpointError, match="belongs to run .* but this job logs to"):
        train(cfg, JobInfo(run_name="defaults"))


def test_resume_of_a_deleted_run_is_refused(tmp_path):
    cfg = configure(tmp_path, OVERRIDES)
    cfg.trainer.epochs = 1
    train(cfg, JobInfo(run_name="defaults"))
    client, run = only_run(cfg.tracking.uri)
    client.delete_run(run.info.run_id)
    cfg.checkpoint.resume = True
    with pytest.raises(CheckpointError, match="no longer has"):
        train(cfg, JobInfo(run_name="defaults"))


def test_resume_of_locked_variant_rejected(tmp_path):
    cfg = configure(tmp_path, OVERRIDES)
    cfg.checkpoint.resume = True
    lock = VariantLock(ckpt.checkpoint_dir(cfg, "defaults", PROJECT_ROOT))
    assert lock.acquire()
    try:
        with pytest.raises(CheckpointError, match=f"another job .*{os.getpid()}"):
            train(cfg, JobInfo(run_name="defaults"))
    finally:
        lock.release()
    assert not (tmp_path / "store" / "mlflow.db").exists() or not MlflowClient(
        cfg.tracking.uri
    ).search_runs(["0"])


def test_run_left_running_is_marked_killed_on_resume(tmp_path):
    cfg = configure(tmp_path, OVERRIDES)
    cfg.trainer.epochs = 1
    train(cfg, JobInfo(run_name="defaults"))
    client, run = only_run(cfg.tracking.uri)
    client.update_run(run.info.run_id, status="RUNNING")  # as a SIGKILL leaves it
    path = ckpt.checkpoint_dir(cfg, "defaults", PROJECT_ROOT) / CHECKPOINT_FILE
    payload = ckpt.load(path)
    assert ckpt.check_run_to_resume(client, payload, path) == "KILLED"
    assert client.get_run(run.info.run_id).info.status == "KILLED"


# ---------------------------------------------------------------------------
# Real processes: SIGTERM and SIGKILL


def launch(tmp_path: Path, overrides: list[str]) -> subprocess.Popen:
    command = [sys.executable, "-m", "src.train", *overrides, f"hydra.run.dir={tmp_path / 'job'}"]
    return subprocess.Popen(
        command,
        cwd=PROJECT_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_for_checkpoint(path: Path, epoch: int, process: subprocess.Popen, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"training ended before epoch {epoch}:\n{process.stdout.read()}")
        if path.is_file():
            try:
                if torch.load(path, weights_only=True)["epoch"] >= epoch:
                    return
            except (EOFError, RuntimeError):
                pass  # cannot happen with the rename, but do not fail the test on a race
        time.sleep(0.05)
    pytest.fail(f"no checkpoint of epoch {epoch} within {timeout} s")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_killed_process_resumes_into_the_same_run(tmp_path, signum, reference):
    store = _mkdir(tmp_path / "store")
    uri = default_tracking_uri(store)
    overrides = [
        *SLOW_OVERRIDES,
        f"tracking.uri={uri}",
        f"checkpoint.dir={tmp_path / 'checkpoints'}",
    ]
    cfg = compose_config(overrides)
    run_name = job_run_name(overrides, None)  # a single run is named after its overrides
    path = ckpt.checkpoint_dir(cfg, run_name, PROJECT_ROOT) / CHECKPOINT_FILE

    process = launch(tmp_path, overrides)
    wait_for_checkpoint(path, 3, process)
    process.send_signal(signum)
    output, _ = process.communicate(timeout=120)
    assert process.returncode != 0
    client, run = only_run(uri)
    if signum == signal.SIGTERM:
        assert run.info.status == "KILLED", output
        assert "Traceback" not in output
    else:
        assert run.info.status == "RUNNING"  # a SIGKILLed job cannot end its run
        assert runs_main(["stale", "--tracking-uri", uri]) == 1
        assert runs_main(["stale", "--tracking-uri", uri, "--mark-killed"]) == 0
        assert client.get_run(run.info.run_id).info.status == "KILLED"
        assert runs_main(["stale", "--tracking-uri", uri]) == 0
    payload = torch.load(path, weights_only=True)
    assert payload["run_id"] == run.info.run_id
    assert payload["epoch"] >= 3

    resumed = subprocess.run(
        [sys.executable, "-m", "src.train", *overrides, "checkpoint.resume=true",
         f"hydra.run.dir={tmp_path / 'job2'}"],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    client, run = only_run(uri)
    assert run.info.status == "FINISHED"
    assert_same_histories(histories(client, run.info.run_id), reference("slow"))
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "logs")}
    assert "logs/attempt-2" in artifacts


def test_stale_command_leaves_live_runs_alone(tmp_path, capsys):
    uri = default_tracking_uri(_mkdir(tmp_path / "store"))
    client = MlflowClient(uri)
    experiment = client.create_experiment("e", artifact_location=(tmp_path / "a").as_uri())
    live = client.create_run(experiment, tags=process_tags())
    dead_tags = {**process_tags(), "process.pid": "999999999"}
    dead = client.create_run(experiment, tags=dead_tags)
    other_host = client.create_run(
        experiment, tags={"process.host": "elsewhere", "process.pid": "1"}
    )
    assert runs_main(["stale", "--tracking-uri", uri]) == 1
    out = capsys.readouterr().out
    assert dead.info.run_id in out
    assert "is gone" in out
    assert live.info.run_id not in out
    assert other_host.info.run_id not in out
    # A run from another host counts once it has been quiet for --older-than minutes.
    assert runs_main(["stale", "--tracking-uri", uri, "--older-than", "0", "--mark-killed"]) == 0
    statuses = {r.info.run_id: r.info.status for r in client.search_runs([experiment])}
    assert statuses == {
        live.info.run_id: "RUNNING",
        dead.info.run_id: "KILLED",
        other_host.info.run_id: "KILLED",
    }


def test_stale_command_names_a_missing_experiment(tmp_path, capsys):
    uri = default_tracking_uri(_mkdir(tmp_path / "store"))
    assert runs_main(["stale", "--tracking-uri", uri, "--experiment", "nope"]) == 2
    assert "No experiment named 'nope'" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# A requeue by submitit


@pytest.mark.slow
def test_submitit_requeue_resumes_the_job(tmp_path, reference):
    uri = default_tracking_uri(_mkdir(tmp_path / "store"))
    overrides = [
        *SLOW_OVERRIDES,
        f"tracking.uri={uri}",
        f"checkpoint.dir={tmp_path / 'checkpoints'}",
    ]
    folder = ckpt.checkpoint_dir(compose_config(overrides), "defaults", PROJECT_ROOT)
    process = subprocess.Popen(
        [sys.executable, "-m", "src.train", "-m", "hydra/launcher=cluster_local", *overrides,
         f"hydra.sweep.dir={tmp_path / 'sweep'}"],
        cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    wait_for_checkpoint(folder / CHECKPOINT_FILE, 3, process, timeout=240)
    _, pid = (folder / ckpt.LOCK_FILE).read_text().split()
    os.kill(int(pid), signal.SIGUSR2)  # what SLURM sends before a time-out or preemption
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output[-3000:]
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("vanishing-gradients")
    runs = client.search_runs([experiment.experiment_id])
    (run,) = [r for r in runs if "sweep.role" not in r.data.tags]  # the job's, not the parent's
    assert run.info.status == "FINISHED"
    assert run.data.tags["resume.attempts"] == "2"
    assert_same_histories(histories(client, run.info.run_id), reference("slow"))


@pytest.mark.slow
def test_sweep_killed_mid_job_resumes_what_it_lacks(tmp_path, reference):
    uri = default_tracking_uri(_mkdir(tmp_path / "store"))
    overrides = [*SLOW_OVERRIDES, f"tracking.uri={uri}", f"checkpoint.dir={tmp_path / 'ckpt'}"]
    sigmoid_cfg = compose_config([*overrides, "activation=sigmoid"])
    path = ckpt.checkpoint_dir(sigmoid_cfg, "activation=sigmoid", PROJECT_ROOT) / CHECKPOINT_FILE

    def sweep(name: str, *extra: str) -> list[str]:
        return [sys.executable, "-m", "src.train", "-m", "activation=relu,sigmoid", *overrides,
                *extra, f"hydra.sweep.dir={tmp_path / name}"]  # fmt: skip

    process = subprocess.Popen(
        sweep("first"), cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    wait_for_checkpoint(path, 3, process, timeout=240)
    process.kill()  # the whole sweep dies at once, parent run and all
    process.communicate(timeout=60)

    again = subprocess.run(
        sweep("again", "checkpoint.resume=true"), cwd=PROJECT_ROOT, capture_output=True,
        text=True, timeout=600,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("vanishing-gradients")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    relu, sigmoid = runs["activation=relu"], runs["activation=sigmoid"]
    assert relu.info.status == sigmoid.info.status == "FINISHED"
    assert "resume.attempts" not in relu.data.tags  # finished before the kill: skipped
    assert sigmoid.data.tags["resume.attempts"] == "2"
    # Both now belong to the second sweep's parent run, which compares them.
    parents = {relu.data.tags["mlflow.parentRunId"], sigmoid.data.tags["mlflow.parentRunId"]}
    assert len(parents) == 1
    assert client.get_run(parents.pop()).info.status == "FINISHED"
    # The first sweep's parent run died with its process: the stale command finds it.
    (first_parent,) = [
        r for r in client.search_runs([experiment.experiment_id], "tags.`sweep.role` = 'parent'")
        if r.info.status == "RUNNING"
    ]  # fmt: skip
    assert runs_main(["stale", "--tracking-uri", uri, "--mark-killed"]) == 0
    assert client.get_run(first_parent.info.run_id).info.status == "KILLED"
    sigmoid_reference = reference("slow_sigmoid")
    assert_same_histories(histories(client, sigmoid.info.run_id), sigmoid_reference)
