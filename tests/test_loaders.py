"""File loaders read back generated files exactly and name the file or folder when they fail."""

from __future__ import annotations

import os
import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from boss_core import loaders
from boss_core.data import load_dataset


def unit(pixels: np.ndarray) -> np.ndarray:
    return pixels.astype(np.float32) / 127.5 - 1.0


def write_folder(root, shapes_by_class, mode="L", seed=0):
    """PNG files root/<class>/<i>.png with random pixels; returns {path: (pixels, class)}."""
    rng = np.random.default_rng(seed)
    written = {}
    for cls, shapes in shapes_by_class.items():
        (root / cls).mkdir(parents=True)
        for i, shape in enumerate(shapes):
            pixels = rng.integers(0, 256, size=shape, dtype=np.uint8)
            path = root / cls / f"{i}.png"
            Image.fromarray(pixels, mode=mode).save(path)
            written[str(path)] = (pixels, cls)
    return written


@pytest.mark.parametrize("mode,shape", [("L", (6, 5)), ("RGB", (6, 5, 3))])
def test_image_folder_reads_pixels_and_labels_exactly(tmp_path, mode, shape):
    written = write_folder(tmp_path, {"dog": [shape] * 2, "cat": [shape] * 3}, mode=mode)
    x, y, classes = loaders.load_image_folder(tmp_path)
    assert classes == ["cat", "dog"]
    assert y.tolist() == [0, 0, 0, 1, 1]
    expected = [written[str(tmp_path / c / f"{i}.png")][0] for c, n in (("cat", 3), ("dog", 2))
                for i in range(n)]
    expected = np.stack([p[None] if p.ndim == 2 else p.transpose(2, 0, 1) for p in expected])
    np.testing.assert_array_equal(x.numpy(), unit(expected))  # (M, C, H, W)


def test_image_folder_mixed_sizes_and_channels(tmp_path):
    write_folder(tmp_path / "a", {"c0": [(8, 8)], "c1": [(6, 6)]})
    with pytest.raises(ValueError, match=r"c1.0\.png|c0.0\.png"):
        loaders.load_image_folder(tmp_path / "a")
    x, _, _ = loaders.load_image_folder(tmp_path / "a", image_size=4)
    assert x.shape == (2, 1, 4, 4)

    write_folder(tmp_path / "b", {"c0": [(5, 5)]}, mode="L")
    write_folder(tmp_path / "b", {"c1": [(5, 5, 3)]}, mode="RGB", seed=1)
    with pytest.raises(ValueError, match="channels"):
        loaders.load_image_folder(tmp_path / "b")
    x, y, _ = loaders.load_image_folder(tmp_path / "b", channels=3)
    assert x.shape == (2, 3, 5, 5)
    grey = x[y == 0][0]
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])  # grey -> RGB copies


def test_image_folder_errors_name_the_file_or_folder(tmp_path):
    write_folder(tmp_path / "ok", {"c0": [(4, 4)]})
    bad = tmp_path / "ok" / "c0" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(ValueError, match="broken.png"):
        loaders.load_image_folder(tmp_path / "ok")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        loaders.load_image_folder(tmp_path / "nowhere")
    (tmp_path / "empty" / "c0").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="empty"):
        loaders.load_image_folder(tmp_path / "empty")


def write_idx(path, array: np.ndarray) -> None:
    """IDX file: magic 0x00000800 | 0x08 (uint8) << 8 | ndim, big-endian sizes, raw bytes."""
    header = struct.pack(">I", (0x08 << 8) | array.ndim)
    header += b"".join(struct.pack(">I", s) for s in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_mnist(root, n_train=5, n_test=3):
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
        arrays[prefix] = (images, labels)
    return arrays


def test_mnist_reads_idx_files_exactly(tmp_path):
    arrays = write_mnist(tmp_path)
    for train, prefix in ((True, "train"), (False, "t10k")):
        data = load_dataset("mnist", root=tmp_path, train=train)
        images, labels = arrays[prefix]
        np.testing.assert_array_equal(data.x.numpy(), unit(images)[:, None])
        np.testing.assert_array_equal(data.y.numpy(), labels.astype(np.int64))
    os.remove(tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte")
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        loaders.load_mnist(tmp_path)


def test_cifar10_reads_pickles_exactly(tmp_path, monkeypatch):
    from torchvision.datasets import CIFAR10, cifar

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    batches = {}
    for name, _ in CIFAR10.train_list + CIFAR10.test_list:
        data = rng.integers(0, 256, size=(2, 3072), dtype=np.uint8)  # R, G, B planes per row
        labels = rng.integers(0, 10, size=2).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, "labels": labels}, f)
        batches[name] = (data, labels)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f)
    # torchvision compares md5 sums of the real CIFAR-10 files (the batches in
    # CIFAR10._check_integrity, the meta file through cifar.check_integrity); our tiny
    # stand-ins cannot match, so both checks are reduced to "the file exists".
    monkeypatch.setattr(CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(cifar, "check_integrity", lambda path, md5=None: os.path.isfile(path))

    x, y, classes = loaders.load_cifar10(tmp_path, train=True)
    train = [batches[name] for name, _ in CIFAR10.train_list]
    expected = np.concatenate([d for d, _ in train]).reshape(-1, 3, 32, 32)
    np.testing.assert_array_equal(x.numpy(), unit(expected))
    assert y.tolist() == [label for _, labels in train for label in labels]
    assert classes[3] == "class3"
    x_test, y_test, _ = loaders.load_cifar10(tmp_path, train=False)
    np.testing.assert_array_equal(x_test.numpy(),
                                  unit(batches["test_batch"][0].reshape(-1, 3, 32, 32)))
    os.remove(folder / "data_batch_3")
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        loaders.load_cifar10(tmp_path)
