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


def test_gpu_workers_get_whole_gpus_and_single_worker_trials_share_them():
    cluster = {"CPU": 16.0, "GPU": 2.0}
    plan = plan_resources(ScalingConfig(num_workers=2), cluster)
    assert plan.use_gpu and plan.worker_resources["GPU"] == 1.0 and plan.concurrent == 1
    shared = plan_resources(ScalingConfig(), cluster, concurrent_trials=4)
    assert shared.worker_resources["GPU"] == 0.5 and shared.concurrent == 4
