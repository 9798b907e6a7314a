"""Bring your own model: import a network class by path, load a state_dict file, wrap an adapter.

The params.yaml ``model`` section names an external network with ``arch: import``,
``import_path: "package.module:ClassName"`` and ``init_kwargs``; ``adapter`` converts the
network's time/output convention to boss's ``v(x, t)`` (t in [0, 1], 0 noise, 1 data); and
``weights`` points at a pretrained state_dict file.

Weights belong to the UNWRAPPED network: an adapter holds its network as ``.net``, which
prefixes every state_dict key with ``net.``, so ``build_pretrained`` loads the file into the
inner network first and wraps it afterwards. A user's own checkpoint (``net.state_dict()``)
therefore loads as saved; to save a boss-built model for reuse, save
``inner_network(model).state_dict()``.

This is the only place in ``boss_core.models`` that reads files (``load_state_dict_file``).
Pickle files are read with ``torch.load(weights_only=True)``: tensors and plain containers
only, never arbitrary objects.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..denoisers import DenoiserAdapter, DenoiserConfig
from ..velocity import DiffusersFlowAdapter, RectifiedFlowAdapter

ADAPTERS = ("plain", "rectified_flow", "diffusers", "denoiser")

_IDENT = r"[A-Za-z_]\w*"
# "pkg.mod:Name" or "pkg.mod:Outer.Inner" (colon form) or "pkg.mod.Name" (last dot splits)
IMPORT_PATH = re.compile(rf"^{_IDENT}(\.{_IDENT})*(:{_IDENT}(\.{_IDENT})*|\.{_IDENT})$")
_CHECKPOINT_KEYS = ("state_dict", "model")  # containers that hold the state_dict itself

__all__ = [
    "ADAPTERS",
    "IMPORT_PATH",
    "import_object",
    "inner_network",
    "load_state_dict_file",
    "load_weights",
    "wrap_adapter",
]


def import_object(path: str) -> Any:
    """Return the callable named by ``path``: "package.module:Name" or "package.module.Name".

    The colon form may name a nested attribute ("pkg.mod:Outer.Inner"); the dotted form splits
    at the last dot. The object must be callable (a class or a factory function); whether it
    builds an ``nn.Module`` is checked by ``build_model``.

    Raises:
        ValueError naming the path if it is malformed, the module cannot be imported, the
        attribute is missing or the object is not callable.
    """
    if not isinstance(path, str) or not IMPORT_PATH.match(path):
        raise ValueError(
            f"import_path must look like 'package.module:ClassName' or "
            f"'package.module.ClassName', got {path!r}")
    if ":" in path:
        module_name, attr_path = path.split(":", 1)
    else:
        module_name, attr_path = path.rsplit(".", 1)
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # missing module, or the module itself failed to import
        raise ValueError(
            f"import_path {path!r}: cannot import module {module_name!r} "
            f"({type(err).__name__}: {err})") from err
    obj: Any = module
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise ValueError(
                f"import_path {path!r}: module {module_name!r} has no attribute {attr_path!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(
            f"import_path {path!r} names a {type(obj).__name__}, not an nn.Module class or "
            f"a callable that builds one")
    return obj


def load_state_dict_file(path: str | Path) -> dict[str, Tensor]:
    """Read a state_dict file onto the CPU.

    ``*.safetensors`` files are read with safetensors; anything else (.pt, .pth, ...) with
    ``torch.load(weights_only=True)``, which refuses pickled objects other than tensors and
    plain containers. A checkpoint dict holding the state_dict under "state_dict" or "model"
    (checked in that order) is unwrapped.

    Raises:
        ValueError naming the file if it is missing, unreadable, corrupt, holds non-tensor
        objects, or is not a mapping of str keys to tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"weights file {str(path)!r} does not exist or is not a file")
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path), device="cpu")
        except Exception as err:  # header, JSON and data errors all mean a bad file
            raise ValueError(
                f"weights file {str(path)!r} is not a readable safetensors file "
                f"({type(err).__name__}: {err})") from err
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # corrupt archive, truncated file, or disallowed objects
            raise ValueError(
                f"weights file {str(path)!r} could not be read with "
                f"torch.load(weights_only=True): it is corrupt, not a torch file, or holds "
                f"objects other than tensors ({type(err).__name__}: {err})") from err
    if isinstance(state, Mapping):
        for key in _CHECKPOINT_KEYS:
            if isinstance(state.get(key), Mapping):
                state = state[key]
                break
    if not isinstance(state, Mapping) or not state:
        raise ValueError(
            f"weights file {str(path)!r} does not hold a state_dict (a non-empty mapping of "
            f"parameter names to tensors); found {type(state).__name__}")
    bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise ValueError(
            f"weights file {str(path)!r} does not hold a state_dict: entries {bad[:5]!r} "
            f"are not str -> tensor")
    return dict(state)


def load_weights(
    model: nn.Module, state_dict: Mapping[str, Tensor], *, source: str | Path | None = None
) -> nn.Module:
    """Load ``state_dict`` into ``model`` strictly (same keys, same shapes); returns ``model``.

    Args:
        source: where the state_dict came from (e.g. the file), named in errors.
    Raises:
        ValueError naming the model (and ``source``) listing missing and unexpected keys, or
        the shape mismatches.
    """
    where = f" from {str(source)!r}" if source is not None else ""
    name = type(model).__name__
    expected = set(model.state_dict())
    given = set(state_dict)
    missing, unexpected = sorted(expected - given), sorted(given - expected)
    if missing or unexpected:
        hint = ""
        if unexpected and all(k.startswith("net.") for k in unexpected):
            hint = (" (keys start with 'net.': saved from an adapter-wrapped model? save "
                    "inner_network(model).state_dict() instead)")
        raise ValueError(
            f"weights{where} do not match {name}: missing keys {_short(missing)}, "
            f"unexpected keys {_short(unexpected)}{hint}")
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as err:  # size mismatches
        raise ValueError(f"weights{where} do not fit {name}: {err}") from err
    return model


def wrap_adapter(net: nn.Module, adapter: str,
                 denoiser: DenoiserConfig | None = None) -> nn.Module:
    """Wrap ``net`` so it follows boss's ``v(x, t)`` convention.

    "plain" returns ``net`` itself (it already is v(x, t) with t in [0, 1]);
    "rectified_flow" gives ``RectifiedFlowAdapter(net)``; "diffusers" gives
    ``DiffusersFlowAdapter(net)`` (see ``boss_core.velocity`` for their conventions);
    "denoiser" gives ``DenoiserAdapter(net, denoiser)``, a diffusion model's epsilon / x0 / v
    prediction on the linear path (``boss_core.denoisers``; ``denoiser`` None: its defaults).
    """
    if adapter == "plain":
        return net
    if adapter == "rectified_flow":
        return RectifiedFlowAdapter(net)
    if adapter == "diffusers":
        return DiffusersFlowAdapter(net)
    if adapter == "denoiser":
        return DenoiserAdapter(net, denoiser)
    raise ValueError(f"adapter must be one of {', '.join(ADAPTERS)}, got {adapter!r}")


def inner_network(model: nn.Module) -> nn.Module:
    """The network inside an adapter (``model.net``), or ``model`` itself if not wrapped.

    Its state_dict is the one ``ModelConfig.weights`` expects.
    """
    if isinstance(model, (RectifiedFlowAdapter, DiffusersFlowAdapter, DenoiserAdapter)):
        return model.net
    return model


def _short(keys: list[str], limit: int = 8) -> str:
    if len(keys) <= limit:
        return repr(keys)
    return f"{keys[:limit]!r} and {len(keys) - limit} more"
