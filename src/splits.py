"""Train, validation and test splits, kept on the device or streamed through a DataLoader.

Data that fits the memory budget becomes whole float32 tensors on the training
device, batched by index: for small data that is much faster than a DataLoader.
Larger data stays a map-style ``Dataset`` on the host and streams through a
DataLoader with worker processes and pinned memory. Both paths draw each epoch's
order from the same generator with ``torch.randperm``, so they see the same
mini-batches in the same order.

Images are float32 [C, H, W] with pixels in [0, 1] on both paths; the model
normalises them (see ``src.models.Normalize``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

log = logging.getLogger(__name__)

LOADERS = ("auto", "tensor", "dataloader")
EVAL_BATCH_SIZE = 1000  # images per forward pass when evaluating a split
PREVIEW_SIZE = 64  # images per split in DatasetSplits.preview()


class ImageTensorDataset(Dataset):
    """Images held in host memory, served one at a time as float32 in [0, 1].

    `images` is uint8 [N, C, H, W] with pixels in 0..255, or float32 [N, C, H, W] in
    [0, 1]. Kept as uint8, images take a quarter of the memory until a batch is built.
    """

    def __init__(self, images: torch.Tensor, targets: torch.Tensor):
        if len(images) != len(targets):
            raise ValueError(f"{len(images)} images but {len(targets)} targets")
        self.images = images
        self.targets = targets

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return to_float(self.images[index]), self.targets[index]


def to_float(images: torch.Tensor) -> torch.Tensor:
    """Convert uint8 pixels (0..255) to float32 in [0, 1]; pass float32 through unchanged."""
    if images.dtype == torch.uint8:
        return images.float().div_(255)
    return images


@dataclass
class Split:
    """One split: whole tensors on the device, or a Dataset that a DataLoader streams.

    Exactly one of (`inputs`, `targets`) and `dataset` is set. Images are float32
    [C, H, W] in [0, 1].
    """

    inputs: torch.Tensor | None = None  # [N, C, H, W] on the training device
    targets: torch.Tensor | None = None  # [N] int64 class indices
    dataset: Dataset | None = None  # items (image [C, H, W], target) on the host

    @property
    def streamed(self) -> bool:
        return self.dataset is not None

    def __len__(self) -> int:
        return len(self.dataset) if self.streamed else len(self.inputs)

    def head(self, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the first `count` images and targets, on the CPU."""
        if not self.streamed:
            return self.inputs[:count].cpu(), self.targets[:count].cpu()
        items = [self.dataset[i] for i in range(min(count, len(self.dataset)))]
        images = torch.stack([image for image, _ in items])
        targets = torch.as_tensor([int(target) for _, target in items], dtype=torch.int64)
        return images, targets


@dataclass
class DatasetSplits:
    """The train, validation and test splits of a dataset, and what a model needs to know.

    `val` is the same object as `test` when no share of the training set is held out.
    """

    train: Split
    val: Split
    test: Split
    input_shape: tuple[int, int, int]  # (C, H, W), what the model is built for
    num_classes: int
    mean: tuple[float, ...] = (0.0,)  # per channel (or one for all), for the model's Normalize
    std: tuple[float, ...] = (1.0,)
    num_workers: int = 0  # DataLoader worker processes on the streamed path
    pin_memory: bool = False  # page-locked host batches, for faster copies to a GPU

    @property
    def streamed(self) -> bool:
        return self.train.streamed

    # The tensor path's whole splits, as the training loop and reports read them.
    @property
    def train_inputs(self) -> torch.Tensor:
        return self._tensor(self.train).inputs

    @property
    def train_targets(self) -> torch.Tensor:
        return self._tensor(self.train).targets

    @property
    def test_inputs(self) -> torch.Tensor:
        return self._tensor(self.test).inputs

    @property
    def test_targets(self) -> torch.Tensor:
        return self._tensor(self.test).targets

    @staticmethod
    def _tensor(split: Split) -> Split:
        if split.streamed:
            raise AttributeError(
                "This split streams through a DataLoader and has no whole tensors: "
                "use DatasetSplits.preview() for a few images."
            )
        return split

    def preview(self, count: int = PREVIEW_SIZE) -> DatasetSplits:
        """Return the first `count` images of each split as CPU tensors, for figures and examples.

        Reads only those images, also where the splits stream from disk.
        """
        splits = {}
        for name in ("train", "val", "test"):
            inputs, targets = getattr(self, name).head(count)
            splits[name] = Split(inputs, targets)
        if self.val is self.test:
            splits["val"] = splits["test"]
        return DatasetSplits(
            **splits,
            input_shape=self.input_shape,
            num_classes=self.num_classes,
            mean=self.mean,
            std=self.std,
        )

    def train_loader(self, batch_size: int, shuffle: torch.Generator, seed: int) -> DataLoader:
        """Build the streamed path's training DataLoader: one permutation from `shuffle` an epoch.

        `seed` seeds the loader's own generator, which picks the worker seeds, so that
        the global torch generator is left alone.
        """
        return DataLoader(
            self.train.dataset,
            batch_sampler=EpochBatches(len(self.train), batch_size, shuffle),
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            generator=torch.Generator().manual_seed(seed),
        )

    def eval_loader(self, split: Split, seed: int) -> DataLoader:
        """Build a DataLoader that streams `split` in order, EVAL_BATCH_SIZE images a batch."""
        return DataLoader(
            split.dataset,
            batch_size=EVAL_BATCH_SIZE,
            shuffle=False,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            generator=torch.Generator().manual_seed(seed),
        )


class EpochBatches(Sampler[list[int]]):
    """Mini-batches of indices from one ``torch.randperm(num_samples, generator)`` an epoch.

    The last batch is partial when `batch_size` does not divide `num_samples`. Unlike
    torch's RandomSampler, which draws a second permutation at the end of each pass,
    this draws exactly one, as the tensor path does, so both paths stay in step.
    """

    def __init__(self, num_samples: int, batch_size: int, generator: torch.Generator):
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.generator = generator

    def __iter__(self) -> Iterator[list[int]]:
        perm = torch.randperm(self.num_samples, generator=self.generator)
        for start in range(0, self.num_samples, self.batch_size):
            yield perm[start : start + self.batch_size].tolist()

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.batch_size)


def split_indices(
    targets: torch.Tensor, fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``range(len(targets))`` into sorted (kept, held-out) indices, `fraction` held out.

    The split is stratified by class, so each class keeps its share, whenever scikit-learn
    can stratify: at least two samples a class, and one per class on each side. Otherwise
    it is a plain random split. Both are deterministic for a `seed`; neither touches the
    global torch generator.
    """
    from sklearn.model_selection import train_test_split

    targets_np = targets.numpy()
    held_out = math.ceil(fraction * len(targets_np))
    counts = torch.bincount(targets).numpy()
    num_classes = int((counts > 0).sum())
    can_stratify = (
        counts[counts > 0].min() >= 2
        and held_out >= num_classes
        and len(targets_np) - held_out >= num_classes
    )
    if not can_stratify:
        log.warning(
            "Holding out %d of %d images without stratifying: too few images a class",
            held_out, len(targets_np),
        )  # fmt: skip
    kept_indices, held_out_indices = train_test_split(
        torch.arange(len(targets_np)).numpy(),
        test_size=held_out,
        random_state=seed,
        stratify=targets_np if can_stratify else None,
    )
    kept_indices = torch.from_numpy(kept_indices).sort().values
    return kept_indices, torch.from_numpy(held_out_indices).sort().values


def estimate_megabytes(num_images: int, input_shape: Sequence[int]) -> float:
    """Return the size in MiB of `num_images` float32 images of `input_shape` (C, H, W)."""
    return num_images * math.prod(input_shape) * 4 / 2**20


def choose_loader(
    loader: str, num_images: int, input_shape: Sequence[int], memory_budget_mb: float
) -> str:
    """Resolve ``dataset.loader``: ``auto`` picks ``tensor`` when the images fit the budget."""
    if loader != "auto":
        return loader
    megabytes = estimate_megabytes(num_images, input_shape)
    choice = "tensor" if megabytes <= memory_budget_mb else "dataloader"
    log.info(
        "%d images are %.0f MiB as float32, %s dataset.memory_budget_mb=%g: using the %s path",
        num_images, megabytes, "within" if choice == "tensor" else "over",
        memory_budget_mb, choice,
    )  # fmt: skip
    return choice


def stack_dataset(dataset: Dataset, num_workers: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Read every item of `dataset` into (images [N, C, H, W], targets [N]) on the CPU.

    An ImageTensorDataset's images come back as stored, uint8 or float32; others as float32.
    """
    if isinstance(dataset, ImageTensorDataset):
        return dataset.images, dataset.targets
    loader = DataLoader(dataset, batch_size=256, num_workers=num_workers)
    images, targets = [], []
    for batch_images, batch_targets in loader:
        images.append(batch_images)
        targets.append(batch_targets)
    return torch.cat(images), torch.cat(targets).long()


def subset(dataset: Dataset, indices: torch.Tensor | None) -> Dataset:
    """Return the items of `dataset` at `indices`, or `dataset` itself for None."""
    if indices is None:
        return dataset
    if isinstance(dataset, ImageTensorDataset):
        return ImageTensorDataset(dataset.images[indices], dataset.targets[indices])
    return Subset(dataset, indices.tolist())


def dataset_targets(dataset: Dataset) -> torch.Tensor:
    """Return the class index of every item, without reading images where the dataset can."""
    if isinstance(dataset, Subset):
        return dataset_targets(dataset.dataset)[list(dataset.indices)]
    targets = getattr(dataset, "targets", None)
    if targets is None:
        targets = [int(dataset[i][1]) for i in range(len(dataset))]
    return torch.as_tensor(targets, dtype=torch.int64)


def build_splits(
    train: Dataset,
    test: Dataset,
    num_classes: int,
    dataset_cfg,
    device: torch.device,
) -> DatasetSplits:
    """Hold out the validation share of `train`, pick the path and place the splits.

    `dataset_cfg` supplies ``val_fraction``, ``split_seed``, ``loader``,
    ``memory_budget_mb``, ``num_workers``, ``mean`` and ``std``. On the tensor path
    the images move to `device` as float32; on the streamed path they stay on the host.
    """
    val_fraction = float(dataset_cfg.val_fraction)
    train_indices = val_indices = None
    if val_fraction > 0:
        train_indices, val_indices = split_indices(
            dataset_targets(train), val_fraction, int(dataset_cfg.split_seed)
        )

    input_shape = tuple(int(dim) for dim in train[0][0].shape)
    loader = choose_loader(
        dataset_cfg.loader, len(train) + len(test), input_shape, dataset_cfg.memory_budget_mb
    )
    parts = {"train": subset(train, train_indices), "test": test}
    if val_indices is not None:
        parts["val"] = subset(train, val_indices)

    num_workers = int(dataset_cfg.num_workers)
    splits: dict[str, Split] = {}
    for name, part in parts.items():
        if loader == "dataloader":
            splits[name] = Split(dataset=part)
        else:
            images, targets = stack_dataset(part, num_workers)
            # Convert on the device: uint8 crosses to a GPU in a quarter of the bytes.
            splits[name] = Split(to_float(images.to(device)), targets.to(device))
    splits.setdefault("val", splits["test"])
    log.info(
        "Splits: %d training, %d validation%s, %d test images of shape %s, %d classes",
        len(splits["train"]), len(splits["val"]),
        " (the test split)" if splits["val"] is splits["test"] else "",
        len(splits["test"]), input_shape, num_classes,
    )  # fmt: skip
    return DatasetSplits(
        **splits,
        input_shape=input_shape,
        num_classes=num_classes,
        mean=tuple(float(m) for m in dataset_cfg.mean),
        std=tuple(float(s) for s in dataset_cfg.std),
        num_workers=num_workers,
        pin_memory=loader == "dataloader" and device.type == "cuda",
    )
