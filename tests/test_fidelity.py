"""FID/KID through torch-fidelity with our classifier and a local (random) InceptionV3."""

from itertools import pairwise

import numpy as np
import pytest
import torch
import torch_fidelity

from boss_core.data import load_digits_images
from boss_core.features import FeatureNetConfig, save_feature_net, train_feature_net
from boss_core.fidelity import (
    CLASSIFIER_NAME,
    FidelityConfig,
    build_extractor,
    fid_kid,
    fid_kid_over_seeds,
    to_uint8_rgb,
)
from boss_core.metrics import aggregate


def config(**overrides):
    values = dict(kid_subset_size=500, kid_subsets=20, device="cpu")
    values.update(overrides)
    return FidelityConfig(**values)


@pytest.fixture(scope="module")
def setup():
    digits = load_digits_images()
    net = train_feature_net(digits.x, digits.y, FeatureNetConfig(
        iterations=150, batch_size=64, device="cpu", progress=False)).net
    return digits.x, net, build_extractor(config(), net)


def shifted(x, offset):
    return (x + offset).clamp(-1.0, 1.0)


def test_fid_and_kid_of_a_set_against_itself_are_zero(setup):
    x, _, extractor = setup
    out = fid_kid(x, x, extractor)
    assert abs(out["fid"]) < 1e-6
    # KID's subsets are drawn independently from the two (identical) sets, so it is only about
    # 0: small against the KID of a barely visible shift (0.1 < 0.125, the digits' gray step)
    small = fid_kid(shifted(x, 0.1), x, extractor)
    assert abs(out["kid"]) < 0.2 * small["kid"]
    assert small["fid"] > 1e3 * abs(out["fid"])


def test_fid_and_kid_grow_with_the_offset(setup):
    x, _, extractor = setup
    rows = [fid_kid(shifted(x, c), x, extractor) for c in (0.0, 0.1, 0.2, 0.4, 0.8)]
    fids, kids = [r["fid"] for r in rows], [r["kid"] for r in rows]
    assert all(a < b for a, b in pairwise(fids)), fids
    assert all(a < b for a, b in pairwise(kids)), kids


def test_reference_features_are_cached_by_content(setup):
    x, _, extractor = setup
    first = extractor.reference(x)
    assert extractor.reference(x.clone()) is first  # same content, new tensor: a cache hit
    other = extractor.reference(shifted(x, 0.2))
    assert other is not first and other.digest != first.digest
    assert fid_kid(x[:600], first, extractor) == fid_kid(x[:600], x, extractor)


def test_values_equal_torch_fidelity_calculate_metrics(setup, tmp_path):
    # the same numbers from torch-fidelity's own end-to-end path, loading the saved net
    x, net, extractor = setup
    path = tmp_path / "net.safetensors"
    save_feature_net(net, path)
    samples = shifted(x, 0.3)
    ours = fid_kid(samples, x, extractor)

    class Images(torch.utils.data.Dataset):
        def __init__(self, u):
            self.u = u

        def __len__(self):
            return len(self.u)

        def __getitem__(self, i):
            return self.u[i]

    theirs = torch_fidelity.calculate_metrics(
        input1=Images(to_uint8_rgb(samples)), input2=Images(to_uint8_rgb(x)), fid=True, kid=True,
        feature_extractor=CLASSIFIER_NAME, feature_extractor_weights_path=str(path),
        kid_subset_size=500, kid_subsets=20, cuda=False, save_cpu_ram=True, verbose=False,
        cache=False)
    assert ours["fid"] == pytest.approx(theirs[torch_fidelity.KEY_METRIC_FID], rel=1e-5)
    # they compute KID's kernels in float32, we in float64
    assert ours["kid"] == pytest.approx(theirs[torch_fidelity.KEY_METRIC_KID_MEAN], rel=1e-3)
    assert ours["kid_std"] == pytest.approx(theirs[torch_fidelity.KEY_METRIC_KID_STD], rel=1e-2)


def test_over_seeds_aggregates_per_seed_values(setup):
    x, _, extractor = setup
    sets = [shifted(x, c) for c in (0.1, 0.2, 0.3)]
    out = fid_kid_over_seeds(sets, x, extractor)
    fids = [fid_kid(s, x, extractor)["fid"] for s in sets]
    assert out["n_seeds"] == 3
    assert out["fid"] == pytest.approx(np.mean(fids), rel=1e-12)
    assert out["fid_std"] == pytest.approx(np.std(fids), rel=1e-12)
    with pytest.raises(ValueError, match="n_seeds=3"):
        fid_kid_over_seeds(sets[:2], x, extractor)


def test_aggregate_is_mean_and_population_std():
    out = aggregate([{"a": 1.0, "b": 10.0}, {"a": 3.0, "b": 10.0}, {"a": 8.0, "b": 10.0}])
    assert out["a"] == pytest.approx(4.0) and out["b"] == 10.0 and out["b_std"] == 0.0
    assert out["a_std"] == pytest.approx(np.sqrt((9 + 1 + 16) / 3))
    assert out["n_seeds"] == 3
    with pytest.raises(ValueError, match="n_seeds must be >= 2"):
        aggregate([{"a": 1.0}])
    with pytest.raises(ValueError, match="clash"):
        aggregate([{"a": 1.0, "a_std": 0.1}] * 2)


def test_bad_configs_and_inputs_are_refused_before_compute(setup, tmp_path):
    x, _, extractor = setup
    with pytest.raises(ValueError, match="n_seeds"):
        FidelityConfig(n_seeds=1)
    with pytest.raises(ValueError, match="unknown extractor"):
        FidelityConfig(extractor="clip")
    with pytest.raises(ValueError, match="inception_weights"):
        FidelityConfig(extractor="inception")
    with pytest.raises(ValueError, match="needs feature_net"):
        build_extractor(config())
    big = build_extractor(config(kid_subset_size=1000), setup[1])
    with pytest.raises(ValueError, match=r"kid_subset_size=1000 .* 999 samples"):
        fid_kid(x[:999], x, big)
    with pytest.raises(ValueError, match=r"kid_subset_size=1000 .* 500 reference"):
        fid_kid(x, x[:500], big)
    missing = tmp_path / "no_such_inception.pth"
    with pytest.raises(ValueError, match="no_such_inception.pth"):
        build_extractor(config(extractor="inception", inception_weights=str(missing)))


def test_inception_option_loads_local_weights(tmp_path):
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class RandomInit(FeatureExtractorInceptionV3):
        """torch-fidelity's InceptionV3 that keeps its random init instead of loading weights."""

        def load_state_dict(self, *args, **kwargs):
            return None

    empty = tmp_path / "empty.pt"
    torch.save({}, empty)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        module = RandomInit("random", ["2048"], feature_extractor_weights_path=str(empty))
        for layer in module.modules():  # He init keeps activations O(1) through ~90 layers
            if isinstance(layer, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
    weights = tmp_path / "inception.pth"
    torch.save(module.state_dict(), weights)

    x = load_digits_images().x[:16]
    extractor = build_extractor(config(extractor="inception", inception_weights=str(weights),
                                       kid_subset_size=8, kid_subsets=5))
    same = fid_kid(x[:8], x[:8], extractor)
    other = fid_kid(x[8:], x[:8], extractor)
    assert abs(same["fid"]) < 1e-4 * other["fid"]
    assert other["fid"] > 0.01

    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"junk" * 100)
    with pytest.raises(ValueError, match="corrupt.pth"):
        build_extractor(config(extractor="inception", inception_weights=str(corrupt)))
    wrong = tmp_path / "wrong.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, wrong)
    with pytest.raises(ValueError, match="wrong.pth"):
        build_extractor(config(extractor="inception", inception_weights=str(wrong)))
