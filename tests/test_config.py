import os
import subprocess
import sys

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from src.config import ConfigError, validate
from src.models import build_model, weight_layers
from tests.conftest import CONF_DIR, PROJECT_ROOT, compose_config

GROUPS = ["dataset", "model", "activation", "optimizer", "tracking"]


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


def run_cli(*args: str, cwd=PROJECT_ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run(
        [sys.executable, "-m", "src.train", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("trainer.epochs=abc", "trainer.epochs"),
        ("trainer.batch_size=0", "trainer.batch_size"),
        ("optimizer.lr=-1", "optimizer.lr"),
    ],
)
def test_cli_rejects_bad_value(override, key, tmp_path):
    # hydra.run.dir keeps the job folder out of the repository.
    result = run_cli(
        override, f"hydra.run.dir={tmp_path}/run", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"
    )
    assert result.returncode != 0
    assert key in result.stderr + result.stdout
    assert not (tmp_path / "mlflow.db").exists(), "no run may start for a bad config"


def test_cli_lists_options_for_unknown_group_option(tmp_path):
    result = run_cli("activation=foo", f"hydra.run.dir={tmp_path}/run")
    assert result.returncode != 0
    assert "Could not find 'activation/foo'" in result.stderr
    assert "sigmoid" in result.stderr
