"""Sample from a straightened model: K Euler steps on the schedule it was trained for.

    python -m tasks.cli.sample --method boss --nfe 2 [--outputs outputs] [--n 64] [--seed 0]
                           [--out samples] [--device auto] [--batch-size 256]
    python -m tasks.cli.sample --registry boss-boss-nfe2[/VERSION|@ALIAS] [--n 64] [--seed 0]
                           [--out samples] [--device auto] [--batch-size 256]

The first form reads ``<outputs>/students/<method>/nfe_<K>/`` (model.safetensors +
schedule.json) from the DVC outputs (``--outputs runs/<name>/outputs`` for a Prefect run's
folder). The second downloads a registered model version's artifacts from MLflow (store:
``MLFLOW_TRACKING_URI``, else ``sqlite:///<repo root>/mlflow.db``; no version means the latest
one) into a temporary folder and loads them the same way.

A class-conditional student samples image i at label i mod C (class-balanced, as the
evaluation) or, with ``--label L``, every image at class L; it learned the guided teacher's
chords, so each step is one network call. Sample i starts from
``sample_noise(data_shape, seed, 0, n)[i]``, so one seed gives the same
samples bit for bit on one device (and batch size). Writes ``<out>/<label>_nfe<K>_seed<seed>.npy``
(float32, (n, *data_shape)) and ``.png`` (image grid or 2-D scatter) atomically and prints their
paths. Models are read from safetensors only: a pickle (torch.save) file is refused, never
unpickled. A registered model whose config has arch "import" (rebuilding it imports and calls
the callable its file names) is refused unless --allow-import. Exit code 2 names what is
missing or unreadable.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from boss_core.device import resolve_device
from boss_core.guidance import balanced_labels, num_classes_of
from boss_core.methods import trained_names
from boss_core.sampling import euler_sample
from boss_core.schedule import Schedule
from boss_core.seeds import sample_noise

from ..runtime.artifacts import build_from_meta, model_builder
from ..runtime.io import atomic_path, load_model, load_tensors, read_json
from ..runtime.workspace import repo_root

MODEL_FILE, SCHEDULE_FILE = "model.safetensors", "schedule.json"
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default (zip) format
_VERSION = re.compile(r"^(?:\d+|latest)$")


class SampleError(Exception):
    """A user-facing failure: a missing model, version, folder or file (exit code 2)."""


# ---------------------------------------------------------------------------------- loading


def _refuse_pickle(path: Path) -> None:
    """ValueError if ``path`` looks like a torch.save / pickle file (raw bytes, never parsed).

    A safetensors file starts with its header length (8 bytes, little-endian) and then "{";
    torch.save writes a zip archive ("PK\\x03\\x04") or a bare pickle ("\\x80" + protocol).
    """
    with open(path, "rb") as handle:
        head = handle.read(9)
    if len(head) == 9 and head[8:9] == b"{":
        return
    if head.startswith(_ZIP_MAGIC) or (
            len(head) > 1 and head[0] == 0x80 and head[1] in (2, 3, 4, 5)):
        raise ValueError(
            f"{path} is a pickle / torch.save file, not safetensors; refusing to load it "
            f"(unpickling can run code)")


def _refuse_import(path: Path) -> None:
    """ValueError if the model file's config builds its network with arch "import".

    Rebuilding such a model calls ``import_path(**init_kwargs)`` from the file's metadata: any
    importable callable with any arguments (e.g. ``os:system``), i.e. code the file chooses.
    Reads the JSON header only.
    """
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            raw = (handle.metadata() or {}).get("model_config")
        config = json.loads(raw) if raw is not None else {}
    except Exception:  # a bad header: load_model refuses the file and names it
        return
    if isinstance(config, dict) and config.get("arch") == "import":
        raise ValueError(
            f"{path} builds its network by importing {config.get('import_path')!r} "
            f"(arch 'import'), which runs code named by the file; refused: pass --allow-import "
            f"(allow_import=True) if you trust where the model came from")


def load_folder(folder: str | os.PathLike, device: str | torch.device = "cpu", *,
                allow_import: bool = False) -> tuple[nn.Module, Schedule, tuple[int, ...]]:
    """(eval-mode model, schedule, data shape) of a student folder; errors name the file.

    Same files as ``tasks.runtime.artifacts.load_student``; the data
    shape comes from the model file's
    metadata. A torch.save / pickle file is refused unread, and a model whose config has arch
    "import" unless ``allow_import`` (rebuilding it imports and calls what the file names).
    FileNotFoundError for a missing folder or file, ValueError for a bad one.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder {folder} does not exist")
    for name in (MODEL_FILE, SCHEDULE_FILE):
        if not (folder / name).is_file():
            present = sorted(p.name for p in folder.iterdir()) or ["nothing"]
            raise FileNotFoundError(
                f"{folder / name} is missing (the folder holds: {', '.join(present)})")
    _refuse_pickle(folder / MODEL_FILE)
    if not allow_import:
        _refuse_import(folder / MODEL_FILE)
        build = build_from_meta
    else:  # trusted by the caller: allow the import path the file itself names
        config = load_tensors(folder / MODEL_FILE)[1].get("model_config") or {}
        build = model_builder(config.get("import_path"))
    model, meta = load_model(folder / MODEL_FILE, build, resolve_device(device))
    schedule = Schedule.from_dict(read_json(folder / SCHEDULE_FILE))
    shape = meta.get("data_shape")
    if not isinstance(shape, list) or not shape or not all(
            isinstance(s, int) and s > 0 for s in shape):
        raise ValueError(f"{folder / MODEL_FILE} has no valid data_shape in its metadata: "
                         f"{shape!r}")
    return model, schedule, tuple(shape)


def sample_labels(model: nn.Module, n: int, label: int | None = None) -> Tensor | None:
    """The (n,) labels a class-conditional model samples at: class-balanced y_i = i mod C
    (``boss_core.guidance.balanced_labels``, as the evaluation draws them), or every sample at
    class ``label``; None for an unconditional model (a ``label`` then is a ValueError)."""
    num_classes = num_classes_of(model)
    if num_classes is None:
        if label is not None:
            raise ValueError(f"--label {label}: the model is unconditional (no num_classes)")
        return None
    if label is None:
        return balanced_labels(num_classes, 0, n)
    if not 0 <= label < num_classes:
        raise ValueError(f"--label must be in [0, {num_classes}), got {label}")
    return torch.full((n,), label, dtype=torch.int64)


@torch.no_grad()
def sample_model(model: nn.Module, schedule: Schedule, data_shape: tuple[int, ...], n: int,
                 seed: int, batch_size: int | None = None, label: int | None = None) -> Tensor:
    """(n, *data_shape) float32 CPU samples: Euler on ``schedule.times`` from seeded noise.

    Noise row i is ``sample_noise(data_shape, seed, 0, n)[i]`` whatever ``batch_size``; a
    class-conditional student is called with sample i's label (``sample_labels``; one call
    per step: it learned the guided teacher's chords).
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    labels = sample_labels(model, n, label)
    device = next(iter(model.parameters()), torch.empty(0)).device
    step = n if batch_size is None else batch_size
    times = schedule.time_grid()
    parts = []
    for start in range(0, n, step):
        count = min(step, n - start)
        noise = sample_noise(data_shape, seed, start, count, device=device)
        extras = {} if labels is None else {"y": labels[start:start + count].to(device)}
        parts.append(euler_sample(model, noise, times, extras=extras).float().cpu())
    return torch.cat(parts)


def sample_from_folder(folder: str | os.PathLike, n: int, seed: int, device: str = "cpu",
                       batch_size: int | None = None, *, allow_import: bool = False,
                       label: int | None = None) -> tuple[Tensor, Schedule]:
    """(samples (n, *shape) float32 on the CPU, schedule) of the student in ``folder``."""
    model, schedule, shape = load_folder(folder, device, allow_import=allow_import)
    return sample_model(model, schedule, shape, n, seed, batch_size, label), schedule


# --------------------------------------------------------------------------------- registry


def parse_registry_spec(spec: str) -> tuple[str, str | None, str | None]:
    """``name``, ``name/3``, ``name/latest``, ``name@alias`` (optionally ``models:/...``) ->
    (name, version or None, alias or None)."""
    text = spec.strip()
    if text.startswith("models:/"):
        text = text[len("models:/"):]
    text = text.strip("/")
    name, version, alias = text, None, None
    if "@" in text:
        name, alias = text.rsplit("@", 1)
        if not alias:
            raise SampleError(f"registry spec {spec!r} has an empty alias after '@'")
    elif "/" in text and _VERSION.match(text.rsplit("/", 1)[1]):
        name, version = text.rsplit("/", 1)
        version = None if version == "latest" else version
    if not name:
        raise SampleError(f"registry spec {spec!r} names no registered model")
    return name, version, alias


def _tracking_uri(tracking_uri: str | None) -> str:
    if tracking_uri:
        return tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    from ..runtime.tracking import tracking_uri as default_uri

    return default_uri(repo_root())


def _check_store(uri: str) -> None:
    """A sqlite store that does not exist yet would be created empty: say so instead."""
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///"):])
        if str(path) not in ("", ":memory:") and not path.is_file():
            raise SampleError(f"no MLflow store at {path} (run the pipeline first, or set "
                              f"MLFLOW_TRACKING_URI)")


def resolve_version(client, name: str, version: str | None, alias: str | None) -> str:
    """The version number a spec names (the highest READY version when none is given)."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise SampleError(f"registered model {name!r} not found") from err
        raise
    if alias is not None:
        try:
            return str(client.get_model_version_by_alias(name, alias).version)
        except MlflowException as err:
            raise SampleError(f"registered model {name!r} has no alias {alias!r}") from err
    versions = client.search_model_versions(f"name='{name}'")
    found = sorted(int(v.version) for v in versions if v.status in (None, "", "READY"))
    if not found:
        raise SampleError(f"registered model {name!r} has no (ready) versions")
    if version is None:
        return str(found[-1])
    if int(version) not in found:
        raise SampleError(f"version {version} of registered model {name!r} not found "
                          f"(versions: {', '.join(map(str, found))})")
    return str(int(version))


def fetch_registered_version(spec: str, tracking_uri: str | None = None,
                             dst: str | os.PathLike | None = None) -> tuple[Path, str, str]:
    """Download a registered version's artifacts into ``dst`` (default: a new temp folder the
    caller removes); returns (folder, model name, version)."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = _tracking_uri(tracking_uri)
    _check_store(uri)
    name, version, alias = parse_registry_spec(spec)
    registry = os.environ.get("MLFLOW_REGISTRY_URI") or uri
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=registry)
    version = resolve_version(client, name, version, alias)
    dst = Path(dst) if dst is not None else Path(tempfile.mkdtemp(prefix="boss-sample-"))
    dst.mkdir(parents=True, exist_ok=True)
    where = {"dst_path": str(dst), "tracking_uri": uri, "registry_uri": registry}
    try:
        try:
            local = mlflow.artifacts.download_artifacts(f"models:/{name}/{version}", **where)
        except MlflowException:  # a models:/ resolver that does not take this source
            source = client.get_model_version_download_uri(name, version)
            local = mlflow.artifacts.download_artifacts(artifact_uri=source, **where)
    except (MlflowException, OSError) as err:
        raise SampleError(f"could not download the artifacts of {name!r} version {version}: "
                          f"{err}") from err
    return Path(local), name, version


def fetch_registered(name_or_uri: str, tracking_uri: str | None = None) -> Path:
    """A local folder (new temp folder, caller removes it) with a registered version's files.

    ``name_or_uri``: ``name``, ``name/VERSION``, ``name@alias`` or ``models:/...`` of those.
    Raises SampleError for an unknown name, version or alias.
    """
    return fetch_registered_version(name_or_uri, tracking_uri)[0]


# -------------------------------------------------------------------------------------- CLI


def write_samples(samples: Tensor, out: str | os.PathLike, label: str, nfe: int, seed: int
                  ) -> tuple[Path, Path | None]:
    """Write ``<out>/<label>_nfe<K>_seed<seed>.npy`` and ``.png`` atomically; returns the paths
    (png None when the data shape has no picture: neither images nor 2-D points)."""
    from ..runtime.plots import sample_grid

    stem = Path(out) / f"{label}_nfe{nfe}_seed{seed}"
    npy, png = stem.with_suffix(".npy"), stem.with_suffix(".png")
    array = samples.detach().cpu().numpy().astype(np.float32, copy=False)
    with atomic_path(npy) as tmp, open(tmp, "wb") as handle:
        np.save(handle, array)  # a file handle: np.save would append ".npy" to a name
    drawable = (array.ndim == 2 and array.shape[1] == 2) or (
        array.ndim == 4 and array.shape[1] in (1, 3))
    if not drawable:
        return npy, None
    nrow = max(1, math.ceil(math.sqrt(len(array))))
    sample_grid(array, png, nrow=nrow, title=f"{label}  K={nfe}  seed={seed}")
    return npy, png


def _safe_label(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.@-]+", "_", text).strip("_") or "model"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tasks.cli.sample",
        description=(
            "Sample from a straightened model with K Euler steps on its schedule.\n\n"
            "  python -m tasks.cli.sample --method boss --nfe 2 [--outputs outputs] [--n 64] "
            "[--seed 0] [--out samples]\n"
            "      the DVC outputs: <outputs>/students/<method>/nfe_<K>/\n"
            "  python -m tasks.cli.sample --registry boss-boss-nfe2[/VERSION|@ALIAS] [--n 64] "
            "[--seed 0] [--out samples]\n"
            "      a registered MLflow model version (latest when none is given); store: "
            "MLFLOW_TRACKING_URI,\n      else sqlite:///<repo root>/mlflow.db\n\n"
            "Writes <out>/<label>_nfe<K>_seed<seed>.npy (float32 (n, *data_shape)) and .png and "
            "prints their paths.\nThe same seed gives the same .npy bit for bit (same device "
            "and batch size). Exit code 2: a missing\nor unreadable model, folder, file, "
            "registered name or version."),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--method", help="a trained method of boss_core/methods.py ("
                        f"{', '.join(trained_names())}); needs --nfe")
    source.add_argument("--registry", metavar="NAME[/VERSION|@ALIAS]",
                        help="registered model, e.g. boss-boss-nfe2, boss-boss-nfe2/3 or "
                        "boss-boss-nfe2@champion")
    parser.add_argument("--nfe", type=int, help="K, the student's number of steps (--method)")
    parser.add_argument("--outputs", default=None,
                        help="the outputs folder to read students from (default: "
                        "<repo root>/outputs; e.g. runs/<name>/outputs)")
    parser.add_argument("--n", type=int, default=64, help="number of samples (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    parser.add_argument("--out", default="samples", help="output folder (default samples/)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:<i> or auto")
    parser.add_argument("--batch-size", type=int, default=256,
                        help="samples per network call (default 256)")
    parser.add_argument("--label", type=int, default=None,
                        help="class-conditional models: sample every image at this class "
                        "(default: class-balanced labels i mod C, as the evaluation)")
    parser.add_argument("--allow-import", action="store_true",
                        help="--registry: load a model whose config has arch 'import' (its "
                        "file names a callable that is imported and called; trusted sources "
                        "only). Local --method folders always may.")
    return parser


def _run(args: argparse.Namespace) -> list[Path]:
    device = resolve_device(args.device)
    if args.registry is not None:
        if args.outputs is not None or args.nfe is not None:
            raise SampleError("--outputs and --nfe go with --method, not --registry")
        with tempfile.TemporaryDirectory(prefix="boss-sample-") as tmp:
            folder, name, version = fetch_registered_version(args.registry, dst=tmp)
            model, schedule, shape = load_folder(folder, device,
                                                 allow_import=args.allow_import)
        label = f"{name}-v{version}"
    else:
        if args.nfe is None:
            raise SampleError("--method needs --nfe K")
        outputs = Path(args.outputs) if args.outputs is not None else repo_root() / "outputs"
        folder = outputs / "students" / args.method / f"nfe_{args.nfe}"
        if not folder.is_dir():
            parent = outputs / "students" / args.method
            have = sorted(p.name for p in parent.iterdir()) if parent.is_dir() else []
            hint = (f"; {parent} holds {', '.join(have)}" if have else
                    f"; run `dvc repro straighten@{args.method}` first or pass --outputs")
            raise SampleError(f"no student folder {folder}{hint}")
        model, schedule, shape = load_folder(folder, device, allow_import=True)
        label = args.method
    if args.nfe is not None and schedule.nfe != args.nfe:
        raise SampleError(f"{folder / SCHEDULE_FILE} has K={schedule.nfe}, not {args.nfe}")
    samples = sample_model(model, schedule, shape, args.n, args.seed, args.batch_size,
                           args.label)
    npy, png = write_samples(samples, args.out, _safe_label(label), schedule.nfe, args.seed)
    return [npy] if png is None else [npy, png]


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    args = build_parser().parse_args(argv)
    if args.n < 1 or args.batch_size < 1:
        print("error: --n and --batch-size must be >= 1", file=sys.stderr)
        return 2
    try:
        paths = _run(args)
    except (SampleError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
