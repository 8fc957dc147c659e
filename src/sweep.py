"""The sweep as one thing in MLflow: a parent run around a Hydra multirun.

:class:`SweepRunCallback` checks the launcher's parallelism, every job's config
and the tracking server, then opens the parent run when a multirun starts. It
hands the parent's id to the jobs in two ways. It appends a Hydra override that sets
``hydra.job.env_set.SWEEP_PARENT_RUN``: every Hydra launcher (basic, joblib,
submitit local and SLURM) composes each job's config from the sweep's Hydra
overrides, so jobs on other machines get the id with their config, without a
shared folder. It also writes ``<sweep dir>/parent_run.json``, which jobs read
when their config carries no id. At the end it logs the comparison and finishes
the parent run FINISHED, with the number of failed jobs in the tag
``sweep.failed_jobs`` (FAILED if the comparison itself fails). A sweep stopped
by Ctrl-C or SIGTERM ends its parent KILLED at exit.
"""

from __future__ import annotations

import atexit
import json
import logging
import signal
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, read_write

from src.checkpoint import validate_checkpoint
from src.config import ConfigError, validate

log = logging.getLogger(__name__)

PARENT_FILE = "parent_run.json"
PARENT_ENV = "SWEEP_PARENT_RUN"  # key under hydra.job.env_set that carries the parent record
FAILURES_DIR = "failed_jobs"  # one JSON file per failed job, read at the sweep's end

# The launchers' and sweepers' classes, as hydra.launcher._target_ and
# hydra.sweeper._target_ name them.
BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
BASIC_LAUNCHER = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"
JOBLIB_LAUNCHER = "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"
SUBMITIT_LOCAL_LAUNCHER = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher"
SUBMITIT_SLURM_LAUNCHER = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"


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
    """Return the sweep's parent run record (``run_id``, ``sweep_keys``) for this job, if any.

    The record comes from the job's own Hydra config (``hydra.job.env_set``), else from
    ``parent_run.json`` in the sweep folder. A parent in another store is not linked.
    """
    from src.tracking import redact_uri

    text = hydra_cfg.job.env_set.get(PARENT_ENV)
    if text is None:
        path = sweep_dir(hydra_cfg) / PARENT_FILE
        if not path.is_file():
            return None
        text = path.read_text()
    parent = json.loads(text)
    parent_uri = redact_uri(parent["tracking_uri"])
    if parent_uri != redact_uri(tracking_uri):
        log.warning(
            "Not linking to parent run %s: it is in %s, this job logs to %s",
            parent["run_id"],
            parent_uri,
            redact_uri(tracking_uri),
        )
        return None
    return parent


def pass_parent_run(config: DictConfig, record: dict) -> None:
    """Append a Hydra override that puts `record` into every job's ``hydra.job.env_set``.

    Launchers compose each job from the sweep's Hydra overrides plus the job's own
    (``ConfigLoader.load_sweep_config``), so the record travels with the job's config
    to worker processes and cluster nodes. The JSON text is quoted for Hydra's
    override grammar. Its ``'`` and ``$`` become JSON escapes, so that Hydra neither
    ends the quoted string early nor reads ``${...}`` as an interpolation.
    """
    text = json.dumps(record).replace("'", "\\u0027").replace("$", "\\u0024")
    with read_write(config.hydra.overrides):
        config.hydra.overrides.hydra.append(f"++hydra.job.env_set.{PARENT_ENV}='{text}'")


def swept_values(task_overrides: list[str], key: str) -> list[str] | None:
    """Return the values that the sweep gives `key`, or None where `key` is not swept."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    for override in OverridesParser.create().parse_overrides(task_overrides):
        if override.get_key_element() == key and override.is_sweep_override():
            return list(override.sweep_string_iterator())
    return None


def count_jobs(task_overrides: list[str]) -> int | None:
    """Return how many jobs the basic sweeper makes of `task_overrides`, or None if unknown.

    Only choice and range sweeps can be counted without the config repository.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    jobs = 1
    for override in OverridesParser.create().parse_overrides(task_overrides):
        if override.is_sweep_override():
            try:
                jobs *= len(list(override.sweep_string_iterator()))
            except HydraException:
                return None
    return jobs


def check_parallelism(config: DictConfig, cores: int | None = None) -> None:
    """Raise ConfigError when a sweep's jobs at once, times their threads, exceed the cores.

    More threads than cores make the jobs compete for the cores and slow each other
    down, so this runs before any job starts. joblib runs ``hydra.launcher.n_jobs``
    jobs at once (-1: one per core, -2: all but one, as joblib counts). Submitit's
    local mode starts every job of a batch at once (``hydra.sweeper.max_batch_size``,
    default all). On SLURM each job must get at least ``trainer.num_threads`` CPUs.
    `cores` defaults to the cores that this process may use (CPU affinity and cgroup
    quota, as joblib counts them).
    """
    from joblib import cpu_count

    cores = cores or cpu_count()
    launcher = config.hydra.launcher
    target = launcher.get("_target_", "")
    task_overrides = list(config.hydra.overrides.task)
    swept = swept_values(task_overrides, "trainer.num_threads")
    threads = max(int(v) for v in swept) if swept else int(config.trainer.num_threads)
    threads_key = f"trainer.num_threads={threads}" + (" (the largest swept value)" if swept else "")

    if target == JOBLIB_LAUNCHER:
        n_jobs = int(launcher.n_jobs)
        workers = n_jobs if n_jobs > 0 else cores + 1 + n_jobs
        if n_jobs == 0 or workers < 1:
            raise ConfigError(
                f"Invalid config value hydra.launcher.n_jobs={n_jobs}: expected a number of "
                f"parallel jobs >= 1, or -1 for one per core ({cores} here)."
            )
        if workers * threads > cores:
            raise ConfigError(
                f"Invalid config: hydra.launcher.n_jobs={n_jobs} runs {workers} jobs at once, "
                f"and {workers} x {threads_key} = {workers * threads} threads is more than the "
                f"{cores} cores here. Lower hydra.launcher.n_jobs or trainer.num_threads so "
                f"that their product is at most {cores}."
            )
    elif target == SUBMITIT_LOCAL_LAUNCHER:
        jobs = count_jobs(task_overrides)
        if jobs is None:
            log.warning("Cannot count the jobs of this sweep, so threads are not checked")
            return
        batch = config.hydra.sweeper.get("max_batch_size")
        at_once = min(jobs, batch) if batch else jobs
        if at_once * threads > cores:
            raise ConfigError(
                f"Invalid config: submitit's local mode starts {at_once} jobs at once, and "
                f"{at_once} x {threads_key} = {at_once * threads} threads is more than the "
                f"{cores} cores here. Set hydra.sweeper.max_batch_size={max(cores // threads, 1)} "
                "or lower trainer.num_threads."
            )
    elif target == SUBMITIT_SLURM_LAUNCHER:
        cpus = launcher.get("cpus_per_task")
        if cpus is not None and cpus < threads:
            raise ConfigError(
                f"Invalid config: hydra.launcher.cpus_per_task={cpus} is less than "
                f"{threads_key}. Raise hydra.launcher.cpus_per_task or lower trainer.num_threads."
            )


def sweep_jobs(config: DictConfig) -> list[list[str]]:
    """Return each job's overrides as Hydra's basic sweeper makes them, in job order.

    The sweeper's ``hydra.sweeper.params`` come first and the command line's task
    overrides after them, so that a command-line value of the same key wins.
    """
    # NOTE: Hydra 1.3 keeps the basic sweeper in hydra._internal, a private module.
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = [f"{key}={value}" for key, value in (config.hydra.sweeper.get("params") or {}).items()]
    arguments = params + list(config.hydra.overrides.task)
    # The config loader lets glob() sweeps list a config group's options.
    parser = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())
    (jobs,) = BasicSweeper.split_arguments(parser.parse_overrides(arguments), None)
    return jobs


def check_sweep_configs(config: DictConfig) -> None:
    """Compose and validate every job of a basic sweep; raise one ConfigError naming each bad job.

    Composes each job as the launchers do (``ConfigLoader.load_sweep_config``), so
    a bad value in the sweep's tenth job stops it before the first job runs. Values
    are checked against this machine too (cores, memory, GPUs) unless the launcher
    runs the jobs elsewhere, as SLURM does. Other sweepers choose their jobs while
    they run, so their jobs are left to check themselves.
    """
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    sweeper = config.hydra.sweeper.get("_target_")
    if sweeper != BASIC_SWEEPER:
        log.debug("Job configs are checked by each job: %s is not the basic sweeper", sweeper)
        return
    start = time.perf_counter()
    try:
        jobs = sweep_jobs(config)
    except HydraException as err:
        raise ConfigError(f"Invalid sweep: {_hydra_message(err)}") from None
    on_this_machine = config.hydra.launcher.get("_target_") in (
        BASIC_LAUNCHER,
        JOBLIB_LAUNCHER,
        SUBMITIT_LOCAL_LAUNCHER,
    )
    loader = GlobalHydra.instance().config_loader()
    keys = sweep_keys(list(config.hydra.overrides.task))
    keys += [str(key) for key in (config.hydra.sweeper.get("params") or {})]
    failures = []
    for number, overrides in enumerate(jobs):
        try:
            job_cfg = loader.load_sweep_config(config, list(overrides))
            validate(job_cfg, machine=on_this_machine)
            validate_checkpoint(job_cfg)
        except ConfigError as err:
            failures.append(f"#{number} {job_run_name(overrides, keys)}: {err}")
        except (HydraException, OmegaConfBaseException) as err:
            failures.append(f"#{number} {job_run_name(overrides, keys)}: {_hydra_message(err)}")
    log.info("Checked the configs of %d jobs in %.2f s", len(jobs), time.perf_counter() - start)
    if failures:
        raise ConfigError(
            f"Invalid config in {len(failures)} of the sweep's {len(jobs)} jobs, so no job "
            "was started:\n  " + "\n  ".join(failures)
        )


def _hydra_message(err: Exception) -> str:
    """Return a Hydra or OmegaConf error as one line, with its cause but without object types."""
    text = f"{err}\n{err.__cause__}" if err.__cause__ is not None else str(err)
    skipped = ("full_key:", "reference_type=", "object_type=", "Config search path", "provider=")
    lines = [line.strip() for line in text.splitlines()]
    return " ".join(line for line in lines if line and not line.startswith(skipped))


# Overrides that do not change the variant, left out of run names.
UNNAMED_KEYS = ("tracking", "trainer.device", "trainer.num_threads", "checkpoint")


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


class Interrupted(KeyboardInterrupt):
    """A stop signal, raised as Ctrl-C is, so that the runs it stops end KILLED."""

    def __init__(self, signum: int):
        super().__init__(f"received signal {signal.Signals(signum).name}")
        self.signum = signum


def raise_interrupt(signum: int, frame) -> None:
    """Signal handler: raise :class:`Interrupted` in the main thread."""
    raise Interrupted(signum)


def interrupt_status(err: KeyboardInterrupt) -> int:
    """Return the exit status for a stop by `err`: 128 plus the signal, as shells report it."""
    return 128 + getattr(err, "signum", signal.SIGINT)


class SweepRunCallback(Callback):
    """Open an MLflow parent run for a multirun and finish it when the sweep ends."""

    def __init__(self) -> None:
        self.run_id: str | None = None
        self.tracking_uri: str | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Check the launcher, the jobs' configs and the store, then open the parent run.

        A bad launcher or tracking setting, or a job with an invalid config, ends the
        sweep before its first job and before the parent run exists, with exit status
        1: Hydra turns a callback's exceptions into warnings and goes on, but lets
        SystemExit through. The parent run's id then goes to the jobs.
        """
        from mlflow.tracking import MlflowClient

        from src.tracking import (
            TrackingServerError,
            connect_tracking,
            get_or_create_experiment,
            process_tags,
            redact_credentials,
        )

        try:
            check_parallelism(config)
            check_sweep_configs(config)
            self.tracking_uri = connect_tracking(config.tracking)
        except (ConfigError, TrackingServerError) as err:
            log.error("Sweep not started: %s", err)
            raise SystemExit(1) from err
        hydra_cfg = config.hydra
        folder = sweep_dir(hydra_cfg)
        client = MlflowClient(self.tracking_uri)
        experiment_id = get_or_create_experiment(
            client, config.tracking.experiment_name, self.tracking_uri
        )
        overrides = redact_credentials(" ".join(hydra_cfg.overrides.task))
        run = client.create_run(
            experiment_id,
            run_name=f"sweep {overrides}".strip(),
            tags={
                "sweep.dir": str(folder),
                "sweep.overrides": overrides,
                "sweep.role": "parent",
                **process_tags(),  # so that a dead sweep's parent can be found as stale
            },
        )
        self.run_id = run.info.run_id
        folder.mkdir(parents=True, exist_ok=True)
        record = {
            "run_id": self.run_id,
            "tracking_uri": redact_credentials(self.tracking_uri),
            "sweep_keys": sweep_keys(list(hydra_cfg.overrides.task))
            + [str(key) for key in (hydra_cfg.sweeper.get("params") or {})],
        }
        (folder / PARENT_FILE).write_text(json.dumps(record))
        pass_parent_run(config, record)
        log.info("Sweep parent run %s in %s", self.run_id, record["tracking_uri"])

        # An interrupted sweep never reaches on_multirun_end: end the parent KILLED
        # at exit instead, and turn a scheduler's SIGTERM into that same exit path.
        signal.signal(signal.SIGTERM, raise_interrupt)
        atexit.register(self._end_if_running, client, self.run_id)

    @staticmethod
    def _end_if_running(client, run_id: str) -> None:
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, status="KILLED")
            log.warning("Sweep interrupted: parent run %s ended KILLED", run_id)

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
