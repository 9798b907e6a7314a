"""Velocity networks and their config: ``ModelConfig`` -> ``build_model``.

Every network is a velocity model ``v(x, t, y=None)`` with x of shape (B, *data_shape), t of
shape (B,) in [0, 1] (0 noise, 1 data) and optional int64 class labels y of shape (B,).
External networks (arch "import") reach that convention through an adapter; see
``boss_core.models.external``.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from torch import nn

from ..config import ConfigMixin, check_int
from ..denoisers import DenoiserConfig
from ..seeds import seeded
from .external import (
    ADAPTERS,
    IMPORT_PATH,
    import_object,
    inner_network,
    load_state_dict_file,
    load_weights,
    wrap_adapter,
)
from .mlp import ConditionEmbedding, VelocityMLP, fourier_time_features
from .unet import VelocityUNet

BUILTIN_ARCHITECTURES = ("mlp", "unet")
ARCHITECTURES = (*BUILTIN_ARCHITECTURES, "import")

__all__ = [
    "ADAPTERS",
    "ARCHITECTURES",
    "BUILTIN_ARCHITECTURES",
    "ConditionEmbedding",
    "DenoiserConfig",
    "ModelConfig",
    "VelocityMLP",
    "VelocityUNet",
    "build_model",
    "build_pretrained",
    "count_parameters",
    "fourier_time_features",
    "import_object",
    "inner_network",
    "load_state_dict_file",
    "load_weights",
    "wrap_adapter",
]


@dataclass(frozen=True)
class ModelConfig(ConfigMixin):
    """The ``model`` section of params.yaml.

    arch: "mlp" (``VelocityMLP``; uses hidden, depth) or "unet" (``VelocityUNet``; uses
    base_channels, channel_mults, num_res_blocks). time_embed_dim and num_classes apply to both;
    num_classes = None builds an unconditional network.

    arch "import" builds a user's network: ``import_path`` ("package.module:ClassName" or
    "package.module.ClassName") is called with ``init_kwargs`` (the only constructor
    arguments; data_shape and the builtin fields above are not passed). num_classes then only
    records whether the network takes labels ``y``. import_path and init_kwargs must be unset
    for the builtin arches.

    adapter (any arch): "plain" (the network already is v(x, t), t in [0, 1], 0 noise),
    "rectified_flow" (``RectifiedFlowAdapter``), "diffusers" (``DiffusersFlowAdapter``) or
    "denoiser" (``boss_core.denoisers.DenoiserAdapter``: a diffusion model's epsilon / x0 / v
    prediction, configured by ``denoiser``, a ``DenoiserConfig`` or its mapping, which must keep
    its defaults with any other adapter). The wrapped model keeps its network as ``.net``
    (state_dict keys gain a "net." prefix).

    weights: a pretrained state_dict file (.safetensors, or .pt/.pth read with
    ``torch.load(weights_only=True)``) holding the UNWRAPPED network's keys. ``build_model``
    never reads it; ``build_pretrained`` builds, loads it into the inner network and wraps the
    adapter. A pipeline uses that instead of training a teacher when weights is set.

    Defaults: the digits teacher picked by bench/teacher_quality.py. With about 2 minutes of
    training on 2 CPU cores, the U-Net with 16 base channels and mults (1, 2) (131k parameters)
    gave a lower Frechet distance to the real digits than MLPs of 0.7M and 3.6M parameters and
    than a 32-channel U-Net. The MLP defaults (256 wide, 3 blocks) are the better of the MLPs;
    the MLP samples about 6x faster, so it suits 2-D sets and quick trials.
    """

    arch: str = "unet"
    hidden: int = 256
    depth: int = 3
    time_embed_dim: int = 128
    base_channels: int = 16
    channel_mults: tuple[int, ...] = (1, 2)
    num_res_blocks: int = 1
    num_classes: int | None = None
    import_path: str | None = None
    init_kwargs: dict[str, Any] | None = None
    adapter: str = "plain"
    denoiser: DenoiserConfig = DenoiserConfig()
    weights: str | None = None

    def __post_init__(self):
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"arch must be one of {', '.join(ARCHITECTURES)}, got {self.arch!r}")
        self._check_external()
        object.__setattr__(self, "channel_mults", tuple(self.channel_mults))
        for name in ("hidden", "depth", "base_channels", "num_res_blocks"):
            check_int(name, getattr(self, name), 1)
        check_int("time_embed_dim", self.time_embed_dim, 2)
        if self.time_embed_dim % 2:
            raise ValueError(f"time_embed_dim must be even, got {self.time_embed_dim}")
        if not self.channel_mults:
            raise ValueError("channel_mults must name at least one level")
        for mult in self.channel_mults:
            check_int("channel_mults entry", mult, 1)
        if self.num_classes is not None:
            check_int("num_classes", self.num_classes, 1)

    def _check_external(self) -> None:
        """Validate import_path, init_kwargs, adapter and weights (no import, no file access)."""
        if self.arch == "import":
            if self.import_path is None:
                raise ValueError("import_path must be set when arch is 'import' "
                                 "(e.g. 'package.module:ClassName')")
            if not isinstance(self.import_path, str) or not IMPORT_PATH.match(self.import_path):
                raise ValueError(
                    f"import_path must look like 'package.module:ClassName' or "
                    f"'package.module.ClassName', got {self.import_path!r}")
            if self.init_kwargs is not None:
                if not isinstance(self.init_kwargs, Mapping) or not all(
                        isinstance(k, str) and k.isidentifier() for k in self.init_kwargs):
                    raise ValueError(
                        f"init_kwargs must be a mapping of keyword-argument names to values, "
                        f"got {self.init_kwargs!r}")
                # a private copy: the frozen config must not change with the caller's dict
                object.__setattr__(self, "init_kwargs", copy.deepcopy(dict(self.init_kwargs)))
        else:
            if self.import_path is not None:
                raise ValueError(
                    f"import_path is only used with arch 'import', got {self.import_path!r} "
                    f"with arch {self.arch!r}")
            if self.init_kwargs is not None:
                raise ValueError(
                    f"init_kwargs is only used with arch 'import', got {self.init_kwargs!r} "
                    f"with arch {self.arch!r}")
        if self.adapter not in ADAPTERS:
            raise ValueError(f"adapter must be one of {', '.join(ADAPTERS)}, got {self.adapter!r}")
        if self.denoiser is None:
            object.__setattr__(self, "denoiser", DenoiserConfig())
        elif isinstance(self.denoiser, Mapping):
            object.__setattr__(self, "denoiser", DenoiserConfig.from_dict(self.denoiser))
        elif not isinstance(self.denoiser, DenoiserConfig):
            raise ValueError(f"denoiser must be a mapping of denoiser keys, got {self.denoiser!r}")
        if self.adapter != "denoiser" and self.denoiser != DenoiserConfig():
            default = DenoiserConfig().to_dict()
            changed = {k: v for k, v in self.denoiser.to_dict().items() if v != default[k]}
            raise ValueError(f"denoiser keys only apply with adapter 'denoiser', got adapter "
                             f"{self.adapter!r} with denoiser keys {changed}")
        if self.weights is not None:
            if isinstance(self.weights, os.PathLike):
                object.__setattr__(self, "weights", os.fspath(self.weights))
            if not isinstance(self.weights, str) or not self.weights.strip():
                raise ValueError(
                    f"weights must be a path to a state_dict file or None, got {self.weights!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain types (tuples become lists, denoiser a dict) that round-trip ``from_dict``."""
        return {**super().to_dict(), "denoiser": self.denoiser.to_dict()}

    def __hash__(self) -> int:
        # init_kwargs is a dict, so the generated field-tuple hash would fail
        return hash(tuple(_freeze(getattr(self, f.name)) for f in fields(self)))


def _freeze(value: Any) -> Any:
    """A hashable stand-in for ``value`` that is equal whenever the values are equal."""
    if isinstance(value, Mapping):
        return ("<map>", frozenset((_freeze(k), _freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, (set, frozenset)):
        return frozenset(_freeze(v) for v in value)
    try:
        hash(value)
    except TypeError:
        return repr(value)
    return value




def build_model(
    config: ModelConfig, data_shape: tuple[int, ...], *, seed: int | None = None
) -> nn.Module:
    """Build the freshly initialised network of ``config`` for samples of shape ``data_shape``.

    arch "import" calls ``import_object(config.import_path)(**config.init_kwargs)``; the
    result is then wrapped by ``wrap_adapter(net, config.adapter)`` for every arch ("plain"
    returns the network itself). ``config.weights`` is NOT read here (no file I/O): use
    ``build_pretrained`` for that.

    Args:
        data_shape: per-sample shape, e.g. (2,) for 2-D sets or (C, H, W) for images.
        seed: if given, the weights are initialised from ``torch.manual_seed(seed)`` inside a
            forked RNG, so the result is the same whatever the global RNG state and the global
            state is left untouched. Without a seed the init draws from the global RNG. Either
            way the construction holds ``seeds.GLOBAL_RNG_LOCK`` (``seeds.seeded``), so builds in
            concurrent threads do not interleave their draws.
    Raises:
        ValueError for a bad import_path, or if it does not build an ``nn.Module``.
    """
    if config.arch not in ARCHITECTURES:
        raise ValueError(f"arch must be one of {', '.join(ARCHITECTURES)}, got {config.arch!r}")
    data_shape = tuple(int(s) for s in data_shape)
    if config.arch == "unet" and len(data_shape) != 3:
        raise ValueError(f"arch 'unet' needs image data (C, H, W), got data_shape {data_shape}")
    factory = import_object(config.import_path) if config.arch == "import" else None
    with seeded(seed):  # one construction at a time draws from the global RNG
        net = _construct(config, data_shape, factory)
    return wrap_adapter(net, config.adapter, config.denoiser)


def _construct(config: ModelConfig, data_shape: tuple[int, ...], factory: Any) -> nn.Module:
    if factory is not None:
        kwargs = copy.deepcopy(config.init_kwargs or {})
        try:
            net = factory(**kwargs)
        except TypeError as err:
            raise ValueError(
                f"import_path {config.import_path!r} could not be called with init_kwargs "
                f"{kwargs!r}: {err}") from err
        if not isinstance(net, nn.Module):
            raise ValueError(
                f"import_path {config.import_path!r} built a {type(net).__name__}, "
                f"not a torch.nn.Module")
        return net
    if config.arch == "mlp":
        return VelocityMLP(
            data_shape,
            hidden=config.hidden,
            depth=config.depth,
            time_embed_dim=config.time_embed_dim,
            num_classes=config.num_classes,
        )
    return VelocityUNet(
        data_shape[0],
        base_channels=config.base_channels,
        channel_mults=config.channel_mults,
        num_res_blocks=config.num_res_blocks,
        time_embed_dim=config.time_embed_dim,
        num_classes=config.num_classes,
    )


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def build_pretrained(
    config: ModelConfig, data_shape: tuple[int, ...], *, seed: int | None = None
) -> nn.Module:
    """Build the network of ``config``, load ``config.weights`` into it and wrap its adapter.

    The weights go into the unwrapped network, so their keys are the network's own (no
    ``net.`` prefix). ``seed`` only matters for state not in the file (e.g. non-persistent
    buffers). Returns the model in eval mode on the CPU.

    Raises:
        ValueError if ``config.weights`` is None, or as ``load_state_dict_file`` and
        ``load_weights`` do (naming the file).
    """
    if config.weights is None:
        raise ValueError("weights must name a state_dict file for build_pretrained, got None")
    state = load_state_dict_file(config.weights)
    net = build_model(replace(config, adapter="plain", denoiser=DenoiserConfig()), data_shape,
                      seed=seed)
    load_weights(net, state, source=config.weights)
    return wrap_adapter(net, config.adapter, config.denoiser).eval()
