"""The default FID feature network: a small CNN classifier trained on the dataset's labels.

FID/KID computed on the penultimate features of a classifier trained on the same data (the
"classifier FID" of small-image papers) is meaningful for 8x8 digits, where InceptionV3 (trained
on 299x299 photographs) is not. The network works for any (C, H, W): the convolutions keep the
resolution and an adaptive average pool brings every image size to 4x4 before the feature layer:

    x (B, C, H, W) -> conv3x3 32, ReLU -> conv3x3 64, ReLU -> adaptive avg pool 4x4 (B, 64, 4, 4)
      -> flatten (B, 1024) -> Linear(1024, F), ReLU = h (B, F) -> Linear(F, classes) = logits

The features are f = h / s, with the fixed scale s = sqrt(mean over training images and dims of
h^2) set once after training (a buffer, saved with the weights), so that a.b / F is O(1) like
InceptionV3's pool features: KID's cubic kernel (a.b / F + 1)^3 then works at its intended scale.

Training minimises cross-entropy with Adam on a random (seeded) split; step s draws its batch
from ``step_generator(seed, s)``, and the initial weights come from the seed too, so a run is a
function of (images, labels, config) on the CPU.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from .config import ConfigMixin, check_bool, check_device_name, check_int, check_number
from .device import resolve_device
from .seeds import sample_seed, seeded, step_generator

_STREAM_SPLIT, _STREAM_INIT = 2, 3  # seed streams of boss_core.seeds used here
_POOL = 4  # every image is pooled to _POOL x _POOL before the feature layer


@dataclass(frozen=True)
class FeatureNetConfig(ConfigMixin):
    """Training settings of the FID feature classifier (a ``features`` section of params.yaml).

    iterations / batch_size / lr: Adam steps, batch size and learning rate.
    holdout_fraction: share of the images held out to measure accuracy, in (0, 1).
    feature_dim: width F of the penultimate (feature) layer.
    The defaults reach about 98.9% held-out accuracy on the 8x8 digits in ~15 s on one CPU thread.
    """

    iterations: int = 800
    batch_size: int = 128
    lr: float = 2e-3
    holdout_fraction: float = 0.2
    feature_dim: int = 64
    seed: int = 0
    device: str = "auto"
    progress: bool = True

    def __post_init__(self):
        check_int("iterations", self.iterations, 1)
        check_int("batch_size", self.batch_size, 1)
        check_int("feature_dim", self.feature_dim, 1)
        check_int("seed", self.seed, 0)
        check_number("lr", self.lr, lambda v: v > 0, "> 0")
        check_number("holdout_fraction", self.holdout_fraction, lambda v: 0 < v < 1, "in (0, 1)")
        check_device_name(self.device)
        check_bool("progress", self.progress)


class FeatureNet(nn.Module):
    """The classifier; ``features(x)`` gives the (B, feature_dim) penultimate activations."""

    def __init__(self, in_channels: int, num_classes: int, feature_dim: int = 64):
        super().__init__()
        self.in_channels, self.num_classes, self.feature_dim = in_channels, num_classes, feature_dim
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(_POOL),  # (B, 64, 4, 4) for every H, W
            nn.Flatten(),  # (B, 1024)
            nn.Linear(64 * _POOL * _POOL, feature_dim), nn.ReLU(),
        )
        self.head = nn.Linear(feature_dim, num_classes)
        self.register_buffer("feature_scale", torch.ones(()))  # s of the module doc

    def arch(self) -> dict[str, int]:
        """The constructor arguments (saved beside the weights)."""
        return {"in_channels": self.in_channels, "num_classes": self.num_classes,
                "feature_dim": self.feature_dim}

    def features(self, x: Tensor) -> Tensor:
        """x: (B, C, H, W) float in [-1, 1] -> (B, feature_dim) features h / s (post-ReLU)."""
        return self.body(x) / self.feature_scale

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, C, H, W) -> (B, num_classes) logits (independent of feature_scale)."""
        return self.head(self.body(x))

    def logits_from_features(self, features: Tensor) -> Tensor:
        """(B, feature_dim) features -> (B, num_classes) logits."""
        return self.head(features * self.feature_scale)


@dataclass(frozen=True, eq=False)
class FeatureNetResult:
    """A trained feature classifier (in eval mode, on the training device) and its accuracy."""

    net: FeatureNet
    heldout_accuracy: float
    n_train: int
    n_heldout: int
    config: FeatureNetConfig
    wall_time_s: float


def _check_data(images: Tensor, labels: Tensor | None) -> None:
    if labels is None:
        raise ValueError("the FID feature network needs labels: it is a classifier trained on the "
                         "dataset's classes (pass labels, or use the 'inception' extractor)")
    if not isinstance(images, Tensor) or not images.is_floating_point() or images.dim() != 4:
        raise ValueError("images must be a floating tensor of shape (M, C, H, W)")
    if not isinstance(labels, Tensor) or labels.is_floating_point() or labels.shape != (
            images.shape[0],):
        raise ValueError(f"labels must be an integer tensor of shape ({images.shape[0]},)")
    if images.shape[0] < 2:
        raise ValueError(f"need at least 2 images to train and hold out, got {images.shape[0]}")
    if int(labels.min()) < 0:
        raise ValueError(f"labels must be >= 0, got {int(labels.min())}")


def train_feature_net(images: Tensor, labels: Tensor | None,
                      config: FeatureNetConfig) -> FeatureNetResult:
    """Train the classifier on a seeded (1 - holdout_fraction) split; report held-out accuracy.

    Args:
        images: (M, C, H, W) float in [-1, 1].
        labels: (M,) int64 class labels in [0, num_classes); num_classes = max(labels) + 1.
    Raises:
        ValueError: labels missing, bad shapes or config (before any compute).
    """
    if not isinstance(config, FeatureNetConfig):
        raise ValueError(f"config must be a FeatureNetConfig, got {type(config).__name__}")
    _check_data(images, labels)
    device = resolve_device(config.device)
    n = images.shape[0]
    n_heldout = min(n - 1, max(1, round(config.holdout_fraction * n)))
    split = torch.Generator().manual_seed(sample_seed(config.seed, 0, _STREAM_SPLIT))
    order = torch.randperm(n, generator=split)  # (M,)
    train_idx, held_idx = order[n_heldout:], order[:n_heldout]
    x_train = images[train_idx].to(device=device, dtype=torch.float32)  # (M_train, C, H, W)
    y_train = labels[train_idx].to(device=device, dtype=torch.long)  # (M_train,)

    with seeded(sample_seed(config.seed, 0, _STREAM_INIT)):  # global RNG untouched, locked
        net = FeatureNet(images.shape[1], int(labels.max()) + 1, config.feature_dim)
    net.to(device).train()
    optimizer = torch.optim.Adam(net.parameters(), lr=config.lr)
    started = time.perf_counter()
    bar = tqdm(range(config.iterations), disable=not config.progress, desc="feature net",
               dynamic_ncols=True)
    for step in bar:
        cut = 1.0 - 0.9 * step / config.iterations  # linear decay of the lr to 10%
        for group in optimizer.param_groups:
            group["lr"] = config.lr * cut
        index = torch.randint(x_train.shape[0], (config.batch_size,),
                              generator=step_generator(config.seed, step)).to(device)  # (B,)
        loss = F.cross_entropy(net(x_train[index]), y_train[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step + 1 == config.iterations:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    bar.close()
    net.eval()
    with torch.no_grad():  # s = RMS of the unscaled features over the training images
        h = torch.cat([net.body(x_train[i:i + 1024]) for i in range(0, x_train.shape[0], 1024)])
        net.feature_scale.fill_(float(h.pow(2).mean().sqrt().clamp_min(1e-12)))
    accuracy = classifier_accuracy(net, images[held_idx], labels[held_idx])
    return FeatureNetResult(net=net, heldout_accuracy=accuracy, n_train=int(train_idx.numel()),
                            n_heldout=n_heldout, config=config,
                            wall_time_s=time.perf_counter() - started)


@torch.no_grad()
def classifier_accuracy(net: FeatureNet, images: Tensor, labels: Tensor,
                        batch_size: int = 1024) -> float:
    """Fraction of ``images`` (M, C, H, W) whose argmax logit equals ``labels`` (M,)."""
    device = next(net.parameters()).device
    correct = 0
    for start in range(0, images.shape[0], batch_size):
        x = images[start:start + batch_size].to(device=device, dtype=torch.float32)
        pred = net(x).argmax(dim=1).cpu()  # (b,)
        correct += int((pred == labels[start:start + batch_size]).sum())
    return correct / max(1, images.shape[0])


def save_feature_net(net: FeatureNet, path: str | Path) -> None:
    """Write the weights (safetensors) with the architecture as JSON metadata; atomic rename."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "boss-feature-net",
                                           "arch": json.dumps(net.arch())})
    tmp.replace(path)


def load_feature_net(path: str | Path, device: str = "cpu") -> FeatureNet:
    """Read a ``save_feature_net`` file (no pickle: safetensors + JSON) into an eval-mode net.

    Raises:
        ValueError: missing, corrupt or not-a-feature-net file, naming the file.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"feature net file {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            meta = handle.metadata() or {}
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
        if meta.get("format") != "boss-feature-net":
            raise ValueError("no 'boss-feature-net' format tag in its metadata")
        arch = json.loads(meta["arch"])
        with seeded():  # the throw-away init still draws from the global RNG
            net = FeatureNet(int(arch["in_channels"]), int(arch["num_classes"]),
                             int(arch["feature_dim"]))
        net.load_state_dict(tensors)
    except Exception as err:  # safetensors, JSON, key and shape errors all mean a bad file
        raise ValueError(f"feature net file {str(path)!r} is corrupt or mismatching: {err}"
                         ) from err
    return net.to(resolve_device(device)).eval()


@torch.no_grad()
def predict_from_features(net: FeatureNet, features: Tensor, batch_size: int = 4096) -> Tensor:
    """(M, feature_dim) features f = h / s (``features``, as the FID extractor gives them)
    -> (M,) int64 argmax classes of ``head(f s)``, on the CPU."""
    device = next(net.parameters()).device
    parts = [net.logits_from_features(features[i:i + batch_size].to(device, torch.float32))
             .argmax(dim=1).cpu() for i in range(0, features.shape[0], batch_size)]
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)
