"""Checks against the Ray cluster a pipeline runs on, made before any actor or worker starts."""

from __future__ import annotations

import logging
import os
import time

logger = logging.getLogger(__name__)

# A cluster joined through an address (``ray job submit``, KubeRay) may autoscale GPU nodes in:
# wait this long for them before refusing. A local cluster started by this process cannot grow.
GPU_WAIT_S = 600.0
POLL_S = 5.0


def joined_existing_cluster() -> bool:
    """True under ``ray job submit`` / a ``RAY_ADDRESS`` (the cluster may autoscale), False for a local one."""
    return bool(os.environ.get("RAY_ADDRESS"))


def require_gpus(needed: float, what: str, wait_s: float | None = None) -> None:
    """Refuse a GPU request the cluster cannot meet (Ray would otherwise wait for it forever)."""
    import ray

    wait = (GPU_WAIT_S if joined_existing_cluster() else 0.0) if wait_s is None else wait_s
    deadline = time.monotonic() + wait
    while True:
        have = float(ray.cluster_resources().get("GPU", 0.0))
        if have >= needed:
            return
        if time.monotonic() >= deadline:
            raise ValueError(f"{what}={needed:g} but the Ray cluster has {have:g} GPU(s)"
                             + (f" (waited {wait:.0f} s for autoscaling)" if wait else "")
                             + f": run on a cluster with GPUs, or set {what}=0 to run on CPU")
        logger.info("waiting for GPUs: %s=%g, the cluster has %g", what, needed, have)
        time.sleep(POLL_S)
