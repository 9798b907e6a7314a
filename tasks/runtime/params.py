"""params.yaml -> ``Params``: one frozen ``boss_core`` config per section, checked before compute.

Sections and their configs::

    run        RunConfig          experiment, device, progress, register_models
    data       DataConfig         which dataset (default: the embedded digits in data/digits)
    model      ModelConfig        the teacher's architecture, or your own (import path, weights)
    teacher    TeacherConfig      teacher training
    features   FeatureNetConfig   the FID feature network
    fidelity   FidelityConfig     FID / KID settings
    sweep      SweepConfig        methods, NFEs, fine grid, search / pair / evaluation sizes
    straighten StraightenConfig   fine-tuning (BOSS, LoRA, reflow, distill)
    scale      ScaleConfig        where shards and fine-tuning run (Dask, torchrun)
    methods    MethodOptions      each method's own options (``methods.<method>.<option>``)

``run.device`` and ``run.progress`` fill the sections that have those keys and leave them out;
``sweep.n_seeds`` fills ``fidelity.n_seeds``. Errors name the key as ``section.key``.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from boss_core.config import RunConfig, ScaleConfig
from boss_core.data import DataConfig
from boss_core.features import FeatureNetConfig
from boss_core.fidelity import FidelityConfig
from boss_core.grids import uniform_grid
from boss_core.guidance import check_guidance
from boss_core.methods import MethodOptions
from boss_core.models import ModelConfig
from boss_core.paths import get_path
from boss_core.straighten import StraightenConfig
from boss_core.sweep import SweepConfig
from boss_core.teacher import TeacherConfig

SECTIONS: dict[str, type] = {
    "run": RunConfig,
    "data": DataConfig,
    "model": ModelConfig,
    "teacher": TeacherConfig,
    "features": FeatureNetConfig,
    "fidelity": FidelityConfig,
    "sweep": SweepConfig,
    "straighten": StraightenConfig,
    "scale": ScaleConfig,
    "methods": MethodOptions,
}
_FILLED_FROM_RUN = ("device", "progress")


class ParamsError(ValueError):
    """A bad params file or value; the message names ``section.key``."""


@dataclass(frozen=True)
class Params:
    run: RunConfig
    data: DataConfig
    model: ModelConfig
    teacher: TeacherConfig
    features: FeatureNetConfig
    fidelity: FidelityConfig
    sweep: SweepConfig
    straighten: StraightenConfig
    scale: ScaleConfig
    methods: MethodOptions  # per-method options (boss_core/methods.py)
    raw: Mapping[str, Any]  # the merged YAML mapping, before filling (what DVC tracks)

    def flat(self, sections: Iterable[str] | None = None) -> dict[str, Any]:
        """``{"section.key": value}`` of the effective configs (for MLflow params)."""
        out = {}
        for name in sections or SECTIONS:
            for key, value in getattr(self, name).to_dict().items():
                if isinstance(value, dict):  # methods: {method: {option: value}}
                    out.update({f"{name}.{key}.{k}": v for k, v in value.items()})
                else:
                    out[f"{name}.{key}"] = value
        return out

    def digest(self, sections: Iterable[str]) -> str:
        """A short hash of the named sections' effective values (checkpoint folder names)."""
        text = json.dumps(self.flat(sections), sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def parse_override(text: str) -> tuple[str, Any]:
    """``"section.key=value"`` -> (``"section.key"``, YAML-parsed value)."""
    if "=" not in text:
        raise ParamsError(f"override {text!r} must look like section.key=value")
    key, value = text.split("=", 1)
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError as err:
        raise ParamsError(f"override {key}: cannot parse value {value!r}: {err}") from err


def apply_overrides(raw: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``raw`` with ``{"section.key": value}`` set; unknown names raise ParamsError."""
    merged = copy.deepcopy(dict(raw))
    for dotted, value in overrides.items():
        section, _, key = dotted.partition(".")
        if section not in SECTIONS or not key:
            raise ParamsError(f"override {dotted!r}: expected section.key with section in "
                              f"{list(SECTIONS)}")
        if SECTIONS[section] is MethodOptions:  # methods.<method>.<option>
            method, _, option = key.partition(".")
            merged.setdefault(section, {})
            merged[section] = dict(merged[section] or {})
            merged[section][method] = {**(merged[section].get(method) or {}), option: value}
            continue
        known = {f.name for f in dataclasses.fields(SECTIONS[section])}
        if key not in known:
            raise ParamsError(f"unknown key {dotted!r}; {section} keys: {sorted(known)}")
        merged.setdefault(section, {})
        if merged[section] is None:
            merged[section] = {}
        merged[section][key] = value
    return merged


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"params file {str(path)!r} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ParamsError(f"params file {str(path)!r} is not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise ParamsError(f"params file {str(path)!r} must hold a mapping of sections")
    return raw


def load_params(path: str | os.PathLike = "params.yaml",
                overrides: Mapping[str, Any] | None = None) -> Params:
    """Read, override, fill and validate; every error is a ParamsError naming the key."""
    return build_params(apply_overrides(read_yaml(path), overrides or {}))


def build_params(raw: Mapping[str, Any]) -> Params:
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ParamsError(f"unknown section(s) {unknown}; known: {list(SECTIONS)}")
    run = _section("run", raw.get("run") or {}, {})
    fill = {key: getattr(run, key) for key in _FILLED_FROM_RUN}
    configs = {"run": run}
    for name in SECTIONS:
        if name == "run":
            continue
        extra = dict(fill)
        if name == "fidelity":
            extra["n_seeds"] = (raw.get("sweep") or {}).get("n_seeds", SweepConfig.n_seeds)
        configs[name] = _section(name, raw.get(name) or {}, extra)
    params = Params(**configs, raw=copy.deepcopy(dict(raw)))
    _check_across(params)
    return params


def _section(name: str, values: Any, fill: Mapping[str, Any]):
    cls = SECTIONS[name]
    if not isinstance(values, Mapping):
        raise ParamsError(f"section {name!r} must be a mapping of keys, got {values!r}")
    if cls is MethodOptions:
        try:
            return cls.from_dict(values)
        except (ValueError, TypeError) as err:
            raise ParamsError(f"{name}.{err}") from err
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ParamsError(f"unknown key(s) {[f'{name}.{k}' for k in unknown]}; "
                          f"{name} keys: {sorted(known)}")
    merged = {k: v for k, v in fill.items() if k in known}
    merged.update(values)
    try:
        return cls.from_dict(merged)
    except (ValueError, TypeError) as err:
        message = f"{name}.{err}"  # config messages start with the key
        value = merged.get(str(err).split(" ", 1)[0])
        if isinstance(value, str) and _is_number(value):
            message += (f" (YAML reads {value} as a string: write the number with a dot, "
                        "e.g. 1.0e-3, or without an exponent, e.g. 0.001)")
        raise ParamsError(message) from err


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _check_across(p: Params) -> None:
    s = p.sweep
    try:  # guidance needs a conditional model whose unconditional mode was trained
        check_guidance(s.guidance, p.model.num_classes, p.teacher.label_dropout,
                       pretrained=p.model.weights is not None)
    except ValueError as err:
        raise ParamsError(str(err)) from err
    if p.fidelity.kid_subset_size > s.eval_samples and p.data.name not in _POINT_SETS:
        raise ParamsError(f"fidelity.kid_subset_size={p.fidelity.kid_subset_size} exceeds "
                          f"sweep.eval_samples={s.eval_samples}")
    if p.fidelity.n_seeds != s.n_seeds:
        raise ParamsError(f"fidelity.n_seeds={p.fidelity.n_seeds} must equal "
                          f"sweep.n_seeds={s.n_seeds} (leave it out: it is filled from sweep)")
    try:  # the teacher is evaluated on the fine grid, up to t_{N-1} = 1 - 1 / N
        get_path(p.teacher.path).check_grid(uniform_grid(s.n_steps), name="sweep.n_steps")
    except ValueError as err:
        raise ParamsError(f"teacher.path={p.teacher.path}: {err}") from err


_POINT_SETS = ("moons", "checkerboard", "gaussian_mixture")
