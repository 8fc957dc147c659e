"""End-of-epoch checkpoints, and resuming a job from one into the same MLflow run.

A job's checkpoints live in ``<checkpoint.dir>/<experiment>/<variant>/``, where the
variant folder is the run name plus a hash of every config value that changes the
results (tracking, checkpoint, device and thread settings left out). The same
command therefore finds the same folder on any machine that shares the disk. It holds:

- ``checkpoint.pt``: model, optimizer, RNG states, the monitor's histograms, the
  host copy of every logged metric, the epoch and global step, the MLflow run id.
  It is written to a temporary file and renamed, so a crash leaves the previous one
  whole, and it loads with ``torch.load(..., weights_only=True)``.
- ``lock``: the process training that variant takes a ``flock`` on it, so two
  processes never resume the same run. The kernel drops the lock when a process
  dies, even by SIGKILL.

Resuming reopens the run, restores the state, and replays nothing twice: metric
values the store already has (an epoch logged before its checkpoint was written,
or a partial epoch flushed when a job was stopped) are not sent again.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import math
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from src.config import UserError
from src.gradients import Metric
from src.health import Verdict
from src.histograms import HistogramHistory

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
CHECKPOINT_FILE = "checkpoint.pt"
LOCK_FILE = "lock"
MARKER_FILE = "checkpoint.json"  # in a Hydra job folder: where this job's checkpoints are
# Config keys that do not change what a job computes, so they stay out of the variant hash.
UNHASHED_KEYS = ("tracking", "checkpoint", "trainer.device", "trainer.num_threads",
                 "dataset.num_workers")  # fmt: skip


class CheckpointError(UserError):
    """A checkpoint that cannot be resumed, named with what to do."""


# ---------------------------------------------------------------------------
# Where a job's checkpoints are


def variant_hash(cfg: DictConfig) -> str:
    """Return 12 hex digits that identify what `cfg` computes, ignoring UNHASHED_KEYS."""
    container = OmegaConf.to_container(cfg, resolve=True)
    for dotted in UNHASHED_KEYS:
        *parents, last = dotted.split(".")
        node = container
        for key in parents:
            node = node.get(key, {})
        node.pop(last, None)
    text = json.dumps(container, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def checkpoint_dir(cfg: DictConfig, run_name: str, root: Path) -> Path:
    """Return the folder of this variant's checkpoints, under `root` for a relative dir."""
    base = Path(cfg.checkpoint.dir)
    if not base.is_absolute():
        base = root / base
    safe_name = re.sub(r"[^A-Za-z0-9=,._+-]", "_", run_name)[:80]
    experiment = re.sub(r"[^A-Za-z0-9=,._+-]", "_", cfg.tracking.experiment_name)
    digest = variant_hash(cfg)
    folder = base / experiment / f"{safe_name}-{digest}"
    if not folder.is_dir():
        # The same overrides in another order name the same variant: the hash decides.
        same_variant = sorted((base / experiment).glob(f"*-{digest}"))
        if len(same_variant) == 1:
            return same_variant[0]
    return folder


# ---------------------------------------------------------------------------
# The state that a checkpoint carries


@dataclass
class History:
    """Host copies of every logged metric and each epoch's gradient-health verdict."""

    metrics: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)
    verdicts: list[Verdict] = field(default_factory=list)
    # Arrays of the values that state_dict converted already; the lists only grow.
    _converted: dict[str, tuple[np.ndarray, np.ndarray]] = field(
        default_factory=dict, repr=False, compare=False
    )

    def add(self, metrics: list[Metric]) -> None:
        for metric in metrics:
            steps, values = self.metrics.setdefault(metric.key, ([], []))
            steps.append(metric.step)
            values.append(metric.value)

    def last(self) -> dict[str, float]:
        return {key: values[-1] for key, (_, values) in self.metrics.items()}

    def state_dict(self) -> dict[str, Any]:
        """Return the history as tensors and plain types, loadable with ``weights_only=True``.

        Values converted by an earlier call are reused, so a call costs about the values
        added since, not the whole history.
        """
        return {
            "metrics": {key: self._arrays(key) for key in self.metrics},
            "verdicts": [_verdict_state(v) for v in self.verdicts],
        }

    def _arrays(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        steps, values = self.metrics[key]
        done_steps, done_values = self._converted.get(key, (np.zeros(0, np.int64), np.zeros(0)))
        done = len(done_steps)
        if done < len(steps):
            done_steps = np.concatenate([done_steps, np.array(steps[done:], dtype=np.int64)])
            done_values = np.concatenate([done_values, np.array(values[done:], dtype=np.float64)])
            self._converted[key] = (done_steps, done_values)
        return torch.from_numpy(done_steps), torch.from_numpy(done_values)

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> History:
        metrics = {
            key: (steps.tolist(), values.tolist())
            for key, (steps, values) in state["metrics"].items()
        }
        return cls(metrics, [_verdict_from_state(v) for v in state["verdicts"]])


def _verdict_state(verdict: Verdict) -> dict[str, Any]:
    return {
        "network": verdict.network,
        "layer_verdicts": list(verdict.layer_verdicts),
        "first_layer": verdict.first_layer,
        "rms": torch.from_numpy(np.asarray(verdict.rms, dtype=np.float64)),
        "ratios": torch.from_numpy(np.asarray(verdict.ratios, dtype=np.float64)),
        "decay_per_layer": float(verdict.decay_per_layer),
    }


def _verdict_from_state(state: dict[str, Any]) -> Verdict:
    return Verdict(
        network=state["network"],
        layer_verdicts=list(state["layer_verdicts"]),
        first_layer=state["first_layer"],
        rms=state["rms"].numpy(),
        ratios=state["ratios"].numpy(),
        decay_per_layer=state["decay_per_layer"],
    )


@dataclass
class TrainState:
    """The training progress between epochs: what a checkpoint restores.

    `shuffle` is the generator that draws each epoch's order of the training set;
    `fit_seconds` adds up the training time of every attempt.
    """

    shuffle: torch.Generator
    epoch: int = 0  # epochs completed
    global_step: int = 0  # iterations completed
    history: History = field(default_factory=History)
    fit_seconds: float = 0.0

    @classmethod
    def new(cls, seed: int) -> TrainState:
        # Its own stream, so that reshuffles leave the global RNG alone.
        return cls(shuffle=torch.Generator().manual_seed(seed))


def histograms_state(histograms: HistogramHistory) -> dict[str, Any]:
    return {
        "epochs": list(histograms.epochs),
        "edges": [torch.from_numpy(np.asarray(e)) for e in histograms.edges],
        "counts": [torch.from_numpy(np.asarray(c)) for c in histograms.counts],
    }


def load_histograms_state(histograms: HistogramHistory, state: dict[str, Any]) -> None:
    histograms.epochs[:] = list(state["epochs"])
    histograms.edges[:] = [e.numpy() for e in state["edges"]]
    histograms.counts[:] = [c.numpy() for c in state["counts"]]


# ---------------------------------------------------------------------------
# Writing and reading


def save_atomic(payload: dict[str, Any], path: Path) -> None:
    """Write `payload` to `path` through a temporary file and a rename, then sync the folder.

    A crash at any moment leaves either the previous file or the new one, never a torn file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def load(path: Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True``; raise CheckpointError naming a bad file."""
    try:
        payload = torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # torch raises several types for a truncated or foreign file
        log.debug("torch.load(%s) failed: %s", path, err)
        raise CheckpointError(
            f"Cannot read checkpoint {path}: the file is damaged or was not written by this "
            f"tool ({type(err).__name__}). Delete it to start the variant afresh, or run "
            "without checkpoint.resume=true."
        ) from None
    version = payload.get("format") if isinstance(payload, dict) else None
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"Checkpoint {path} has format {version!r}, this code reads format "
            f"{FORMAT_VERSION}. Delete it to start the variant afresh."
        )
    return payload


def rng_state(shuffle: torch.Generator) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "shuffle": shuffle.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any], shuffle: torch.Generator) -> None:
    torch.set_rng_state(state["torch"].cpu())
    shuffle.set_state(state["shuffle"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


# ---------------------------------------------------------------------------
# The lock and the job-folder marker


class VariantLock:
    """An exclusive ``flock`` on the variant folder's lock file, held while a job trains it.

    The file also names the holder (host and pid), for the message another process gets.
    Where the file system has no working flock (some network file systems), a warning is
    logged and the job goes on unlocked.
    """

    def __init__(self, folder: Path):
        self.path = folder / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> bool:
        """Take the lock; return False when another live process holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except OSError as err:
            log.warning("No lock on %s (%s); nothing stops a second job on it", self.path, err)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.uname().nodename} {os.getpid()}\n".encode())
        self._fd = fd
        return True

    def holder(self) -> str:
        try:
            return self.path.read_text().strip() or "unknown"
        except OSError:
            return "unknown"

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None


def write_marker(job_dir: Path, folder: Path, run_id: str) -> None:
    """Note in the Hydra job folder which checkpoint folder and run this job writes."""
    marker = {"checkpoint_dir": str(folder), "run_id": run_id}
    (job_dir / MARKER_FILE).write_text(json.dumps(marker) + "\n")


def read_marker(job_dir: Path | None) -> dict | None:
    if job_dir is None or not (job_dir / MARKER_FILE).is_file():
        return None
    return json.loads((job_dir / MARKER_FILE).read_text())


def requeued(job_dir: Path | None) -> bool:
    """Tell whether this job is an earlier attempt of itself, started again by its scheduler.

    SLURM counts requeues in SLURM_RESTART_COUNT. Submitit (Hydra's submitit launcher,
    on SLURM or locally) runs a requeued job in its first attempt's folder, where that
    attempt left its marker.
    """
    if int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0:
        return True
    return bool(os.environ.get("SUBMITIT_EXECUTOR")) and read_marker(job_dir) is not None


# ---------------------------------------------------------------------------
# Sending each metric value once


def logged_steps(client, run_id: str) -> dict[str, int]:
    """Return the last step stored for each metric key of run `run_id`."""
    run = client.get_run(run_id)
    return {
        key: max(m.step for m in client.get_metric_history(run_id, key)) for key in run.data.metrics
    }


def missing_from_store(history: History, logged: dict[str, int], now_ms: int) -> list[Metric]:
    """Return the values of `history` at steps after the last one the store has for their key.

    A job killed before the metric writer stored an epoch that its checkpoint covers
    leaves such gaps; the checkpoint's history fills them. The original timestamps are
    not kept in the history, so these values get `now_ms`.
    """
    missing = []
    for key, (steps, values) in history.metrics.items():
        last = logged.get(key, -1)
        missing.extend(
            Metric(key, value, step, now_ms) for step, value in zip(steps, values) if step > last
        )
    return missing


class SkipLogged:
    """Send metrics through `tracker`, leaving out values at steps the store already has.

    A resumed job replays the iterations after its checkpoint. The earlier attempt
    sent the values up to the last step stored for a key, and they are the same.
    Within one key, values are always logged in step order, so an earlier attempt that
    stopped in the middle of a batch stored a prefix of each key's steps.
    """

    def __init__(self, tracker, logged: dict[str, int] | None = None):
        self.tracker = tracker
        self.logged = dict(logged or {})

    def log_metrics(self, metrics: list[Metric]) -> None:
        if self.logged:
            metrics = [m for m in metrics if m.step > self.logged.get(m.key, -1)]
        if metrics:
            self.tracker.log_metrics(metrics)


# ---------------------------------------------------------------------------
# One job's checkpoints


class Checkpointer:
    """The checkpoints of one job: where they are, whether to resume, and writing them.

    `every` is ``checkpoint.every``; 0 writes none. `min_interval` is
    ``checkpoint.min_interval``: seconds since the job started or since the last
    checkpoint before another is due. The last epoch always gets one. `resume` is
    ``checkpoint.resume``, or a requeue by the job's scheduler.
    """

    def __init__(self, cfg: DictConfig, run_name: str, root: Path, job_dir: Path | None):
        self.every = int(cfg.checkpoint.every)
        self.min_interval = float(cfg.checkpoint.min_interval)
        self.epochs = int(cfg.trainer.epochs)
        self.folder = checkpoint_dir(cfg, run_name, root)
        self.path = self.folder / CHECKPOINT_FILE
        self.job_dir = job_dir
        self.requeued = requeued(job_dir)
        self.resume = bool(cfg.checkpoint.resume) or self.requeued
        self.lock = VariantLock(self.folder)
        self.locked = False
        self._writer: threading.Thread | None = None
        self._last_save = time.monotonic()

    def acquire(self) -> None:
        """Take the variant's lock; raise CheckpointError if resuming and another job holds it.

        A new run whose variant another job trains at this moment goes on without
        checkpoints, with a warning, rather than overwrite that job's.
        """
        if self.every == 0 and not self.resume:
            return
        self.locked = self.lock.acquire()
        if self.locked:
            return
        holder = self.lock.holder()
        if self.resume:
            raise CheckpointError(
                f"Cannot resume from {self.folder}: another job (host and pid: {holder}) is "
                "training this variant now. Wait for it to end, or stop it first."
            )
        log.warning(
            "Another job (host and pid: %s) is training this variant and writing %s; this "
            "job writes no checkpoints",
            holder, self.folder,
        )  # fmt: skip
        self.every = 0

    def release(self) -> None:
        """Wait for the last checkpoint, then let other jobs have the variant."""
        self.wait()
        if self.locked:
            self.lock.release()
            self.locked = False

    def discard_earlier(self) -> None:
        """Delete the checkpoint that an earlier run of this variant left, as a new run starts.

        Without this, a new run that ends before its first checkpoint would leave the
        earlier run's file, and a resume would take that run for this one.
        """
        if self.every == 0 or not self.locked or not self.path.is_file():
            return
        self.path.unlink()
        log.info("Removed %s, the checkpoint of an earlier run of this variant", self.path)

    def load_for_resume(self, tracking_uri: str, device: torch.device) -> dict[str, Any] | None:
        """Return the checkpoint to resume from, or None to start a new run."""
        if not self.resume:
            return None
        if not self.path.is_file():
            log.info("No checkpoint at %s: starting a new run", self.path)
            return None
        payload = load(self.path, device)
        marker = read_marker(self.job_dir)
        if self.requeued and marker is not None and marker["run_id"] != payload["run_id"]:
            # The first attempt died before its first checkpoint; this one is another run's.
            log.info(
                "No checkpoint of run %s at %s: starting a new run", marker["run_id"], self.path
            )
            return None
        from src.tracking import redact_uri

        if redact_uri(payload["tracking_uri"]) != redact_uri(tracking_uri):
            raise CheckpointError(
                f"Checkpoint {self.path} belongs to run {payload['run_id']} in the store "
                f"{redact_uri(payload['tracking_uri'])}, but this job logs to "
                f"{redact_uri(tracking_uri)}. Set tracking.uri to that store to resume, or "
                "delete the checkpoint to start afresh."
            )
        return payload

    def due(self, epoch: int) -> bool:
        """True when a checkpoint is due at the end of `epoch`."""
        if self.every == 0:
            return False
        if epoch == self.epochs:
            return True
        waited = time.monotonic() - self._last_save
        return epoch % self.every == 0 and waited >= self.min_interval

    def save(self, payload: dict[str, Any]) -> None:
        """Write `payload` in a background thread, from a copy taken now.

        Training goes on while the file is written and synced; the next save, and
        :meth:`wait`, wait for the one before. A failed write is logged, and the
        previous checkpoint stays.
        """
        self.wait()
        self._last_save = time.monotonic()
        payload = {"format": FORMAT_VERSION, **_copy_tensors(payload)}
        if self.job_dir is not None and read_marker(self.job_dir) is None:
            write_marker(self.job_dir, self.folder, payload["run_id"])
        self._writer = threading.Thread(
            target=self._write, args=(payload,), name="checkpoint-writer", daemon=True
        )
        self._writer.start()

    def _write(self, payload: dict[str, Any]) -> None:
        try:
            save_atomic(payload, self.path)
        except Exception as err:
            log.error(
                "Writing the checkpoint of epoch %d of run %s to %s failed: %s. The previous "
                "checkpoint stays; free disk space or fix checkpoint.dir to resume later epochs",
                payload["epoch"], payload["run_id"], self.path, err,
            )  # fmt: skip
            return
        log.debug("Checkpoint of epoch %d written to %s", payload["epoch"], self.path)

    def wait(self) -> None:
        """Wait until the checkpoint being written, if any, is on disk."""
        if self._writer is not None:
            self._writer.join()
            self._writer = None


def _copy_tensors(obj: Any) -> Any:
    """Return `obj` with every tensor inside dicts, lists and tuples copied to the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {key: _copy_tensors(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_copy_tensors(value) for value in obj)
    return obj


def check_run_to_resume(client, payload: dict[str, Any], path: Path) -> str:
    """Return the status of the checkpoint's run; raise CheckpointError if it cannot continue.

    A run still RUNNING, while this process holds the variant's lock, belongs to an
    attempt that died without ending it (SIGKILL, a lost node): it is marked KILLED,
    the truth about that attempt, before this one reopens it.
    """
    from mlflow.exceptions import MlflowException

    run_id = payload["run_id"]
    try:
        run = client.get_run(run_id)
    except MlflowException:
        run = None
    if run is None or run.info.lifecycle_stage != "active":
        raise CheckpointError(
            f"Checkpoint {path} continues run {run_id}, which the tracking store no longer "
            "has (deleted?). Delete the checkpoint folder to start the variant afresh."
        )
    status = run.info.status
    if status == "RUNNING":
        client.set_terminated(run_id, "KILLED")
        log.warning(
            "Run %s was left RUNNING by an attempt that died without ending it; marked KILLED "
            "before resuming it", run_id,
        )  # fmt: skip
        status = "KILLED"
    return status


def validate_checkpoint(cfg: DictConfig) -> None:
    """Raise ConfigError for a ``checkpoint`` value that cannot work."""
    from src.config import ConfigError

    every = cfg.checkpoint.every
    if every < 0:
        raise ConfigError(
            f"Invalid config value checkpoint.every={every!r}: expected an integer >= 0 "
            "(0 writes no checkpoints)."
        )
    interval = cfg.checkpoint.min_interval
    if not (isinstance(interval, (int, float)) and math.isfinite(interval) and interval >= 0):
        raise ConfigError(
            f"Invalid config value checkpoint.min_interval={interval!r}: expected a finite "
            "number of seconds >= 0 (0 writes one at every checkpoint.every-th epoch)."
        )
    if not str(cfg.checkpoint.dir).strip():
        raise ConfigError(
            "Invalid config value checkpoint.dir='': expected a folder, for example checkpoints."
        )
