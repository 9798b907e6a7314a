"""Image datasets from files on disk (the path is always an argument; nothing is downloaded).

Each loader returns ``(images, labels, classes)``: images float32 (M, C, H, W) scaled from 8-bit
pixels p to p / 127.5 - 1 in [-1, 1], labels int64 (M,), classes the label names.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

# PIL modes read as 1 (grey) or 3 (RGB) channels; others are refused with the file named.
_GREY_MODES = {"1": "L", "L": "L", "LA": "L"}
_RGB_MODES = {"RGB": "RGB", "RGBA": "RGB", "P": "RGB", "CMYK": "RGB", "YCbCr": "RGB"}


def _to_unit_range(pixels: np.ndarray) -> Tensor:
    """uint8 (..., H, W) or (M, H, W, C) array -> float32 tensor p / 127.5 - 1."""
    return torch.from_numpy(pixels.astype(np.float32) / 127.5 - 1.0)


def _read_image(path: str, image_size: tuple[int, int] | None, channels: int | None) -> np.ndarray:
    """One image file -> uint8 array (C, H, W), optionally converted and resized."""
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            if channels is not None:
                target = "L" if channels == 1 else "RGB"
            elif mode in _GREY_MODES:
                target = _GREY_MODES[mode]
            elif mode in _RGB_MODES:
                target = _RGB_MODES[mode]
            else:
                raise ValueError(f"image {path} has unsupported mode {mode!r}; pass channels=1|3")
            img = img.convert(target) if img.mode != target else img
            if image_size is not None:
                img = img.resize((image_size[1], image_size[0]), Image.Resampling.BILINEAR)
            pixels = np.asarray(img, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ValueError(f"cannot read image file {path}: {err}") from err
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)  # (C, H, W)


def load_image_folder(
    root: str | os.PathLike,
    image_size: int | tuple[int, int] | None = None,
    channels: int | None = None,
) -> tuple[Tensor, Tensor, list[str]]:
    """Images in class subfolders ``root/<class>/<file>`` (torchvision ``ImageFolder`` layout).

    Labels follow the sorted class-folder names. All images must share one size and channel
    count unless ``image_size`` (int for square, or (H, W)) / ``channels`` (1 or 3) are given,
    in which case each image is resized (bilinear) / converted.
    Raises:
        FileNotFoundError: root missing, or no image files in it.
        ValueError: a corrupt or unreadable file (named), or mixed sizes / channel counts.
    """
    from torchvision.datasets import ImageFolder

    root = Path(root)
    _check_folder(root, "image folder")
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be 1, 3 or None, got {channels!r}")
    if isinstance(image_size, int):
        image_size = (image_size, image_size)
    if image_size is not None and (len(image_size) != 2 or min(image_size) < 1):
        raise ValueError(f"image_size must be a positive int or (H, W), got {image_size!r}")
    try:
        # loader=str: ImageFolder only lists files here; _read_image decodes them below.
        folder = ImageFolder(str(root), loader=str)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"no class folders with image files under {root}: {err}") from err

    images, first_path = [], None
    for path, _ in folder.samples:
        pixels = _read_image(path, image_size, channels)
        if first_path is None:
            first_path, first_shape = path, pixels.shape
        elif pixels.shape != first_shape:
            raise ValueError(
                f"image {path} has shape (C, H, W) = {pixels.shape} but {first_path} has "
                f"{first_shape}; pass image_size= and/or channels= to resize/convert"
            )
        images.append(pixels)
    x = _to_unit_range(np.stack(images))  # (M, C, H, W)
    y = torch.tensor(folder.targets, dtype=torch.int64)
    return x, y, list(folder.classes)


def _check_folder(root: Path, what: str) -> None:
    """FileNotFoundError naming ``root`` unless it is an existing folder."""
    if not root.exists():
        raise FileNotFoundError(f"{what} {root} does not exist")
    if not root.is_dir():
        raise FileNotFoundError(f"{what} {root} is a file, not a folder")


def _missing(root: Path, names: list[str]) -> list[str]:
    return [name for name in names if not (root / name).is_file()]


def load_mnist(root: str | os.PathLike, train: bool = True) -> tuple[Tensor, Tensor, list[str]]:
    """MNIST from ``root/MNIST/raw/*-idx?-ubyte`` (torchvision layout): x (M, 1, 28, 28)."""
    from torchvision.datasets import MNIST

    root = Path(root)
    raw = root / "MNIST" / "raw"
    # torchvision checks all four raw files exist whichever split is asked for.
    names = [f"{p}-{k}-idx{d}-ubyte" for p in ("train", "t10k")
             for k, d in (("images", 3), ("labels", 1))]
    missing = _missing(raw, names)
    if missing:
        raise FileNotFoundError(f"MNIST files missing under {raw} (root {root}): {missing}")
    try:
        dataset = MNIST(str(root), train=train, download=False)
    except (RuntimeError, ValueError, TypeError, AssertionError) as err:
        raise ValueError(f"cannot read MNIST under root {root}: {err}") from err
    x = _to_unit_range(dataset.data.numpy()).unsqueeze(1)  # (M, 28, 28) -> (M, 1, 28, 28)
    return x, dataset.targets.to(torch.int64), [str(c) for c in dataset.classes]


def load_cifar10(root: str | os.PathLike, train: bool = True) -> tuple[Tensor, Tensor, list[str]]:
    """CIFAR-10 from ``root/cifar-10-batches-py`` (python pickles): x (M, 3, 32, 32)."""
    from torchvision.datasets import CIFAR10

    root = Path(root)
    folder = root / CIFAR10.base_folder
    names = [n for n, _ in CIFAR10.train_list + CIFAR10.test_list] + [CIFAR10.meta["filename"]]
    missing = _missing(folder, names)
    if missing:
        raise FileNotFoundError(f"CIFAR-10 files missing under {folder} (root {root}): {missing}")
    try:
        dataset = CIFAR10(str(root), train=train, download=False)
    except RuntimeError as err:  # torchvision's md5 check of the batch files
        raise ValueError(f"CIFAR-10 files under root {root} are corrupted: {err}") from err
    x = _to_unit_range(np.ascontiguousarray(dataset.data)).permute(0, 3, 1, 2)  # NHWC -> NCHW
    return x.contiguous(), torch.tensor(dataset.targets, dtype=torch.int64), list(dataset.classes)


def load_npy(root: str | os.PathLike) -> tuple[Tensor, Tensor | None, list[str]]:
    """Arrays saved with numpy: ``root/images.npy`` and, optionally, ``root/labels.npy``.

    images: float (M, C, H, W) already in [-1, 1], or uint8 (M, C, H, W) pixels (scaled to
    p / 127.5 - 1), or float (M, D) points (2-D sets). labels: int (M,). This is the layout the
    pipeline writes for the embedded digits, so a data folder is versioned as plain files.
    """
    root = Path(root)
    _check_folder(root, "data folder")
    path, labels_path = root / "images.npy", root / "labels.npy"
    if not path.is_file():
        raise FileNotFoundError(f"no images.npy in data folder {root}")
    images = _read_npy(path)
    labels = _read_npy(labels_path) if labels_path.is_file() else None
    if images.dtype != np.uint8 and not np.issubdtype(images.dtype, np.floating):
        raise ValueError(f"{path}: expected uint8 pixels or float values, got dtype "
                         f"{images.dtype}")
    if images.ndim not in (2, 4) or len(images) == 0:
        raise ValueError(f"{path}: expected (M, C, H, W) images or (M, D) points, got shape "
                         f"{images.shape}")
    x = _to_unit_range(images) if images.dtype == np.uint8 else torch.from_numpy(
        np.ascontiguousarray(images, dtype=np.float32))
    if not torch.isfinite(x).all():
        raise ValueError(f"{path} holds NaN or Inf values")
    y = None
    if labels is not None:
        if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"{labels_path}: expected {len(images)} integer labels, "
                             f"got {labels.dtype} {labels.shape}")
        if labels.min() < 0:
            raise ValueError(f"{labels_path}: labels must be >= 0 (class indices), got "
                             f"{int(labels.min())}")
        y = torch.from_numpy(labels.astype(np.int64))
    classes = [str(c) for c in range(int(y.max()) + 1)] if y is not None else []
    return x, y, classes


def _read_npy(path: Path) -> np.ndarray:
    """One .npy file (no pickles); ValueError naming the file when it is corrupt or truncated."""
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise ValueError(f"cannot read {path}: {err}") from err
