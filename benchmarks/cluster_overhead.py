"""Per-trial overhead of the cluster path: the same one-step digits trials on a local Ray and on a two-node Ray
cluster of this machine (two ``ray start`` nodes of 1 CPU each, ``crdnd_ray.engine.local_cluster``) joined with
``scaling.address``.

In each place two kinds of trial run through the real engine (``sweep_overhead.measure``: ``run_trials``
with a timing callback in the driver): single-worker trials that train in their Tune trial (2 at a time), and
2-worker Ray Train runs (1 at a time; on the cluster one rank per node). A trial's start-up is the time from
its start to its first report. Printed and written to ``benchmarks/results/cluster_overhead.json``.

    PYTHONPATH=. .venv/bin/python benchmarks/cluster_overhead.py [--trials 4] [--train-trials 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from sweep_overhead import REPO, measure

KINDS = (("in-process trial", {"scaling.in_process_single_worker": True}, 2),
         ("2-worker Ray Train run", {"scaling.num_workers": 2}, 1))
"""(mode, overrides, trials at a time) of each kind of trial."""


def run_place(place: str, address: str | None, counts: tuple[int, int], names: dict[str, str]) -> list[dict]:
    """Every kind of trial on one Ray (local when ``address`` is None); node ids become ``names``."""
    import ray

    rows = []
    for (mode, overrides, concurrent), trials in zip(KINDS, counts):
        row = measure(mode, {**overrides, "scaling.address": address}, trials, concurrent)
        row["place"] = place
        row["nodes"] = [[names.get(node, "local") for node in ranks] for ranks in row["nodes"]]
        print(f"{place}, {mode}: start-up {row['startup_to_first_report_s_median']:.1f} s (median of {trials})",
              flush=True)
        rows.append(row)
    ray.shutdown()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=4, help="single-worker trials per place")
    parser.add_argument("--train-trials", type=int, default=2, help="2-worker Ray Train trials per place")
    args = parser.parse_args()
    os.environ.setdefault("CRDND_RAY_CACHE", str(Path(tempfile.gettempdir()) / "crdnd-ray-bench-teachers"))
    import ray
    import torch

    from crdnd_ray.engine.local_cluster import LocalCluster

    counts = (args.trials, args.train_trials)
    load = os.getloadavg()
    rows = run_place("local Ray (2 CPUs)", None, counts, {})
    started = time.perf_counter()
    with LocalCluster() as cluster:
        cluster_start = time.perf_counter() - started
        names = {node_id: name for name, node_id in cluster.node_ids().items()}
        rows += run_place("2-node cluster (1 CPU each)", cluster.address, counts, names)
    print(f"two ray start nodes up in {cluster_start:.1f} s (load average before: {load[0]:.1f})")
    print(f"{'place':28s} {'trial':24s} {'sweep wall s':>12s} {'start-up s (median)':>20s} "
          f"{'trial wall s (median)':>22s}  ranks on")
    for row in rows:
        print(f"{row['place']:28s} {row['mode']:24s} {row['sweep_wall_s']:12.2f} "
              f"{row['startup_to_first_report_s_median']:20.2f} {row['trial_wall_s_median']:22.2f}  "
              f"{', '.join('/'.join(ranks) for ranks in row['nodes'])}")
    out = REPO / "benchmarks" / "results" / "cluster_overhead.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                           "torch": torch.__version__, "ray": ray.__version__,
                                           "load_average_before": round(load[0], 2)},
                               "cluster_start_s": round(cluster_start, 1), "results": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
