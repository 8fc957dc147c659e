"""Test src.datasets and load_dataset on small files written here in each dataset's real format.

The MNIST family gets IDX files under ``<root>/<Class>/raw/``, CIFAR-10 python pickle
batches under ``<root>/cifar-10-batches-py/``, and image_folder a folder of PNGs. No
test downloads anything: a guard fails any call that would.
"""

import gzip
import os
import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from src import datasets
from src.data import PROJECT_ROOT, input_shape_of, load_dataset, resolve_root
from src.datasets import DatasetError, read_idx
from src.models import build_model
from tests.conftest import compose_config

CPU = torch.device("cpu")
MNIST_FOLDERS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST", "kmnist": "KMNIST"}
MNIST_TRAIN, MNIST_TEST = 60, 20  # images written per split
CIFAR_PER_BATCH, CIFAR_TEST = 8, 10


@pytest.fixture(autouse=True)
def no_download(monkeypatch):
    """Fail any test that would let torchvision download."""

    def reject_download(class_name, root):
        pytest.fail(f"a test tried to download {class_name} into {root}")

    monkeypatch.setattr(datasets, "_download_torchvision", reject_download)


def write_idx(path, array: np.ndarray) -> None:
    """Write a uint8 array as an IDX file: 0x0000, type 0x08, ndim, big-endian dims, data."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def mnist_arrays(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(count, 28, 28), dtype=np.uint8)
    labels = np.arange(count, dtype=np.uint8) % 10
    return images, labels


def write_mnist(root, name: str) -> dict[str, np.ndarray]:
    """Write a small dataset in torchvision's raw MNIST layout; return what was written."""
    raw = root / MNIST_FOLDERS[name] / "raw"
    raw.mkdir(parents=True)
    train_images, train_labels = mnist_arrays(MNIST_TRAIN, 0)
    test_images, test_labels = mnist_arrays(MNIST_TEST, 1)
    write_idx(raw / "train-images-idx3-ubyte", train_images)
    write_idx(raw / "train-labels-idx1-ubyte", train_labels)
    write_idx(raw / "t10k-images-idx3-ubyte", test_images)
    write_idx(raw / "t10k-labels-idx1-ubyte", test_labels)
    return {"train_images": train_images, "train_labels": train_labels,
            "test_images": test_images, "test_labels": test_labels}  # fmt: skip


def write_cifar(root) -> dict[str, np.ndarray]:
    """Write five training batches and a test batch as CIFAR-10's python pickles."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(2)
    written = {}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for index, name in enumerate(names):
        count = CIFAR_TEST if name == "test_batch" else CIFAR_PER_BATCH
        data = rng.integers(0, 256, size=(count, 3072), dtype=np.uint8)
        labels = [int(label) for label in (np.arange(count) + index) % 10]
        batch = {"batch_label": name, "labels": labels, "data": data,
                 "filenames": [f"{name}_{i}.png" for i in range(count)]}  # fmt: skip
        with (folder / name).open("wb") as file:
            pickle.dump(batch, file, protocol=2)
        written[name] = (data, labels)
    return written


def write_image_folder(root, classes=("cat", "dog", "emu"), per_class: int = 6) -> None:
    """Write per_class 12x10 RGB PNGs per class, each one flat colour: red scaled by class."""
    for index, name in enumerate(classes):
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            colour = (40 * (index + 1), 10 * i, 200)
            Image.new("RGB", (12, 10), colour).save(folder / f"{i}.png")


def dataset_cfg(name: str, *overrides: str):
    return compose_config([f"dataset={name}", *overrides]).dataset


# The MNIST family


@pytest.mark.parametrize("name", sorted(MNIST_FOLDERS))
def test_mnist_family_reads_idx_files(name, tmp_path):
    written = write_mnist(tmp_path, name)
    data = load_dataset(
        dataset_cfg(name, f"dataset.root={tmp_path}", "dataset.val_fraction=0"), CPU
    )
    assert data.input_shape == (1, 28, 28)
    assert data.num_classes == 10
    assert data.train_inputs.shape == (MNIST_TRAIN, 1, 28, 28)
    assert data.train_inputs.dtype == torch.float32
    expected = torch.from_numpy(written["train_images"]).float().unsqueeze(1) / 255
    torch.testing.assert_close(data.train_inputs, expected)
    assert data.train_targets.tolist() == written["train_labels"].tolist()
    assert data.test_targets.tolist() == written["test_labels"].tolist()


def test_mnist_validation_share_held_out(tmp_path):
    write_mnist(tmp_path, "mnist")
    data = load_dataset(dataset_cfg("mnist", f"dataset.root={tmp_path}"), CPU)
    assert len(data.val) == 6  # 10% of 60
    assert len(data.train) == 54
    assert data.val is not data.test
    train_rows = {tuple(row.tolist()) for row in data.train_inputs.flatten(1)}
    val_rows = {tuple(row.tolist()) for row in data.val.inputs.flatten(1)}
    assert train_rows.isdisjoint(val_rows)


def test_mnist_missing_files_named(tmp_path):
    with pytest.raises(DatasetError) as info:
        load_dataset(dataset_cfg("mnist", f"dataset.root={tmp_path}"), CPU)
    message = str(info.value)
    assert str(tmp_path / "MNIST" / "raw") in message
    assert "train-images-idx3-ubyte" in message
    assert "t10k-labels-idx1-ubyte" in message
    assert "dataset.download=true" in message


def test_mnist_compressed_files_need_gunzip(tmp_path):
    written = write_mnist(tmp_path, "kmnist")
    raw = tmp_path / "KMNIST" / "raw"
    source = raw / "train-images-idx3-ubyte"
    with gzip.open(raw / "train-images-idx3-ubyte.gz", "wb") as file:
        file.write(source.read_bytes())
    source.unlink()
    assert written
    with pytest.raises(DatasetError, match="gunzip"):
        load_dataset(dataset_cfg("kmnist", f"dataset.root={tmp_path}"), CPU)


@pytest.mark.parametrize(
    ("corruption", "reason"),
    [
        (lambda data: data[: len(data) // 2], "needs"),
        (lambda data: b"\x12\x34" + data[2:], "header"),
        (lambda data: b"\x00\x00", "header"),
    ],
)
def test_mnist_corrupt_file_named(tmp_path, corruption, reason):
    write_mnist(tmp_path, "fashion_mnist")
    path = tmp_path / "FashionMNIST" / "raw" / "train-images-idx3-ubyte"
    path.write_bytes(corruption(path.read_bytes()))
    with pytest.raises(DatasetError, match=reason) as info:
        load_dataset(dataset_cfg("fashion_mnist", f"dataset.root={tmp_path}"), CPU)
    assert str(path) in str(info.value)


def test_mnist_label_count_mismatch(tmp_path):
    write_mnist(tmp_path, "mnist")
    labels = tmp_path / "MNIST" / "raw" / "train-labels-idx1-ubyte"
    write_idx(labels, np.zeros(MNIST_TRAIN - 1, dtype=np.uint8))
    with pytest.raises(DatasetError, match="do not match") as info:
        load_dataset(dataset_cfg("mnist", f"dataset.root={tmp_path}"), CPU)
    assert str(labels) in str(info.value)


def test_read_idx_round_trip(tmp_path):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "x", array)
    np.testing.assert_array_equal(read_idx(tmp_path / "x"), array)


def test_download_false_never_downloads(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(datasets, "_download_torchvision", lambda *args: calls.append(args))
    with pytest.raises(DatasetError):
        load_dataset(dataset_cfg("mnist", f"dataset.root={tmp_path}"), CPU)
    assert calls == []


def test_download_true_asks_torchvision(tmp_path, monkeypatch):
    calls = []

    def fake_download(class_name, root):
        calls.append((class_name, root))
        write_mnist(root, "mnist")

    monkeypatch.setattr(datasets, "_download_torchvision", fake_download)
    data = load_dataset(
        dataset_cfg("mnist", f"dataset.root={tmp_path}", "dataset.download=true"), CPU
    )
    assert calls == [("MNIST", tmp_path)]
    assert len(data.train) + len(data.val) == MNIST_TRAIN


# CIFAR-10


def test_cifar10_reads_pickle_batches(tmp_path):
    written = write_cifar(tmp_path)
    data = load_dataset(
        dataset_cfg("cifar10", f"dataset.root={tmp_path}", "dataset.val_fraction=0"), CPU
    )
    assert data.input_shape == (3, 32, 32)
    assert data.num_classes == 10
    assert len(data.train) == 5 * CIFAR_PER_BATCH
    assert len(data.test) == CIFAR_TEST
    # The first image: its 3072 bytes are the red, green and blue 32x32 planes in turn.
    first, labels = written["data_batch_1"]
    expected = torch.from_numpy(first[0].reshape(3, 32, 32)).float() / 255
    torch.testing.assert_close(data.train_inputs[0], expected)
    assert data.train_targets[:CIFAR_PER_BATCH].tolist() == labels
    assert data.test_targets.tolist() == written["test_batch"][1]


def test_cifar10_missing_batch_named(tmp_path):
    write_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DatasetError) as info:
        load_dataset(dataset_cfg("cifar10", f"dataset.root={tmp_path}"), CPU)
    message = str(info.value)
    assert str(tmp_path / "cifar-10-batches-py") in message
    assert "data_batch_3" in message
    assert "dataset.download=true" in message


def test_cifar10_corrupt_batch_named(tmp_path):
    write_cifar(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(DatasetError, match="Corrupt CIFAR-10 batch") as info:
        load_dataset(dataset_cfg("cifar10", f"dataset.root={tmp_path}"), CPU)
    assert str(path) in str(info.value)


def test_cifar10_wrong_shape_named(tmp_path):
    write_cifar(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    batch = {"labels": [0, 1], "data": np.zeros((2, 100), dtype=np.uint8)}
    path.write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(DatasetError, match=r"\[N, 3072\]") as info:
        load_dataset(dataset_cfg("cifar10", f"dataset.root={tmp_path}"), CPU)
    assert str(path) in str(info.value)


class Planted:
    """A pickle payload that would run a command when unpickled."""

    def __reduce__(self):
        return (os.system, ("echo planted",))


def test_cifar10_pickle_cannot_run_code(tmp_path):
    write_cifar(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    path.write_bytes(pickle.dumps({"data": Planted(), "labels": []}))
    with pytest.raises(DatasetError, match="not allowed"):
        load_dataset(dataset_cfg("cifar10", f"dataset.root={tmp_path}"), CPU)


# scikit-learn's 8x8 digits


def test_uci_digits_splits_and_shape():
    data = load_dataset(dataset_cfg("uci_digits"), CPU)
    assert data.input_shape == (1, 28, 28)
    assert data.num_classes == 10
    assert len(data.test) == 360  # 20% of 1797, rounded up
    assert len(data.val) == 144  # 10% of the remaining 1437, rounded up
    assert len(data.train) == 1797 - 360 - 144
    assert 0.0 <= data.train_inputs.min().item()
    assert data.train_inputs.max().item() <= 1.0
    assert set(data.test_targets.tolist()) == set(range(10))


def test_uci_digits_image_size_configurable():
    data = load_dataset(dataset_cfg("uci_digits", "dataset.image_size=8"), CPU)
    assert data.input_shape == (1, 8, 8)
    # At 8x8 the pixels are the originals: counts of 0..16 scaled to [0, 1].
    pixels = torch.unique(data.train_inputs * 16)
    torch.testing.assert_close(pixels, pixels.round())


def test_uci_digits_split_is_deterministic():
    first = load_dataset(dataset_cfg("uci_digits", "dataset.image_size=8"), CPU)
    second = load_dataset(dataset_cfg("uci_digits", "dataset.image_size=8"), CPU)
    other = load_dataset(
        dataset_cfg("uci_digits", "dataset.image_size=8", "dataset.split_seed=1"), CPU
    )
    assert torch.equal(first.test_targets, second.test_targets)
    assert torch.equal(first.test_inputs, second.test_inputs)
    assert not torch.equal(first.test_inputs, other.test_inputs)


# A folder of labelled images


@pytest.mark.parametrize("channels", [1, 3])
def test_image_folder_reads_pngs(tmp_path, channels):
    write_image_folder(tmp_path / "images")
    cfg = dataset_cfg(
        "image_folder",
        f"dataset.root={tmp_path / 'images'}",
        "dataset.image_size=16",
        f"dataset.channels={channels}",
        "dataset.mean=[0.5]",
        "dataset.std=[0.5]",
    )
    data = load_dataset(cfg, CPU)
    assert data.input_shape == (channels, 16, 16)
    assert data.num_classes == 3
    total = len(data.train) + len(data.val) + len(data.test)
    assert total == 18
    assert len(data.test) == 4  # 20% of 18, rounded up
    if channels == 3:
        # Each image is flat: red is 40 * (class + 1), blue 200, in 0..255.
        red = data.train_inputs[:, 0].mean(dim=(1, 2)) * 255
        torch.testing.assert_close(red, 40.0 * (data.train_targets.float() + 1), atol=1, rtol=0)
        blue = data.train_inputs[:, 2] * 255
        torch.testing.assert_close(blue, torch.full_like(blue, 200.0), atol=1, rtol=0)


def test_image_folder_test_root(tmp_path):
    write_image_folder(tmp_path / "train", per_class=4)
    write_image_folder(tmp_path / "test", per_class=2)
    cfg = dataset_cfg(
        "image_folder",
        f"dataset.root={tmp_path / 'train'}",
        f"dataset.test_root={tmp_path / 'test'}",
        "dataset.val_fraction=0",
    )
    data = load_dataset(cfg, CPU)
    assert len(data.train) == 12
    assert len(data.test) == 6
    assert data.test_targets.tolist() == [0, 0, 1, 1, 2, 2]


def test_image_folder_missing_root_named(tmp_path):
    root = tmp_path / "nowhere"
    with pytest.raises(DatasetError) as info:
        load_dataset(dataset_cfg("image_folder", f"dataset.root={root}"), CPU)
    assert str(root) in str(info.value)
    assert "<root>/<class name>/" in str(info.value)


def test_image_folder_without_classes_named(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "loose.png").write_bytes(b"")
    with pytest.raises(DatasetError, match="No labelled images") as info:
        load_dataset(dataset_cfg("image_folder", f"dataset.root={tmp_path / 'images'}"), CPU)
    assert str(tmp_path / "images") in str(info.value)


def test_image_folder_corrupt_image_named(tmp_path):
    write_image_folder(tmp_path / "images")
    broken = tmp_path / "images" / "dog" / "3.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    cfg = dataset_cfg(
        "image_folder", f"dataset.root={tmp_path / 'images'}", "dataset.num_workers=0"
    )
    with pytest.raises(DatasetError) as info:
        load_dataset(cfg, CPU)
    assert str(broken) in str(info.value)


def test_image_folder_class_mismatch_named(tmp_path):
    write_image_folder(tmp_path / "train")
    write_image_folder(tmp_path / "test", classes=("cat", "dog"))
    cfg = dataset_cfg(
        "image_folder",
        f"dataset.root={tmp_path / 'train'}",
        f"dataset.test_root={tmp_path / 'test'}",
    )
    with pytest.raises(DatasetError, match="classes") as info:
        load_dataset(cfg, CPU)
    assert str(tmp_path / "test") in str(info.value)


def test_image_folder_streams_from_disk(tmp_path):
    write_image_folder(tmp_path / "images")
    cfg = dataset_cfg(
        "image_folder",
        f"dataset.root={tmp_path / 'images'}",
        "dataset.loader=dataloader",
        "dataset.num_workers=0",
    )
    data = load_dataset(cfg, CPU)
    assert data.streamed
    loader = data.eval_loader(data.test, seed=0)
    images, targets = next(iter(loader))
    assert images.shape == (4, 1, 28, 28)
    assert targets.dtype == torch.int64


# Roots and shapes


def test_relative_root_resolves_from_project():
    assert resolve_root("data") == PROJECT_ROOT / "data"
    assert resolve_root("data").is_absolute()
    assert resolve_root("/abs/path") == resolve_root("/abs/path").resolve()


def test_input_shape_matches_loaded(tmp_path):
    write_mnist(tmp_path, "mnist")
    write_cifar(tmp_path)
    for name in ("mnist", "cifar10"):
        cfg = dataset_cfg(name, f"dataset.root={tmp_path}")
        assert load_dataset(cfg, CPU).input_shape == input_shape_of(cfg)


MODEL_OVERRIDES = [
    ["model=mlp"],
    ["model=mlp", "model.residual=true", "model.hidden_sizes=[32,32,32]"],
    ["model=cnn"],
    ["model=cnn", "model.batch_norm=true", "model.channels=[4,8,8]"],
]


@pytest.mark.parametrize("model_overrides", MODEL_OVERRIDES, ids=lambda o: ",".join(o))
def test_shapes_propagate_into_models(tmp_path, model_overrides):
    write_mnist(tmp_path, "mnist")
    write_cifar(tmp_path)
    write_image_folder(tmp_path / "images", classes=("a", "b", "c", "d"))
    cases = {
        "mnist": [f"dataset.root={tmp_path}"],
        "cifar10": [f"dataset.root={tmp_path}"],
        "uci_digits": ["dataset.image_size=16"],
        "image_folder": [f"dataset.root={tmp_path / 'images'}", "dataset.channels=3",
                         "dataset.image_size=20", "dataset.mean=[0.5,0.4,0.3]"],
    }  # fmt: skip
    for name, overrides in cases.items():
        cfg = compose_config([f"dataset={name}", *overrides, *model_overrides])
        data = load_dataset(cfg.dataset, CPU)
        model = build_model(
            cfg.model, cfg.activation, data.input_shape, data.num_classes, data.mean, data.std
        )
        logits = model(data.train_inputs[:5])
        assert logits.shape == (5, data.num_classes), name
    assert data.num_classes == 4


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["dataset.loader=stream"], "dataset.loader"),
        (["dataset.val_fraction=1.0"], "dataset.val_fraction"),
        (["dataset.memory_budget_mb=0"], "dataset.memory_budget_mb"),
        (["dataset.num_workers=-1"], "dataset.num_workers"),
        (["dataset=cifar10", "dataset.mean=[0.5,0.5]"], "dataset.mean"),
        (["dataset=mnist", "dataset.std=[0.0]"], "dataset.std"),
        (["dataset=image_folder", "dataset.channels=2"], "dataset.channels"),
        (["dataset=uci_digits", "dataset.test_fraction=0"], "dataset.test_fraction"),
    ],
)
def test_validate_rejects_bad_dataset(overrides, key):
    from src.config import ConfigError, validate

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as info:
        validate(compose_config(overrides))
    assert "expected" in str(info.value)
