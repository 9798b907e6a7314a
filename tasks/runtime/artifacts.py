"""The files steps hand to each other, by name, with their readers.

outputs/prepare/dataset.safetensors     x (M, *shape) float32, y (M,) int64 if labelled
outputs/teacher/model.safetensors       the teacher (EMA) velocity model
outputs/features/feature_net.safetensors  the FID classifier (image data only)
outputs/cost/cost.safetensors           CostMatrix sum (float64) with n_samples, search cost
outputs/schedules/schedules.json        {method: {"nfe_K": Schedule dict}} for every NFE
outputs/pairs/pairs.safetensors         chord pairs per (group, K) and reflow pairs (with
                                        their labels y of a class-conditional teacher)
outputs/students/<method>/nfe_K/        model.safetensors + schedule.json per straightened model
results/metrics.json, results/costs.json, results/plots/*.csv, results/figures/*.png
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from boss_core.cost import CostMatrix
from boss_core.data import TensorData
from boss_core.device import resolve_device
from boss_core.guidance import Conditioning
from boss_core.models import ModelConfig, build_model
from boss_core.pairs import ChordPairs, ReflowPairs
from boss_core.schedule import Schedule
from boss_core.seeds import sample_noise, search_seed

from .io import load_model, load_tensors, read_json
from .params import Params, ParamsError
from .workspace import Workspace


def dataset_file(ws: Workspace) -> Path:
    return ws.step("prepare") / "dataset.safetensors"


def load_prepared(ws: Workspace) -> TensorData:
    tensors, meta = load_tensors(dataset_file(ws))
    return TensorData(x=tensors["x"], y=tensors.get("y"), name=meta.get("name", "data"),
                      classes=tuple(meta.get("classes", ())))


def model_builder(allowed_import: str | None = None):
    """``build(model_config, data_shape)`` for ``io.load_model``: rebuilds a saved network.

    A file's config with ``arch: import`` names code to import and call, so it is refused
    unless its ``import_path`` is ``allowed_import`` (the one params.yaml names). Weights are
    loaded by the caller, never re-read from ``model_config['weights']``.
    """
    def build(model_config: dict, data_shape: tuple) -> nn.Module:
        config = ModelConfig.from_dict({**model_config, "weights": None})
        if config.arch == "import" and config.import_path != allowed_import:
            raise ValueError(f"the model file names code to import ({config.import_path!r}); "
                             "only the import_path params.yaml names is trusted")
        return build_model(config, data_shape)

    return build


build_from_meta = model_builder(None)


def teacher_file(ws: Workspace) -> Path:
    return ws.step("teacher") / "model.safetensors"


def load_teacher(ws: Workspace, device: str = "cpu",
                 allowed_import: str | None = None) -> nn.Module:
    model, _ = load_model(teacher_file(ws), model_builder(allowed_import),
                          resolve_device(device))
    return model


def student_dir(ws: Workspace, method: str, nfe: int) -> Path:
    return ws.step("students") / method / f"nfe_{nfe}"


def load_student(path: Path, device: str = "cpu",
                 allowed_import: str | None = None) -> tuple[nn.Module, Schedule]:
    """A straightened model folder (local or downloaded from the registry)."""
    model, _ = load_model(Path(path) / "model.safetensors", model_builder(allowed_import),
                          resolve_device(device))
    schedule = Schedule.from_dict(read_json(Path(path) / "schedule.json"))
    return model, schedule


def schedules_file(ws: Workspace) -> Path:
    return ws.step("schedules") / "schedules.json"


def load_schedules(ws: Workspace) -> dict[str, dict[int, Schedule]]:
    raw = read_json(schedules_file(ws))["schedules"]
    return {method: {int(key.split("_")[1]): Schedule.from_dict(value)
                     for key, value in table.items()} for method, table in raw.items()}


def schedules_to_dict(table: dict[str, dict[int, Schedule]]) -> dict:
    return {method: {f"nfe_{k}": s.to_dict() for k, s in sorted(by_k.items())}
            for method, by_k in table.items()}


def is_image_data(shape) -> bool:
    return len(tuple(shape)) == 3


def load_cost(ws: Workspace):
    """(CostMatrix, summary) of the cost step: the float64 sum and its sample count."""
    tensors, meta = load_tensors(ws.step("cost") / "cost.safetensors")
    return CostMatrix(tensors["sum"].numpy(), int(meta["n_samples"])), meta


def conditioning_of(params: Params) -> Conditioning:
    """The run's labels and guidance: C = ``model.num_classes``, w = ``sweep.guidance``
    (checked when params.yaml was read)."""
    return Conditioning(params.model.num_classes, params.sweep.guidance)


def search_inputs(ctx):
    """(teacher, noise): the teacher on the run's device and the ``sweep.search_samples``
    search noises (``boss_core.seeds.search_seed``), shared by the cost matrix and the global
    search."""
    s = ctx.params.sweep
    shape = load_prepared(ctx.ws).data_shape
    teacher = load_teacher(ctx.ws, ctx.params.run.device, ctx.params.model.import_path)
    device = next(teacher.parameters()).device
    return teacher, sample_noise(tuple(shape), search_seed(s.seed), 0, s.search_samples,
                                 device=device)


def pairs_file(ws: Workspace) -> Path:
    return ws.step("pairs") / "pairs.safetensors"


def load_pairs(ws: Workspace, schedule: str, nfe: int = 0):
    """``ChordPairs`` of the chords along ``schedule`` for K = ``nfe``, or the reflow
    ``ReflowPairs`` when ``nfe`` is 0 (a shared student)."""
    tensors, _ = load_tensors(pairs_file(ws))
    if nfe == 0:
        if "reflow.z" not in tensors:
            raise ValueError(f"no reflow pairs in {pairs_file(ws)}: rerun the pairs step")
        return ReflowPairs(*(tensors[f"reflow.{f}"] for f in ("z", "x1", "sample")),
                           tensors.get("reflow.y"))
    prefix = f"{schedule}.nfe_{nfe}"
    if f"{prefix}.x" not in tensors:
        raise ValueError(f"no pairs for {prefix} in {pairs_file(ws)}: rerun the pairs step")
    return ChordPairs(*(tensors[f"{prefix}.{f}"] for f in ("x", "t", "target", "sample")),
                      tensors.get(f"{prefix}.y"))


def check_classifier_labels(params: Params, data: TensorData, where: str) -> None:
    """Image data scored with ``fidelity.extractor: classifier`` needs two or more classes:
    the FID feature network is a classifier trained on them (one class teaches it nothing)."""
    if not is_image_data(data.data_shape) or params.fidelity.extractor != "classifier":
        return
    n_classes = 0 if data.y is None else int(torch.unique(data.y).numel())
    if n_classes < 2:
        found = "has no labels" if data.y is None else "has a single class"
        raise ParamsError(
            f"fidelity.extractor='classifier' trains the FID feature network on the labels, "
            f"but data {where} ({params.data.name}) {found}: set fidelity.extractor=inception "
            "(with fidelity.inception_weights, a local InceptionV3 file) or give labelled data "
            "(image_folder with one class folder per label, or labels.npy beside images.npy)")
