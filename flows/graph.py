"""Run the pipeline's steps as a graph: each step once the steps whose outputs it reads are
done, at most ``concurrency`` at once, on Prefect's ``ThreadPoolTaskRunner``.

``flows.pipeline`` lists the steps in dvc.yaml's order with their ``after`` (the stages whose
outputs dvc.yaml lists among the step's deps). With concurrency 1 that order is the run order.
With more, a step starts as soon as its inputs are done and a worker is free; among the ready
steps the earlier one in the list goes first. Every step is a Prefect task run of the flow run
(submitted with ``wait_for`` its upstream futures, so the UI draws the graph).

A failed step fails the run: no further step starts, the steps already running finish (a
thread cannot be stopped), then the first failure is raised.

Threads: torch's intra-op pool is process-wide, so concurrent steps share it. With
``concurrency`` c > 1 each step gets ``torch.get_num_threads() // c`` threads (at least 1) for
the run, so c steps do not oversubscribe the cores, and the count is restored afterwards;
c = 1 leaves it alone. The results of c steps at once equal those of one step at a time at
equal threads per step, bit for bit on the CPU (tests/test_flow.py); a different thread count
may change float rounding, as it would in any torch program.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("boss")


@dataclass(frozen=True)
class Step:
    """One task of the graph: ``task(*args)`` once every step named in ``after`` is done.

    ``exclusive``: the step runs alone (a torchrun launch sized for the whole machine).
    """

    name: str
    task: Any  # a prefect Task, or a tasks.runtime.step.StepTask (built on submission)
    args: tuple = ()
    after: tuple[str, ...] = ()
    exclusive: bool = False


def check_graph(steps: Sequence[Step]) -> None:
    """Names are unique and every ``after`` names an earlier step (so the list order is a
    valid run order); raises ValueError naming the step."""
    seen: set[str] = set()
    for step in steps:
        if step.name in seen:
            raise ValueError(f"step {step.name!r} is listed twice")
        missing = [name for name in step.after if name not in seen]
        if missing:
            raise ValueError(f"step {step.name!r} runs after {missing}, which are not listed "
                             "before it")
        seen.add(step.name)


@contextmanager
def torch_threads_per_step(concurrency: int) -> Iterator[int]:
    """Split torch's process-wide intra-op threads between ``concurrency`` steps; yields the
    threads per step. Worker threads started inside take the new count (torch reads it when a
    thread first runs a parallel op)."""
    import torch

    before = torch.get_num_threads()
    if concurrency == 1:
        yield before
        return
    per_step = max(1, before // concurrency)
    torch.set_num_threads(per_step)
    try:
        yield per_step
    finally:
        torch.set_num_threads(before)


def _prefect_task(task: Any):
    build = getattr(type(task), "build", None)  # a StepTask builds its Prefect task lazily
    return build(task) if build is not None else task


def run_graph(steps: Sequence[Step], concurrency: int = 1) -> dict[str, Any]:
    """Run every step as a Prefect task run of the current flow run; returns {name: result}.

    Raises the first failure once the steps already running have finished.
    """
    from concurrent.futures import FIRST_COMPLETED, wait

    from prefect.task_runners import ThreadPoolTaskRunner
    from prefect.utilities.callables import get_call_parameters

    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
        raise ValueError(f"concurrency must be an integer >= 1, got {concurrency!r}")
    check_graph(steps)
    pending, futures, running = list(steps), {}, {}
    results: dict[str, Any] = {}
    failure: BaseException | None = None
    with torch_threads_per_step(concurrency) as threads, \
            ThreadPoolTaskRunner(max_workers=concurrency) as runner:
        if concurrency > 1:
            log.info("flow: up to %d steps at once, %d torch thread(s) each", concurrency,
                     threads)
        while True:
            ready = _ready(pending, results, running, concurrency) if failure is None else []
            for step in ready:
                task = _prefect_task(step.task)
                parameters = get_call_parameters(task.fn, step.args, {})
                future = runner.submit(task, parameters,
                                       wait_for=[futures[name] for name in step.after])
                futures[step.name] = future
                running[future.wrapped_future] = (step, future)
                pending.remove(step)
            if not running:
                break
            done, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for finished in done:
                step, future = running.pop(finished)
                try:
                    results[step.name] = future.result()
                except BaseException as err:  # noqa: BLE001 - re-raised below
                    log.error("step %s failed: %s", step.name, err)
                    failure = failure or err
    if failure is not None:
        if pending:
            log.error("not started after the failure: %s", ", ".join(s.name for s in pending))
        raise failure
    return results


def _ready(pending: list[Step], done: dict[str, Any], running: dict,
           concurrency: int) -> list[Step]:
    """The pending steps to start now, in list order: inputs done, a worker free, and an
    exclusive step only when nothing else runs (and then alone)."""
    chosen: list[Step] = []
    busy = len(running)
    exclusive = any(step.exclusive for step, _ in running.values())
    for step in pending:
        if exclusive or busy + len(chosen) >= concurrency:
            break
        if not all(name in done for name in step.after):
            continue
        if step.exclusive:
            if busy or chosen:
                break  # wait until the others finish; nothing overtakes it
            return [step]
        chosen.append(step)
    return chosen
