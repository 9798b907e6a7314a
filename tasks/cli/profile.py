"""Parameter profiles: a flat YAML of ``section.key: value`` overrides on top of params.yaml.

    python -m tasks.cli.profile params.paper.yaml --dvc-args  # "-S key=value ..." for dvc exp run
    python -m tasks.cli.profile tests/profiles/tiny.yaml --write params.yaml   # merge in place

Every key is checked (the merged params must load) before anything is printed or written.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import yaml

from ..runtime.io import write_text
from ..runtime.params import ParamsError, apply_overrides, build_params, read_yaml


def read_profile(path: str | Path) -> dict:
    raw = read_yaml(path)
    bad = [k for k in raw if "." not in str(k)]
    if bad:
        raise ParamsError(f"profile {path}: keys must be section.key, got {bad}")
    return raw


def _inline(value) -> str:
    """A value as one line of YAML flow style (what ``dvc exp run -S`` parses)."""
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.cli.profile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("profile", help="flat YAML of section.key: value")
    parser.add_argument("--params", default="params.yaml", help="the base params file")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--dvc-args", action="store_true", help="print -S arguments")
    mode.add_argument("--write", metavar="FILE", help="write the merged params to FILE")
    args = parser.parse_args(argv)
    try:
        overrides = read_profile(args.profile)
        merged = apply_overrides(read_yaml(args.params), overrides)
        build_params(merged)  # validate before printing or writing
    except ParamsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.dvc_args:
        pairs = [f"{k}={_inline(v)}" for k, v in overrides.items()]
        print(" ".join(f"-S {shlex.quote(pair)}" for pair in pairs))
    else:
        write_text(args.write, yaml.safe_dump(merged, sort_keys=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
