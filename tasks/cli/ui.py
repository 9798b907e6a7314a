"""Start the MLflow UI on 127.0.0.1 for this repository's tracking store.

    python -m tasks.cli.ui [--port 5000] [--host 127.0.0.1] [--params params.yaml]

Prints the link straight to the experiment's runs table (http://HOST:PORT/#/experiments/<id>/runs)
and runs until Ctrl-C. The store is MLFLOW_TRACKING_URI, else sqlite:///<repo>/mlflow.db.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..runtime import tracking
from ..runtime.params import ParamsError, load_params
from ..runtime.servers import MLFLOW_SERVER_ENV
from ..runtime.workspace import repo_root


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.cli.ui", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--host", default="127.0.0.1",
                        help="bind address (default 127.0.0.1: this machine only)")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    try:
        experiment = load_params(args.params).run.experiment
    except ParamsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    repo = repo_root(Path(args.params).resolve().parent)
    experiment_id = tracking.setup(repo, experiment)
    uri = tracking.tracking_uri(repo)
    print(f"MLflow UI: http://{args.host}:{args.port}/#/experiments/{experiment_id}/runs "
          f"(store {uri}); Ctrl-C stops it", flush=True)
    mlflow = str(Path(sys.executable).parent / "mlflow")
    for key, value in MLFLOW_SERVER_ENV.items():  # no idle GenAI job consumers (servers.py)
        os.environ.setdefault(key, value)
    os.execv(mlflow, [mlflow, "ui", "--host", args.host, "--port", str(args.port),
                      "--backend-store-uri", uri, "--workers", "1"])
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
