"""Step 1, prepare: read the dataset params.yaml names into one checked tensor file.

    python -m tasks.prepare [--params params.yaml] [--set data.name=moons]

Writes outputs/prepare/dataset.safetensors (x, and y when labelled) and a grid of real samples.
"""

from __future__ import annotations

import dataclasses
import sys

import torch

from .io import save_tensors, write_json
from .step import StepContext, main, prefect_task

NAME, SECTIONS = "prepare", ("data",)


def run(ctx: StepContext) -> dict:
    config = ctx.params.data
    if config.root is not None:  # relative to the workspace, whatever the working directory
        config = dataclasses.replace(config, root=str(ctx.ws.data_path(config.root)))
    data = config.load()
    x = data.x.float()
    if not torch.isfinite(x).all():
        raise ValueError(f"dataset {config.name!r} holds NaN or Inf values")
    tensors = {"x": x} if data.y is None else {"x": x, "y": data.y.long()}
    meta = {"name": data.name, "n": len(data), "data_shape": list(data.data_shape),
            "classes": list(data.classes), "labelled": data.y is not None}
    out = ctx.ws.step(NAME)
    save_tensors(out / "dataset.safetensors", tensors, meta)
    write_json(out / "summary.json", meta)
    from .plots import sample_grid

    sample_grid(x[:64], out / "real_samples.png", title=f"{data.name}: real samples")
    ctx.log_artifact(out / "real_samples.png", "figures")
    ctx.log_metrics({"n_samples": len(data)})
    return meta


task = prefect_task(NAME, run, SECTIONS, retries=2)  # reading user files: retry flaky I/O

if __name__ == "__main__":
    sys.exit(main(NAME, run, SECTIONS, __doc__))
