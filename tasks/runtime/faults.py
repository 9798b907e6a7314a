"""Deterministic fault injection for the crash tests (tests only: never set it in production).

    BOSS_FAULT="<point>:<n>" python -m tasks.<step> ...

kills the process with SIGKILL (no cleanup, no ``finally``, no atexit: as a power cut or the
OOM killer would) the ``n``-th time (1-based) this process reaches ``<point>``. Points:

    teacher.checkpoint        tasks/teacher.py, right after a checkpoint file was renamed into
                              place (n = 2: killed after the second checkpoint)
    straighten.checkpoint     tasks/straighten.py, right after boss_core.straighten saved
                              ``straighten.pt`` (counted over every K of the method)
    artifact.write            tasks/runtime/io.py ``atomic_path``, after the block wrote the
                              temporary
                              file and before the rename that makes it visible (mid-artifact);
                              counts every atomic write of the process
    artifact.write/<name>     the same, counting only writes of files called ``<name>``
                              (e.g. ``artifact.write/metrics.json:1``)

Counts live in this process only, so a rerun without the variable runs through. With
``BOSS_FAULT`` unset, ``fault_point`` costs one environment lookup. A malformed value raises
ValueError at the first point reached, so a typo in a test cannot pass silently.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

ENV = "BOSS_FAULT"
_counts: Counter[str] = Counter()


def parse(spec: str) -> tuple[str, int]:
    """``"teacher.checkpoint:2"`` -> ("teacher.checkpoint", 2); ValueError otherwise."""
    point, sep, count = spec.rpartition(":")
    if not sep or not point or not count.isdigit() or int(count) < 1:
        raise ValueError(f"{ENV}={spec!r} must look like <point>:<n> with n >= 1, "
                         "e.g. teacher.checkpoint:2")
    return point, int(count)


def fault_point(point: str, detail: str | None = None) -> None:
    """Count a visit to ``point`` (also known as ``point/detail``); SIGKILL on the n-th one."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    target, n = parse(spec)
    if target != point and (detail is None or target != f"{point}/{detail}"):
        return
    _counts[target] += 1
    if _counts[target] == n:
        os.kill(os.getpid(), signal.SIGKILL)
