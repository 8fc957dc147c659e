"""Sweeps through Hydra's launchers: joblib, submitit's local mode, and SLURM's config.

The end-to-end sweeps run the real command line against a real ``mlflow server`` or
SQLite store and read every run back through the MLflow client. No SLURM cluster is
available here: the SLURM launcher is checked up to the sbatch script it would submit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import submitit
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from joblib import cpu_count
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf, read_write
from submitit.slurm import slurm as submitit_slurm

from src.config import ConfigError
from src.sweep import (
    JOBLIB_LAUNCHER,
    PARENT_ENV,
    PARENT_FILE,
    SUBMITIT_LOCAL_LAUNCHER,
    SUBMITIT_SLURM_LAUNCHER,
    check_parallelism,
    count_jobs,
    pass_parent_run,
    read_parent_run,
)
from tests.conftest import CONF_DIR, PROJECT_ROOT, TINY_OVERRIDES
from tests.mlflow_server import running_mlflow_server

SECRET = "s3cret-pw"
PER_ITERATION = ("train/loss", "grad_")  # metric keys logged at every iteration


def compose_with_hydra(overrides: list[str]):
    """Compose ``conf/config.yaml`` with the ``hydra`` node, as a launcher receives it."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides, return_hydra_config=True)


def with_task_overrides(cfg, task: list[str]):
    """Return `cfg` with ``hydra.overrides.task`` set to `task`, as a multirun's master config."""
    with read_write(cfg.hydra.overrides):
        cfg.hydra.overrides.task = task
    return cfg


# --- Launcher configs --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "target"),
    [
        ("parallel", JOBLIB_LAUNCHER),
        ("cluster_local", SUBMITIT_LOCAL_LAUNCHER),
        ("slurm", SUBMITIT_SLURM_LAUNCHER),
    ],
)
def test_launcher_option_composes(option, target):
    cfg = compose_with_hydra([f"hydra/launcher={option}"])
    assert cfg.hydra.launcher._target_ == target
    OmegaConf.to_container(cfg.hydra.launcher, resolve=True)  # every interpolation resolves


def test_slurm_reads_site_environment(monkeypatch):
    monkeypatch.setenv("SBATCH_PARTITION", "gpu")
    monkeypatch.setenv("SBATCH_ACCOUNT", "vision")
    monkeypatch.delenv("SBATCH_QOS", raising=False)
    launcher = compose_with_hydra(["hydra/launcher=slurm", "trainer.num_threads=4"]).hydra.launcher
    assert launcher.partition == "gpu"
    assert launcher.account == "vision"
    assert launcher.qos is None
    assert launcher.cpus_per_task == 4, "one CPU per torch thread"
    assert launcher.timeout_min == 60
    assert launcher.mem_gb == 4
    assert launcher.gpus_per_task is None
    assert launcher.array_parallelism == 16


def test_slurm_launcher_builds_sbatch_script(monkeypatch, tmp_path):
    monkeypatch.setenv("SBATCH_PARTITION", "gpu")
    cfg = compose_with_hydra([
        "hydra/launcher=slurm", "trainer.num_threads=2", f"hydra.sweep.dir={tmp_path}",
        "hydra.launcher.gpus_per_task=1", "hydra.launcher.timeout_min=30",
        "+hydra.launcher.additional_parameters.mail-type=END",
    ])  # fmt: skip
    submitted = {}

    def capture_array(executor, function, *arguments):
        submitted["executor"] = executor
        submitted["overrides"] = arguments[0]
        return []  # no jobs: nothing to wait for

    # No srun or sbatch here: the executor is built for real and the submission captured.
    monkeypatch.setattr(submitit_slurm.SlurmExecutor, "affinity", classmethod(lambda cls: 1))
    monkeypatch.setattr(submitit.AutoExecutor, "map_array", capture_array)
    launcher = instantiate(cfg.hydra.launcher)
    launcher.setup(hydra_context=None, task_function=None, config=cfg)
    launcher.launch([["activation=relu"], ["activation=sigmoid"]], initial_job_idx=0)

    executor = submitted["executor"]._executor
    assert isinstance(executor, submitit_slurm.SlurmExecutor)
    assert submitted["overrides"] == (["activation=relu"], ["activation=sigmoid"])
    assert str(executor.folder) == f"{tmp_path}/.submitit/%j"
    script = submitit_slurm._make_sbatch_string(
        command="python -u -m submitit.core._submit FOLDER", folder=executor.folder,
        map_count=40, **executor.parameters,
    )  # fmt: skip
    lines = set(script.splitlines())
    for line in [
        "#SBATCH --partition=gpu",
        "#SBATCH --cpus-per-task=2",
        "#SBATCH --gpus-per-task=1",
        "#SBATCH --mem=4GB",
        "#SBATCH --time=30",
        "#SBATCH --array=0-39%16",
        "#SBATCH --mail-type=END",
    ]:
        assert line in lines, line


# --- Threads against cores ---------------------------------------------------------------


def test_joblib_oversubscription_names_both_keys():
    cfg = compose_with_hydra(
        ["hydra/launcher=parallel", "hydra.launcher.n_jobs=2", "trainer.num_threads=2"]
    )
    with pytest.raises(ConfigError) as info:
        check_parallelism(cfg, cores=2)
    message = str(info.value)
    assert "hydra.launcher.n_jobs=2" in message
    assert "trainer.num_threads=2" in message
    assert "4 threads is more than the 2 cores" in message


def test_joblib_all_cores_one_thread_passes():
    cfg = compose_with_hydra(["hydra/launcher=parallel"])
    assert cfg.hydra.launcher.n_jobs == -1
    check_parallelism(cfg, cores=2)


def test_joblib_all_cores_two_threads_rejected():
    cfg = compose_with_hydra(["hydra/launcher=parallel", "trainer.num_threads=2"])
    with pytest.raises(ConfigError, match="n_jobs=-1 runs 2 jobs at once"):
        check_parallelism(cfg, cores=2)


def test_joblib_zero_jobs_rejected():
    cfg = compose_with_hydra(["hydra/launcher=parallel", "hydra.launcher.n_jobs=0"])
    with pytest.raises(ConfigError, match="hydra.launcher.n_jobs=0"):
        check_parallelism(cfg, cores=2)


def test_swept_threads_use_largest_value():
    cfg = compose_with_hydra(["hydra/launcher=parallel", "hydra.launcher.n_jobs=2"])
    with_task_overrides(cfg, ["trainer.num_threads=1,2"])
    with pytest.raises(ConfigError, match=r"trainer.num_threads=2 \(the largest swept value\)"):
        check_parallelism(cfg, cores=3)


def test_submitit_local_counts_jobs_at_once():
    cfg = compose_with_hydra(["hydra/launcher=cluster_local"])
    with_task_overrides(cfg, ["activation=relu,sigmoid,tanh", "optimizer=adam,sgd"])
    with pytest.raises(ConfigError, match="hydra.sweeper.max_batch_size=2"):
        check_parallelism(cfg, cores=2)
    with read_write(cfg.hydra.sweeper):
        cfg.hydra.sweeper.max_batch_size = 2
    check_parallelism(cfg, cores=2)


def test_count_jobs_of_sweeps():
    assert count_jobs(["activation=relu,sigmoid,tanh", "optimizer=adam,sgd", "seed=1"]) == 6
    assert count_jobs(["seed=range(0,4)"]) == 4
    assert count_jobs(["activation=glob(*)"]) is None


def test_slurm_cpus_below_threads_rejected():
    cfg = compose_with_hydra(
        ["hydra/launcher=slurm", "trainer.num_threads=4", "hydra.launcher.cpus_per_task=2"]
    )
    with pytest.raises(ConfigError, match="hydra.launcher.cpus_per_task=2 is less than"):
        check_parallelism(cfg, cores=1)


def test_cli_oversubscription_stops_before_jobs(tmp_path):
    n_jobs = cpu_count() + 1
    result = subprocess.run(
        [sys.executable, "-m", "src.train", "-m", "activation=relu,sigmoid",
         "hydra/launcher=parallel", f"hydra.launcher.n_jobs={n_jobs}",
         f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", f"hydra.sweep.dir={tmp_path}/sweep"],
        cwd=PROJECT_ROOT, env=sweep_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 1
    output = result.stdout + result.stderr
    assert f"hydra.launcher.n_jobs={n_jobs}" in output
    assert "trainer.num_threads=1" in output
    assert not (tmp_path / "sweep").exists(), "no job may start"


# --- The parent run, passed to every job -------------------------------------------------


def test_parent_record_survives_override_grammar():
    record = {
        "run_id": "0123abcd",
        "tracking_uri": "http://***@host:5000/it's/${not_an_interpolation}\\",
        "sweep_keys": ["activation", "optimizer.lr"],
    }
    master = compose_with_hydra([])
    pass_parent_run(master, record)
    override = master.hydra.overrides.hydra[-1]
    # A launcher composes each job from the sweep's Hydra overrides, as here.
    job = compose_with_hydra([override, "activation=sigmoid"])
    assert json.loads(job.hydra.job.env_set[PARENT_ENV]) == record


def job_hydra_cfg(tmp_path, env_set: dict[str, str]):
    return OmegaConf.create(
        {"job": {"env_set": env_set}, "sweep": {"dir": "sweep"}, "runtime": {"cwd": str(tmp_path)}}
    )


def test_parent_from_job_config_without_shared_folder(tmp_path):
    record = {"run_id": "abc", "tracking_uri": "http://***@h:1", "sweep_keys": ["activation"]}
    hydra_cfg = job_hydra_cfg(tmp_path, {PARENT_ENV: json.dumps(record)})
    assert not (tmp_path / "sweep").exists()
    assert read_parent_run(hydra_cfg, "http://alice:pw@h:1") == record


def test_parent_from_sweep_folder_file(tmp_path):
    record = {"run_id": "abc", "tracking_uri": "sqlite:///x.db", "sweep_keys": ["seed"]}
    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / PARENT_FILE).write_text(json.dumps(record))
    assert read_parent_run(job_hydra_cfg(tmp_path, {}), "sqlite:///x.db") == record


def test_parent_in_other_store_not_linked(tmp_path):
    record = {"run_id": "abc", "tracking_uri": "http://h:1", "sweep_keys": ["seed"]}
    hydra_cfg = job_hydra_cfg(tmp_path, {PARENT_ENV: json.dumps(record)})
    assert read_parent_run(hydra_cfg, "http://h:2") is None


# --- End-to-end sweeps -------------------------------------------------------------------


def sweep_env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def run_sweep(sweep_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    """Run ``python -m src.train -m`` with the tiny settings and without logging the model."""
    return subprocess.run(
        [sys.executable, "-m", "src.train", "-m", *TINY_OVERRIDES, "tracking.log_model=false",
         *overrides, f"hydra.sweep.dir={sweep_dir}"],
        cwd=PROJECT_ROOT, env=sweep_env(), capture_output=True, text=True, timeout=900,
    )  # fmt: skip


def sweep_runs(client: MlflowClient) -> tuple:
    """Return the parent run and its children in experiment ``vanishing-gradients``."""
    experiment = client.get_experiment_by_name("vanishing-gradients")
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("sweep.role") == "parent"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(runs) == len(children) + 1, "every run belongs to the sweep"
    return parent, children


def assert_complete_run(client: MlflowClient, run, epochs: int, iters_per_epoch: int = 3):
    """Check that `run` finished and that every metric has every step.

    A metric logged once at step 0 is a summary of the whole run, and is left out.
    """
    assert run.info.status == "FINISHED", run.info.run_name
    keys = set(run.data.metrics)
    assert {"train/loss", "grad_mean/fc1", "test/accuracy"} <= keys
    for key in keys:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        if steps == [0]:
            continue
        last = epochs * iters_per_epoch if key.startswith(PER_ITERATION) else epochs
        assert sorted(steps) == list(range(1, last + 1)), (run.info.run_name, key)


def download_text(client: MlflowClient, run_id: str, path: str, folder: Path) -> str:
    return Path(client.download_artifacts(run_id, path, str(folder))).read_text()


def assert_jobs_logged_apart(client, children, sweep_dir: Path, tmp_path: Path):
    """Check each job's folder and log: its own lines only, and its parent from its config."""
    names = {run.info.run_name for run in children}
    for run in children:
        log_text = download_text(client, run.info.run_id, "logs/train.log", tmp_path / "dl")
        assert f"Training {run.info.run_name} on" in log_text
        for other in names - {run.info.run_name}:
            assert f"Training {other} on" not in log_text, "one job's log holds another's lines"
    job_dirs = [p for p in sweep_dir.iterdir() if (p / ".hydra").is_dir()]
    assert len(job_dirs) == len(children)
    for job_dir in job_dirs:
        assert "tracking=" not in job_dir.name, "the tracking option stays out of folder names"
        assert "tracking.uri" not in job_dir.name
    for job_dir in job_dirs:
        assert (job_dir / "train.log").is_file()
        hydra_yaml = OmegaConf.load(job_dir / ".hydra" / "hydra.yaml")
        record = json.loads(hydra_yaml.hydra.job.env_set[PARENT_ENV])
        assert record["run_id"] == children[0].data.tags["mlflow.parentRunId"]


@pytest.fixture
def server(tmp_path):
    with running_mlflow_server(tmp_path / "server") as running:
        yield running


@pytest.mark.slow
def test_joblib_sweep_logs_to_server(server, tmp_path):
    n_jobs = min(2, cpu_count())
    uri = server.uri.replace("http://", f"http://alice:{SECRET}@")  # the server ignores it
    sweep_dir = tmp_path / "sweep"
    result = run_sweep(
        sweep_dir, "activation=relu,sigmoid", "trainer.epochs=1", "hydra/launcher=parallel",
        f"hydra.launcher.n_jobs={n_jobs}", "tracking=server", f"tracking.uri={uri}",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    client = MlflowClient(server.uri)
    parent, children = sweep_runs(client)

    assert parent.info.status == "FINISHED"
    assert sorted(r.info.run_name for r in children) == ["activation=relu", "activation=sigmoid"]
    for run in children:
        assert_complete_run(client, run, epochs=1)
        assert run.info.artifact_uri.startswith("mlflow-artifacts:/")
        assert "gradients/histograms.npz" in {a.path for a in client.list_artifacts(
            run.info.run_id, "gradients")}  # fmt: skip
    assert_jobs_logged_apart(client, children, sweep_dir, tmp_path)
    assert list((server.folder / "artifacts").rglob("histograms.npz")), "served artifacts"

    # The password never reaches MLflow, the console, the job logs or the parent record.
    assert SECRET not in result.stdout + result.stderr
    for run in [parent, *children]:
        assert SECRET not in run.info.run_name
        assert all(SECRET not in value for value in run.data.params.values())
        assert all(SECRET not in value for value in run.data.tags.values())
    for path in [*sweep_dir.glob("*/train.log"), sweep_dir / PARENT_FILE]:
        assert SECRET not in path.read_text(), path


@pytest.mark.slow
def test_submitit_local_sweep_logs_to_server(server, tmp_path):
    sweep_dir = tmp_path / "sweep"
    result = run_sweep(
        sweep_dir, "activation=relu,sigmoid", "trainer.epochs=1",
        "hydra/launcher=cluster_local", f"hydra.sweeper.max_batch_size={min(2, cpu_count())}",
        "tracking=server", f"tracking.uri={server.uri}",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    client = MlflowClient(server.uri)
    parent, children = sweep_runs(client)

    assert parent.info.status == "FINISHED"
    assert sorted(r.info.run_name for r in children) == ["activation=relu", "activation=sigmoid"]
    for run in children:
        assert_complete_run(client, run, epochs=1)
        assert run.info.artifact_uri.startswith("mlflow-artifacts:/")
    assert_jobs_logged_apart(client, children, sweep_dir, tmp_path)
    assert list(sweep_dir.glob(".submitit/*/*_result.pkl")), "the jobs went through submitit"
    comparison = {a.path for a in client.list_artifacts(parent.info.run_id, "comparison")}
    assert "comparison/summary.md" in comparison


@pytest.mark.slow
def test_parallel_sweep_on_sqlite_loses_nothing(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    (tmp_path / "mlruns").mkdir()
    result = run_sweep(
        tmp_path / "sweep", "activation=relu,sigmoid,tanh", "optimizer=adam,sgd",
        "trainer.epochs=2", "hydra/launcher=parallel",
        f"hydra.launcher.n_jobs={min(2, cpu_count())}", f"tracking.uri={uri}",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    client = MlflowClient(uri)
    parent, children = sweep_runs(client)

    assert parent.info.status == "FINISHED"
    assert len(children) == 6
    assert len({r.info.run_name for r in children}) == 6
    for run in children:
        assert_complete_run(client, run, epochs=2)
