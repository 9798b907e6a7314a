"""Datasets as tensors: the embedded digits, 2-D toy sets, and a dispatch to the file loaders.

Images come as float32 (M, C, H, W) in [-1, 1]; 2-D sets as float32 (n, 2) of roughly unit scale.
Everything is a deterministic function of its arguments (the seed included). Results are
``TensorData`` records, which also unpack as ``x, y = ...``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from . import loaders
from .config import ConfigMixin, check_bool, check_int


@dataclass(frozen=True, eq=False)
class TensorData:
    """A dataset held in memory.

    x: (M, *data_shape) float32; y: (M,) int64 labels or None; classes: label names (may be
    empty); name: the dataset's name. Iterating yields (x, y), so ``x, y = data`` works.
    """

    x: Tensor
    y: Tensor | None
    name: str
    classes: tuple[str, ...] = ()

    def __iter__(self) -> Iterator[Tensor | None]:
        return iter((self.x, self.y))

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def data_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])


def load_digits_images() -> TensorData:
    """scikit-learn's 1,797 8x8 digits: x (1797, 1, 8, 8) = pixel / 8 - 1 in [-1, 1], y int64."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.from_numpy(bunch.images.astype(np.float32) / 8.0 - 1.0)  # (1797, 8, 8)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    return TensorData(
        x=images.unsqueeze(1), y=labels, name="digits",
        classes=tuple(str(c) for c in bunch.target_names),
    )  # x: (1797, 1, 8, 8)


def _check_n(n: int) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    return int(n)


def make_moons(n: int, seed: int, noise: float = 0.05) -> TensorData:
    """Two interleaving half circles (sklearn's ``make_moons``) centred at 0.

    Points are sklearn's moons minus (0.5, 0.25): x in about [-1.5, 1.5], y in [-0.8, 0.8];
    labels say which moon (0 or 1).
    """
    from sklearn.datasets import make_moons as sk_moons

    points, labels = sk_moons(_check_n(n), noise=noise, random_state=seed)
    points = points - np.array([0.5, 0.25])
    return TensorData(
        x=torch.from_numpy(points.astype(np.float32)), y=torch.from_numpy(labels.astype(np.int64)),
        name="moons", classes=("upper", "lower"),
    )


def make_checkerboard(n: int, seed: int) -> TensorData:
    """Uniform on the 8 dark squares of a 4x4 checkerboard over [-2, 2]^2 (per-axis std ~1.15).

    A square (i, j), i, j in 0..3, is dark when i + j is even. No labels.
    """
    rng = np.random.default_rng(seed)
    n = _check_n(n)
    cell = rng.integers(0, 8, size=n)  # which dark square
    row = cell // 2  # (n,) in 0..3
    col = 2 * (cell % 2) + (row % 2)  # the two dark columns of each row
    offset = rng.random((n, 2))  # uniform inside the square
    points = np.stack([col + offset[:, 0], row + offset[:, 1]], axis=1) - 2.0  # (n, 2)
    return TensorData(x=torch.from_numpy(points.astype(np.float32)), y=None, name="checkerboard")


def make_gaussian_mixture(
    n: int, seed: int, n_modes: int = 8, radius: float = 1.5, std: float = 0.1
) -> TensorData:
    """Equal-weight mixture of isotropic Gaussians N(mu_k, std^2 I) on a circle.

    mu_k = radius (cos 2 pi k / n_modes, sin 2 pi k / n_modes); labels are the mode index k.
    """
    n = _check_n(n)
    if isinstance(n_modes, bool) or not isinstance(n_modes, int) or n_modes < 1:
        raise ValueError(f"n_modes must be an integer >= 1, got {n_modes!r}")
    if not (radius >= 0 and std > 0):
        raise ValueError(f"need radius >= 0 and std > 0, got radius={radius}, std={std}")
    rng = np.random.default_rng(seed)
    modes = rng.integers(0, n_modes, size=n)  # (n,)
    angles = 2.0 * np.pi * modes / n_modes
    centres = radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)  # (n, 2)
    points = centres + std * rng.standard_normal((n, 2))
    return TensorData(
        x=torch.from_numpy(points.astype(np.float32)), y=torch.from_numpy(modes.astype(np.int64)),
        name="gaussian_mixture", classes=tuple(str(k) for k in range(n_modes)),
    )


def _from_loader(name: str, fn: Callable[..., tuple]) -> Callable[..., TensorData]:
    def load(*args: Any, **kwargs: Any) -> TensorData:
        images, labels, classes = fn(*args, **kwargs)
        return TensorData(x=images, y=labels, name=name, classes=tuple(classes))

    load.__signature__ = inspect.signature(fn)  # keyword checks in load_dataset use fn's
    load.__doc__ = fn.__doc__
    return load


load_image_folder = _from_loader("image_folder", loaders.load_image_folder)
load_mnist = _from_loader("mnist", loaders.load_mnist)
load_cifar10 = _from_loader("cifar10", loaders.load_cifar10)
load_npy = _from_loader("npy", loaders.load_npy)

DATASETS: dict[str, Callable[..., TensorData]] = {
    "digits": load_digits_images,
    "moons": make_moons,
    "checkerboard": make_checkerboard,
    "gaussian_mixture": make_gaussian_mixture,
    "image_folder": load_image_folder,
    "mnist": load_mnist,
    "cifar10": load_cifar10,
    "npy": load_npy,
}
# The arguments each dataset takes from DataConfig (the others must stay at their defaults).
_ARGS = {"digits": (), "moons": ("n", "seed"), "checkerboard": ("n", "seed"),
         "gaussian_mixture": ("n", "seed"), "image_folder": ("root", "image_size", "channels"),
         "mnist": ("root", "train"), "cifar10": ("root", "train"), "npy": ("root",)}


@dataclass(frozen=True)
class DataConfig(ConfigMixin):
    """The ``data`` section of params.yaml: which dataset, and its arguments.

    name: one of ``DATASETS``. root: the folder for image_folder / mnist / cifar10 / npy.
    n, seed: size and seed of a generated 2-D set. image_size, channels: resize / convert an
    image folder. train: the MNIST / CIFAR-10 split.
    """

    name: str = "digits"
    root: str | None = None
    n: int = 5000
    seed: int = 0
    image_size: int | None = None
    channels: int | None = None
    train: bool = True

    def __post_init__(self):
        if self.name not in DATASETS:
            raise ValueError(f"name must be one of {list(DATASETS)}, got {self.name!r}")
        if "root" in _ARGS[self.name] and not (isinstance(self.root, str) and self.root):
            raise ValueError(f"root must name the data folder for dataset {self.name!r}")
        check_int("n", self.n, 1)
        check_int("seed", self.seed, 0)
        for name in ("image_size", "channels"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), 1)
        if self.channels not in (None, 1, 3):
            raise ValueError(f"channels must be 1, 3 or null, got {self.channels!r}")
        check_bool("train", self.train)
        # A resize, a conversion or a split the dataset would silently ignore is refused.
        for name, unset in (("image_size", None), ("channels", None), ("train", True)):
            if getattr(self, name) != unset and name not in _ARGS[self.name]:
                users = [d for d, args in _ARGS.items() if name in args]
                raise ValueError(f"{name} only applies to datasets {users}, not {self.name!r}: "
                                 f"set it to {'null' if unset is None else unset}")

    def loader_kwargs(self) -> dict[str, Any]:
        """The keyword arguments ``load_dataset(self.name, ...)`` takes."""
        return {key: getattr(self, key) for key in _ARGS[self.name]}

    def load(self) -> TensorData:
        return load_dataset(self.name, **self.loader_kwargs())


def load_dataset(name: str, **kwargs: Any) -> TensorData:
    """Load dataset ``name`` with its own keyword arguments.

    digits: none; moons / checkerboard / gaussian_mixture: n, seed (and their options);
    image_folder: root, image_size, channels; mnist / cifar10: root, train.
    Raises ValueError for an unknown name, an unknown argument or a missing one.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    fn = DATASETS[name]
    params = inspect.signature(fn).parameters
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        raise ValueError(f"dataset {name!r} takes {sorted(params)}, got unknown {unknown}")
    missing = [p for p, v in params.items() if v.default is inspect.Parameter.empty
               and p not in kwargs]
    if missing:
        raise ValueError(f"dataset {name!r} needs argument(s) {missing}")
    return fn(**kwargs)
