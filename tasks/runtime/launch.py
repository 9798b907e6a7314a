"""Run a fine-tuning step on as many processes as params.yaml's ``scale`` section asks for.

    python -m tasks.runtime.launch straighten --method boss [--params params.yaml] [--set k=v ...]
        [--out DIR]

With ``scale.nnodes * scale.nproc_per_node == 1``, or for a method that ``sweep.methods`` does
not select (the step only marks it skipped), this is ``python -m tasks.straighten`` with the
same arguments, in this process. Otherwise it runs (a list, no shell)

    <venv>/bin/torchrun --nnodes NNODES --nproc_per_node NPROC --rdzv_backend c10d
        --rdzv_endpoint ENDPOINT --rdzv_id RDZV_ID -m tasks.straighten <the same arguments>

with ENDPOINT = ``scale.rdzv_endpoint``, or 127.0.0.1 and a free port on one node. Every rank
trains its share of each global batch (``straighten.batch_size`` stays the global batch, so
the results do not depend on the world size; it must be divisible by it, checked here before
anything starts); rank 0 alone writes outputs/ and checkpoints/ and logs to MLflow. The exit
code is torchrun's (or the step's); SIGTERM is passed on to torchrun, which stops its
workers (Ctrl-C reaches it from the terminal).

Several nodes: start the same command, in the same checkout and params, on every node, e.g.

    python -m tasks.runtime.launch straighten --method boss --set scale.nnodes=2 \\
        --set scale.nproc_per_node=4 --set scale.rdzv_endpoint=node0:29400

``rdzv_endpoint`` must be reachable from every node (the first node to arrive that runs on
that host serves the c10d rendezvous there); ``scale.rdzv_id`` tells concurrent jobs apart.
Rank 0 is on the node whose host name sorts first (torch's c10d rendezvous order), so give
every node the same ``--out`` on a shared filesystem (or run DVC on that node); the other
nodes need the step's inputs (outputs/pairs, teacher, schedules) but write nothing. The
checkpoint is read by rank 0 and sent to the others, so a resume needs it on rank 0's node
only. Placement settings are not DVC params of the stage: changing them does not rerun it.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import signal
import socket
import subprocess
import sys
from pathlib import Path

from boss_core.config import ScaleConfig
from boss_core.distributed import Dist

from .params import ParamsError, load_params, parse_override
from .step import setup_logging

log = logging.getLogger("boss")
STEPS = ("straighten",)  # the steps that train with DistributedDataParallel


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def build_command(scale: ScaleConfig, step: str, argv: list[str],
                  executable: str = sys.executable, port: int | None = None) -> list[str]:
    """The argv that runs ``python -m tasks.<step> <argv>`` on ``scale.world_size`` ranks.

    One rank: ``[python, -m, tasks.<step>, *argv]``. Several: torchrun (next to
    ``executable``) with the c10d rendezvous at ``scale.rdzv_endpoint`` or
    ``127.0.0.1:<port>`` (a free port when None).
    """
    if step not in STEPS:
        raise ValueError(f"unknown step {step!r}; known: {list(STEPS)}")
    module = f"tasks.{step}"
    if scale.world_size == 1:
        return [executable, "-m", module, *argv]
    endpoint = scale.rdzv_endpoint or f"127.0.0.1:{port or free_port()}"
    return [str(Path(executable).parent / "torchrun"),
            "--nnodes", str(scale.nnodes), "--nproc_per_node", str(scale.nproc_per_node),
            "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint, "--rdzv_id", scale.rdzv_id,
            "-m", module, *argv]


def run_child(cmd: list[str]) -> int:
    """Run ``cmd`` and wait; its exit code (128 + n when signal n ended it).

    SIGTERM is passed on to the child. SIGINT is ignored here while the child runs: Ctrl-C
    reaches the child from the terminal (same process group), and passing it on as well
    would interrupt torchrun's own shutdown of its workers.
    """
    child = subprocess.Popen(cmd)

    def forward(signum, frame):
        child.send_signal(signum)

    old = {signal.SIGTERM: signal.signal(signal.SIGTERM, forward),
           signal.SIGINT: signal.signal(signal.SIGINT, signal.SIG_IGN)}
    try:
        code = child.wait()
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        if child.poll() is None:
            child.kill()
            child.wait()
    return code if code >= 0 else 128 - code


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(
        prog="python -m tasks.runtime.launch", description=__doc__, allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Other arguments go to the step unchanged (python -m tasks.straighten --help).")
    p.add_argument("step", choices=STEPS, help="the step to run")
    p.add_argument("--method", default=None, help="passed on to the step")
    p.add_argument("--params", default="params.yaml", help="params file (default params.yaml)")
    p.add_argument("--out", default=None, help="passed on to the step")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="SECTION.KEY=VALUE",
                   help="override one params key (repeatable); applies to scale too")
    args, _ = p.parse_known_args(argv)
    at = argv.index(args.step)
    step_argv = argv[:at] + argv[at + 1:]  # the step reads --params, --set, --out as well
    setup_logging()
    try:
        params = load_params(args.params, dict(parse_override(o) for o in args.overrides))
        Dist(0, params.scale.world_size).rank_slice(params.straighten.batch_size)
    except (ParamsError, ValueError) as err:
        log.error("error: %s", " ".join(str(err).split()))
        return 2
    # one rank, or a method the sweep does not select (its step only marks it skipped)
    if params.scale.world_size == 1 or (
            args.method is not None and args.method not in params.sweep.methods):
        return importlib.import_module(f"tasks.{args.step}").main_cli(step_argv)
    cmd = build_command(params.scale, args.step, step_argv)
    log.info("launch: %s", " ".join(cmd))
    return run_child(cmd)


if __name__ == "__main__":
    sys.exit(main())
