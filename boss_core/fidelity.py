"""FID and KID through torch-fidelity, with our classifier or a local InceptionV3 as extractor.

Images arrive as float (M, C, H, W) in [-1, 1] and are quantised the way saved PNGs would be:

    u = clamp(round((x + 1) * 127.5), 0, 255) as uint8, gray (C = 1) repeated to 3 channels,

which is the input torch-fidelity's extractors take: (B, 3, H, W) uint8. Features come from
torch-fidelity's own dataset loop, and the numbers from its own code:

    FID = ||mu_1 - mu_2||^2 + tr(S_1) + tr(S_2) - 2 tr((S_1 S_2)^(1/2))   (fid_statistics_to_metric)
    KID = mean over ``kid_subsets`` random subsets of size m of the unbiased MMD^2 with the cubic
          kernel k(a, b) = (a.b / D + 1)^3                                 (kid_features_to_metric)

``kid_std`` is torch-fidelity's std over those subsets. The reference set's features and FID
statistics are computed once per extractor and reused, keyed on the content of the quantised
images (a hash), never on a name.

Extractors: ``"classifier"`` is ``boss_core.features.FeatureNet`` registered with torch-fidelity
as ``"boss-classifier"`` (the trained net is handed to each instance; with ``calculate_metrics``
call ``register_classifier_extractor()`` and pass ``feature_extractor_weights_path=`` a
``save_feature_net`` file). ``"inception"`` is torch-fidelity's ``inception-v3-compat`` loaded
from a local weights file (nothing is downloaded).

torch-fidelity (and the torchvision it imports) is imported inside the functions that compute,
never by importing this module, so reading a ``FidelityConfig`` costs no torchvision import.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from .config import ConfigMixin, check_device_name, check_int
from .device import resolve_device
from .features import FeatureNet, load_feature_net
from .metrics import aggregate
from .seeds import seeded

if TYPE_CHECKING:
    from torch_fidelity import FeatureExtractorBase

CLASSIFIER_NAME = "boss-classifier"
INCEPTION_NAME = "inception-v3-compat"
EXTRACTORS = ("classifier", "inception")
KID_SEED = 2020  # torch-fidelity's default rng_seed for the KID subsets


class _ClassifierExtractorMethods:
    """torch-fidelity wrapper of a ``FeatureNet``: uint8 (B, 3 or C, H, W) -> features.

    Layers: "features" (B, feature_dim), the default for FID/KID/PRC; "logits" (B, classes).
    The net comes from ``feature_net=`` (a module, copied) or ``feature_extractor_weights_path=``
    (a ``save_feature_net`` file). The class torch-fidelity instantiates, ``ClassifierExtractor``,
    is these methods on ``FeatureExtractorBase``, built by ``register_classifier_extractor``.
    """

    def __init__(self, name, features_list, feature_net=None, feature_extractor_weights_path=None,
                 **kwargs):
        super().__init__(name, features_list)
        if feature_net is None and feature_extractor_weights_path is None:
            raise ValueError(f"{name}: pass feature_net= or feature_extractor_weights_path=")
        if feature_net is None:
            feature_net = load_feature_net(feature_extractor_weights_path)
        self.net = copy.deepcopy(feature_net).cpu().eval()  # torch-fidelity freezes and moves it

    def forward(self, x):
        if x.dtype != torch.uint8 or x.dim() != 4:
            raise ValueError(f"expected uint8 (B, C, H, W) images, got {x.dtype} {tuple(x.shape)}")
        x = x.to(torch.float32) / 127.5 - 1.0  # back to [-1, 1]
        channels = self.net.in_channels
        if x.shape[1] == 3 and channels == 1:
            x = x.mean(dim=1, keepdim=True)  # (B, 1, H, W): the gray channel repeated 3 times
        elif x.shape[1] != channels:
            raise ValueError(f"images have {x.shape[1]} channels, the net expects {channels}")
        feats = self.net.features(x)  # (B, feature_dim)
        out = {"features": feats, "logits": self.net.logits_from_features(feats)}
        return tuple(out[name] for name in self.features_list)

    @staticmethod
    def get_provided_features_list():
        return "features", "logits"

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"isc": "logits", "fid": "features", "kid": "features", "prc": "features"}[metric]

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros((1, 3, 8, 8), dtype=torch.uint8)


_classifier_extractor: type | None = None


def register_classifier_extractor() -> type:
    """``ClassifierExtractor`` (a torch-fidelity ``FeatureExtractorBase``), registered with
    torch-fidelity as ``"boss-classifier"``; built and registered on the first call only.

    Importing this module imports no torch-fidelity (and so no torchvision): params loading and
    the stages that compute no FID never pay for it. ``build_extractor`` calls this; call it
    yourself before ``torch_fidelity.calculate_metrics(feature_extractor="boss-classifier")``.
    """
    global _classifier_extractor
    if _classifier_extractor is None:
        from torch_fidelity import FeatureExtractorBase, register_feature_extractor
        from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

        cls = type("ClassifierExtractor", (_ClassifierExtractorMethods, FeatureExtractorBase),
                   {"__module__": __name__, "__qualname__": "ClassifierExtractor",
                    "__doc__": _ClassifierExtractorMethods.__doc__})
        if CLASSIFIER_NAME not in FEATURE_EXTRACTORS_REGISTRY:
            register_feature_extractor(CLASSIFIER_NAME, cls)
        _classifier_extractor = cls
    return _classifier_extractor


def __getattr__(name: str):
    """``boss_core.fidelity.ClassifierExtractor`` (pickle finds the class by this name)."""
    if name == "ClassifierExtractor":
        return register_classifier_extractor()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True)
class FidelityConfig(ConfigMixin):
    """The ``fidelity`` section of params.yaml.

    extractor: "classifier" (our FeatureNet) or "inception" (needs ``inception_weights``, a local
        torch-fidelity InceptionV3 state dict). kid_subset_size / kid_subsets: KID's subsets.
    n_seeds: sample sets (noise seeds) per method, >= 2 so a std can be reported.
    batch_size: feature-extraction batch. device: where the extractor runs.
    """

    extractor: str = "classifier"
    inception_weights: str | None = None
    kid_subset_size: int = 1000
    kid_subsets: int = 100
    n_seeds: int = 3
    batch_size: int = 256
    device: str = "auto"

    def __post_init__(self):
        if self.extractor not in EXTRACTORS:
            raise ValueError(f"unknown extractor {self.extractor!r}; known: {EXTRACTORS}")
        if self.extractor == "inception" and self.inception_weights is None:
            raise ValueError("extractor 'inception' needs inception_weights (a local file path; "
                             "InceptionV3 weights cannot be downloaded here)")
        check_int("kid_subset_size", self.kid_subset_size, 2)
        check_int("kid_subsets", self.kid_subsets, 1)
        check_int("n_seeds", self.n_seeds, 2)
        check_int("batch_size", self.batch_size, 1)
        check_device_name(self.device)


def to_uint8_rgb(images: Tensor) -> Tensor:
    """(M, C, H, W) float in [-1, 1], C in {1, 3} -> (M, 3, H, W) uint8 (module doc)."""
    if not isinstance(images, Tensor) or not images.is_floating_point() or images.dim() != 4:
        raise ValueError("images must be a floating tensor of shape (M, C, H, W)")
    if images.shape[1] not in (1, 3):
        raise ValueError(f"images must have 1 or 3 channels, got {images.shape[1]}")
    u = ((images.detach().float().cpu() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return u.expand(-1, 3, -1, -1).contiguous() if u.shape[1] == 1 else u  # (M, 3, H, W)


class _Images(Dataset):
    """One uint8 (3, H, W) tensor per item, the Dataset form torch-fidelity takes."""

    def __init__(self, images: Tensor):
        self.images = images

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> Tensor:
        return self.images[index]


@dataclass(frozen=True, eq=False)
class ReferenceFeatures:
    """features: (M, D) float32 on the CPU; fid_stats: torch-fidelity's {"mu", "sigma"}."""

    features: Tensor
    fid_stats: dict[str, np.ndarray]
    digest: str


class FidelityExtractor:
    """A torch-fidelity feature extractor plus a content-keyed cache of reference features."""

    def __init__(self, config: FidelityConfig, module: FeatureExtractorBase, layer: str,
                 cache_size: int = 4):
        self.config, self.module, self.layer = config, module, layer
        self.device = resolve_device(config.device)
        self._cache: dict[str, ReferenceFeatures] = {}
        self._cache_size = cache_size

    def __getstate__(self) -> dict:
        """Pickled for a Dask worker without the reference cache (it can be large)."""
        return {**self.__dict__, "_cache": {}}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.device = resolve_device(self.config.device)  # the worker's own device

    def _features_uint8(self, u: Tensor) -> Tensor:
        from torch_fidelity.utils import get_featuresdict_from_dataset

        cuda = self.device.type == "cuda"
        with torch.cuda.device(self.device) if cuda else contextlib.nullcontext():
            feats = get_featuresdict_from_dataset(_Images(u), self.module, self.config.batch_size,
                                                  cuda, save_cpu_ram=True, verbose=False)
        return feats[self.layer]  # (M, D) float32, CPU

    def features(self, images: Tensor) -> Tensor:
        """(M, C, H, W) float in [-1, 1] -> (M, D) float32 features on the CPU."""
        return self._features_uint8(to_uint8_rgb(images))

    def reference(self, images: Tensor) -> ReferenceFeatures:
        """Features and FID statistics of a reference set, computed once per distinct content."""
        u = to_uint8_rgb(images)
        digest = hashlib.blake2b(u.numpy().tobytes() + str(tuple(u.shape)).encode(),
                                 digest_size=16).hexdigest()
        if digest not in self._cache:
            from torch_fidelity.metric_fid import fid_features_to_statistics

            feats = self._features_uint8(u)
            if len(self._cache) >= self._cache_size:
                self._cache.pop(next(iter(self._cache)))  # drop the oldest entry
            stats = fid_features_to_statistics(feats)  # {"mu": (D,), "sigma": (D, D)}
            self._cache[digest] = ReferenceFeatures(feats, stats, digest)
        return self._cache[digest]


def _check_inception_file(path: Path) -> None:
    """Refuse a missing file or one that is not a plain tensor state dict (no pickled code)."""
    if not path.is_file():
        raise ValueError(f"inception_weights file {str(path)!r} does not exist (InceptionV3 "
                         "weights are not downloaded here; pass a local torch-fidelity .pth file)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"inception_weights file {str(path)!r} is not a plain state dict: {err}"
                         ) from err
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"inception_weights file {str(path)!r} is not a tensor state dict")


def build_extractor(config: FidelityConfig,
                    feature_net: FeatureNet | str | Path | None = None) -> FidelityExtractor:
    """The extractor ``config`` names; all file and argument checks happen here, before compute.

    Args:
        feature_net: for "classifier", a trained ``FeatureNet`` or a ``save_feature_net`` path.
    """
    if not isinstance(config, FidelityConfig):
        raise ValueError(f"config must be a FidelityConfig, got {type(config).__name__}")
    from torch_fidelity.utils import create_feature_extractor

    cuda = resolve_device(config.device).type == "cuda"
    if config.extractor == "inception":
        path = Path(config.inception_weights)
        _check_inception_file(path)
        try:
            with seeded():  # InceptionV3 draws a random init before its weights load
                module = create_feature_extractor(INCEPTION_NAME, ["2048"], cuda=cuda,
                                                  feature_extractor_weights_path=str(path),
                                                  verbose=False)
        except RuntimeError as err:  # load_state_dict: missing / unexpected / mis-shaped keys
            raise ValueError(f"inception_weights file {str(path)!r} does not match "
                             f"torch-fidelity's InceptionV3: {err}") from err
        return FidelityExtractor(config, module, "2048")
    if feature_net is None:
        raise ValueError("extractor 'classifier' needs feature_net: a trained FeatureNet "
                         "(boss_core.features.train_feature_net) or a save_feature_net file")
    if isinstance(feature_net, (str, Path)):
        feature_net = load_feature_net(feature_net)
    register_classifier_extractor()
    module = create_feature_extractor(CLASSIFIER_NAME, ["features"], cuda=cuda,
                                      feature_net=feature_net, verbose=False)
    return FidelityExtractor(config, module, "features")


def fid_kid(samples: Tensor, reference: Tensor | ReferenceFeatures,
            extractor: FidelityExtractor) -> dict[str, float]:
    """FID, KID and KID's subset std of ``samples`` (M, C, H, W) against ``reference``.

    Args:
        reference: (M_ref, C, H, W) images (features cached in ``extractor``) or
            ``extractor.reference(images)``.
    Returns:
        {"fid": float, "kid": float, "kid_std": float}.
    Raises:
        ValueError: either set smaller than ``kid_subset_size`` (before any compute).
    """
    n_ref = reference.features.shape[0] if isinstance(reference, ReferenceFeatures) else (
        reference.shape[0])
    _check_sizes(samples.shape[0], n_ref, extractor.config.kid_subset_size)
    ref = reference if isinstance(reference, ReferenceFeatures) else extractor.reference(reference)
    return fid_kid_features(extractor.features(samples), ref, extractor.config)


def _check_sizes(n_samples: int, n_ref: int, m: int) -> None:
    for what, count in (("samples", n_samples), ("reference", n_ref)):
        if count < m:
            raise ValueError(f"kid_subset_size={m} is larger than the {count} {what}; "
                             f"lower kid_subset_size or pass more {what}")


def fid_kid_features(feats: Tensor, reference: ReferenceFeatures,
                     config: FidelityConfig) -> dict[str, float]:
    """``fid_kid`` from features already extracted: (M, D) float32 against the reference's.

    Sharded evaluation extracts features on the workers (``FidelityExtractor.features``) and
    scores the merged (M, D) here, so only features travel, never images.
    """
    from torch_fidelity.metric_fid import (
        KEY_METRIC_FID,
        fid_features_to_statistics,
        fid_statistics_to_metric,
    )
    from torch_fidelity.metric_kid import (
        KEY_METRIC_KID_MEAN,
        KEY_METRIC_KID_STD,
        kid_features_to_metric,
    )

    m = config.kid_subset_size
    _check_sizes(feats.shape[0], reference.features.shape[0], m)
    fid = fid_statistics_to_metric(fid_features_to_statistics(feats), reference.fid_stats,
                                   False)
    # float64 kernels: float32 sums of ~m^2 kernel values lose KID's small differences
    kid = kid_features_to_metric(feats.double(), reference.features.double(),
                                 kid_subsets=config.kid_subsets, kid_subset_size=m,
                                 rng_seed=KID_SEED, verbose=False)
    return {"fid": float(fid[KEY_METRIC_FID]), "kid": float(kid[KEY_METRIC_KID_MEAN]),
            "kid_std": float(kid[KEY_METRIC_KID_STD])}


def fid_kid_over_seeds(samples_per_seed: Sequence[Tensor], reference: Tensor,
                       extractor: FidelityExtractor) -> dict[str, float]:
    """``fid_kid`` per seed, then ``metrics.aggregate``: mean, population std and n_seeds.

    Returns:
        {"fid", "fid_std", "kid", "kid_std", "kid_subset_std", "kid_subset_std_std", "n_seeds"}:
        here ``kid_std`` is the std of KID across seeds; torch-fidelity's within-seed subset std
        (``fid_kid``'s "kid_std") is renamed ``kid_subset_std`` and averaged over seeds.

    Raises:
        ValueError: the number of sample sets differs from ``config.n_seeds``.
    """
    n_seeds = extractor.config.n_seeds
    if len(samples_per_seed) != n_seeds:
        raise ValueError(f"n_seeds={n_seeds} but {len(samples_per_seed)} sample sets were given")
    ref = reference if isinstance(reference, ReferenceFeatures) else extractor.reference(reference)
    rows = []
    for samples in samples_per_seed:
        row = fid_kid(samples, ref, extractor)
        rows.append({"fid": row["fid"], "kid": row["kid"], "kid_subset_std": row["kid_std"]})
    return aggregate(rows)
