"""Tests of resource planning (``engine.resources``) against clusters given as plain dicts: no Ray."""

from __future__ import annotations

import pytest

from crdnd_ray.config import ScalingConfig
from crdnd_ray.engine.resources import TRIAL_CPU, ResourceError, plan_resources


def test_impossible_requests_are_refused_at_once():
    cluster = {"CPU": 2.0, "memory": 8e9}
    with pytest.raises(ResourceError, match=r"asks for 8.01 CPU \(8 worker\(s\) × 1 plus .*only 2 CPU"):
        plan_resources(ScalingConfig(num_workers=8, resources_per_worker={"CPU": 1}), cluster)
    with pytest.raises(ResourceError, match="use_gpu is true but the Ray cluster has no GPU"):
        plan_resources(ScalingConfig(use_gpu=True), cluster)
    with pytest.raises(ResourceError, match="cannot share GPUs"):
        plan_resources(ScalingConfig(num_workers=2, use_gpu=True, resources_per_worker={"CPU": 1, "GPU": 0.5}),
                       {"CPU": 8.0, "GPU": 1.0})




def test_two_concurrent_trials_on_two_cpus_get_fractional_workers_that_fit():
    cluster = {"CPU": 2.0}
    plan = plan_resources(ScalingConfig(), cluster, concurrent_trials=2)
    assert plan.concurrent == 2
    assert plan.worker_resources == {"CPU": 0.99}
    assert plan.trial_resources == {"CPU": TRIAL_CPU}
    assert plan.concurrent * (plan.worker_resources["CPU"] + plan.trial_resources["CPU"]) <= cluster["CPU"]

    in_process = plan_resources(ScalingConfig(), cluster, concurrent_trials=2, in_process=True)
    assert in_process.trial_resources == in_process.worker_resources == {"CPU": 0.99}
    assert in_process.concurrent * in_process.trial_resources["CPU"] <= cluster["CPU"]

    workers = plan_resources(ScalingConfig(num_workers=2), cluster, concurrent_trials=2)
    assert workers.worker_resources == {"CPU": 0.495}
    assert workers.concurrent == 2


def test_workers_fit_on_one_node_beside_the_trial_drivers_of_a_two_node_cluster():
    """Two nodes of 1 CPU: 2 workers of 0.995 CPU (sized from the 2-CPU total) never fit beside a trial driver."""
    one = plan_resources(ScalingConfig(num_workers=2), {"CPU": 2.0}, node_cpus=[1.0, 1.0])
    assert one.worker_resources == {"CPU": 0.99} and one.concurrent == 1
    assert plan_resources(ScalingConfig(num_workers=2), {"CPU": 2.0}).worker_resources == {"CPU": 0.995}
    two = plan_resources(ScalingConfig(num_workers=2), {"CPU": 2.0}, concurrent_trials=2, node_cpus=[1.0, 1.0])
    assert two.worker_resources == {"CPU": 0.49} and two.concurrent == 2
    assert 2 * TRIAL_CPU + 2 * two.worker_resources["CPU"] <= 1.0
    big = plan_resources(ScalingConfig(num_workers=2), {"CPU": 16.0}, node_cpus=[0.0, 8.0, 8.0])
    assert big.worker_resources == {"CPU": 1.0}


def test_gpu_workers_get_whole_gpus_unless_trials_are_packed():
    cluster = {"CPU": 16.0, "GPU": 2.0}
    plan = plan_resources(ScalingConfig(num_workers=2), cluster)
    assert plan.use_gpu and plan.worker_resources["GPU"] == 1.0 and plan.concurrent == 1
    whole = plan_resources(ScalingConfig(), cluster, concurrent_trials=4)
    assert whole.worker_resources["GPU"] == 1.0 and whole.concurrent == 2
    shared = plan_resources(ScalingConfig(trials_per_gpu=2), cluster, concurrent_trials=4)
    assert shared.worker_resources["GPU"] == 0.5 and shared.concurrent == 4


GPU_CLUSTER = {"CPU": 32.0, "GPU": 2.0, "memory": 64e9}


@pytest.mark.parametrize(("trials_per_gpu", "concurrent", "share", "fits"), [
    (1, 8, 1.0, 2), (4, 8, 0.25, 8), (4, 3, 0.25, 3), (3, 9, 0.3333, 6), (7, 14, 0.1428, 14),
    ("auto", 1, 1.0, 1), ("auto", 3, 0.5, 3), ("auto", 8, 0.25, 8), ("auto", 100, 0.25, 8),
])
def test_single_worker_gpu_trials_are_packed_by_trials_per_gpu(trials_per_gpu, concurrent, share, fits):
    scaling = ScalingConfig(use_gpu=True, trials_per_gpu=trials_per_gpu)
    plan = plan_resources(scaling, GPU_CLUSTER, concurrent_trials=concurrent)
    assert plan.worker_resources["GPU"] == share
    assert plan.concurrent == fits
    in_process = plan_resources(scaling, GPU_CLUSTER, concurrent_trials=concurrent, in_process=True)
    assert in_process.trial_resources["GPU"] == share


def test_multi_worker_trials_keep_whole_gpus_and_refuse_packing():
    plan = plan_resources(ScalingConfig(num_workers=2, trials_per_gpu="auto"), GPU_CLUSTER, concurrent_trials=4)
    assert plan.worker_resources["GPU"] == 1.0 and plan.concurrent == 1
    with pytest.raises(ResourceError, match=r"trials_per_gpu=2 packs .* 2 worker\(s\).*Set scaling.trials_per_gpu: 1"):
        plan_resources(ScalingConfig(num_workers=2, trials_per_gpu=2), GPU_CLUSTER)
    with pytest.raises(ResourceError, match="without scaling.resources_per_worker"):
        plan_resources(ScalingConfig(trials_per_gpu=2, resources_per_worker={"CPU": 1, "GPU": 0.5}), GPU_CLUSTER)


def test_trials_per_gpu_accepts_positive_integers_and_auto():
    assert ScalingConfig(trials_per_gpu="auto").trials_per_gpu == "auto"
    assert ScalingConfig().trials_per_gpu == 1
    for bad in (0, -1, "many"):
        with pytest.raises(ValueError):
            ScalingConfig(trials_per_gpu=bad)
