"""Shared pieces of the frozen config dataclasses (one per params.yaml section).

Each config validates its values in ``__post_init__`` (before any compute) and is built from
a mapping by ``from_dict``, which rejects unknown keys by name.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

_DEVICE_NAME = re.compile(r"^(cpu|auto|cuda|cuda:\d+)$")


def check_int(name: str, value: Any, minimum: int) -> None:
    """Raise ValueError naming ``name`` unless value is an int (not bool) >= minimum."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def check_number(name: str, value: Any, ok: Callable[[float], bool], rule: str) -> None:
    """Raise ValueError naming ``name`` unless value is a finite number satisfying ``ok``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number {rule}, got {value!r}")
    if not math.isfinite(value) or not ok(float(value)):
        raise ValueError(f"{name} must be {rule}, got {value!r}")


def check_device_name(device: object) -> None:
    """Raise ValueError unless ``device`` is 'cpu', 'cuda', 'cuda:<index>' or 'auto'."""
    if not isinstance(device, str) or not _DEVICE_NAME.match(device.strip().lower()):
        raise ValueError(f"device must be 'cpu', 'cuda', 'cuda:<index>' or 'auto', got {device!r}")


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool, got {value!r}")


class ConfigMixin:
    """``from_dict`` / ``to_dict`` for frozen config dataclasses."""

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]):
        """Build from a mapping (a params.yaml section); unknown keys raise ValueError."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"unknown {cls.__name__} key(s) {unknown}; known keys: {sorted(known)}")
        return cls(**dict(values))

    def to_dict(self) -> dict[str, Any]:
        """Plain types (tuples become lists) that round-trip through ``from_dict``."""
        return {k: list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(self).items()}


@dataclass(frozen=True)
class RunConfig(ConfigMixin):
    """The ``run`` section of params.yaml: settings shared by every step.

    experiment: the MLflow experiment name. device: "cpu", "cuda", "cuda:<i>" or "auto"; it
    fills every section's ``device`` that params.yaml leaves out. progress: tqdm bars (also
    filled into the sections). register_models: put the straightened models in the MLflow
    model registry.
    """

    experiment: str = "boss"
    device: str = "auto"
    progress: bool = True
    register_models: bool = True

    def __post_init__(self):
        if not isinstance(self.experiment, str) or not self.experiment.strip():
            raise ValueError(f"experiment must be a non-empty name, got {self.experiment!r}")
        check_device_name(self.device)
        check_bool("progress", self.progress)
        check_bool("register_models", self.register_models)


RUNNERS = ("local", "dask")


@dataclass(frozen=True)
class ScaleConfig(ConfigMixin):
    """The ``scale`` section of params.yaml: where sharded work and fine-tuning run.

    Only placement, never the math: every setting here leaves the results equal (see
    tests/test_dask.py and tests/test_ddp.py for the tolerances).

    Sharded work (teacher trajectories + cost, training pairs, evaluation sampling) is split
    into seed ranges of ``shard_samples`` samples (0: one shard per ``dask_workers``, rounded up
    to a multiple of ``sweep.batch_size``, or one shard with runner "local").
    runner: "local" runs the shards one after the other in the step's process; "dask" maps them
    as Prefect tasks on prefect-dask's ``DaskTaskRunner``: a ``LocalCluster`` of ``dask_workers``
    processes, or the existing scheduler at ``dask_address`` ("tcp://host:8786"; the
    ``BOSS_DASK_ADDRESS`` environment variable wins over params).

    Fine-tuning (straighten, reflow, distill) runs under ``torchrun`` when ``nnodes *
    nproc_per_node > 1``: DistributedDataParallel (gloo on the CPU, NCCL on GPUs) with the
    global batch ``straighten.batch_size`` split across ranks. ``rdzv_endpoint`` ("host:port")
    is the c10d rendezvous of a multi-node job ("" on one node: a free local port); every node
    runs the same command with the same ``rdzv_id``.

    flow_concurrency: how many independent steps the Prefect flow ``flows.pipeline`` runs at
    once (teacher beside features, the straightening methods beside each other); 1 runs them
    one after the other in dvc.yaml's order. Each step then gets ``torch.get_num_threads() //
    flow_concurrency`` intra-op threads (at least 1). ``dvc repro`` runs its stages one at a
    time whatever this says.
    """

    runner: str = "local"
    dask_address: str = ""
    dask_workers: int = 2
    shard_samples: int = 0
    nproc_per_node: int = 1
    nnodes: int = 1
    rdzv_endpoint: str = ""
    rdzv_id: str = "boss"
    flow_concurrency: int = 1

    def __post_init__(self):
        if self.runner not in RUNNERS:
            raise ValueError(f"runner must be one of {RUNNERS}, got {self.runner!r}")
        for name in ("dask_address", "rdzv_endpoint", "rdzv_id"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a string, got {getattr(self, name)!r}")
        if self.dask_address and "://" not in self.dask_address:
            raise ValueError(f"dask_address must look like tcp://host:port, got "
                             f"{self.dask_address!r}")
        if self.rdzv_endpoint and ":" not in self.rdzv_endpoint:
            raise ValueError(f"rdzv_endpoint must look like host:port, got "
                             f"{self.rdzv_endpoint!r}")
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ValueError("rdzv_endpoint is needed when nnodes > 1 (host:port of the "
                             "rendezvous every node reaches)")
        if not self.rdzv_id.strip():
            raise ValueError("rdzv_id must be a non-empty name")
        for name, low in (("dask_workers", 1), ("shard_samples", 0), ("nproc_per_node", 1),
                          ("nnodes", 1), ("flow_concurrency", 1)):
            check_int(name, getattr(self, name), low)

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc_per_node
