"""Test src.data: contract, determinism, variety, learnability and plotting of the digits."""

import hashlib
import math
import pathlib
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from src.data import make_digits, plot_digit_grid

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
TRAIN_SEED = 0
TEST_SEED = 1
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def digest(images: torch.Tensor, targets: torch.Tensor) -> str:
    return hashlib.sha256(images.numpy().tobytes() + targets.numpy().tobytes()).hexdigest()


@pytest.fixture(scope="module")
def train_set() -> tuple[torch.Tensor, torch.Tensor]:
    return make_digits(5000, TRAIN_SEED)


@pytest.fixture(scope="module")
def test_set() -> tuple[torch.Tensor, torch.Tensor]:
    return make_digits(1000, TEST_SEED)


# contract: shapes, dtypes, ranges, balance


def test_make_digits_shape_and_dtype(train_set):
    images, targets = train_set
    assert images.shape == (5000, 1, 28, 28)
    assert images.dtype == torch.float32
    assert targets.shape == (5000,)
    assert targets.dtype == torch.int64


def test_make_digits_value_range(train_set):
    images, targets = train_set
    assert images.min().item() >= 0.0
    assert images.max().item() <= 1.0
    assert targets.min().item() == 0
    assert targets.max().item() == 9
    assert torch.isfinite(images).all()


@pytest.mark.parametrize("image_size", [8, 16, 64])
def test_make_digits_other_image_sizes(image_size):
    images, targets = make_digits(20, seed=3, image_size=image_size)
    assert images.shape == (20, 1, image_size, image_size)
    assert targets.shape == (20,)
    assert images.amax(dim=(1, 2, 3)).min().item() > 0.5


def test_make_digits_balanced_classes(train_set):
    _, targets = train_set
    assert torch.bincount(targets, minlength=10).tolist() == [500] * 10


def test_make_digits_balanced_with_remainder():
    _, targets = make_digits(1003, seed=5)
    assert torch.bincount(targets, minlength=10).tolist() == [101] * 3 + [100] * 7


def test_make_digits_targets_shuffled(train_set):
    _, targets = train_set
    assert not torch.equal(targets, torch.sort(targets).values)
    assert (targets[1:] != targets[:-1]).float().mean().item() > 0.8


def test_make_digits_single_sample():
    images, targets = make_digits(1, seed=0)
    assert images.shape == (1, 1, 28, 28)
    assert targets.tolist() == [0]


# determinism and RNG isolation


def test_make_digits_same_seed_identical(train_set):
    images, targets = make_digits(5000, TRAIN_SEED)
    assert torch.equal(images, train_set[0])
    assert torch.equal(targets, train_set[1])


def test_make_digits_identical_in_fresh_process():
    images, targets = make_digits(300, seed=11)
    code = (
        "import hashlib; from src.data import make_digits; "
        "images, targets = make_digits(300, seed=11); "
        "print(hashlib.sha256(images.numpy().tobytes() + targets.numpy().tobytes()).hexdigest())"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == digest(images, targets)


def test_make_digits_different_seed_differs():
    images_a, targets_a = make_digits(200, seed=100)
    images_b, targets_b = make_digits(200, seed=101)
    assert not torch.equal(targets_a, targets_b)
    assert not torch.equal(images_a, images_b)


def test_make_digits_keeps_global_rng_state():
    torch_state = torch.random.get_rng_state()
    numpy_state = np.random.get_state()[1].copy()
    python_state = random.getstate()
    # no other test uses image_size 20, so this call also renders the glyph templates
    make_digits(100, seed=9, image_size=20)
    assert torch.equal(torch.random.get_rng_state(), torch_state)
    assert np.array_equal(np.random.get_state()[1], numpy_state)
    assert random.getstate() == python_state


def test_make_digits_test_split_differs(train_set, test_set):
    train_hashes = {hashlib.sha256(image.numpy().tobytes()).hexdigest() for image in train_set[0]}
    test_hashes = {hashlib.sha256(image.numpy().tobytes()).hexdigest() for image in test_set[0]}
    assert len(train_hashes) == 5000
    assert len(test_hashes) == 1000
    assert train_hashes.isdisjoint(test_hashes)


# the images look like digits and vary


def test_make_digits_ink_fraction(train_set):
    images, _ = train_set
    ink_fraction = (images > 0.5).float().mean(dim=(1, 2, 3))
    assert 0.08 < images.mean().item() < 0.25  # MNIST's training-set mean pixel value is 0.1307
    assert 0.08 < ink_fraction.mean().item() < 0.25
    assert ink_fraction.min().item() > 0.01
    assert images.amax(dim=(1, 2, 3)).min().item() > 0.9


def test_make_digits_background_border(train_set):
    images, _ = train_set
    border = torch.cat(
        [images[..., 0, :], images[..., -1, :], images[..., :, 0], images[..., :, -1]], dim=-1
    )
    assert (border.amax(dim=(1, 2)) > 0.5).float().mean().item() < 0.05
    assert images[..., 12:16, 12:16].mean().item() > images[..., :4, :4].mean().item()


def test_make_digits_centred_on_ink(train_set):
    images, _ = train_set
    coords = torch.arange(28, dtype=torch.float32)
    mass = images.sum(dim=(1, 2, 3))
    center_y = (images.sum(dim=(1, 3)) * coords).sum(dim=-1) / mass
    center_x = (images.sum(dim=(1, 2)) * coords).sum(dim=-1) / mass
    assert abs(center_x.mean().item() - 13.5) < 1.0
    assert abs(center_y.mean().item() - 13.5) < 1.0


def test_make_digits_same_class_varies(train_set):
    images, targets = train_set
    for digit in range(10):
        samples = images[targets == digit][:50].flatten(1)
        distances = torch.cdist(samples, samples, p=1) / samples.shape[1]
        off_diagonal = distances[~torch.eye(len(samples), dtype=torch.bool)]
        assert off_diagonal.min().item() > 0.005, f"digit {digit} has near-identical images"
        assert off_diagonal.mean().item() > 0.05, f"digit {digit} varies too little"


def test_make_digits_learnable_by_mlp(train_set, test_set):
    train_images, train_targets = train_set[0][:2000].flatten(1), train_set[1][:2000]
    test_images, test_targets = test_set[0][:500].flatten(1), test_set[1][:500]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(784, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(5):
        for batch in torch.randperm(len(train_images)).split(64):
            loss = F.cross_entropy(model(train_images[batch]), train_targets[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        accuracy = (model(test_images).argmax(dim=1) == test_targets).float().mean().item()
    assert accuracy > 0.7, f"test accuracy {accuracy:.3f}"


def test_make_digits_second_call_uses_cache():
    from src.data import _glyph_templates

    make_digits(10, seed=0)
    hits = _glyph_templates.cache_info().hits
    make_digits(10, seed=1)
    assert _glyph_templates.cache_info().hits == hits + 1


# argument validation


@pytest.mark.parametrize(
    ("arguments", "name"),
    [
        ({"num_samples": 0, "seed": 0}, "num_samples"),
        ({"num_samples": -5, "seed": 0}, "num_samples"),
        ({"num_samples": 10, "seed": -1}, "seed"),
        ({"num_samples": 10, "seed": 2**63}, "seed"),
        ({"num_samples": 10, "seed": 0, "image_size": 7}, "image_size"),
        ({"num_samples": 10, "seed": 0, "image_size": 257}, "image_size"),
    ],
)
def test_make_digits_rejects_out_of_range(arguments, name):
    with pytest.raises(ValueError, match=name) as error:
        make_digits(**arguments)
    assert str(arguments[name]) in str(error.value)
    assert "[" in str(error.value) or ">=" in str(error.value)


@pytest.mark.parametrize(
    ("arguments", "name"),
    [
        ({"num_samples": 10.0, "seed": 0}, "num_samples"),
        ({"num_samples": True, "seed": 0}, "num_samples"),
        ({"num_samples": 10, "seed": "0"}, "seed"),
        ({"num_samples": 10, "seed": 0, "image_size": 28.5}, "image_size"),
    ],
)
def test_make_digits_rejects_non_integer(arguments, name):
    with pytest.raises(TypeError, match=name):
        make_digits(**arguments)


def test_make_digits_accepts_numpy_integers():
    images, targets = make_digits(np.int64(10), seed=np.int32(4), image_size=np.int64(28))
    assert torch.equal(images, make_digits(10, seed=4)[0])
    assert torch.equal(targets, make_digits(10, seed=4)[1])


# plotting and the command


def test_plot_digit_grid_axes_count():
    images, targets = make_digits(6, seed=0)
    figure = plot_digit_grid(images, targets, rows=2, cols=3, title="sample")
    assert len(figure.axes) == 6
    assert [ax.get_title() for ax in figure.axes] == [str(int(t)) for t in targets]
    assert figure.get_suptitle() == "sample"


def test_plot_digit_grid_fewer_images():
    images, targets = make_digits(4, seed=0)
    figure = plot_digit_grid(images, targets, rows=2, cols=3)
    assert len(figure.axes) == 6
    assert sum(len(ax.images) for ax in figure.axes) == 4


def test_plot_digit_grid_rejects_mismatched_targets():
    images, targets = make_digits(4, seed=0)
    with pytest.raises(ValueError, match="targets"):
        plot_digit_grid(images, targets[:3])


def test_data_command_writes_png(tmp_path):
    out = tmp_path / "digits.png"
    result = subprocess.run(
        [sys.executable, "-m", "src.data", "--num-samples", "16", "--seed", "0", "--out", str(out)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert out.read_bytes().startswith(PNG_SIGNATURE)
    assert str(out) in result.stderr


def test_data_command_rejects_bad_num_samples(tmp_path):
    out = tmp_path / "digits.png"
    result = subprocess.run(
        [sys.executable, "-m", "src.data", "--num-samples", "0", "--out", str(out)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "num_samples" in result.stderr
    assert not out.exists()


# splits: validation share, loader choice and the two data paths


def test_epoch_batches_match_randperm():
    from src.splits import EpochBatches

    sampler = EpochBatches(10, 4, torch.Generator().manual_seed(3))
    reference = torch.Generator().manual_seed(3)
    assert len(sampler) == 3
    for _ in range(2):  # each epoch draws exactly one permutation, as the tensor path does
        perm = torch.randperm(10, generator=reference).tolist()
        assert list(sampler) == [perm[0:4], perm[4:8], perm[8:10]]


def test_split_indices_stratified_and_disjoint():
    from src.splits import split_indices

    targets = torch.arange(100) % 10
    train_indices, held_out = split_indices(targets, 0.2, seed=0)
    assert len(held_out) == 20
    assert torch.bincount(targets[held_out], minlength=10).tolist() == [2] * 10
    assert sorted(torch.cat([train_indices, held_out]).tolist()) == list(range(100))
    again, _ = split_indices(targets, 0.2, seed=0)
    other, _ = split_indices(targets, 0.2, seed=1)
    assert torch.equal(train_indices, again)
    assert not torch.equal(train_indices, other)


def test_split_indices_too_small_to_stratify():
    from src.splits import split_indices

    targets = torch.tensor([0, 0, 0, 1, 2, 2, 2, 2])  # class 1 has one image
    train_indices, held_out = split_indices(targets, 0.25, seed=0)
    assert len(held_out) == 2
    assert sorted(torch.cat([train_indices, held_out]).tolist()) == list(range(8))


def test_choose_loader_by_memory_budget():
    from src.splits import choose_loader, estimate_megabytes

    assert estimate_megabytes(1000, (1, 28, 28)) == pytest.approx(1000 * 784 * 4 / 2**20)
    assert choose_loader("auto", 1000, (1, 28, 28), memory_budget_mb=2.0) == "dataloader"
    assert choose_loader("auto", 1000, (1, 28, 28), memory_budget_mb=4.0) == "tensor"
    assert choose_loader("tensor", 1000, (1, 28, 28), memory_budget_mb=0.1) == "tensor"
    assert choose_loader("dataloader", 10, (1, 28, 28), memory_budget_mb=1e6) == "dataloader"


def small_digits_cfg(*overrides: str):
    from tests.conftest import compose_config

    return compose_config(["dataset.train_size=100", "dataset.test_size=30", *overrides]).dataset


def test_default_digits_validate_on_test_split():
    from src.data import load_dataset

    data = load_dataset(small_digits_cfg(), torch.device("cpu"))
    assert data.val is data.test
    assert not data.streamed
    assert data.mean == (0.0,)
    assert data.std == (1.0,)


def test_auto_loader_streams_over_budget():
    from src.data import load_dataset

    # 130 images of 1x28x28 are about 0.39 MiB as float32.
    data = load_dataset(small_digits_cfg("dataset.memory_budget_mb=0.1"), torch.device("cpu"))
    assert data.streamed
    with pytest.raises(AttributeError, match="preview"):
        _ = data.train_inputs
    preview = data.preview()
    assert preview.train_inputs.shape == (64, 1, 28, 28)
    assert preview.test_inputs.shape == (30, 1, 28, 28)


def test_both_paths_give_same_batches():
    from src.data import load_dataset
    from src.loop import batch_sources

    cpu = torch.device("cpu")
    tensors = load_dataset(small_digits_cfg("dataset.val_fraction=0.2"), cpu)
    streamed = load_dataset(
        small_digits_cfg("dataset.val_fraction=0.2", "dataset.loader=dataloader",
                         "dataset.num_workers=0"), cpu,
    )  # fmt: skip
    sources = [
        batch_sources(data, 32, torch.Generator().manual_seed(5), 5, cpu)
        for data in (tensors, streamed)
    ]
    for name in ("train", "val", "test"):
        for _ in range(2):  # two epochs: the shuffles stay in step
            pairs = list(zip(sources[0][name](), sources[1][name]()))
            assert len(pairs) == math.ceil(
                len(getattr(tensors, name)) / (32 if name == "train" else 1000)
            )
            for (x_tensor, y_tensor), (x_stream, y_stream) in pairs:
                assert torch.equal(x_tensor, x_stream), name
                assert torch.equal(y_tensor, y_stream), name


def run_metrics(cfg) -> dict[str, list[tuple[int, float]]]:
    """Train `cfg` into its store and return every metric's (step, value) history."""
    from mlflow.tracking import MlflowClient

    from src.train import train

    train(cfg)
    client = MlflowClient(cfg.tracking.uri)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment_name)
    (run,) = client.search_runs([experiment.experiment_id])
    return {
        key: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        for key in run.data.metrics
    }


def test_dataloader_path_logs_same_metrics(tmp_path):
    from src.tracking import default_tracking_uri
    from tests.conftest import TINY_OVERRIDES, compose_config

    histories = {}
    for loader in ("tensor", "dataloader"):
        store = tmp_path / loader
        store.mkdir()
        cfg = compose_config([*TINY_OVERRIDES, f"dataset.loader={loader}", "dataset.num_workers=2",
                              "dataset.val_fraction=0.1", "tracking.log_model=false",
                              "monitor.epoch_images=false"])  # fmt: skip
        cfg.tracking.uri = default_tracking_uri(store)
        histories[loader] = run_metrics(cfg)
    tensor, streamed = histories["tensor"], histories["dataloader"]
    assert set(tensor) == set(streamed)
    assert "grad_rms/fc1" in tensor
    for key in tensor:
        assert [step for step, _ in tensor[key]] == [step for step, _ in streamed[key]], key
    # 270 training images in batches of 128: 3 iterations an epoch, 2 epochs.
    assert [step for step, _ in tensor["train/loss"]] == list(range(1, 7))
    # The same batches in the same order give the same losses on the CPU.
    assert tensor["train/loss"] == streamed["train/loss"]
    assert [step for step, _ in tensor["val/loss"]] == [1, 2]
    assert [step for step, _ in tensor["val/accuracy"]] == [1, 2]
    assert tensor["val/loss"] != tensor["test/loss"]


def test_plot_digit_grid_colour_images():
    images = torch.rand(4, 3, 8, 8)
    figure = plot_digit_grid(images, torch.arange(4), rows=1, cols=4)
    pixels = figure.axes[0].images[0].get_array()
    assert pixels.shape == (8, 8, 3)
