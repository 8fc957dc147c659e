"""Synthetic MNIST-like handwritten digits, generated offline from matplotlib's fonts.

Each image starts from a digit glyph rendered with FreeType from one of the TrueType
fonts that ship inside matplotlib (DejaVu, STIX, Computer Modern). A random affine warp
(rotation, scale, aspect, shear, shift), a mild elastic warp and a random stroke width
then make every sample different. Images are white ink (1.0) on a black background (0.0).
As in MNIST, each glyph is fitted into the central 20/28 of the frame. MNIST centres the
digit on its centre of mass, which pushes a top-heavy 7 against the bottom edge once it is
scaled up and shifted, so here the centre lies halfway between the box centre and the
centre of mass.

:func:`load_dataset` builds the training splits of any configured dataset: these
synthetic digits, or a real one that src.datasets reads from local files.

    python -m src.data --num-samples 64 --seed 0 --out digits.png
"""

from __future__ import annotations

import argparse
import functools
import logging
import math
import operator
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset

from src.datasets import (
    MNIST_FAMILY,
    DatasetError,
    image_folder,
    read_cifar10,
    read_mnist_family,
    read_uci_digits,
)
from src.splits import (
    DatasetSplits,
    ImageTensorDataset,
    build_splits,
    dataset_targets,
    split_indices,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from matplotlib.ft2font import FT2Font

log = logging.getLogger(__name__)

NUM_CLASSES = 10
MIN_IMAGE_SIZE = 8
MAX_IMAGE_SIZE = 256
MAX_SEED = 2**63 - 1
PROJECT_ROOT = Path(__file__).resolve().parents[1]

# Font files under matplotlib's mpl-data/fonts/ttf. Files that fail to load or lack a
# digit glyph are skipped, so the set can shrink with the matplotlib version.
FONT_FILES = (
    "DejaVuSans.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSans-Oblique.ttf",
    "DejaVuSans-BoldOblique.ttf",
    "DejaVuSansMono.ttf",
    "DejaVuSansMono-Bold.ttf",
    "DejaVuSansMono-Oblique.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSerif-Bold.ttf",
    "DejaVuSerif-Italic.ttf",
    "DejaVuSerif-BoldItalic.ttf",
    "STIXGeneral.ttf",
    "STIXGeneralBol.ttf",
    "STIXGeneralItalic.ttf",
    "STIXGeneralBolIta.ttf",
    "cmr10.ttf",
    "cmb10.ttf",
    "cmss10.ttf",
    "cmtt10.ttf",
    "cmti10.ttf",
)
MIN_FONTS = 6  # fewer fonts give too little variety in glyph shape

# Lengths ending in _PX are in pixels of a 28x28 image and scale with image_size, so a
# larger image_size gives the same digits at a higher resolution.
REFERENCE_SIZE = 28
BOX_FRACTION = 20 / 28  # MNIST fits each digit into a 20x20 box of the 28x28 frame
# templates are rendered at least this large, then warped and area-downsampled
TEMPLATE_MIN_SIZE = 112
BLUR_SIGMA_PX = 0.6  # Gaussian blur of the templates, so the stroke threshold can move edges

# Augmentation ranges, sampled uniformly per image.
MAX_ROTATION_DEG = 15.0
SCALE_RANGE = (0.8, 1.1)
CENTER_OF_MASS_WEIGHT = 0.5  # 1 centres on the centre of mass as MNIST does, 0 on the box centre
MAX_LOG_ASPECT = 0.12  # width/height ratio in exp(+-0.12), about 0.89 to 1.13
MAX_SHEAR = 0.2
MAX_SHIFT_PX = 1.5
ELASTIC_PX = 0.8  # standard deviation of the smooth elastic displacement
ELASTIC_GRID = 4  # control points per side of the elastic displacement field
THRESHOLD_RANGE = (0.25, 0.6)  # lower thresholds give thicker strokes
# slope of the ramp from blurred template value to ink, so 1/EDGE_GAIN is the ramp width
EDGE_GAIN = 4.0
CHUNK_SIZE = 64  # images warped at once, few enough that the S x S grids stay in CPU cache


def _check_int(name: str, value: int, low: int, high: int | None = None) -> int:
    """Convert an integer argument to int, or raise naming the argument and its allowed range.

    Accepts any integer type (numpy integers included) but not bool. Raises TypeError for
    other types and ValueError outside [low, high].
    """
    bounds = f"[{low}, {high}]" if high is not None else f">= {low}"
    allowed = f"in {bounds}" if high is not None else bounds
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an integer {bounds}, got bool {value!r}")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(
            f"{name} must be an integer {bounds}, got {type(value).__name__} {value!r}"
        ) from None
    if value < low or (high is not None and value > high):
        raise ValueError(f"{name} must be {allowed}, got {value}")
    return value


def _font_dir() -> str:
    import matplotlib

    return os.path.join(matplotlib.get_data_path(), "fonts", "ttf")


def _render_glyph(font: FT2Font, char: str, pixel_size: int) -> np.ndarray | None:
    """Render one character and return its ink, float32 in [0, 1], cropped to the ink bbox.

    Returns None when the font lacks the glyph or renders no ink.
    """
    if font.get_char_index(ord(char)) == 0:
        return None
    font.set_size(pixel_size, 72)  # at 72 dpi one point is one pixel
    font.set_text(char, 0.0)
    font.draw_glyphs_to_bitmap(antialiased=True)
    ink = np.asarray(font.get_image(), dtype=np.float32) / 255.0
    rows = np.flatnonzero(ink.max(axis=1) > 0)
    cols = np.flatnonzero(ink.max(axis=0) > 0)
    if rows.size == 0:
        return None
    return ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def _gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Blur [N, 1, H, W] images with a separable Gaussian of sigma pixels, zero-padded."""
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    images = F.conv2d(images, kernel.view(1, 1, 1, -1), padding=(0, radius))
    return F.conv2d(images, kernel.view(1, 1, -1, 1), padding=(radius, 0))


@functools.lru_cache(maxsize=4)
def _glyph_templates(image_size: int) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
    """Render every digit in every usable font once, at a supersampled resolution.

    Returns three values. templates [num_fonts * 10, 1, S, S] contains blurred ink at index
    font * 10 + digit. centers [num_fonts * 10, 2] contains the point each template is centred
    on, as (x, y) in affine_grid's [-1, 1] coordinates. The last value names the fonts used.
    S is image_size times an integer factor. Callers must not modify the cached tensors.
    """
    factor = math.ceil(TEMPLATE_MIN_SIZE / image_size)
    size = image_size * factor  # S
    box = round(BOX_FRACTION * size)
    pixel_size = 2 * box  # render larger than needed, then downsample with antialiasing

    from matplotlib.ft2font import FT2Font

    # render and fit each glyph into the box, keeping its aspect ratio
    templates, fonts = [], []
    font_dir = _font_dir()
    for name in FONT_FILES:
        path = os.path.join(font_dir, name)
        try:
            font = FT2Font(path)
            glyphs = [_render_glyph(font, str(digit), pixel_size) for digit in range(NUM_CLASSES)]
        except (OSError, RuntimeError) as error:
            log.warning("Skipping font %s: failed to load (%s)", path, error)
            continue
        if any(glyph is None for glyph in glyphs):
            log.warning("Skipping font %s: a digit glyph is missing", path)
            continue
        for glyph in glyphs:
            height, width = glyph.shape
            scale = box / max(height, width)
            new_height, new_width = max(1, round(height * scale)), max(1, round(width * scale))
            glyph = torch.from_numpy(glyph)[None, None]
            glyph = F.interpolate(
                glyph, size=(new_height, new_width), mode="bilinear", antialias=True
            )
            canvas = torch.zeros(1, 1, size, size)
            top, left = (size - new_height) // 2, (size - new_width) // 2
            canvas[..., top : top + new_height, left : left + new_width] = glyph.clamp(0, 1)
            templates.append(canvas)
        fonts.append(name)
    if len(fonts) < MIN_FONTS:
        raise RuntimeError(
            f"found {len(fonts)} usable digit fonts in {font_dir}, need at least {MIN_FONTS}. "
            "Check the matplotlib installation."
        )
    templates = _gaussian_blur(torch.cat(templates), BLUR_SIGMA_PX * size / REFERENCE_SIZE)

    # centre of mass, in pixel centres mapped to [-1, 1] (align_corners=False)
    coords = (2 * torch.arange(size, dtype=torch.float32) + 1) / size - 1
    mass = templates.sum(dim=(1, 2, 3))
    center_x = (templates.sum(dim=(1, 2)) * coords).sum(dim=-1) / mass
    center_y = (templates.sum(dim=(1, 3)) * coords).sum(dim=-1) / mass
    centers = CENTER_OF_MASS_WEIGHT * torch.stack([center_x, center_y], dim=-1)
    log.debug(
        "Rendered %d glyph templates, %d px square, from %d fonts", len(templates), size, len(fonts)
    )
    return templates, centers, tuple(fonts)


def _uniform(generator: torch.Generator, n: int, low: float, high: float) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator)


def make_digits(
    num_samples: int, seed: int, image_size: int = 28
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generate a balanced, shuffled set of synthetic handwritten digits.

    Returns images, float32 [num_samples, 1, image_size, image_size] in [0, 1] with 1 as ink,
    and targets, int64 [num_samples] in 0..9. Each class gets num_samples // 10 images and the
    first num_samples % 10 classes get one more. The output depends only on the arguments
    (bit-identical across processes with the same torch build) and never touches the global
    torch, numpy or random RNG state, so training code can seed those independently.
    Raises TypeError or ValueError naming the invalid argument.
    """
    num_samples = _check_int("num_samples", num_samples, 1)
    seed = _check_int("seed", seed, 0, MAX_SEED)
    image_size = _check_int("image_size", image_size, MIN_IMAGE_SIZE, MAX_IMAGE_SIZE)

    templates, centers, _ = _glyph_templates(image_size)
    size = templates.shape[-1]
    num_fonts = len(templates) // NUM_CLASSES
    generator = torch.Generator().manual_seed(seed)

    # balanced targets in random order
    counts = [
        num_samples // NUM_CLASSES + int(digit < num_samples % NUM_CLASSES)
        for digit in range(NUM_CLASSES)
    ]
    targets = torch.repeat_interleave(torch.arange(NUM_CLASSES), torch.tensor(counts))
    targets = targets[torch.randperm(num_samples, generator=generator)]

    # per-image augmentation parameters, all drawn up front so CHUNK_SIZE cannot change them
    n = num_samples
    font = torch.randint(num_fonts, (n,), generator=generator)
    angle = torch.deg2rad(_uniform(generator, n, -MAX_ROTATION_DEG, MAX_ROTATION_DEG))
    scale = _uniform(generator, n, *SCALE_RANGE)
    aspect = torch.exp(_uniform(generator, n, -MAX_LOG_ASPECT, MAX_LOG_ASPECT))
    shear = _uniform(generator, n, -MAX_SHEAR, MAX_SHEAR)
    pixel = 2 / REFERENCE_SIZE  # one _PX unit in affine_grid's [-1, 1] coordinates
    shift = (2 * torch.rand(n, 2, generator=generator) - 1) * MAX_SHIFT_PX * pixel
    threshold = _uniform(generator, n, *THRESHOLD_RANGE)
    elastic = torch.randn(n, 2, ELASTIC_GRID, ELASTIC_GRID, generator=generator)
    elastic = elastic * ELASTIC_PX * pixel

    # inverse affine map from output to template coordinates:
    # diag(1/sx, 1/sy) @ shear(-k) @ rot(-angle)
    sx, sy = scale * aspect.sqrt(), scale / aspect.sqrt()
    cos, sin = torch.cos(angle), torch.sin(angle)
    inverse = torch.stack(
        [
            torch.stack([(cos - shear * sin) / sx, (sin + shear * cos) / sx], dim=-1),
            torch.stack([-sin / sy, cos / sy], dim=-1),
        ],
        dim=1,
    )  # [n, 2, 2]
    offset = centers[font * NUM_CLASSES + targets] - (inverse @ shift[..., None])[..., 0]

    # bicubic upsampling is separable, so upsampling the G x G elastic field to S x S is
    # basis.T @ elastic @ basis, cheaper than F.interpolate on 2 channels per image
    eye = torch.eye(ELASTIC_GRID).view(ELASTIC_GRID, 1, ELASTIC_GRID, 1)
    basis = F.interpolate(eye, size=(size, 1), mode="bicubic", align_corners=True)
    basis = basis[:, 0, :, 0]  # [G, S]

    # pixel centres in [-1, 1] coordinates, as affine_grid computes them with align_corners=False
    coords = (2 * torch.arange(size, dtype=torch.float32) + 1) / size - 1
    x, y = coords.view(1, 1, size), coords.view(1, size, 1)

    images = torch.empty(n, 1, image_size, image_size)
    for start in range(0, n, CHUNK_SIZE):
        chunk = slice(start, min(start + CHUNK_SIZE, n))
        a = inverse[chunk, None, None]  # [c, 1, 1, 2, 2]
        b = offset[chunk, None, None]  # [c, 1, 1, 2]
        displacement = basis.T @ elastic[chunk] @ basis  # [c, 2, S, S]
        grid_x = a[..., 0, 0] * x + a[..., 0, 1] * y + b[..., 0] + displacement[:, 0]
        grid_y = a[..., 1, 0] * x + a[..., 1, 1] * y + b[..., 1] + displacement[:, 1]
        grid = torch.stack([grid_x, grid_y], dim=-1)  # [c, S, S, 2]
        source = templates[font[chunk] * NUM_CLASSES + targets[chunk]]  # [c, 1, S, S]
        ink = F.grid_sample(
            source, grid, mode="bilinear", padding_mode="zeros", align_corners=False
        )

        # a clamped linear ramp on the blurred ink sets the stroke width, then area-downsample
        ink = ink.sub_(threshold[chunk].view(-1, 1, 1, 1)).mul_(EDGE_GAIN).add_(0.5).clamp_(0, 1)
        images[chunk] = F.interpolate(ink, size=(image_size, image_size), mode="area")

    return images, targets


def plot_digit_grid(
    images: torch.Tensor,
    targets: torch.Tensor,
    rows: int = 8,
    cols: int = 8,
    title: str | None = None,
) -> Figure:
    """Draw the first rows * cols images in a grid, each titled with its target.

    Accepts greyscale [N, 1, H, W] or [N, H, W] and colour [N, 3, H, W] images in [0, 1].
    Builds a matplotlib.figure.Figure directly, without pyplot, so it works under any backend
    and leaves no global figure state. Axes beyond the number of images stay blank.
    Returns the Figure, which has exactly rows * cols axes.
    """
    from matplotlib.figure import Figure

    rows = _check_int("rows", rows, 1)
    cols = _check_int("cols", cols, 1)
    if images.ndim == 4 and images.shape[1] == 1:
        images = images[:, 0]
    elif images.ndim == 4 and images.shape[1] == 3:
        images = images.permute(0, 2, 3, 1)  # [N, H, W, 3], as imshow takes colour images
    elif images.ndim != 3:
        raise ValueError(
            "images must have shape [N, 1, H, W], [N, 3, H, W] or [N, H, W], "
            f"got {list(images.shape)}"
        )
    if len(targets) != len(images):
        raise ValueError(
            "targets must have one label per image, "
            f"got {len(targets)} targets for {len(images)} images"
        )

    figure = Figure(
        figsize=(cols * 0.9, rows * 1.0 + (0.4 if title else 0.0)), layout="constrained"
    )
    axes = figure.subplots(rows, cols, squeeze=False)
    for index, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if index < len(images):
            pixels = images[index].detach().cpu().clamp(0.0, 1.0).numpy()
            ax.imshow(pixels, cmap="gray", vmin=0.0, vmax=1.0)
            ax.set_title(str(int(targets[index])), fontsize=9)
    if title:
        figure.suptitle(title)
    return figure


def resolve_root(path: str) -> Path:
    """Return `path` as an absolute folder: ``~`` expanded, relative paths from the project root."""
    folder = Path(path).expanduser()
    return folder if folder.is_absolute() else PROJECT_ROOT / folder


# The jobs of a sweep in one process (the default launcher) share their images. Callers
# must not change the tensors in place.
_cached_digits = functools.lru_cache(maxsize=4)(make_digits)


def read_dataset(dataset_cfg) -> tuple[Dataset, Dataset, int]:
    """Generate or read the dataset that ``dataset_cfg.name`` names.

    Returns (train, test, num_classes); both splits are map-style datasets of
    (image float32 [C, H, W] in [0, 1], class index). Raises DatasetError for
    missing or corrupt files and ValueError for an unknown name.
    """
    name = dataset_cfg.name
    if name == "digits":
        size = dataset_cfg.image_size
        train = _cached_digits(dataset_cfg.train_size, dataset_cfg.train_seed, size)
        test = _cached_digits(dataset_cfg.test_size, dataset_cfg.test_seed, size)
        return ImageTensorDataset(*train), ImageTensorDataset(*test), NUM_CLASSES

    if name == "uci_digits":
        images, targets = read_uci_digits(dataset_cfg.image_size)
        train_indices, test_indices = split_indices(
            targets, dataset_cfg.test_fraction, dataset_cfg.split_seed
        )
        train = ImageTensorDataset(images[train_indices], targets[train_indices])
        test = ImageTensorDataset(images[test_indices], targets[test_indices])
        return train, test, NUM_CLASSES

    if name in MNIST_FAMILY or name == "cifar10":
        root = resolve_root(dataset_cfg.root)
        log.info("Reading %s from %s", name, root)
        if name == "cifar10":
            train = read_cifar10(root, train=True, download=dataset_cfg.download)
            test = read_cifar10(root, train=False)
        else:
            train = read_mnist_family(root, name, train=True, download=dataset_cfg.download)
            test = read_mnist_family(root, name, train=False)
        return ImageTensorDataset(*train), ImageTensorDataset(*test), NUM_CLASSES

    if name == "image_folder":
        return _read_image_folder(dataset_cfg)

    raise ValueError(
        f"Unknown dataset {name!r}: expected one of digits, uci_digits, "
        f"{', '.join(MNIST_FAMILY)}, cifar10, image_folder."
    )


def _read_image_folder(dataset_cfg) -> tuple[Dataset, Dataset, int]:
    """Index ``dataset.root`` and take the test split from ``dataset.test_root`` or a share."""
    size, channels = dataset_cfg.image_size, dataset_cfg.channels
    root = resolve_root(dataset_cfg.root)
    train = image_folder(root, size, channels)
    log.info("Found %d images of %d classes in %s", len(train), len(train.classes), root)
    if dataset_cfg.test_root is None:
        train_indices, test_indices = split_indices(
            dataset_targets(train), dataset_cfg.test_fraction, dataset_cfg.split_seed
        )
        classes = len(train.classes)
        return Subset(train, train_indices.tolist()), Subset(train, test_indices.tolist()), classes

    test_root = resolve_root(dataset_cfg.test_root)
    test = image_folder(test_root, size, channels, config_key="dataset.test_root")
    if test.classes != train.classes:
        raise DatasetError(
            f"The classes in {test_root} (dataset.test_root) differ from those in {root} "
            f"(dataset.root): {test.classes} against {train.classes}. "
            "Both folders need one subfolder for each class, with the same names."
        )
    return train, test, len(train.classes)


def load_dataset(dataset_cfg, device: torch.device) -> DatasetSplits:
    """Read the dataset that `dataset_cfg` describes and place its splits for training.

    Splits that fit ``dataset.memory_budget_mb`` become tensors on `device`; larger
    ones stream through a DataLoader (see src.splits).
    """
    train, test, num_classes = read_dataset(dataset_cfg)
    return build_splits(train, test, num_classes, dataset_cfg, device)


def input_shape_of(dataset_cfg) -> tuple[int, int, int]:
    """Return the (C, H, W) of the images that `dataset_cfg` gives, without reading them."""
    name = dataset_cfg.name
    if name in ("digits", "uci_digits"):
        return (1, dataset_cfg.image_size, dataset_cfg.image_size)
    if name in MNIST_FAMILY:
        return (1, 28, 28)
    if name == "cifar10":
        return (3, 32, 32)
    if name == "image_folder":
        return (dataset_cfg.channels, dataset_cfg.image_size, dataset_cfg.image_size)
    raise ValueError(f"Unknown dataset {name!r}.")


def main(argv: list[str] | None = None) -> None:
    """Generate digits and save a sample grid as an image file."""
    parser = argparse.ArgumentParser(
        prog="python -m src.data", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--num-samples",
        type=int,
        default=64,
        help="number of digits to generate and show (default: 64)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="random seed, 0 to 2**63 - 1 (default: 0)"
    )
    parser.add_argument(
        "--image-size", type=int, default=28, help="image side in pixels (default: 28)"
    )
    parser.add_argument("--cols", type=int, default=8, help="images per grid row (default: 8)")
    parser.add_argument(
        "--out",
        default="digits.png",
        help="output image path, whose extension sets the format (default: digits.png)",
    )
    args = parser.parse_args(argv)
    if args.cols < 1:
        parser.error(f"--cols must be >= 1, got {args.cols}")
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )

    start = time.perf_counter()
    try:
        images, targets = make_digits(args.num_samples, args.seed, args.image_size)
    except (TypeError, ValueError) as error:
        parser.error(str(error))
    log.info("Generated %d digits in %.2f s", len(images), time.perf_counter() - start)

    cols = min(args.cols, len(images))
    rows = math.ceil(len(images) / cols)
    figure = plot_digit_grid(images, targets, rows=rows, cols=cols, title=f"seed {args.seed}")
    figure.savefig(args.out, dpi=100)
    log.info("Wrote a %dx%d grid of digits to %s", rows, cols, os.path.abspath(args.out))


if __name__ == "__main__":
    main()
