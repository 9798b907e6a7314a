"""The same pipeline, pointed at real infrastructure by configuration only.

Local stand-ins, each started by this test and stopped by its PID:
- a Dask cluster: ``dask scheduler`` + 2 ``dask worker`` processes, reached by address
  (``BOSS_DASK_ADDRESS``), with the Prefect server their shard tasks report to;
- an MLflow tracking server on 127.0.0.1 with a database backend (SQLite) and a proxied
  artifact store (``--serve-artifacts``), reached through ``MLFLOW_TRACKING_URI``;
- a DVC remote in a temporary folder (``dvc remote add``);
- torchrun: the straightening stages on 2 processes (``scale.nproc_per_node``), then one
  stage again as ``--nnodes 2`` on 127.0.0.1 with a c10d rendezvous endpoint.
Nothing in the code changes: params.yaml's ``scale`` section, environment variables and the
DVC config do.
"""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import pytest
import yaml
from dask_helpers import dask_cluster
from pipeline_helpers import BIN, copy_repo, env, mlflow_server, run
from test_pipeline_dvc import STEPS

from flows.local_server import free_port, stop_process

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
SCALE = {"runner": "dask", "shard_samples": 64, "nproc_per_node": 2}


def _configure(repo: Path) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["scale"].update(SCALE)
    params["sweep"]["batch_size"] = 32  # shards of 64 = whole batches: 1-2 cost shards...
    params["sweep"]["search_samples"] = 128  # ... 2 cost shards, 2 pair shards, 4 eval shards
    # fewer trained rows than the tiny profile: this test is about placement, not methods
    params["sweep"]["methods"] = ["teacher", "uniform", "bellman", "boss", "distill_uniform"]
    params["sweep"]["nfes"] = [2]
    params["sweep"]["eval_samples"] = 256  # 4 evaluation shards of 64
    params["sweep"]["n_seeds"] = 2
    params["fidelity"]["kid_subset_size"] = 100
    params["model"]["base_channels"] = 8  # the tiny profile's teacher
    # and shorter training: the stages' placement is tested, not the models' quality
    params["teacher"]["iterations"] = 150
    params["features"]["iterations"] = 60
    params["straighten"]["iterations"] = 30
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "scale"], repo)


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory, prefect_server_api):
    root = tmp_path_factory.mktemp("scale")
    repo = copy_repo(root / "repo")
    _configure(repo)
    remote = root / "dvc-remote"
    run([str(BIN / "dvc"), "remote", "add", "-d", "stand_in", str(remote)], repo)
    with ExitStack() as stack, ThreadPoolExecutor(2) as pool:
        # the cluster (reporting to the session's Prefect server) and the MLflow server start
        # at the same time
        cluster = pool.submit(stack.enter_context,
                              dask_cluster(prefect_server_api, 2, cwd=repo))
        server = pool.submit(stack.enter_context,
                             mlflow_server(root / "mlflow", serve_artifacts=True))
        (address, api), uri = cluster.result(), server.result()
        # the shard sub-flows report to the session's Prefect server; the stages themselves run
        # plain (BOSS_PREFECT=0): stages as Prefect flows are the flow tests' subject
        extra = {"BOSS_DASK_ADDRESS": address, "PREFECT_API_URL": api,
                 "MLFLOW_TRACKING_URI": uri, "BOSS_PREFECT": "0"}
        run([str(BIN / "dvc"), "repro"], repo, timeout=1500, **extra)
        run([str(BIN / "dvc"), "push"], repo, **extra)
        yield repo, remote, uri, extra


def test_pipeline_on_stand_ins_completes(stand_ins):
    repo, _, _, _ = stand_ins
    metrics = json.loads((repo / "results" / "metrics.json").read_text())
    assert metrics["boss"]["nfe_2"]["fid"] < metrics["uniform"]["nfe_2"]["fid"]
    cost = json.loads((repo / "outputs" / "cost" / "summary.json").read_text())
    assert cost["shards"] == 2 and cost["n_samples"] == 128


def test_runs_and_artifacts_are_on_the_mlflow_server(stand_ins):
    import mlflow

    repo, _, uri, _ = stand_ins
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("boss-tiny")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = {r.info.run_name: r for r in runs
                if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id}
    assert sorted(children) == sorted(STEPS)  # one run per stage: torchrun ranks > 0 log none
    assert parents[0].info.artifact_uri.startswith("mlflow-artifacts:")
    listed = {a.path for a in client.list_artifacts(children["straighten_boss"].info.run_id,
                                                   "models/boss/nfe_2")}
    assert "models/boss/nfe_2/model.safetensors" in listed
    assert not (repo / "mlartifacts").exists() and not (repo / "mlflow.db").exists()


def test_dvc_remote_holds_the_outputs(stand_ins):
    repo, remote, _, extra = stand_ins
    assert len([p for p in remote.rglob("*") if p.is_file()]) >= 10
    status = run([str(BIN / "dvc"), "status", "--cloud"], repo, **extra)
    assert "in sync" in status.stdout.lower(), status.stdout


def test_two_node_torchrun_matches_the_two_process_stage(stand_ins):
    """World size 2 either way (2 processes on one node in the repro, 2 nodes of 1 process
    here), so the same ranks see the same rows: the weights must be equal bit for bit."""
    import torch
    from safetensors.torch import load_file

    repo, _, _, extra = stand_ins
    method = "distill_uniform"
    before = {k: load_file(repo / f"outputs/students/{method}/nfe_{k}/model.safetensors")
              for k in (2,)}
    endpoint = f"127.0.0.1:{free_port()}"
    cmd = [sys.executable, "-m", "tasks.runtime.launch", "straighten", "--method", method,
           "--set", "scale.nnodes=2", "--set", "scale.nproc_per_node=1",
           "--set", f"scale.rdzv_endpoint={endpoint}", "--set", "scale.rdzv_id=two-nodes"]
    nodes = [subprocess.Popen(cmd, cwd=repo, env=env(**extra), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True)
             for _ in range(2)]
    try:
        logs = [node.communicate(timeout=600)[0] for node in nodes]
    finally:
        for node in nodes:
            stop_process(node)
    assert [n.returncode for n in nodes] == [0, 0], "\n".join(log[-3000:] for log in logs)
    for k, want in before.items():
        got = load_file(repo / f"outputs/students/{method}/nfe_{k}/model.safetensors")
        assert sorted(got) == sorted(want)
        for name in want:
            assert torch.equal(got[name], want[name]), (k, name)
