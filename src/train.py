"""Train one network variant and record its gradients in MLflow.

python -m src.train                              # one run with the defaults
python -m src.train -m activation=relu,sigmoid   # a sweep, one MLflow run per job
"""

from __future__ import annotations

import logging
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf
from torch import nn

from src import reports
from src.activations import ActivationMonitor
from src.checkpoint import (
    Checkpointer,
    History,
    SkipLogged,
    TrainState,
    check_run_to_resume,
    histograms_state,
    load_histograms_state,
    logged_steps,
    missing_from_store,
    restore_rng,
    rng_state,
    validate_checkpoint,
)
from src.config import (
    ConfigError,
    UserError,
    exit_on_bad_override,
    full_error_requested,
    register_schemas,
    validate,
)
from src.data import load_dataset
from src.gradients import GradientMonitor, Metric
from src.health import Thresholds, judge_run
from src.loop import Divergence, check_last_batch, fit
from src.models import build_model, weight_layers
from src.sweep import (
    interrupt_status,
    job_run_name,
    raise_interrupt,
    read_parent_run,
    record_job_failure,
)
from src.tracking import (
    PROJECT_ROOT,
    Tracker,
    connect_tracking,
    flatten_params,
    is_connection_error,
    process_tags,
    redact_credentials,
    redact_uri,
    resolve_tracking_uri,
    run_environment_tags,
    start_run,
)

log = logging.getLogger(__name__)
register_schemas()


@dataclass
class JobInfo:
    """A job as the launcher describes it: its name, its overrides and its folder."""

    run_name: str = "defaults"
    overrides: list[str] = field(default_factory=list)
    output_dir: Path | None = None  # Hydra's job folder, holding .hydra/ and the job log
    parent_run_id: str | None = None


def resolve_device(name: str) -> torch.device:
    """Map ``auto`` to CUDA when available, else the CPU; pass other names through."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"Invalid config value trainer.device={name!r}: CUDA is not available on this "
            "machine. Use trainer.device=auto or cpu."
        )
    return device


def train(cfg: DictConfig, job: JobInfo | None = None) -> dict[str, float]:
    """Train the configured variant, log everything to MLflow, and return the final metrics.

    With ``checkpoint.resume=true``, or when its scheduler requeued the job, the job
    continues from its variant's last checkpoint into the same MLflow run.
    """
    validate(cfg)
    validate_checkpoint(cfg)
    tracking_uri = connect_tracking(cfg.tracking)  # a wrong server fails here, in seconds
    job = job or JobInfo()
    device = resolve_device(cfg.trainer.device)
    torch.set_num_threads(cfg.trainer.num_threads)
    torch.manual_seed(cfg.seed)

    checkpointer = Checkpointer(cfg, job.run_name, PROJECT_ROOT, job.output_dir)
    checkpointer.acquire()
    try:
        return _train(cfg, job, tracking_uri, device, checkpointer)
    finally:
        checkpointer.release()


def _train(
    cfg: DictConfig,
    job: JobInfo,
    tracking_uri: str,
    device: torch.device,
    checkpointer: Checkpointer,
) -> dict[str, float]:
    payload = checkpointer.load_for_resume(tracking_uri, device)
    if payload is not None:
        client = MlflowClient(tracking_uri)
        status = check_run_to_resume(client, payload, checkpointer.path)
        if status == "FINISHED":
            log.info(
                "Run %s of %s finished already (checkpoint %s): nothing to resume",
                payload["run_id"], job.run_name, checkpointer.path,
            )  # fmt: skip
            if job.parent_run_id:  # it belongs to the sweep that asked for it now
                client.set_tag(payload["run_id"], "mlflow.parentRunId", job.parent_run_id)
            return dict(client.get_run(payload["run_id"]).data.metrics)
    else:
        checkpointer.discard_earlier()

    # Data: device tensors batched by index, or a DataLoader when too large for that.
    data = load_dataset(cfg.dataset, device)

    # Model, optimizer and the monitors.
    model = build_model(
        cfg.model, cfg.activation, data.input_shape, data.num_classes, data.mean, data.std
    ).to(device)
    optimizer = instantiate(cfg.optimizer)(params=model.parameters())
    iters_per_epoch = math.ceil(len(data.train) / cfg.trainer.batch_size)
    # Image folders give their size only once read: check before a run exists.
    check_last_batch(model, len(data.train), cfg.trainer.batch_size)
    monitor = build_monitor(model, cfg.monitor, iters_per_epoch, use_stats_thread(cfg, optimizer))
    thresholds = Thresholds(**cfg.health)
    state = TrainState.new(cfg.seed)
    if payload is not None:
        model.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
        load_histograms_state(monitor.histograms, payload["histograms"])
        state.epoch, state.global_step = payload["epoch"], payload["global_step"]
        state.history = History.from_state_dict(payload["history"])
        state.fit_seconds = payload["fit_seconds"]
        restore_rng(payload["rng"], state.shuffle)

    tags = {
        "activation": cfg.activation.name,
        **run_environment_tags(device, cfg.seed),
        **process_tags(),
        "checkpoint.dir": str(checkpointer.folder),
    }
    run_id = payload["run_id"] if payload is not None else None
    with start_run(
        tracking_uri,
        cfg.tracking.experiment_name,
        job.run_name,
        tags,
        job.parent_run_id,
        run_id,
        metric_writer=use_metric_writer(cfg),
    ) as tracker:
        activation_monitor = None
        attempt = 1 + int(payload["attempt"]) if payload is not None else 1
        logged: dict[str, int] = {}
        try:
            if payload is None:
                # Config and inputs first, so that a failed run still shows what it ran.
                tracker.log_params(flatten_params(cfg))
                log_config(tracker, cfg, job)
                reports.log_dataset_samples(tracker, data.preview())
            else:
                # Reopening the run sent what an earlier attempt spooled, if the server
                # takes it now. What the spool still contains counts as sent too.
                logged = logged_steps(tracker.client, run_id)
                for key, step in tracker.spooled_metric_steps().items():
                    logged[key] = max(step, logged.get(key, step))
                missing = missing_from_store(state.history, logged, int(time.time() * 1000))
                if missing:
                    log.warning(
                        "The store lacked %d values of the epochs up to %d; sent them from the "
                        "checkpoint", len(missing), state.epoch,
                    )  # fmt: skip
                    tracker.log_metrics(missing)
                    for metric in missing:
                        logged[metric.key] = max(metric.step, logged.get(metric.key, -1))
                resumed = {**tags, "resume.attempts": attempt, "resume.from_epoch": state.epoch}
                if job.parent_run_id:
                    resumed["mlflow.parentRunId"] = job.parent_run_id
                tracker.set_tags(resumed)
                log.info(
                    "Resuming run %s from epoch %d (checkpoint %s), attempt %d",
                    run_id, state.epoch, checkpointer.path, attempt,
                )  # fmt: skip

            log.info(
                "Training %s on %s: %d epochs of %d iterations",
                job.run_name, device, cfg.trainer.epochs, iters_per_epoch,
            )  # fmt: skip
            if cfg.monitor.activations:
                activation_monitor = ActivationMonitor(model, cfg.monitor.saturation_eps)
            fit_start = time.perf_counter()
            earlier_seconds = state.fit_seconds

            def save_checkpoint(state: TrainState) -> None:
                state.fit_seconds = earlier_seconds + time.perf_counter() - fit_start
                if checkpointer.due(state.epoch):
                    checkpointer.save(
                        checkpoint_payload(
                            model,
                            optimizer,
                            monitor,
                            state,
                            tracker.run_id,
                            tracking_uri,
                            attempt,
                        )  # fmt: skip
                    )

            sink = SkipLogged(tracker, logged)
            fit(
                model, optimizer, data, monitor, sink, cfg.trainer, cfg.seed,
                thresholds, activation_monitor, state, save_checkpoint,
            )  # fmt: skip
            history = state.history
            tracker.flush()  # the metric writer may still be storing the last epochs
            # From the first iteration to the end of the last epoch's logging, over attempts.
            fit_seconds = earlier_seconds + time.perf_counter() - fit_start
            timing = [Metric("time/fit_seconds", fit_seconds, 0, int(time.time() * 1000))]
            sink.log_metrics(timing)
            if "time/fit_seconds" not in history.metrics:
                history.add(timing)

            # The verdict over the whole run, figures from the recorded data, the model.
            verdict = judge_run(monitor.layers, history.verdicts, thresholds)
            reports.log_verdict(tracker, monitor.layers, verdict)
            reports.log_run_figures(
                tracker, history.metrics, monitor.histograms, cfg.activation, job.run_name
            )
            if cfg.monitor.epoch_images:
                reports.log_epoch_images(tracker, monitor.histograms, job.run_name)
            if cfg.tracking.log_model:
                log_model(tracker, model, data, checkpointer, flatten_params(cfg))
        except Divergence as err:
            reports.log_divergence(tracker, err)
            log.error("Run %s diverged: %s", job.run_name, err.reason)
            raise
        except (KeyboardInterrupt, SystemExit) as err:
            log.warning("Run %s stopped (%s); it ends KILLED", job.run_name, type(err).__name__)
            raise
        except BaseException as err:
            log.error("Run %s failed: %r", job.run_name, err)
            raise
        finally:
            monitor.close()
            if activation_monitor is not None:
                activation_monitor.remove()
            reports.log_histograms(tracker, monitor.histograms)
            log_job_log(tracker, job, attempt)

    return history.last()


def log_model(
    tracker: Tracker, model: nn.Module, data, checkpointer: Checkpointer, params: dict
) -> None:
    """Log the trained model; a server that went away costs the model, not the run.

    ``mlflow.pytorch`` uploads the model itself, past the tracker's spool. When the upload
    fails on the connection, the run goes on to end with the tag ``model.logged=false``,
    and the log names the checkpoint that keeps the weights.
    """
    try:
        reports.log_model(model, data.preview(), tracker.run_id, params)
    except Exception as err:
        if not is_connection_error(err):
            raise
        where = checkpointer.path if checkpointer.every else "no checkpoint (checkpoint.every=0)"
        log.error(
            "The trained model was not uploaded to %s: %s. Its weights are in %s",
            redact_uri(tracker.tracking_uri), redact_credentials(str(err)), where,
        )  # fmt: skip
        tracker.set_tags({"model.logged": "false"})


BASIC_LAUNCHER = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"


def use_metric_writer(cfg: DictConfig) -> bool:
    """Decide whether a SQLite store gets its metrics through a child process.

    ``tracking.metric_writer`` decides when set. Otherwise the child runs where it gets a
    core of its own: under Hydra's default launcher (one job at a time) or outside Hydra,
    with trainer.num_threads below the cores. Parallel launchers size their jobs to fill
    the cores, and there the child's work would slow training down.
    """
    if cfg.tracking.metric_writer is not None:
        return bool(cfg.tracking.metric_writer)
    return core_free(cfg)


def core_free(cfg: DictConfig) -> bool:
    """True where a job leaves a core free: one job at a time, with fewer threads than cores.

    That is Hydra's default launcher (or no Hydra) with trainer.num_threads below the
    cores. Parallel launchers size their jobs to fill the cores.
    """
    from joblib import cpu_count

    if HydraConfig.initialized():
        if HydraConfig.get().launcher.get("_target_", "") != BASIC_LAUNCHER:
            return False
    return cfg.trainer.num_threads < cpu_count()


def checkpoint_payload(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    monitor: GradientMonitor,
    state: TrainState,
    run_id: str,
    tracking_uri: str,
    attempt: int,
) -> dict:
    """Return the contents of an end-of-epoch checkpoint: enough to go on as if never stopped."""
    return {
        "run_id": run_id,
        "tracking_uri": tracking_uri,
        "attempt": attempt,
        "epoch": state.epoch,
        "global_step": state.global_step,
        "fit_seconds": state.fit_seconds,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": rng_state(state.shuffle),
        "histograms": histograms_state(monitor.histograms),
        "history": state.history.state_dict(),
    }


def use_stats_thread(cfg: DictConfig, optimizer: torch.optim.Optimizer) -> bool:
    """Decide whether the gradient statistics run on a thread beside training.

    ``monitor.stats_thread`` decides when set. Otherwise the thread runs where a core is
    free for it (see :func:`core_free`) and training is on the CPU, where torch releases
    the GIL in its kernels. The optimizer must be one of torch's, because the thread
    reads the gradients while the optimizer steps, and torch's optimizers do not write
    them. Other optimizers may modify ``.grad`` in place.
    """
    if cfg.monitor.stats_thread is not None:
        return bool(cfg.monitor.stats_thread)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    on_cpu = all(p.device.type == "cpu" for p in params)
    torch_optimizer = type(optimizer).__module__.startswith("torch.optim.")
    return on_cpu and torch_optimizer and core_free(cfg)


def build_monitor(
    model: nn.Module, monitor_cfg, iters_per_epoch: int, stats_thread: bool = False
) -> GradientMonitor:
    """Build the gradient monitor for every weight layer and its bias.

    Bias gradients are always monitored, because the health verdict reads them;
    their per-iteration metrics are logged only with ``monitor.log_bias``.
    """
    layers = weight_layers(model)
    tensors = list(layers)
    modules = dict(model.named_modules())
    paths = {id(module.weight): path for path, module in modules.items()
             if getattr(module, "weight", None) is not None}  # fmt: skip
    for name, weight in layers:
        bias = getattr(modules[paths[id(weight)]], "bias", None)
        if isinstance(bias, nn.Parameter):
            tensors.append((f"{name}.bias", bias))
    logged = None if monitor_cfg.log_bias else [name for name, _ in layers]
    return GradientMonitor(
        tensors,
        iters_per_epoch,
        layers=[name for name, _ in layers],
        stats_every=monitor_cfg.stats_every,
        hist_every=monitor_cfg.hist_every,
        hist_bins=monitor_cfg.hist_bins,
        hist_mode=monitor_cfg.hist_mode,
        hist_log_range=tuple(monitor_cfg.hist_log_range),
        tiny=monitor_cfg.tiny,
        logged=logged,
        stats_thread=stats_thread,
    )


def log_config(tracker: Tracker, cfg: DictConfig, job: JobInfo) -> None:
    """Log the resolved config and the overrides as YAML artifacts under ``config/``."""
    tracker.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config/config.yaml")
    tracker.log_text(OmegaConf.to_yaml(OmegaConf.create(job.overrides)), "config/overrides.yaml")
    if job.output_dir is not None and (job.output_dir / ".hydra").is_dir():
        tracker.log_dir(job.output_dir / ".hydra", "config/hydra")


def log_job_log(tracker: Tracker, job: JobInfo, attempt: int = 1) -> None:
    """Log the job's log file, written by Hydra's job logging, as ``logs/<name>.log``.

    A resumed job's later attempts go to ``logs/attempt-<n>/``, beside the first's.
    """
    if job.output_dir is None:
        return
    for handler in logging.getLogger().handlers:
        handler.flush()
    folder = "logs" if attempt == 1 else f"logs/attempt-{attempt}"
    for path in sorted(job.output_dir.glob("*.log")):
        tracker.log_file(path, folder)


@exit_on_bad_override
@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    # A scheduler stops jobs with SIGTERM: treat it as Ctrl-C, so the run ends KILLED.
    signal.signal(signal.SIGTERM, raise_interrupt)
    hydra_cfg = HydraConfig.get()
    overrides = list(hydra_cfg.overrides.task)
    if hydra_cfg.mode != RunMode.MULTIRUN:
        job = JobInfo(job_run_name(overrides, None), overrides, Path(hydra_cfg.runtime.output_dir))
        try:
            return train(cfg, job)["test/accuracy"]
        except (UserError, Divergence, KeyboardInterrupt) as err:
            # The log records what happened, and a traceback would bury it. Hydra prints one
            # for any exception, so exit instead, unless HYDRA_FULL_ERROR=1 requests it.
            if full_error_requested():
                raise
            if isinstance(err, KeyboardInterrupt):  # Ctrl-C, or SIGTERM raised as one
                log.error("Run %s interrupted: %s", job.run_name, str(err) or "Ctrl-C")
                raise SystemExit(interrupt_status(err)) from None
            if isinstance(err, UserError):  # train() has logged a divergence already
                log.error("%s", err)
            raise SystemExit(1) from None

    parent = read_parent_run(hydra_cfg, resolve_tracking_uri(cfg.tracking.uri))
    job = JobInfo(
        run_name=job_run_name(overrides, parent["sweep_keys"] if parent else None),
        overrides=overrides,
        output_dir=Path(hydra_cfg.runtime.output_dir),
        parent_run_id=parent["run_id"] if parent else None,
    )
    # One failed job must not stop the sweep: its run is already marked, the
    # failure is recorded for the sweep's end, and the next job starts.
    try:
        return train(cfg, job)["test/accuracy"]
    except Exception as err:
        if isinstance(err, UserError):  # the message is complete
            log.error("Job %s failed: %s", job.run_name, err)
        elif not isinstance(err, Divergence):  # train() has logged a divergence already
            log.exception("Job %s failed", job.run_name)
        record_job_failure(hydra_cfg, job.run_name, err)
        return None


if __name__ == "__main__":
    main()
