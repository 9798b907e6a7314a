"""The FID feature classifier: accuracy, determinism, other image sizes, save/load.

``digits_feature_net`` (tests/conftest.py, shared by the session) is trained with ``quick()``.
"""

import pytest
import torch

from boss_core.data import load_digits_images
from boss_core.features import (
    FeatureNet,
    FeatureNetConfig,
    classifier_accuracy,
    load_feature_net,
    save_feature_net,
    train_feature_net,
)


def quick(**overrides):
    values = dict(iterations=200, batch_size=64, device="cpu", progress=False)
    values.update(overrides)
    return FeatureNetConfig(**values)


@pytest.fixture
def digits_net(digits_feature_net):
    digits, result = digits_feature_net
    assert result.config == quick()  # the oracles below are about this training
    return digits, result


def test_digits_classifier_is_accurate_on_held_out_images(digits_net):
    digits, result = digits_net
    assert result.n_heldout == round(0.2 * 1797) and result.n_train == 1797 - result.n_heldout
    assert result.heldout_accuracy > 0.9
    # the network has learned the labels, not the split: accuracy on all images is high too
    assert classifier_accuracy(result.net, digits.x, digits.y) > 0.9


def test_features_are_unit_rms_and_the_head_inverts_the_scale(digits_net):
    digits, result = digits_net
    net = result.net
    with torch.no_grad():
        feats = net.features(digits.x)  # (1797, 64)
        assert feats.shape == (1797, 64)
        # s = RMS over the training images, so over all images the RMS is close to 1
        assert float(feats.pow(2).mean().sqrt()) == pytest.approx(1.0, rel=0.1)
        torch.testing.assert_close(net.logits_from_features(feats), net(digits.x),
                                   rtol=1e-5, atol=1e-4)


def test_training_is_deterministic_for_a_seed_and_leaves_global_rng_alone():
    digits = load_digits_images()
    state = torch.random.get_rng_state()
    nets = [train_feature_net(digits.x, digits.y, quick(iterations=15, seed=s)).net
            for s in (3, 3, 4)]
    assert torch.equal(torch.random.get_rng_state(), state)
    first, same, other = (dict(n.state_dict()) for n in nets)
    assert all(torch.equal(first[k], same[k]) for k in first)
    assert not torch.equal(first["head.weight"], other["head.weight"])


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_other_image_sizes_learn_a_separable_task(shape):
    # class k images are a noisy constant level: trivially separable at any size
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(120) % 2
    images = (labels.float() - 0.5).view(-1, 1, 1, 1) + 0.3 * torch.randn((120, *shape),
                                                                           generator=gen)
    result = train_feature_net(images.clamp(-1, 1), labels,
                               quick(iterations=40, batch_size=16, feature_dim=16))
    assert result.heldout_accuracy > 0.9
    assert result.net.features(images[:5]).shape == (5, 16)


def test_save_load_round_trip(tmp_path, digits_net):
    digits, result = digits_net
    path = tmp_path / "features.safetensors"
    save_feature_net(result.net, path)
    loaded = load_feature_net(path)
    with torch.no_grad():
        assert torch.equal(loaded.features(digits.x[:50]), result.net.features(digits.x[:50]))
    assert loaded.arch() == result.net.arch()


def test_corrupt_missing_or_foreign_files_name_the_file(tmp_path):
    from safetensors.torch import save_file

    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00not a safetensors file" * 10)
    with pytest.raises(ValueError, match="corrupt.safetensors"):
        load_feature_net(corrupt)
    with pytest.raises(ValueError, match="missing.safetensors"):
        load_feature_net(tmp_path / "missing.safetensors")
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(3)}, str(foreign))
    with pytest.raises(ValueError, match="foreign.safetensors"):
        load_feature_net(foreign)
    # right format tag, wrong shapes (a net saved with another feature_dim)
    mismatched = tmp_path / "mismatched.safetensors"
    save_feature_net(FeatureNet(1, 10, feature_dim=8), mismatched)
    state = load_feature_net(mismatched).state_dict()
    state["head.weight"] = torch.zeros(10, 9)
    save_file({k: v.contiguous() for k, v in state.items()}, str(mismatched),
              metadata={"format": "boss-feature-net",
                        "arch": '{"in_channels": 1, "num_classes": 10, "feature_dim": 8}'})
    with pytest.raises(ValueError, match="mismatched.safetensors"):
        load_feature_net(mismatched)


def test_missing_labels_and_bad_config_are_refused():
    digits = load_digits_images()
    with pytest.raises(ValueError, match="FID feature network needs labels"):
        train_feature_net(digits.x, None, quick())
    with pytest.raises(ValueError, match="holdout_fraction"):
        FeatureNetConfig(holdout_fraction=0.0)
    with pytest.raises(ValueError, match="iterations"):
        FeatureNetConfig(iterations=0)
    with pytest.raises(ValueError, match="device"):
        FeatureNetConfig(device="tpu")
    with pytest.raises(ValueError, match="unknown FeatureNetConfig key"):
        FeatureNetConfig.from_dict({"iterations": 10, "width": 3})
    assert FeatureNetConfig.from_dict(quick().to_dict()) == quick()
