"""Checks against the Ray cluster a pipeline runs on, made before any actor or worker starts; a driver-side bar.

Stages ask for CPUs and GPUs through their own fields, and for custom Ray resources through a
``resources`` field (``{"worker": 1}``): a cluster pins work to node types by such resources the
way a GPU cluster pins it by ``GPU``. :func:`validate_resources` validates that field on construction.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import time
from typing import Callable, Iterator, Mapping

logger = logging.getLogger(__name__)

# A cluster joined through an address (``ray job submit``, KubeRay) may autoscale GPU nodes in:
# wait this long for them before refusing. A local cluster started by this process cannot grow.
GPU_WAIT_S = 600.0
POLL_S = 5.0
# Resources Ray reserves names for; each stage sets them through its own fields (num_cpus..., num_gpus...).
RESERVED = ("CPU", "GPU", "memory", "object_store_memory")


def joined_existing_cluster() -> bool:
    """True under ``ray job submit`` / a ``RAY_ADDRESS`` (the cluster may autoscale), False for a local one."""
    return bool(os.environ.get("RAY_ADDRESS"))


def validate_resources(resources: Mapping[str, float], what: str) -> None:
    """Refuse a custom-resource request Ray would reject: names must be custom, amounts > 0 (whole above 1)."""
    for name, amount in resources.items():
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"{what}={dict(resources)}: resource names must be non-empty strings; name the "
                             "custom resource your nodes declare, e.g. {'worker': 1}")
        if name in RESERVED:
            raise ValueError(f"{what}[{name!r}]={amount!r}: {name} is not a custom resource; set it through the "
                             "stage's own CPU/GPU fields and name custom resources only here")
        number = isinstance(amount, (int, float)) and not isinstance(amount, bool)
        if not number or not math.isfinite(amount) or amount <= 0:
            raise ValueError(f"{what}[{name!r}]={amount!r}: must be a number > 0 (the share of the resource each "
                             "one reserves); drop the entry to ask for none")
        if amount > 1 and amount != int(amount):
            raise ValueError(f"{what}[{name!r}]={amount!r}: Ray takes fractions of a resource only up to 1; "
                             f"use a whole number above 1, e.g. {math.ceil(amount)}")


def _wait_for(name: str, needed: float, wait: float) -> float:
    """How much of resource ``name`` the cluster has, once it has ``needed`` or ``wait`` seconds have passed."""
    import ray

    deadline = time.monotonic() + wait
    while True:
        have = float(ray.cluster_resources().get(name, 0.0))
        if have >= needed or time.monotonic() >= deadline:
            return have
        logger.info("waiting for resource %s: %g needed, the cluster has %g", name, needed, have)
        time.sleep(POLL_S)


def _wait_s(wait_s: float | None) -> float:
    return (GPU_WAIT_S if joined_existing_cluster() else 0.0) if wait_s is None else wait_s


def require_gpus(needed: float, what: str, wait_s: float | None = None) -> None:
    """Refuse a GPU request the cluster cannot meet (Ray would otherwise wait for it forever)."""
    wait = _wait_s(wait_s)
    have = _wait_for("GPU", needed, wait)
    if have < needed:
        raise ValueError(f"{what}={needed:g} but the Ray cluster has {have:g} GPU(s)"
                         + (f" (waited {wait:.0f} s for autoscaling)" if wait else "")
                         + f": run on a cluster with GPUs, or set {what}=0 to run on CPU")


def require_resources(resources: Mapping[str, float], what: str, wait_s: float | None = None) -> None:
    """Refuse custom resources no node of the cluster offers (Ray would otherwise wait for them forever)."""
    wait = _wait_s(wait_s)
    for name, needed in resources.items():
        have = _wait_for(name, needed, wait)
        if have < needed:
            raise ValueError(f"{what}[{name!r}]={needed:g} but the Ray cluster has {have:g} of resource {name!r}"
                             + (f" (waited {wait:.0f} s for autoscaling)" if wait else "")
                             + f": start nodes that declare it (ray start --resources '{{\"{name}\": 1}}'), or drop "
                             f"it from {what}")


class _Count:
    """A number Ray workers set and the driver reads (the actor behind :func:`remote_progress`)."""

    def __init__(self) -> None:
        self.n = 0

    def set(self, n: int) -> None:
        self.n = n

    def get(self) -> int:
        return self.n


@contextlib.contextmanager
def remote_progress(name: str, total: int, desc: str, unit: str, every_s: float = 1.0) -> Iterator[None]:
    """A progress bar on the driver that Ray workers move through :func:`progress_setter` ``(name)``."""
    import ray
    from tqdm import tqdm

    counter = ray.remote(num_cpus=0)(_Count).options(name=name).remote()
    bar = tqdm(total=total, desc=desc, unit=unit)
    stop = threading.Event()

    def follow() -> None:
        while True:
            try:
                bar.update(ray.get(counter.get.remote()) - bar.n)
            except ray.exceptions.RayError:  # the job is ending
                return
            if stop.wait(every_s):
                return

    thread = threading.Thread(target=follow, name=f"{desc} bar", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        with contextlib.suppress(ray.exceptions.RayError):
            bar.update(ray.get(counter.get.remote()) - bar.n)
        bar.close()
        ray.kill(counter)


def progress_setter(name: str | None) -> Callable[[int], None]:
    """In a Ray worker: ``set(n)`` moves the bar that :func:`remote_progress` ``(name)`` draws (a no-op without it)."""
    import ray

    try:
        counter = ray.get_actor(name) if name else None
    except ValueError:  # no such bar (the stage runs without one)
        counter = None
    return (lambda n: None) if counter is None else (lambda n: counter.set.remote(n))
