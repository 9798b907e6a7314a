"""LoRA straightening with peft: rank-r adapters on every Linear and Conv2d layer.

A LoRA layer replaces W by W + (alpha / r) B A with A: (r, fan_in), B: (fan_out, r), B = 0 at
the start, so the wrapped model starts exactly at the teacher. Only A and B train.
"""

from __future__ import annotations

import copy
import os

from torch import nn

from .seeds import seeded

LORA_LAYERS = (nn.Linear, nn.Conv2d)


def lora_targets(model: nn.Module) -> dict[str, int]:
    """Names of the Linear/Conv2d layers and the largest rank each allows, min(fan_in, fan_out)."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            out[name] = min(module.in_features, module.out_features)
        elif isinstance(module, nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1]
            out[name] = min(module.in_channels // module.groups * k, module.out_channels)
    return out


def check_lora_rank(model: nn.Module, rank: int) -> dict[str, int]:
    """Validate ``rank`` before any compute and return each target layer's rank.

    A layer whose min(fan_in, fan_out) is below ``rank`` (e.g. a 1-channel output conv) gets
    that smaller rank; a rank above what every layer allows is an error.
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"LoRA rank must be an integer >= 1, got {rank!r}")
    targets = lora_targets(model)
    if not targets:
        raise ValueError("the model has no Linear or Conv2d layer to adapt with LoRA")
    largest = max(targets.values())
    if rank > largest:
        raise ValueError(f"LoRA rank {rank} exceeds what any layer allows (largest "
                         f"min(fan_in, fan_out) is {largest})")
    return {name: min(rank, limit) for name, limit in targets.items()}


def add_lora(model: nn.Module, rank: int = 4, alpha: float | None = None,
             dropout: float = 0.0, seed: int = 0) -> nn.Module:
    """A peft model wrapping a deep copy of ``model`` with rank-``rank`` LoRA on every
    Linear/Conv2d layer (alpha defaults to rank, i.e. scale alpha / r = 1; capped layers
    keep that scale). The base weights are frozen. A's random init comes from ``seed``, not
    from the global RNG, so the same call gives the same adapter."""
    from peft import LoraConfig, get_peft_model

    ranks = check_lora_rank(model, rank)
    alpha = float(alpha if alpha is not None else rank)
    capped = {name: r for name, r in ranks.items() if r < rank}
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout,
                        target_modules=sorted(ranks), rank_pattern=capped,
                        alpha_pattern={n: alpha * r / rank for n, r in capped.items()})
    with seeded(seed):  # A's init from seed alone; global RNG untouched, locked
        return get_peft_model(copy.deepcopy(model), config)


def trainable_fraction(model: nn.Module) -> tuple[int, int, float]:
    """(trainable parameters, all parameters, trainable / all)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total, trainable / total


def merge_lora(peft_model: nn.Module) -> nn.Module:
    """A plain module with W + (alpha / r) B A folded in (the peft model is left as it is)."""
    return copy.deepcopy(peft_model).merge_and_unload()


def save_lora_adapter(peft_model: nn.Module, directory: str | os.PathLike) -> None:
    """Write the adapter (adapter_model.safetensors + adapter_config.json) to ``directory``."""
    peft_model.save_pretrained(os.fspath(directory), safe_serialization=True)


def load_lora_adapter(base_model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Rebuild the peft model from a copy of the teacher and a saved adapter directory."""
    from peft import PeftModel

    path = os.fspath(directory)
    if not os.path.isfile(os.path.join(path, "adapter_config.json")):
        raise ValueError(f"no LoRA adapter in {path} (adapter_config.json is missing)")
    try:
        with seeded():  # the adapter's throw-away init still draws from the global RNG
            return PeftModel.from_pretrained(copy.deepcopy(base_model), path)
    except (RuntimeError, KeyError, ValueError) as err:
        raise ValueError(f"LoRA adapter in {path} does not match the model: {err}") from err
