"""Serve the pipeline as the Prefect deployment ``boss-pipeline/<name>`` until Ctrl-C.

    PREFECT_API_URL=http://127.0.0.1:4200/api python -m flows.serve [--name boss-default]
        [--params-file params.yaml] [--limit 1]

Then, from another shell (same PREFECT_API_URL)::

    prefect deployment run 'boss-pipeline/boss-default' \\
        --param overrides='{"straighten.iterations": 100}' --watch

Each run writes ``runs/<flow run name>/`` (see flows.pipeline). ``--limit`` caps how many
runs execute at once (default 1: the steps use every core, and the default MLflow store is a
SQLite file); further runs wait in Scheduled. ``python -m flows.local_server --serve`` starts a
local Prefect server and this in one command.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

DEFAULT_NAME = "boss-default"


def trigger_command(name: str = DEFAULT_NAME) -> str:
    return (f"prefect deployment run 'boss-pipeline/{name}' "
            "--param overrides='{\"straighten.iterations\": 100}' --watch")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", default=DEFAULT_NAME, help="deployment name")
    parser.add_argument("--params-file", default="params.yaml",
                        help="the base params of every run (default params.yaml)")
    parser.add_argument("--limit", type=int, default=1,
                        help="flow runs executing at once (default 1)")
    args = parser.parse_args(argv)
    # The steps log to the "boss" logger: show it in the Prefect UI next to the task logs.
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "boss")
    if not os.environ.get("PREFECT_API_URL"):
        print("warning: PREFECT_API_URL is not set; Prefect will use a temporary server that "
              "lives only as long as this process (see python -m flows.local_server --serve)",
              file=sys.stderr)
    from flows.pipeline import boss_pipeline
    from tasks.runtime.params import ParamsError, load_params
    from tasks.runtime.tracking import check_prefect_api, check_tracking_server
    from tasks.runtime.workspace import repo_root

    try:  # a broken params file or an unreachable service fails here, not in every run
        load_params(args.params_file)
        check_prefect_api()
        check_tracking_server(repo_root(Path(args.params_file).resolve().parent))
    except (ParamsError, ConnectionError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"serving boss-pipeline/{args.name}; trigger a run with:\n  {trigger_command(args.name)}",
          flush=True)
    boss_pipeline.serve(name=args.name, parameters={"params_file": args.params_file},
                        limit=args.limit, tags=["boss"],
                        description="BOSS pipeline, prepare to report, in runs/<flow run name>/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
