"""Real image datasets read from local files.

Readers for torchvision's MNIST family (IDX files) and CIFAR-10 (python pickle
batches), scikit-learn's 8x8 handwritten digits, and a folder of labelled images in
torchvision's ImageFolder layout. Nothing is downloaded unless a caller passes
``download=True``. Missing or corrupt files raise :class:`DatasetError`, whose
message names the folder or file, the expected files and how to get them.

The readers return pixels as they are stored: uint8 tensors [N, C, H, W] for the
MNIST family and CIFAR-10, and float32 in [0, 1] for the 8x8 digits. An image folder
can be too large to read at once, so it becomes a torch ``Dataset`` that reads each
image, as float32 [C, H, W], when it is indexed.
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from src.config import UserError

log = logging.getLogger(__name__)

# Config name -> torchvision class name, which is also the folder under the root.
MNIST_FAMILY = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST", "kmnist": "KMNIST"}
MNIST_FILES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_FILES = {True: tuple(f"data_batch_{i}" for i in range(1, 6)), False: ("test_batch",)}
IMAGE_FOLDER_LAYOUT = "<root>/<class name>/<image>.png (any format Pillow reads)"


class DatasetError(UserError, RuntimeError):
    """Dataset files that are missing, corrupt or inconsistent."""


def _fetch_hint(files: str) -> str:
    return (
        f"To get {files}, run once with dataset.download=true on a machine with internet "
        "access, or copy the files there from such a machine."
    )


# The MNIST family: IDX files


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file of unsigned bytes (the MNIST format) into an array of its shape.

    The header is two zero bytes, the type code 0x08 (uint8), the number of
    dimensions, then each dimension as a big-endian uint32. Raises DatasetError
    naming the file when the header or the length is wrong.
    """
    data = path.read_bytes()

    def corrupt(reason: str) -> DatasetError:
        return DatasetError(
            f"Corrupt IDX file {path}: {reason}. "
            "Delete it, then copy it again or set dataset.download=true."
        )

    if len(data) < 4:
        raise corrupt(f"{len(data)} bytes, shorter than the 4-byte header")
    if data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise corrupt(
            f"header {data[:4].hex()} is not an IDX header of unsigned bytes (0000 08 nn)"
        )
    ndim = data[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(data) < header:
        raise corrupt(f"header announces {ndim} dimensions but the file has {len(data)} bytes")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(shape))
    if len(data) != expected:
        raise corrupt(f"shape {shape} needs {expected} bytes, the file has {len(data)}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def mnist_folder(root: Path, name: str) -> Path:
    """Return the folder that torchvision keeps the raw IDX files of dataset `name` in."""
    return root / MNIST_FAMILY[name] / "raw"


def read_mnist_family(
    root: Path, name: str, train: bool, download: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Read a split of MNIST, Fashion-MNIST or KMNIST from ``root/<Class>/raw/``.

    Returns images, uint8 [N, 1, 28, 28], and targets, int64 [N] in 0..9. With
    `download`, torchvision fetches the files first if they are not there.
    """
    folder = mnist_folder(root, name)
    if download:
        _download_torchvision(MNIST_FAMILY[name], root)
    _check_files(folder, [*MNIST_FILES[True], *MNIST_FILES[False]], MNIST_FAMILY[name])

    image_file, label_file = (folder / file for file in MNIST_FILES[train])
    images, labels = read_idx(image_file), read_idx(label_file)
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise DatasetError(
            f"Corrupt IDX file {image_file}: expected images of shape [N, 28, 28], "
            f"found {list(images.shape)}."
        )
    if labels.shape != (len(images),):
        raise DatasetError(
            f"IDX files {image_file} and {label_file} do not match: {len(images)} images "
            f"but labels of shape {list(labels.shape)}."
        )
    _check_labels(labels, 10, label_file)
    return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


def _check_files(folder: Path, files: list[str], title: str) -> None:
    """Raise DatasetError listing the files of `files` that are not in `folder`."""
    missing = [file for file in files if not (folder / file).is_file()]
    if not missing:
        return
    compressed = [file for file in missing if (folder / f"{file}.gz").is_file()]
    message = f"Missing {title} files in {folder}: {', '.join(missing)}. "
    if len(missing) < len(files):
        message += f"The folder needs all of {', '.join(files)}. "
    message += _fetch_hint("them")
    if compressed:
        message += f" Found {', '.join(f + '.gz' for f in compressed)}: extract them with gunzip."
    raise DatasetError(message)


def _check_labels(labels: np.ndarray, num_classes: int, path: Path) -> None:
    if labels.size and int(labels.max()) >= num_classes:
        raise DatasetError(
            f"Corrupt label file {path}: found label {int(labels.max())}, "
            f"expected labels 0..{num_classes - 1}."
        )


def _download_torchvision(class_name: str, root: Path) -> None:
    """Let torchvision download and extract both splits of `class_name` under `root`."""
    import torchvision.datasets

    log.info("Downloading %s into %s unless it is there already", class_name, root)
    dataset_class = getattr(torchvision.datasets, class_name)
    for train in (True, False):
        dataset_class(str(root), train=train, download=True)


# CIFAR-10: python pickle batches


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickle dicts, lists and NumPy arrays only, so a planted file cannot run code."""

    ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("_codecs", "encode"),  # how Python 3 pickles bytes at protocol 2
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a CIFAR-10 batch")
        return super().find_class(module, name)


def read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR-10 python batch: images uint8 [N, 3, 32, 32] and labels int64 [N].

    A batch is a pickled dict with ``data`` (uint8 [N, 3072], the red, green and blue
    planes of each 32x32 image in turn) and ``labels`` (N ints).

    NOTE: the published batches are Python 2 pickles, read with ``encoding="latin1"`` as
    NumPy documents for them. The tests cover batches that Python 3 writes in the same
    layout, not the published files themselves.
    """
    try:
        with path.open("rb") as file:
            batch = _ArrayUnpickler(file, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as err:
        raise DatasetError(
            f"Corrupt CIFAR-10 batch {path}: cannot unpickle it ({err}). "
            "Delete it, then copy it again or set dataset.download=true."
        ) from err
    if not isinstance(batch, dict):
        raise DatasetError(f"Corrupt CIFAR-10 batch {path}: expected a dict, found {type(batch)}.")
    batch = {key.decode() if isinstance(key, bytes) else key: value for key, value in batch.items()}
    data, labels = batch.get("data"), batch.get("labels")
    if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        found = list(data.shape) if isinstance(data, np.ndarray) else type(data).__name__
        raise DatasetError(
            f"Corrupt CIFAR-10 batch {path}: expected 'data' of shape [N, 3072], found {found}."
        )
    labels = np.asarray(labels if labels is not None else [], dtype=np.int64)
    if labels.shape != (len(data),):
        raise DatasetError(
            f"Corrupt CIFAR-10 batch {path}: {len(data)} images but {labels.size} labels."
        )
    _check_labels(labels, 10, path)
    return data.astype(np.uint8, copy=False).reshape(-1, 3, 32, 32), labels


def read_cifar10(
    root: Path, train: bool, download: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Read a split of CIFAR-10 from ``root/cifar-10-batches-py/``.

    Returns images, uint8 [N, 3, 32, 32], and targets, int64 [N] in 0..9. With
    `download`, torchvision fetches and extracts the archive first if it is not there.
    """
    folder = root / CIFAR10_FOLDER
    if download:
        _download_torchvision("CIFAR10", root)
    _check_files(folder, [*CIFAR10_FILES[True], *CIFAR10_FILES[False]], "CIFAR-10")
    batches = [read_cifar_batch(folder / file) for file in CIFAR10_FILES[train]]
    images = np.concatenate([images for images, _ in batches])
    labels = np.concatenate([labels for _, labels in batches])
    return torch.from_numpy(images), torch.from_numpy(labels)


# scikit-learn's 8x8 digits


def read_uci_digits(image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Read the 1797 UCI handwritten digits that scikit-learn ships, scaled to `image_size`.

    The originals are 8x8 counts of 0..16 set pixels in 4x4 blocks of a 32x32 bitmap.
    Returns images, float32 [1797, 1, image_size, image_size] in [0, 1] (bilinear
    resampling), and targets, int64 [1797]. scikit-learn reads them from its own
    package data, so this never downloads.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)
    if image_size != images.shape[-1]:
        images = F.interpolate(
            images, size=(image_size, image_size), mode="bilinear", align_corners=False
        ).clamp_(0.0, 1.0)
    return images, torch.from_numpy(digits.target.astype(np.int64))


# A folder of labelled images


def load_image(path: str):
    """Open an image file as RGB with Pillow, or raise DatasetError naming the file."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError) as err:
        raise DatasetError(
            f"Failed to read image {path}: {err}. Replace or delete the file."
        ) from err


def image_folder(root: Path, image_size: int, channels: int, config_key: str = "dataset.root"):
    """Index the labelled images under `root` as a torchvision ImageFolder.

    Each item is (image float32 [channels, image_size, image_size] in [0, 1], class
    index). Images are resized to a square. With one channel they are converted to
    greyscale (ITU-R 601-2 luma, as Pillow does). Classes are the subfolder names in
    sorted order. Files are read when an item is indexed. Error messages name
    `config_key`, the key that set `root`.
    """
    from torchvision import transforms
    from torchvision.datasets import ImageFolder

    if not root.is_dir():
        raise DatasetError(
            f"Image folder {root} ({config_key}) not found. "
            f"Expected the layout {IMAGE_FOLDER_LAYOUT}."
        )
    steps = [transforms.Resize((image_size, image_size))]
    if channels == 1:
        steps.append(transforms.Grayscale(num_output_channels=1))
    steps.append(transforms.ToTensor())
    try:
        return ImageFolder(str(root), transform=transforms.Compose(steps), loader=load_image)
    except FileNotFoundError as err:
        raise DatasetError(
            f"No labelled images in {root} ({config_key}): {err}. "
            f"Expected the layout {IMAGE_FOLDER_LAYOUT}."
        ) from err
