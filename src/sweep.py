"""The sweep as one thing in MLflow: a parent run around a Hydra multirun.

:class:`SweepRunCallback` opens the parent run when a multirun starts and writes
its id to ``<sweep dir>/parent_run.json``. Each job reads that file through the
sweep folder that Hydra passes to it, so the link works with any launcher whose
jobs see the sweep folder (the basic and joblib launchers, and submitit, which
needs a shared folder anyway). At the end it finishes the parent run: FINISHED
when every child finished, FAILED otherwise.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)

PARENT_FILE = "parent_run.json"
FAILURES_DIR = "failed_jobs"  # one JSON file per failed job, read at the sweep's end


def sweep_dir(hydra_cfg: DictConfig) -> Path:
    """Return the sweep folder as an absolute path, resolved from the launch folder."""
    path = Path(hydra_cfg.sweep.dir)
    return path if path.is_absolute() else Path(hydra_cfg.runtime.cwd) / path


def sweep_keys(overrides: list[str]) -> list[str]:
    """Return the keys a multirun sweeps over: ``activation`` in ``activation=relu,sigmoid``."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    return [o.get_key_element() for o in parsed if o.is_sweep_override()]


def read_parent_run(hydra_cfg: DictConfig, tracking_uri: str) -> dict | None:
    """Return the sweep's parent run record (``run_id``, ``sweep_keys``) for this job, if any."""
    path = sweep_dir(hydra_cfg) / PARENT_FILE
    if not path.is_file():
        return None
    parent = json.loads(path.read_text())
    if parent["tracking_uri"] != tracking_uri:
        log.warning(
            "Not linking to parent run %s: it is in %s, this job logs to %s",
            parent["run_id"],
            parent["tracking_uri"],
            tracking_uri,
        )
        return None
    return parent


# Overrides that do not change the variant, left out of run names.
UNNAMED_KEYS = ("tracking.", "trainer.device", "trainer.num_threads")


def job_run_name(task_overrides: list[str], keys: list[str] | None) -> str:
    """Name a job's run after its overrides of the swept `keys`, or of every key without `keys`.

    ``["activation=sigmoid", "trainer.epochs=5"]`` with keys ``["activation"]`` gives
    ``activation=sigmoid``; a run with no naming overrides is called ``defaults``.
    """
    named = []
    for override in task_overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if key.startswith(UNNAMED_KEYS):
            continue
        if keys is None or key in keys:
            named.append(override)
    return ",".join(named) or "defaults"


def record_job_failure(hydra_cfg: DictConfig, run_name: str, error: BaseException) -> None:
    """Write a failed job's name and error into the sweep folder, for the sweep's end."""
    folder = sweep_dir(hydra_cfg) / FAILURES_DIR
    folder.mkdir(parents=True, exist_ok=True)
    record = {"job": int(hydra_cfg.job.num), "run_name": run_name, "error": f"{error}"}
    (folder / f"{hydra_cfg.job.num}.json").write_text(json.dumps(record))


def read_job_failures(folder: Path) -> list[dict]:
    """Return the failure records of a sweep, ordered by job number."""
    paths = sorted((folder / FAILURES_DIR).glob("*.json"), key=lambda p: int(p.stem))
    return [json.loads(path.read_text()) for path in paths]


class SweepRunCallback(Callback):
    """Open an MLflow parent run for a multirun and finish it when the sweep ends."""

    def __init__(self) -> None:
        self.run_id: str | None = None
        self.tracking_uri: str | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from mlflow.tracking import MlflowClient

        from src.tracking import get_or_create_experiment, resolve_tracking_uri

        hydra_cfg = config.hydra
        folder = sweep_dir(hydra_cfg)
        self.tracking_uri = resolve_tracking_uri(config.tracking.uri)
        client = MlflowClient(self.tracking_uri)
        experiment_id = get_or_create_experiment(
            client, config.tracking.experiment_name, self.tracking_uri
        )
        overrides = " ".join(hydra_cfg.overrides.task)
        run = client.create_run(
            experiment_id,
            run_name=f"sweep {overrides}".strip(),
            tags={"sweep.dir": str(folder), "sweep.overrides": overrides, "sweep.role": "parent"},
        )
        self.run_id = run.info.run_id
        folder.mkdir(parents=True, exist_ok=True)
        record = {
            "run_id": self.run_id,
            "tracking_uri": self.tracking_uri,
            "sweep_keys": sweep_keys(list(hydra_cfg.overrides.task)),
        }
        (folder / PARENT_FILE).write_text(json.dumps(record))
        log.info("Sweep parent run %s in %s", self.run_id, self.tracking_uri)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Log the comparison of the sweep's runs to the parent run, then finish it.

        Exits non-zero after that when a job failed, so scripts see the failure.
        """
        if self.run_id is None:
            return
        from mlflow.tracking import MlflowClient

        client = MlflowClient(self.tracking_uri)
        folder = sweep_dir(config.hydra)
        failures = read_job_failures(folder)
        status = "FINISHED"
        try:
            self._log_comparison(client, folder / "comparison")
        except Exception:
            log.exception("Building the comparison for sweep parent run %s failed", self.run_id)
            status = "FAILED"
        finally:
            client.set_tag(self.run_id, "sweep.failed_jobs", str(len(failures)))
            client.set_terminated(self.run_id, status=status)
        log.info("Sweep parent run %s ended %s", self.run_id, status)

        if failures:
            names = ", ".join(f"#{f['job']} {f['run_name']}" for f in failures)
            log.error("%d job(s) of the sweep failed: %s", len(failures), names)
            raise SystemExit(1)

    def _log_comparison(self, client, out_dir: Path) -> None:
        from src import compare

        try:
            runs = compare.select_runs(client, parent_run_id=self.run_id)
        except ValueError as err:
            log.warning("Nothing to compare in sweep parent run %s: %s", self.run_id, err)
            return
        comparison = compare.build_comparison(client, runs, out_dir)
        compare.log_comparison(client, comparison, self.run_id)
        log.info("Sweep comparison in parent run %s and %s:\n%s",
                 self.run_id, out_dir, comparison.explanation)  # fmt: skip
