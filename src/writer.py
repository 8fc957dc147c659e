"""A child process that writes a run's metrics to a local SQLite store.

The reference experiment logs about 58,000 values a run. Written with plain SQL
(:mod:`src.sqlite_metrics`) they cost about 6 µs each, 0.35 s of CPU time a
run, about 7% of the training loop on 2 CPU cores. :class:`MetricWriter` moves
that work to a child process, so that it runs on another core while training
goes on.

The parent sends each batch as compact arrays (a key index, values, steps and
timestamps), with each key's text sent once. The child acknowledges every
batch once it is stored. Until then the parent keeps the batch, so a failed or
killed child loses nothing: :meth:`MetricWriter.flush` raises
:class:`MetricWriterError` naming what is not stored, and
:meth:`MetricWriter.unwritten` returns it for another way of storing.

The child is started with multiprocessing's "spawn" method, a fresh
interpreter, because forking a process that runs torch threads can deadlock.
It imports NumPy, and MLflow only where the store's schema is not the one
:mod:`src.sqlite_metrics` writes; never torch.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import multiprocessing
import multiprocessing.util  # registers its exit handler before this module's, see below
import queue as queue_module
import signal
import sys
import time
import traceback
import types
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

MAX_METRICS_PER_BATCH = 1000  # MLflow's limit for one log_batch call
POLL_SECONDS = 0.2  # how often a waiting parent or child checks that the other is alive


class MetricWriterError(RuntimeError):
    """The writer process failed or died; the message names the run and what is not stored."""


@dataclass
class MetricValue:
    """One metric value, with the fields of ``mlflow.entities.Metric`` that the writer stores."""

    key: str
    value: float
    step: int
    timestamp: int  # milliseconds since the Unix epoch


@dataclass
class _Batch:
    key_index: np.ndarray  # [n] int32, into the writer's key table
    values: np.ndarray  # [n] float64
    steps: np.ndarray  # [n] int64
    timestamps: np.ndarray  # [n] int64, milliseconds


class MetricWriter:
    """Write metrics of run `run_id` to the SQLite store at `tracking_uri` from a child process.

    :meth:`log_batch` returns at once. :meth:`flush` waits until every value sent
    so far is stored, and :meth:`close` also stops the child. Any method raises
    MetricWriterError once the child has failed or died. A writer that is still
    open when the interpreter exits is closed then, within `exit_timeout` seconds.
    """

    def __init__(
        self,
        tracking_uri: str,
        run_id: str,
        start_timeout: float = 120.0,
        exit_timeout: float = 60.0,
    ):
        if not tracking_uri.startswith("sqlite:"):
            raise ValueError(
                f"MetricWriter writes to local SQLite stores only, got tracking URI "
                f"{_without_credentials(tracking_uri)!r}. Log to other stores from the "
                "training process."
            )
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.start_timeout = start_timeout
        self.exit_timeout = exit_timeout
        self._keys: dict[str, int] = {}
        self._sent_keys = 0  # keys[: _sent_keys] have reached the child's key table
        self._next_seq = 0
        self._pending: dict[int, _Batch] = {}  # sent, not yet acknowledged as stored
        # Values of the first pending batch that the child stored before it failed.
        self._stored_in_failed_batch = 0
        self._failure: str | None = None
        self._closed = False
        self._started = time.monotonic()
        self._ready = False

        context = multiprocessing.get_context("spawn")
        self._queue = context.Queue()
        self._replies, child_end = context.Pipe(duplex=False)
        self._process = context.Process(
            target=_serve,
            args=(tracking_uri, run_id, self._queue, child_end),
            name=f"metric-writer-{run_id[:8]}",
            daemon=True,
        )
        with _without_main_module():
            self._process.start()
        child_end.close()
        _open_writers.add(self)

    # -- the parent's side

    def log_batch(self, metrics: Iterable[Any]) -> None:
        """Send `metrics` (objects with ``key``, ``value``, ``step``, ``timestamp``) to be stored.

        Returns without waiting for the store. Raises MetricWriterError, and keeps
        none of `metrics`, once the child has failed or died.
        """
        self._check_open()
        self._read_replies()
        self._raise_if_failed()
        metrics = list(metrics)
        if not metrics:
            return
        key_index = np.empty(len(metrics), dtype=np.int32)
        for i, metric in enumerate(metrics):
            index = self._keys.get(metric.key)
            if index is None:
                index = self._keys[metric.key] = len(self._keys)
            key_index[i] = index
        batch = _Batch(
            key_index=key_index,
            values=np.fromiter((m.value for m in metrics), np.float64, len(metrics)),
            steps=np.fromiter((m.step for m in metrics), np.int64, len(metrics)),
            timestamps=np.fromiter((m.timestamp for m in metrics), np.int64, len(metrics)),
        )
        new_keys = list(self._keys)[self._sent_keys :]
        seq = self._next_seq
        self._next_seq += 1
        self._pending[seq] = batch
        self._queue.put(("batch", seq, new_keys, batch))
        self._sent_keys = len(self._keys)

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every value sent so far is stored.

        Raises MetricWriterError when the child fails or dies, or when nothing is
        stored for `timeout` seconds while values wait (None: wait as long as the
        child is alive).
        """
        self._check_open()
        self._wait_until_stored(timeout)

    def close(self, timeout: float | None = None) -> None:
        """Flush, then stop the child. Raises MetricWriterError as :meth:`flush` does.

        The child is stopped even when the flush fails; the values it did not store
        stay available from :meth:`unwritten`. Closing twice does nothing.
        """
        if self._closed:
            return
        try:
            self._wait_until_stored(timeout)
        finally:
            self._stop()

    def unwritten(self) -> list[MetricValue]:
        """Return the values sent but not yet acknowledged as stored, in the order sent."""
        self._read_replies()
        keys = list(self._keys)
        metrics = []
        for position, batch in enumerate(self._pending.values()):
            start = self._stored_in_failed_batch if position == 0 else 0
            for i in range(start, len(batch.values)):
                metrics.append(
                    MetricValue(
                        keys[batch.key_index[i]],
                        float(batch.values[i]),
                        int(batch.steps[i]),
                        int(batch.timestamps[i]),
                    )
                )
        return metrics

    @property
    def alive(self) -> bool:
        """True while the child runs."""
        return self._process.is_alive()

    @property
    def pid(self) -> int | None:
        """The child's process id."""
        return self._process.pid

    def _check_open(self) -> None:
        if self._closed:
            raise MetricWriterError(f"The metric writer of run {self.run_id} is closed.")

    def _wait_until_stored(self, timeout: float | None) -> None:
        last_progress = time.monotonic()
        remaining = self._count_pending()
        while True:
            self._read_replies(wait=POLL_SECONDS if self._pending else 0.0)
            self._raise_if_failed()
            if not self._pending:
                return
            now = time.monotonic()
            if self._count_pending() < remaining:
                remaining, last_progress = self._count_pending(), now
            waited = now - last_progress
            if not self._ready and now - self._started > self.start_timeout:
                self._fail(f"the writer process did not start within {self.start_timeout:g} s")
            elif timeout is not None and waited > timeout:
                self._fail(f"the writer process stored nothing for {timeout:g} s")

    def _read_replies(self, wait: float = 0.0) -> None:
        """Take in every acknowledgement and failure the child has sent; notice its death."""
        try:
            ready = self._replies.poll(wait)
            while ready:
                self._handle_reply(self._replies.recv())
                ready = self._replies.poll()
        except (EOFError, OSError):
            pass  # the child closed its end: it exited or died, which is checked next
        if self._failure is None and not self._closed and not self._process.is_alive():
            # Replies sent just before the exit may still be in the pipe.
            with contextlib.suppress(EOFError, OSError):
                while self._replies.poll():
                    self._handle_reply(self._replies.recv())
            if self._failure is None:
                self._failure = f"the writer process exited with code {self._process.exitcode}"

    def _handle_reply(self, reply: tuple) -> None:
        kind = reply[0]
        if kind == "ready":
            self._ready = True
        elif kind == "stored":
            self._pending.pop(reply[1], None)
        elif kind == "failed":
            _, seq, stored, message = reply
            # Batches are stored in order, so a failed batch is the first still pending.
            self._stored_in_failed_batch = stored if seq in self._pending else 0
            self._failure = message

    def _count_pending(self) -> int:
        total = sum(len(batch.values) for batch in self._pending.values())
        return total - (self._stored_in_failed_batch if self._pending else 0)

    def _fail(self, reason: str) -> None:
        self._failure = reason
        self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self._failure is None:
            return
        pending = self._count_pending()
        first = min((int(batch.steps.min()) for batch in self._pending.values()), default=0)
        last = max((int(batch.steps.max()) for batch in self._pending.values()), default=0)
        unstored = (
            f"{pending} metric values, steps {first} to {last}, are not stored"
            if pending
            else "every value sent was stored"
        )
        raise MetricWriterError(
            f"Writing metrics of run {self.run_id} to {_without_credentials(self.tracking_uri)} "
            f"failed: {self._failure.rstrip('.')}. {unstored}."
        )

    def _stop(self) -> None:
        self._closed = True
        _open_writers.discard(self)
        if self._process.is_alive() and self._failure is None:
            self._queue.put(("stop",))
            self._process.join(self.exit_timeout)
        if self._process.is_alive():
            log.error("Metric writer of run %s did not stop; terminating it", self.run_id)
            self._process.terminate()
            self._process.join(5.0)
        self._read_replies()
        # A dead child never reads the queue: do not wait for its feeder thread at exit.
        self._queue.cancel_join_thread()
        self._queue.close()
        self._replies.close()


def can_start_child() -> bool:
    """True where multiprocessing can spawn the writer's child.

    joblib's loky workers set their own start method, "loky", which a spawned child
    cannot set up, so it fails at start.
    """
    return multiprocessing.get_start_method(allow_none=True) in (
        None,
        "fork",
        "spawn",
        "forkserver",
    )


_open_writers: weakref.WeakSet[MetricWriter] = weakref.WeakSet()


@atexit.register
def _close_open_writers() -> None:
    """Store what open writers still hold before multiprocessing ends their children at exit.

    atexit runs handlers in reverse order of registration. multiprocessing.util, imported
    above, registers the handler that terminates daemonic children, so this one runs first.
    """
    for writer in list(_open_writers):
        try:
            writer.close(timeout=writer.exit_timeout)
        except MetricWriterError as err:
            log.error("%s", err)


@contextlib.contextmanager
def _without_main_module() -> Iterator[None]:
    """Hide ``__main__`` from multiprocessing while it prepares a spawned child.

    A spawned child imports the parent's main module first. For ``python -m
    src.train`` that is the whole training stack, torch included, which would take
    seconds and hundreds of MiB; the writer needs none of it.
    """
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


def _without_credentials(uri: str) -> str:
    from src.tracking import redact_uri

    return redact_uri(uri)


# -- the child's side


def _serve(tracking_uri: str, run_id: str, batches, replies) -> None:
    """Store each batch from `batches`, and reply after each one.

    Batches go in with plain SQL (:mod:`src.sqlite_metrics`) where the store's schema is
    the known one, so the child imports no MLflow; otherwise with MLflow's ``log_batch``.
    Replies: ``("ready",)`` once connected, ``("stored", seq)`` per batch, and
    ``("failed", seq, values stored of that batch, message)`` on the first error,
    after which the child exits with code 1. A parent that dies stops the child
    after the batches already received are stored.
    """
    from src.sqlite_metrics import open_store

    # Ctrl-C in a terminal reaches the whole process group. The parent decides when
    # this child stops, so that values already received are still stored.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = multiprocessing.parent_process()
    keys: list[str] = []
    seq, stored = None, 0  # the batch being stored, and how many of its values are
    try:
        store_chunk = _chunk_writer(tracking_uri, run_id, open_store(tracking_uri))
        replies.send(("ready",))
        while True:
            try:
                message = batches.get(timeout=POLL_SECONDS)
            except queue_module.Empty:
                if parent is not None and not parent.is_alive():
                    return
                continue
            if message[0] == "stop":
                return
            _, seq, new_keys, batch = message
            keys.extend(new_keys)
            metrics = [
                MetricValue(keys[k], v, s, t)  # .tolist() gives Python floats and ints
                for k, v, s, t in zip(
                    batch.key_index.tolist(), batch.values.tolist(), batch.steps.tolist(),
                    batch.timestamps.tolist(),
                )
            ]  # fmt: skip
            stored = 0
            for start in range(0, len(metrics), MAX_METRICS_PER_BATCH):
                chunk = metrics[start : start + MAX_METRICS_PER_BATCH]
                store_chunk(chunk)
                stored += len(chunk)
            replies.send(("stored", seq))
            seq = None
    except BaseException as err:  # noqa: BLE001 - every failure must reach the parent
        message = f"{type(err).__name__}: {err}"
        with contextlib.suppress(OSError):
            replies.send(("failed", seq, stored, message))
        traceback.print_exc()
        sys.exit(1)


def _chunk_writer(tracking_uri: str, run_id: str, store) -> Callable[[list[MetricValue]], Any]:
    """Return a function that stores one chunk of values: with `store`, or with MLflow."""
    if store is not None:
        return partial(store.log, run_id)
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)

    def log_batch(chunk: list[MetricValue]) -> None:
        metrics = [Metric(m.key, m.value, m.timestamp, m.step) for m in chunk]
        client.log_batch(run_id, metrics=metrics, synchronous=True)

    return log_batch
