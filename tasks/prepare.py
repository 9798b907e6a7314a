"""Step 1, prepare: read the dataset params.yaml names into one checked tensor file.

    python -m tasks.prepare [--params params.yaml] [--set data.name=moons]

Writes outputs/prepare/dataset.safetensors (x, and y when labelled) and a grid of real samples.
As the first stage it also refuses, before anything is written and before the teacher trains,
what a later stage would only find after the teacher's compute: NaN / Inf values, image data
without the labels ``fidelity.extractor: classifier`` trains on, and a ``sweep.lora_rank``
above what every layer of the teacher allows (``boss_lora`` in ``sweep.methods``).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch

from boss_core.data import TensorData
from boss_core.protocol import selected

from .runtime.artifacts import check_classifier_labels, is_image_data
from .runtime.io import save_tensors, write_json
from .runtime.params import Params, ParamsError
from .runtime.step import StepContext, main, prefect_task

NAME, SECTIONS = "prepare", ("data",)


def run(ctx: StepContext) -> dict:
    config = ctx.params.data
    if config.root is not None:  # relative to the workspace, whatever the working directory
        config = dataclasses.replace(config, root=str(ctx.ws.data_path(config.root)))
    data = config.load()
    x = data.x.float()
    check_dataset(ctx.params, data, x, where=config.root or config.name)
    check_inception_file(ctx, data)
    tensors = {"x": x} if data.y is None else {"x": x, "y": data.y.long()}
    meta = {"name": data.name, "n": len(data), "data_shape": list(data.data_shape),
            "classes": list(data.classes), "labelled": data.y is not None}
    out = ctx.ws.step(NAME)
    save_tensors(out / "dataset.safetensors", tensors, meta)
    write_json(out / "summary.json", meta)
    from .runtime.plots import sample_grid

    sample_grid(x[:64], out / "real_samples.png", title=f"{data.name}: real samples")
    ctx.log_artifact(out / "real_samples.png", "figures")
    ctx.log_metrics({"n_samples": len(data)})
    return meta


def check_dataset(params: Params, data: TensorData, x: torch.Tensor, where: str) -> None:
    """Refuse, naming the file, folder or key, what later stages cannot use (nothing written).

    ``where`` is the data folder (or the dataset's name for a generated set).
    """
    bad = ~torch.isfinite(x.reshape(len(x), -1)).all(dim=1)  # (M,) samples with NaN / Inf
    if bad.any():
        raise ValueError(f"data {where} ({params.data.name}) holds NaN or Inf values in "
                         f"{int(bad.sum())} of {len(x)} samples (the first is sample "
                         f"{int(bad.nonzero()[0, 0])})")
    check_classifier_labels(params, data, where)
    lora = [m.name for m in selected(params.sweep) if m.trained and m.training.lora]
    if lora:
        check_lora_rank_for(params, tuple(data.data_shape), lora)


def check_inception_file(ctx: StepContext, data: TensorData) -> None:
    """``fidelity.inception_weights`` must exist now, not when evaluate (the last stage) opens
    it: relative to the working directory as evaluate reads it, or to the workspace."""
    f = ctx.params.fidelity
    if not is_image_data(data.data_shape) or f.extractor != "inception":
        return
    path = Path(f.inception_weights)
    if not (path.is_file() or ctx.ws.data_path(f.inception_weights).is_file()):
        raise ParamsError(f"fidelity.inception_weights file {str(ctx.ws.data_path(str(path)))!r} "
                          "does not exist (fidelity.extractor=inception needs a local "
                          "torch-fidelity InceptionV3 file; nothing is downloaded)")


def check_lora_rank_for(params: Params, data_shape: tuple[int, ...],
                        methods: list[str]) -> None:
    """``sweep.lora_rank`` against the teacher ``params.model`` builds for ``data_shape``.

    The network is built on the meta device (shapes only, no memory, no weights file read);
    a network whose constructor needs real tensors is built on the CPU instead.
    """
    from boss_core.lora import check_lora_rank
    from boss_core.models import build_model

    try:
        with torch.device("meta"):
            model = build_model(params.model, data_shape)
    except ValueError as err:
        raise ParamsError(f"model: cannot build the teacher for data_shape {list(data_shape)}: "
                          f"{err}") from err
    except Exception:  # a constructor that needs real tensors: build it for real
        model = build_model(params.model, data_shape)
    try:
        check_lora_rank(model, params.sweep.lora_rank)
    except ValueError as err:
        raise ParamsError(f"sweep.lora_rank={params.sweep.lora_rank} is too large for the "
                          f"teacher ({params.model.arch}, data_shape {list(data_shape)}) that "
                          f"{', '.join(methods)} adapt: {err}") from err


def _retry_io_only(task, task_run, state) -> bool:
    """Prefect retries a read that may be flaky, not bad input (the same error every time)."""
    return not isinstance(getattr(state, "data", None), (ValueError, FileNotFoundError))


task = prefect_task(NAME, run, SECTIONS, retries=2).with_options(  # reading user files
    retry_condition_fn=_retry_io_only)

if __name__ == "__main__":
    sys.exit(main(NAME, run, SECTIONS, __doc__))
