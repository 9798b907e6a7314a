"""Datasets: the digits match scikit-learn, toy sets are seeded and shaped as documented."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits, make_moons

from boss_core import data as D


def test_digits_are_sklearn_pixels_rescaled_to_unit_range():
    x, y = D.load_digits_images()
    bunch = load_digits()
    assert x.shape == (1797, 1, 8, 8) and x.dtype == torch.float32
    np.testing.assert_array_equal(x[:, 0].numpy(), (bunch.images / 8.0 - 1.0).astype(np.float32))
    np.testing.assert_array_equal(y.numpy(), bunch.target)
    assert y.dtype == torch.int64
    assert float(x.min()) == -1.0 and float(x.max()) == 1.0  # pixel values 0 and 16 occur


@pytest.mark.parametrize("maker", [D.make_moons, D.make_checkerboard, D.make_gaussian_mixture])
def test_two_d_sets_are_seeded(maker):
    a, b, c = maker(500, seed=1), maker(500, seed=1), maker(500, seed=2)
    assert a.x.shape == (500, 2) and a.x.dtype == torch.float32
    assert torch.equal(a.x, b.x)
    assert not torch.equal(a.x, c.x)
    std = a.x.std(0)
    assert bool(((std > 0.3) & (std < 1.5)).all()), std  # roughly unit scale
    assert float(a.x.mean(0).abs().max()) < 0.25  # centred


def test_moons_are_sklearn_moons_shifted():
    data = D.make_moons(300, seed=5)
    points, labels = make_moons(300, noise=0.05, random_state=5)
    np.testing.assert_allclose(data.x.numpy(), points - [0.5, 0.25], rtol=0, atol=1e-6)
    np.testing.assert_array_equal(data.y.numpy(), labels)


def test_checkerboard_points_lie_on_dark_squares_evenly():
    x = D.make_checkerboard(8000, seed=0).x.numpy()
    assert x.min() >= -2.0 and x.max() <= 2.0
    col, row = np.floor(x[:, 0] + 2).astype(int), np.floor(x[:, 1] + 2).astype(int)
    assert ((col + row) % 2 == 0).all()
    counts = np.bincount(row * 4 + col, minlength=16)[(np.add.outer(range(4), range(4)) % 2
                                                       == 0).ravel()]
    assert counts.min() > 0.8 * 1000 and counts.max() < 1.2 * 1000  # 8 squares, 1000 each


def test_gaussian_mixture_points_sit_around_their_labelled_mode():
    data = D.make_gaussian_mixture(8000, seed=0, n_modes=8, radius=1.5, std=0.1)
    angles = 2 * np.pi * data.y.numpy() / 8
    centres = 1.5 * np.stack([np.cos(angles), np.sin(angles)], 1)
    offsets = data.x.numpy() - centres
    np.testing.assert_allclose(offsets.std(0), [0.1, 0.1], rtol=0.05)
    assert np.abs(offsets).max() < 0.6  # 6 std
    counts = np.bincount(data.y.numpy(), minlength=8)
    assert counts.min() > 800 and counts.max() < 1200


def test_load_dataset_dispatch_and_errors():
    direct = D.make_gaussian_mixture(50, seed=3, n_modes=4)
    via = D.load_dataset("gaussian_mixture", n=50, seed=3, n_modes=4)
    assert torch.equal(direct.x, via.x) and torch.equal(direct.y, via.y)
    assert D.load_dataset("digits").data_shape == (1, 8, 8)
    with pytest.raises(ValueError, match="known: digits, moons"):
        D.load_dataset("imagenet")
    with pytest.raises(ValueError, match="n_points"):
        D.load_dataset("moons", n_points=5, seed=0)
    with pytest.raises(ValueError, match="'n'"):
        D.load_dataset("moons", seed=0)
    with pytest.raises(ValueError, match="root"):
        D.load_dataset("mnist")
    with pytest.raises(ValueError, match="n must be"):
        D.make_moons(0, seed=0)
