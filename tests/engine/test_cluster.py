"""A real two-node Ray cluster: a head and a worker node started with the Ray CLI on this machine
(:class:`~crdnd_ray.engine.local_cluster.LocalCluster`, each node in a session of its own with its own temp
dir, free ports and a custom resource), joined by real ``crdnd-ray`` commands through ``scaling.address``.

The teacher checkpoint lies in a folder that no node's processes can see (an empty tmpfs over it in each
node's mount namespace; needs root), so trials and ranks can only get it through Ray's object store. On the
cluster: a ``train --workers 2`` whose ranks run on different nodes, then a digits sweep during which the
worker node is killed (SIGKILL to its process group and every descendant); the trial it ran is retried on
the head from its last checkpoint, and nothing is lost or duplicated in the results or in MLflow. The sweep
comes last: the worker node stays dead. Where the ranks ran and the node-loss timeline are printed (``-s``).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
from conftest import REPO

from crdnd_ray import runs
from crdnd_ray.engine.local_cluster import LocalCluster
from crdnd_ray.processes import alive

pytestmark = pytest.mark.slow

SMALL = ["train.epochs=2", "eval.epoch_limit=64", "eval.final_limit=64", "attack.steps=3", "tracking.enabled=false",
         "eval.verify=false"]
SWEEP_EPOCHS = 5


@pytest.fixture(scope="module")
def cluster(digits_teacher: Path, tmp_path_factory: pytest.TempPathFactory):
    """The two nodes (``node_a`` the head, ``node_b``), each offering 1 CPU and one ``slot``; the teacher in a
    folder hidden from both when this runs as root."""
    hidden = tmp_path_factory.mktemp("driver-only")
    shutil.copy(digits_teacher, hidden / "teacher.pt")
    can_hide = os.geteuid() == 0 and shutil.which("unshare") is not None
    with LocalCluster(resources={"slot": 1}, hidden=[hidden] if can_hide else []) as local:
        yield SimpleNamespace(local=local, teacher=hidden / "teacher.pt", hidden=can_hide)


def _command(cluster: SimpleNamespace, command: str, output: Path, *sets: str) -> list[str]:
    """A ``crdnd-ray COMMAND`` line on the digits search space that joins the cluster."""
    settings = [f"scaling.address={cluster.local.address}", f"teacher.checkpoint={cluster.teacher}", *SMALL, *sets]
    return [sys.executable, "-m", "crdnd_ray.cli", command, str(REPO / "search_spaces" / "digits.yaml"),
            *[part for setting in settings for part in ("--set", setting)], "--output", str(output)]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


def _names(cluster: SimpleNamespace) -> dict[str, str]:
    """Ray node id → node name."""
    return {node_id: name for name, node_id in cluster.local.node_ids().items()}


def test_two_nodes_each_with_its_temp_dir_resources_and_no_view_of_the_driver_folder(cluster) -> None:
    ids = cluster.local.node_ids()
    assert sorted(ids) == ["node_a", "node_b"] and len(set(ids.values())) == 2
    raylets = {}
    for name, node in cluster.local.nodes.items():
        raylets[name], command = node.raylet()
        assert f"--raylet_socket_name={node.temp_dir}/" in command and f"--node_id={ids[name]}" in command
        listed = command.split("--static_resource_list=", 1)[1].split()[0].split(",")
        resources = {key: float(value) for key, value in zip(listed[::2], listed[1::2])}
        assert resources.items() >= {"CPU": 1.0, name: 1.0, "slot": 1.0}.items(), resources
    if not cluster.hidden:
        pytest.skip("hiding the driver's folder from the nodes needs root and unshare")
    assert cluster.teacher.is_file()
    assert {name: os.listdir(f"/proc/{pid}/root{cluster.teacher.parent}") for name, pid in raylets.items()} == \
        {"node_a": [], "node_b": []}


def test_train_runs_its_two_ranks_on_two_nodes(cluster, tmp_path: Path) -> None:
    output = tmp_path / "train"
    done = subprocess.run(_command(cluster, "train", output, "scaling.resources_per_worker={CPU: 0.4, slot: 1}")
                          + ["--workers", "2"], check=False, env=_env(), cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    placements = runs.read_placements(output)
    assert len(placements) == 1
    ranks = [_names(cluster)[node_id] for node_id in placements[0]["nodes"]]
    print(f"\ntrain --workers 2: rank 0 on {ranks[0]}, rank 1 on {ranks[1]}")
    assert sorted(ranks) == ["node_a", "node_b"]
    assert [row["epoch"] for row in runs.read_metrics(output)] == [1, 2]
    final = runs.read_final(output)
    assert final["best_n_eval"] == final["last_n_eval"] == 64
    assert (output / "ray_train" / "train").is_dir()


@pytest.fixture(scope="module")
def lost_node_sweep(cluster, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A 3-trial sweep (2 at a time, ``max_failures: 2``) recording into SQLite; once a trial on ``node_b``
    has finished two epochs, every process of ``node_b`` gets SIGKILL."""
    folder = tmp_path_factory.mktemp("lost-node")
    output = folder / "sweep"
    names = _names(cluster)
    command = _command(cluster, "sweep", output, f"train.epochs={SWEEP_EPOCHS}", "search.num_samples=3",
                       "search.scheduler.kind=none", "scaling.max_failures=2", "tracking.enabled=true",
                       f"tracking.uri=sqlite:///{folder / 'mlflow.db'}")
    started = time.time()
    with open(folder / "sweep.log", "w") as log:
        process = subprocess.Popen(command, env=_env(), cwd=folder, stdout=log, stderr=subprocess.STDOUT)
    victim = None
    while victim is None and process.poll() is None and time.time() < started + 300:
        for trial in output.glob("trials/*"):
            placements = runs.read_placements(trial)
            if placements and names[placements[-1]["nodes"][0]] == "node_b" and len(runs.read_metrics(trial)) >= 2:
                victim = trial
        time.sleep(0.1)
    assert victim is not None, (folder / "sweep.log").read_text()[-3000:]
    killed_at = time.time()
    killed = cluster.local.stop_node("node_b", signal.SIGKILL, 0)
    code = process.wait(600)
    return SimpleNamespace(output=output, folder=folder, code=code, victim=victim, killed=killed, names=names,
                           started=started, killed_at=killed_at, ended=time.time())


def test_the_sweep_ran_on_both_nodes_and_lost_nothing(lost_node_sweep) -> None:
    sweep = lost_node_sweep
    assert sweep.code == 0, (sweep.folder / "sweep.log").read_text()[-3000:]
    assert alive(sweep.killed) == [] and len(sweep.killed) >= 3
    results = pd.read_csv(sweep.output / "results.csv")
    assert len(results) == 3 and results["trial_id"].is_unique and set(results["status"]) == {"finished"}
    first_nodes = {sweep.names[runs.read_placements(sweep.output / "trials" / trial)[0]["nodes"][0]]
                   for trial in results["trial_id"]}
    assert first_nodes == {"node_a", "node_b"}
    for trial in results["trial_id"]:
        assert [row["epoch"] for row in runs.read_metrics(sweep.output / "trials" / trial)] == list(range(1, SWEEP_EPOCHS + 1))


def test_the_lost_trial_resumed_on_the_head_from_its_last_checkpoint(lost_node_sweep) -> None:
    sweep = lost_node_sweep
    placements = runs.read_placements(sweep.victim)
    assert [sweep.names[p["nodes"][0]] for p in placements] == ["node_b", "node_a"]
    rows = runs.read_metrics(sweep.victim)
    before = [row["epoch"] for row in rows if row["epoch_started_at"] < sweep.killed_at]
    after = [row["epoch"] for row in rows if row["epoch_started_at"] > sweep.killed_at]
    assert len(before) >= 2 and before + after == list(range(1, SWEEP_EPOCHS + 1)), (before, after)
    assert all(row["epoch_started_at"] > placements[1]["started_at"] for row in rows if row["epoch"] in after)
    retried_at = placements[1]["started_at"]
    finished_at = (sweep.victim / runs.FINAL_FILE).stat().st_mtime
    print(f"\nnode loss: sweep started at 0 s; node_b killed at {sweep.killed_at - sweep.started:.1f} s while trial "
          f"{sweep.victim.name} had finished epochs {before}; retried on node_a at {retried_at - sweep.started:.1f} s "
          f"({retried_at - sweep.killed_at:.1f} s after the kill), resuming at epoch {after[0]}; trial finished at "
          f"{finished_at - sweep.started:.1f} s; sweep ended at {sweep.ended - sweep.started:.1f} s")


def test_mlflow_holds_each_trial_once_with_its_whole_history(lost_node_sweep) -> None:
    from mlflow import MlflowClient

    sweep = lost_node_sweep
    client = MlflowClient(tracking_uri=f"sqlite:///{sweep.folder / 'mlflow.db'}")
    parent_id = runs.read_run_info(sweep.output)["mlflow_run_id"]
    experiment = client.get_run(parent_id).info.experiment_id
    children = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent_id}'", max_results=100)
    trials = sorted(pd.read_csv(sweep.output / "results.csv")["trial_id"])
    assert sorted(run.data.tags["trial_id"] for run in children) == trials
    for run in children:
        assert (run.info.status, run.data.tags["status"]) == ("FINISHED", "finished")
        for name in ("epoch_pgd20_acc", "loss"):
            steps = [point.step for point in client.get_metric_history(run.info.run_id, name)]
            assert sorted(steps) == list(range(1, SWEEP_EPOCHS + 1)), (run.data.tags["trial_id"], name, steps)
        final = runs.read_final(sweep.output / "trials" / run.data.tags["trial_id"])
        assert {key: run.data.metrics[key] for key in final} == pytest.approx(final)
    retried = {run.data.tags["trial_id"] for run in children if run.data.tags.get("last_failure")}
    assert retried == {sweep.victim.name}
    assert client.get_run(parent_id).info.status == "FINISHED"
