import os
import re
import subprocess
import sys

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from src.config import ConfigError, validate
from src.models import build_model, weight_layers
from tests.conftest import CONF_DIR, PROJECT_ROOT, compose_config

GROUPS = ["dataset", "model", "activation", "optimizer", "tracking"]
SLOW = pytest.mark.slow  # each CLI run costs seconds of imports; the default run keeps a few


def group_options(group: str) -> list[str]:
    return sorted(path.stem for path in (CONF_DIR / group).glob("*.yaml"))


def test_defaults_reproduce_reference_experiment():
    cfg = compose_config()
    assert cfg.trainer.epochs == 50
    assert cfg.trainer.batch_size == 128
    assert cfg.dataset.name == "digits"
    assert cfg.dataset.train_size == 5000
    assert cfg.dataset.image_size == 28
    assert cfg.model.name == "mlp"
    assert len(cfg.model.hidden_sizes) == 3  # four weight layers
    assert cfg.activation.name == "relu"
    assert cfg.optimizer._target_ == "torch.optim.Adam"
    assert cfg.optimizer.lr == 1e-3
    assert list(cfg.optimizer.betas) == [0.9, 0.999]
    assert cfg.optimizer.eps == 1e-8
    assert cfg.monitor.hist_bins == 30
    assert cfg.monitor.stats_every == 1
    assert cfg.monitor.hist_every == 1
    assert cfg.tracking.uri is None


@pytest.mark.parametrize(("group", "option"), [(g, o) for g in GROUPS for o in group_options(g)])
def test_every_group_option_composes(group, option):
    cfg = compose_config([f"{group}={option}"])
    validate(cfg)
    model = build_model(cfg.model, cfg.activation, (1, 28, 28), 10)
    optimizer = instantiate(cfg.optimizer)(params=model.parameters())
    expected = len(cfg.model.hidden_sizes) + 1 + len(cfg.model.get("channels", []))
    assert len(weight_layers(model)) == expected
    assert optimizer.defaults["lr"] == cfg.optimizer.lr


def test_activation_options_cover_required_set():
    required = {"relu", "sigmoid", "tanh", "leaky_relu", "elu", "gelu", "silu"}
    assert required <= set(group_options("activation"))


def test_optimizer_options_cover_required_set():
    assert {"adam", "sgd", "adamw"} <= set(group_options("optimizer"))


def test_deep_variant_from_hidden_sizes():
    cfg = compose_config(["model.hidden_sizes=[64,64,64,64,64,64,64,64]"])
    model = build_model(cfg.model, cfg.activation, (1, 28, 28), 10)
    assert len(weight_layers(model)) == 9


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("trainer.batch_size=0", "trainer.batch_size"),
        ("trainer.epochs=0", "trainer.epochs"),
        ("optimizer.lr=-0.001", "optimizer.lr"),
        ("optimizer.eps=0", "optimizer.eps"),
        ("monitor.hist_bins=0", "monitor.hist_bins"),
        ("monitor.stats_every=0", "monitor.stats_every"),
        ("dataset.train_size=5", "dataset.train_size"),
        ("model.hidden_sizes=[64,0]", "model.hidden_sizes"),
        ("activation.name=softsign2", "activation.name"),
        ("trainer.device=tpu", "trainer.device"),
        ("trainer.num_threads=999", "trainer.num_threads"),
        ("seed=-1", "seed"),
        ("monitor.hist_every=51", "monitor.hist_every"),
        ("monitor.tiny=inf", "monitor.tiny"),
    ],
)
def test_validate_rejects_out_of_range(override, key):
    cfg = compose_config([override])
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(cfg)


def test_schema_rejects_wrong_type():
    with pytest.raises(Exception) as info:
        compose_config(["trainer.epochs=abc"])
    assert "trainer.epochs" in str(info.value) + str(info.value.__cause__)


def test_resolved_config_is_plain_yaml():
    cfg = compose_config()
    assert "epochs: 50" in OmegaConf.to_yaml(cfg, resolve=True)


def run_cli(*args: str, cwd=PROJECT_ROOT, **env_vars: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), **env_vars}
    env.pop("MLFLOW_TRACKING_URI", None)
    if "HYDRA_FULL_ERROR" not in env_vars:
        env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(
        [sys.executable, "-m", "src.train", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def isolated(tmp_path) -> list[str]:
    """Overrides that keep the job folder and the store of a CLI run in `tmp_path`."""
    return [
        f"hydra.run.dir={tmp_path}/run",
        f"hydra.sweep.dir={tmp_path}/sweep",
        f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
    ]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        # Hydra's schema while composing, then validate() before any work.
        ("trainer.epochs=abc", "full_key: trainer.epochs"),
        pytest.param("trainer.epoch=3", "Key 'epoch' not in 'TrainerConfig'", marks=SLOW),
        ("trainer.batch_size=0", "Invalid config value trainer.batch_size=0: expected an integer"),
        pytest.param("optimizer.lr=-1", "Invalid config value optimizer.lr=-1", marks=SLOW),
        pytest.param(
            "dataset.val_fraction=0.999",
            "Invalid config value dataset.val_fraction=0.999",
            marks=SLOW,
        ),
        # Hydra's override parser, named by the entry point first.
        ("trainer.epochs=[1", "Invalid override 'trainer.epochs=[1'"),
        pytest.param("=3", "Invalid override '=3'", marks=SLOW),
    ],
)  # fmt: skip
def test_cli_rejects_bad_value(override, message, tmp_path):
    result = run_cli(override, *isolated(tmp_path))
    output = result.stderr + result.stdout
    assert result.returncode == 1
    assert output.count(message) == 1, output
    assert "Traceback" not in output
    assert not (tmp_path / "mlflow.db").exists(), "no run may start for a bad config"


def test_cli_lists_options_for_unknown_group_option(tmp_path):
    result = run_cli("activation=foo", f"hydra.run.dir={tmp_path}/run")
    assert result.returncode != 0
    assert "Could not find 'activation/foo'" in result.stderr
    assert "sigmoid" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_full_error_shows_traceback(tmp_path):
    result = run_cli("trainer.batch_size=0", *isolated(tmp_path), HYDRA_FULL_ERROR="1")
    assert result.returncode == 1
    assert "Traceback" in result.stderr
    assert "src.config.ConfigError: Invalid config value trainer.batch_size=0" in result.stderr


def test_cli_missing_dataset_one_message(tmp_path):
    result = run_cli("dataset=mnist", f"dataset.root={tmp_path}/none", *isolated(tmp_path))
    output = result.stderr + result.stdout
    assert result.returncode == 1
    assert output.count(f"Missing MNIST files in {tmp_path}/none/MNIST/raw") == 1
    assert "Traceback" not in output


def test_cli_sweep_with_bad_job_starts_nothing(tmp_path):
    result = run_cli("-m", "trainer.batch_size=16,0", "trainer.epochs=1", *isolated(tmp_path))
    output = result.stderr + result.stdout
    assert result.returncode == 1
    assert "Invalid config in 1 of the sweep's 2 jobs" in output
    assert "#1 trainer.batch_size=0: Invalid config value trainer.batch_size=0" in output
    assert "Traceback" not in output
    assert "Training" not in output, "no job may start"
    assert not (tmp_path / "sweep").exists(), "no job folder, no parent run record"
    assert not (tmp_path / "mlflow.db").exists(), "no parent run"


def test_cli_sweep_job_user_error_goes_on(tmp_path):
    # Missing files pass the config check, so each job fails on its own and the sweep goes on.
    from mlflow.tracking import MlflowClient

    missing = f"{tmp_path}/none"
    result = run_cli(
        "-m", "activation=relu,sigmoid", "dataset=mnist", f"dataset.root={missing}",
        *isolated(tmp_path),
    )  # fmt: skip
    output = result.stderr + result.stdout
    assert result.returncode == 1
    for name in ("activation=relu", "activation=sigmoid"):
        assert output.count(f"Job {name} failed: Missing MNIST files in {missing}") == 1
    assert "2 job(s) of the sweep failed" in output
    assert "Traceback" not in output
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("vanishing-gradients")
    (parent,) = client.search_runs([experiment.experiment_id])  # no job created a run
    assert parent.data.tags["sweep.failed_jobs"] == "2"
    assert parent.info.status == "FINISHED"


# Checks that types cannot express: non-finite floats, names, ranges, interacting values.


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["optimizer.lr=inf"], "optimizer.lr"),
        (["optimizer.lr=nan"], "optimizer.lr"),
        (["optimizer.weight_decay=inf"], "optimizer.weight_decay"),
        (["optimizer.eps=inf"], "optimizer.eps"),
        (["optimizer=sgd", "optimizer.momentum=nan"], "optimizer.momentum"),
        (["monitor.hist_log_range=[1e-10,inf]"], "monitor.hist_log_range"),
        (["monitor.tiny=nan"], "monitor.tiny"),
        (["dataset.mean=[nan]"], "dataset.mean"),
        (["dataset.std=[inf]"], "dataset.std"),
        (["dataset.memory_budget_mb=inf"], "dataset.memory_budget_mb"),
        (["health.vanish_abs=inf"], "health.vanish_abs"),
        (["health.min_epochs_frac=nan"], "health.min_epochs_frac"),
        (["activation=leaky_relu", "activation.negative_slope=nan"], "activation.negative_slope"),
        (["activation=elu", "activation.alpha=-inf"], "activation.alpha"),
    ],
)  # fmt: skip
def test_validate_rejects_nonfinite(overrides, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        validate(compose_config(overrides))


def test_validate_allows_infinite_explode_thresholds():
    validate(compose_config(["health.explode_ratio=inf", "health.explode_abs=inf"]))


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["trainer.device=CUDA"], "trainer.device"),
        (["trainer.device=cuda:x"], "trainer.device"),
        (["trainer.device=''"], "trainer.device"),
        (["dataset.name=svhn"], "dataset.name"),
        (["dataset.loader=stream"], "dataset.loader"),
        (["model.init=he"], "model.init"),
        (["model=cnn", "model.pool=min"], "model.pool"),
        (["monitor.hist_mode=linear"], "monitor.hist_mode"),
        (["optimizer._target_=torch.optim.Adamax2"], "optimizer._target_"),
        (["optimizer._target_=os.system"], "optimizer._target_"),
        (["optimizer._target_=torch.optim.lr_scheduler.StepLR"], "optimizer._target_"),
        (["optimizer._partial_=false"], "optimizer._partial_"),
        (["tracking.experiment_name=' '"], "tracking.experiment_name"),
    ],
)  # fmt: skip
def test_validate_rejects_unknown_name(overrides, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        validate(compose_config(overrides))


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["seed=9223372036854775808"], "seed"),
        (["dataset.split_seed=4294967296"], "dataset.split_seed"),
        (["dataset.train_seed=-1"], "dataset.train_seed"),
        (["monitor.hist_bins=1001"], "monitor.hist_bins"),
        (["dataset.image_size=257"], "dataset.image_size"),
        (["model=cnn", "model.kernel_size=29"], "model.kernel_size"),
        (["model=cnn", "model.kernel_size=4"], "model.kernel_size"),
        (["health.vanish_abs=2000"], "health.vanish_abs"),
        (["dataset=mnist", "dataset.root=''"], "dataset.root"),
    ],
)  # fmt: skip
def test_validate_rejects_out_of_range_bound(overrides, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        validate(compose_config(overrides))


@pytest.mark.parametrize(
    ("overrides", "key", "reason"),
    [
        # An option's keys with another option's name: the module rejects them.
        (["dataset.name=mnist"], "dataset.name", "dataset.root"),
        (["dataset=uci_digits", "dataset.name=digits"], "dataset.name", "dataset.train_size"),
        (["model.name=cnn"], "model.name", "model.channels"),
        (["activation=elu", "activation.name=relu"], "activation.alpha", "relu takes no"),
        (["activation=leaky_relu", "activation.name=tanh"], "activation.negative_slope", "tanh"),
        (["optimizer._target_=torch.optim.SGD"], "optimizer.betas", "torch.optim.SGD takes no"),
        (["optimizer=sgd", "optimizer.nesterov=true", "optimizer.momentum=0"],
         "optimizer.nesterov", "momentum > 0"),
    ],
)  # fmt: skip
def test_validate_rejects_mismatched_option(overrides, key, reason):
    with pytest.raises(ConfigError, match=re.escape(key)) as info:
        validate(compose_config(overrides))
    assert reason in str(info.value)


@pytest.mark.parametrize(
    ("overrides", "target"),
    [
        (["optimizer._target_=torch.optim.AdamW"], "AdamW"),
        (["optimizer=sgd", "optimizer._target_=torch.optim.SGD"], "SGD"),
        (["optimizer=sgd", "optimizer.nesterov=true"], "SGD"),
        (["activation=leaky_relu", "activation.name=lrelu"], None),
    ],
)  # fmt: skip
def test_validate_accepts_matching_option(overrides, target):
    cfg = compose_config(overrides)
    validate(cfg)
    model = build_model(cfg.model, cfg.activation, (1, 28, 28), 10)
    optimizer = instantiate(cfg.optimizer)(params=model.parameters())
    if target:
        assert type(optimizer).__name__ == target


def test_validate_names_broken_interpolation():
    cfg = compose_config(["trainer.epochs='${trainer.no_such_key}'"])
    with pytest.raises(ConfigError, match=r"trainer\.epochs") as info:
        validate(cfg)
    assert "no_such_key" in str(info.value)


def test_validate_accepts_working_interpolation():
    validate(compose_config(["monitor.hist_every='${trainer.epochs}'"]))


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        # 5000 training images, 4995 held out for validation: 5 left for 10 classes.
        (["dataset.val_fraction=0.999"], "dataset.val_fraction"),
        (["dataset.train_size=10", "dataset.val_fraction=0.05"], "dataset.val_fraction"),
        (["dataset=uci_digits", "dataset.test_fraction=0.999"], "dataset.test_fraction"),
        (["dataset=uci_digits", "dataset.test_fraction=0.5", "dataset.val_fraction=0.995"],
         "dataset.val_fraction"),
        (["dataset=mnist", "dataset.val_fraction=0.99999"], "dataset.val_fraction"),
    ],
)  # fmt: skip
def test_validate_rejects_empty_training_set(overrides, key):
    with pytest.raises(ConfigError, match=re.escape(key)) as info:
        validate(compose_config(overrides))
    assert "fewer than one" in str(info.value)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ([], 5000),
        (["dataset.train_size=300", "dataset.test_size=100", "dataset.val_fraction=0.1"], 270),
        (["dataset=uci_digits"], 1293),
        (["dataset=uci_digits", "dataset.test_fraction=0.3", "dataset.val_fraction=0.25"], 942),
    ],
)  # fmt: skip
def test_training_set_size_matches_loaded_splits(overrides, expected):
    from src.config import training_set_size
    from src.data import load_dataset

    cfg = compose_config(overrides)
    assert training_set_size(cfg.dataset) == expected
    if cfg.dataset.name == "uci_digits" or cfg.dataset.train_size <= 300:
        data = load_dataset(cfg.dataset, torch.device("cpu"))
        assert len(data.train) == expected


def test_training_set_size_unknown_for_image_folder():
    from src.config import training_set_size

    assert training_set_size(compose_config(["dataset=image_folder"]).dataset) is None


@pytest.mark.parametrize(
    ("overrides", "batch_size"),
    [
        # 5000 % 4999 == 1: the last of two mini-batches contains one image.
        (["model.batch_norm=true", "trainer.batch_size=4999"], 4999),
        (["model.batch_norm=true", "trainer.batch_size=1"], 1),
        # uci_digits keeps 1293 training images: 1293 % 4 == 1.
        (["dataset=uci_digits", "model.batch_norm=true", "trainer.batch_size=4"], 4),
        (["model=cnn", "model.batch_norm=true", "trainer.batch_size=4999"], 4999),
    ],
)  # fmt: skip
def test_validate_rejects_single_image_batch_norm_batch(overrides, batch_size):
    with pytest.raises(ConfigError, match=rf"trainer\.batch_size={batch_size}\b"):
        validate(compose_config(overrides))


@pytest.mark.parametrize(
    "overrides",
    [
        ["trainer.batch_size=4999"],  # no batch norm
        ["model.batch_norm=true", "trainer.batch_size=4998"],
        ["model.batch_norm=true", "model.hidden_sizes=[]", "trainer.batch_size=4999"],
    ],
)  # fmt: skip
def test_validate_accepts_batch_norm_safe_batches(overrides):
    validate(compose_config(overrides))


@pytest.mark.parametrize(("num_train", "batch_size"), [(5000, 4999), (257, 128), (1293, 4), (7, 2)])
def test_batch_norm_suggestion_avoids_single_image(num_train, batch_size):
    from src.config import check_batch_norm_batches

    with pytest.raises(ConfigError) as info:
        check_batch_norm_batches(num_train, batch_size)
    suggestion = int(re.search(r"for example trainer\.batch_size=(\d+)", str(info.value))[1])
    assert suggestion >= 2
    assert (num_train % suggestion or suggestion) != 1
    check_batch_norm_batches(num_train, suggestion)


def test_loop_guard_raises_config_error():
    from src.loop import check_last_batch

    cfg = compose_config(["model.batch_norm=true", "model.hidden_sizes=[8]"])
    model = build_model(cfg.model, cfg.activation, (1, 8, 8), 10)
    with pytest.raises(ConfigError, match=r"trainer\.batch_size=1\b"):
        check_last_batch(model, 100, 1)
    with pytest.raises(ConfigError, match=r"trainer\.batch_size=3\b"):
        check_last_batch(model, 100, 3)
    check_last_batch(model, 100, 4)


def test_validate_rejects_stats_every_beyond_run():
    # 5000 images in batches of 128: 40 iterations in the one epoch.
    with pytest.raises(ConfigError, match=r"monitor\.stats_every=41\b") as info:
        validate(compose_config(["trainer.epochs=1", "monitor.stats_every=41"]))
    assert "40 iterations" in str(info.value)
    validate(compose_config(["trainer.epochs=1", "monitor.stats_every=40"]))


def test_validate_rejects_workers_beyond_cores():
    from src.config import usable_cores

    cores = usable_cores()
    streamed = ["dataset.loader=dataloader", f"dataset.num_workers={cores + 1}"]
    with pytest.raises(ConfigError, match=r"dataset\.num_workers"):
        validate(compose_config(streamed))
    validate(compose_config(streamed), machine=False)
    # The tensor path starts no workers, so their number does not matter there.
    validate(compose_config(["dataset.loader=tensor", f"dataset.num_workers={cores + 1}"]))


def test_validate_rejects_threads_beyond_cores_only_on_machine():
    from src.config import usable_cores

    cfg = compose_config([f"trainer.num_threads={usable_cores() + 1}"])
    with pytest.raises(ConfigError, match=r"trainer\.num_threads"):
        validate(cfg)
    validate(cfg, machine=False)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["model.hidden_sizes=[1000000000]"], "model.hidden_sizes"),
        (["dataset.train_size=1000000000"], "dataset.train_size"),
        (["dataset=uci_digits", "dataset.image_size=100000"], "dataset.image_size"),
    ],
)  # fmt: skip
def test_validate_rejects_run_beyond_memory(overrides, key):
    with pytest.raises(ConfigError, match="GiB of memory") as info:
        validate(compose_config(overrides))
    assert key in str(info.value)
    validate(compose_config(overrides), machine=False)


@pytest.mark.parametrize(
    "overrides",
    [[], ["model.batch_norm=true"], ["model=cnn"], ["model=cnn", "model.batch_norm=true"],
     ["model=cnn", "dataset=cifar10", "model.kernel_size=5", "model.hidden_sizes=[]"]],
)  # fmt: skip
def test_memory_estimate_counts_parameters(overrides):
    from src.config import estimate_memory
    from src.data import input_shape_of

    cfg = compose_config(overrides)
    model = build_model(cfg.model, cfg.activation, input_shape_of(cfg.dataset), 10)
    parameters = sum(p.numel() for p in model.parameters())
    assert estimate_memory(cfg)["parameters"] == 16 * parameters  # four float32 copies each


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_validate_rejects_missing_cuda():
    cfg = compose_config(["trainer.device=cuda"])
    with pytest.raises(ConfigError, match="CUDA is not available"):
        validate(cfg)
    validate(cfg, machine=False)


def test_user_errors_share_base_class():
    from src.config import UserError
    from src.datasets import DatasetError
    from src.tracking import TrackingServerError

    assert issubclass(ConfigError, UserError)
    assert issubclass(ConfigError, ValueError), "callers that catch ValueError keep working"
    assert issubclass(DatasetError, UserError)
    assert issubclass(TrackingServerError, UserError)


# Overrides that Hydra's parser rejects, named before Hydra reports them.


@pytest.mark.parametrize(
    ("override", "reason"),
    [
        ("trainer.epochs=[1", "no viable alternative"),
        ("trainer.epochs=1)", "extraneous input"),
        ("trainer..epochs=3", "position 8"),
        ("=3", "expected a key"),
    ],
)
def test_bad_override_message_names_override(override, reason):
    from src.config import _bad_override_message

    message = _bad_override_message(["-m", "activation=relu", override])
    assert message.startswith(f"Invalid override {override!r}")
    assert reason in message


def test_good_overrides_pass_override_check():
    from src.config import _bad_override_message

    argv = ["-m", "activation=relu,sigmoid", "seed=range(0,3)", "+x='a b'", "--cfg", "job"]
    assert _bad_override_message(argv) is None


def test_override_check_leaves_full_error_to_hydra(monkeypatch):
    from src.config import exit_on_bad_override

    calls = []
    entry = exit_on_bad_override(lambda: calls.append("hydra"))
    monkeypatch.setattr(sys, "argv", ["train", "trainer.epochs=[1"])
    with pytest.raises(SystemExit, match=r"trainer\.epochs=\[1"):
        entry()
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    entry()
    assert calls == ["hydra"]


# A sweep validates every job before its first one, in-process with Hydra's config loader.


def compose_sweep(overrides: list[str]):
    """Compose the multirun config with Hydra's own node, as ``-m`` does, and check its jobs."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode

    from src.sweep import check_sweep_configs

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        config = loader.load_configuration("config", overrides, run_mode=RunMode.MULTIRUN)
        check_sweep_configs(config)


def test_sweep_check_names_every_bad_job():
    with pytest.raises(ConfigError) as info:
        compose_sweep(["activation=relu,foo", "trainer.batch_size=16,0"])
    message = str(info.value)
    assert message.startswith("Invalid config in 3 of the sweep's 4 jobs")
    assert "#1 activation=relu,trainer.batch_size=0: Invalid config value" in message
    assert "#2 activation=foo,trainer.batch_size=16: In 'config': Could not find" in message
    assert "#3 activation=foo,trainer.batch_size=0" in message
    assert "#0" not in message


def test_sweep_check_covers_checkpoint_keys():
    with pytest.raises(ConfigError) as info:
        compose_sweep(["activation=relu,sigmoid", "checkpoint.min_interval=-1,5"])
    message = str(info.value)
    assert message.startswith("Invalid config in 2 of the sweep's 4 jobs")
    assert "checkpoint.min_interval=-1.0" in message


@pytest.mark.parametrize("uri", ["file:///tmp/mlruns", "/tmp/mlruns", "mlruns"])
def test_plain_folder_store_rejected(uri):
    from src.tracking import check_store_uri

    with pytest.raises(ConfigError, match="MLflow 3 rejects a plain-folder store"):
        check_store_uri(uri)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write any file")
def test_read_only_store_rejected(tmp_path):
    from src.tracking import check_store_uri

    store = tmp_path / "mlflow.db"
    store.write_bytes(b"")
    store.chmod(0o444)
    with pytest.raises(ConfigError, match="cannot read and write"):
        check_store_uri(f"sqlite:///{store}")


def test_sweep_check_passes_good_sweep():
    compose_sweep(["activation=relu,sigmoid", "seed=range(0,3)"])


def test_sweep_check_covers_sweeper_params(tmp_path):
    # A sweep in an experiment file (hydra.sweeper.params), and a value on the command line.
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "pair.yaml").write_text(
        "# @package _global_\nhydra:\n  sweeper:\n    params:\n      activation: relu,foo\n"
    )
    overrides = [f"hydra.searchpath=[file://{tmp_path}]", "+experiment=pair", "optimizer.lr=-1"]
    with pytest.raises(ConfigError) as info:
        compose_sweep(overrides)
    message = str(info.value)
    assert message.startswith("Invalid config in 2 of the sweep's 2 jobs")
    assert "#0 activation=relu: Invalid config value optimizer.lr=-1" in message
    assert "#1 activation=foo: In 'config': Could not find 'activation/foo'" in message


def test_sweep_check_skips_machine_for_slurm():
    from src.config import usable_cores

    threads = f"trainer.num_threads={usable_cores() + 1}"
    with pytest.raises(ConfigError, match=r"trainer\.num_threads"):
        compose_sweep(["seed=1,2", threads])
    compose_sweep(["seed=1,2", threads, "hydra/launcher=slurm"])
