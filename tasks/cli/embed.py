"""Write the embedded default data: scikit-learn's digits as ``data/digits/*.npy``.

    python -m tasks.cli.embed [--root data]

The bytes are a deterministic function of the installed scikit-learn's copy of the digits, so
on a fresh clone with no DVC remote the folder matches ``data.dvc`` and ``dvc repro`` accepts
it. Existing files are left alone unless they differ (then they are rewritten atomically).
"""

from __future__ import annotations

import argparse
import io
import logging
from pathlib import Path

import numpy as np

from boss_core.data import load_digits_images

from ..runtime.io import atomic_path

log = logging.getLogger("boss")


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def write_digits(root: Path) -> list[Path]:
    """``root/digits/images.npy`` (1797, 1, 8, 8) float32 in [-1, 1] and ``labels.npy``."""
    data = load_digits_images()
    files = {"images.npy": data.x.numpy(), "labels.npy": data.y.numpy()}
    written = []
    for name, array in files.items():
        path = root / "digits" / name
        payload = _npy_bytes(array)
        if path.is_file() and path.read_bytes() == payload:
            continue
        with atomic_path(path) as tmp:
            tmp.write_bytes(payload)
        written.append(path)
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.cli.embed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path("data"), help="data folder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    written = write_digits(args.root)
    log.info("embedded digits in %s: %s", args.root / "digits",
             f"wrote {[p.name for p in written]}" if written else "already up to date")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
