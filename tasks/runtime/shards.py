"""Map a step's seed-range shards over the configured task runner (params ``scale``).

    runner: local   the shards run one after the other in the step's process (default)
    runner: dask    each shard is a Prefect task on prefect-dask's ``DaskTaskRunner``, inside a
                    sub-flow ``boss-<step>-shards``: a ``LocalCluster`` of ``scale.dask_workers``
                    processes, or the scheduler at ``BOSS_DASK_ADDRESS`` / ``scale.dask_address``

Shard functions are module-level functions of ``boss_core.shards`` (Dask pickles them by
reference), so a worker needs this project installed (``pip install -e .`` in its
environment) but no shared filesystem: the model travels with the task, the noise is rebuilt
from the seeds on the worker, and only the shard's result comes back. Each worker uses one
torch thread per Dask thread (two torch pools on one core slow both ~100x).
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

from boss_core.config import ScaleConfig
from boss_core.shards import Shard, aligned, shard_ranges

log = logging.getLogger("boss")
ADDRESS_ENV = "BOSS_DASK_ADDRESS"
# Dask's nanny sets MALLOC_TRIM_THRESHOLD_=65536 in every worker, which also freezes glibc's
# mmap threshold at 128 KiB: every larger tensor becomes a fresh mmap with page faults and
# torch runs ~2x slower than in-process (bench/dask_scaling.py). A 32 MiB mmap threshold
# undoes that; give workers you start yourself the same variable.
WORKER_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20)}


def dask_address(scale: ScaleConfig) -> str:
    """The scheduler to use: ``BOSS_DASK_ADDRESS``, else ``scale.dask_address`` ("" = local)."""
    address = os.environ.get(ADDRESS_ENV, "").strip() or scale.dask_address
    if address and "://" not in address:
        raise ValueError(f"{ADDRESS_ENV}={address!r} must look like tcp://host:port")
    return address


def check_scheduler(scale: ScaleConfig, timeout: float = 5.0) -> None:
    """ConnectionError naming the setting when the Dask scheduler does not answer."""
    address = dask_address(scale) if scale.runner == "dask" else ""
    if not address:
        return
    host_port = address.split("://", 1)[1].rstrip("/")
    host, _, port = host_port.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except (OSError, ValueError) as err:
        source = ADDRESS_ENV if os.environ.get(ADDRESS_ENV, "").strip() else "scale.dask_address"
        raise ConnectionError(f"Dask scheduler {address} ({source}) is unreachable: {err}") \
            from err


def shard_plan(scale: ScaleConfig, total: int, batch_size: int) -> list[Shard]:
    """The seed ranges of ``total`` samples (one shard for the local runner's default);
    checks first that a configured Dask scheduler answers."""
    check_scheduler(scale)
    workers = scale.dask_workers if scale.runner == "dask" else 1
    shards = shard_ranges(total, scale.shard_samples, batch_size, workers)
    if not aligned(shards, batch_size):
        log.warning("shards of %d samples are not whole batches of %d: results match a "
                    "single process to float32 rounding, not bit for bit",
                    scale.shard_samples, batch_size)
    return shards


def portable(model, scale: ScaleConfig):
    """What a shard receives: the model itself in-process; a CPU copy for Dask (a worker may
    have no GPU, and moves it to its own ``run.device``)."""
    import copy

    if scale.runner == "dask" and hasattr(model, "parameters"):
        return copy.deepcopy(model).cpu()
    return model


def _on_worker(fn: Callable, *args: Any, **kwargs: Any):
    """Run ``fn`` with as many torch threads as the Dask worker has threads."""
    import torch

    try:
        from distributed import get_worker

        torch.set_num_threads(max(1, int(get_worker().state.nthreads)))
    except (ImportError, ValueError, AttributeError):
        pass  # not on a Dask worker
    return fn(*args, **kwargs)


def map_shards(name: str, fn: Callable, shards: Sequence[Shard], scale: ScaleConfig,
               kwargs: dict[str, Any], progress: bool = True) -> list:
    """``[fn(start=s, count=n, **kwargs) for (s, n) in shards]``, on the configured runner.

    Results come back in shard order whatever order the workers finish in.
    """
    started = time.perf_counter()
    if scale.runner == "local" or len(shards) == 0:
        from tqdm.auto import tqdm

        out = [fn(start=s, count=n, **kwargs)
               for s, n in tqdm(shards, desc=f"{name} shards", disable=not progress or
                                len(shards) < 2)]
    else:
        out = _map_dask(name, fn, shards, scale, kwargs)
    log.info("%s: %d shard(s) on the %s runner in %.1f s", name, len(shards), scale.runner,
             time.perf_counter() - started)
    return out


def dask_runner(scale: ScaleConfig):
    """prefect-dask's task runner for ``scale``: an existing scheduler or a LocalCluster."""
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")  # workers inherit it
    logging.getLogger("distributed").setLevel(logging.WARNING)
    from prefect_dask import DaskTaskRunner

    address = dask_address(scale)
    if address:
        return DaskTaskRunner(address=address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": scale.dask_workers,
                                          "threads_per_worker": 1, "processes": True,
                                          "host": "127.0.0.1", "dashboard_address": None,
                                          "env": dict(WORKER_ENV)})


def _map_dask(name: str, fn: Callable, shards: Sequence[Shard], scale: ScaleConfig,
              kwargs: dict) -> list:
    from prefect import flow, task
    from prefect.cache_policies import NO_CACHE

    shard_task = task(_on_worker, name=f"{name}-shard", cache_policy=NO_CACHE)

    @flow(name=f"boss-{name}-shards", task_runner=dask_runner(scale), log_prints=True,
          validate_parameters=False)
    def shards_flow() -> list:
        futures = [shard_task.with_options(task_run_name=f"{name}-shard-{s}-{s + n - 1}")
                   .submit(fn, start=s, count=n, **kwargs) for s, n in shards]
        return [f.result() for f in futures]

    log.info("%s: %d shard(s) on Dask (%s)", name, len(shards),
             dask_address(scale) or f"LocalCluster of {scale.dask_workers} workers")
    with ExitStack() as stack:
        stack.enter_context(shared_prefect_api())
        return shards_flow()


@contextmanager
def shared_prefect_api() -> Iterator[None]:
    """Make sure the flow and its Dask workers report to ONE Prefect API.

    With ``PREFECT_API_URL`` set (a served deployment, ``make prefect``, or your own server)
    nothing changes; the workers of an existing cluster need the same variable. Without it,
    a temporary server on 127.0.0.1 runs for the duration and LocalCluster workers inherit its
    URL (otherwise each worker process would start a temporary server of its own).
    """
    from prefect.logging.handlers import APILogHandler
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if os.environ.get("PREFECT_API_URL"):  # also when set after prefect was imported
        with temporary_settings({PREFECT_API_URL: os.environ["PREFECT_API_URL"]}):
            yield
        return

    from .servers import prefect_server

    with tempfile.TemporaryDirectory(prefix="boss-prefect-") as home, \
            prefect_server(home=home) as url:
        os.environ["PREFECT_API_URL"] = url
        try:
            with temporary_settings({PREFECT_API_URL: url}):
                try:
                    yield
                finally:
                    APILogHandler().flush()  # before the server goes
        finally:
            os.environ.pop("PREFECT_API_URL", None)
