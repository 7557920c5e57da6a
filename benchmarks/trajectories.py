"""Trajectory-generation throughput on local Ray: rows/s with 1 vs 2 decoder actors (tiny preset).

    python benchmarks/trajectories.py --out runs/bench/trajectories.json [--n-prompts 1000]

Each configuration writes a fresh output directory; the wall time includes Ray Data's actor
start-up (one teacher load per actor), which is part of what a user waits for.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import tempfile

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

logger = logging.getLogger("d3ray.bench.trajectories")


def main() -> None:
    import ray

    from pipelines import trajectories as P

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="runs/bench/trajectories.json")
    parser.add_argument("--n-prompts", type=int, default=1000)
    parser.add_argument("--shard-size", type=int, default=125)
    args = parser.parse_args()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    rows = []
    for actors in (1, 2):
        tmp = tempfile.mkdtemp(prefix="d3ray-bench-traj-")
        try:
            cfg = P.TrajectoriesConfig(out=tmp, n_prompts=args.n_prompts, shard_size=args.shard_size,
                                       num_actors=actors, num_cpus_per_actor=os.cpu_count() / actors / 2)
            stats = P.run(cfg)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        rows.append({"actors": actors, **stats})
        logger.info("%d actor(s): %.1f rows/s, %.0f slots/s", actors, stats["rows_per_second"],
                    stats["tokens_per_second"])
    out = {"hardware": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
           "n_prompts": args.n_prompts, "shard_size": args.shard_size, "results": rows}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    logger.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
