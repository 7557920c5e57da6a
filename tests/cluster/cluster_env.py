"""A multi-node Ray cluster and an S3 server, both on 127.0.0.1, for the cluster tests.

- :class:`S3Server`: moto's S3 server (``python -m moto.server``) in its own process, the way s3fs's
  own tests run it. s3fs (botocore) and pyarrow (Ray Train's storage) both read the endpoint from
  ``AWS_ENDPOINT_URL``, so run directories, trajectories, checkpoints and the exported student go
  there through their ``s3://`` URIs, from the driver and from every Ray worker alike.
- :class:`LoopbackCluster`: ``ray.cluster_utils.Cluster``: a head and worker nodes as real raylets,
  each with its own CPUs, object store and a custom resource (``worker``) that pins the stages to
  the worker nodes, the way a GPU cluster pins them by ``GPU``. Nodes are removed hard (SIGKILL, as
  a lost machine) and replacements added with the same resources.

Every process the cluster starts inherits the environment at ``add_node`` time, so the S3
variables are set first. ``RAY_TMPDIR`` points at a private directory: ``Cluster`` records its
address in ``$RAY_TMPDIR/ray/ray_current_cluster``, where a plain ``ray.init()`` elsewhere on this
machine would otherwise find it and join it.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

WORKER = "worker"  # the custom resource of the worker nodes: stages ask for it to run there
NODE_CPUS = 1
OBJECT_STORE_BYTES = 100 * 2**20  # per node; the tiny stages move kilobytes
# Node failure detection: the GCS health-checks every raylet each second and declares it dead after
# 10 misses (Ray's defaults, 3 s x 5, tolerate more; 10 s keeps a loaded 2-core machine clear of false alarms).
SYSTEM_CONFIG = {"health_check_period_ms": 1000, "health_check_failure_threshold": 10}
S3_ENV_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL",
               "AWS_EC2_METADATA_DISABLED")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(check: Callable[[], object], timeout_s: float, what: str, every_s: float = 0.5):
    """Poll ``check`` until it returns something truthy (returned), or fail naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every_s)
    raise TimeoutError(f"waited {timeout_s:.0f} s for {what}")


@contextlib.contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the block, then restore the previous values."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# -- S3 -------------------------------------------------------------------------------------------------
@dataclass
class S3Server:
    """moto's S3 server on 127.0.0.1 in a subprocess (its log in ``log``)."""

    log: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        """What s3fs, botocore and pyarrow need to reach it (credentials are moto's dummies)."""
        return {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_ENDPOINT_URL": self.endpoint, "AWS_EC2_METADATA_DISABLED": "true"}

    def start(self, timeout_s: float = 60) -> None:
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                                             str(self.port)], stdout=log, stderr=subprocess.STDOUT)
        atexit.register(self.stop)  # also when a fixture's teardown never runs (an interrupted session)

        def up() -> bool:
            if self.process.poll() is not None:
                raise RuntimeError(f"moto's S3 server exited ({self.process.returncode}): "
                                   f"{self.log.read_text()[-2000:]}")
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", self.port)) == 0

        wait_until(up, timeout_s, f"moto's S3 server on port {self.port}", every_s=0.2)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=20)


def s3():
    """A new s3fs filesystem that caches no listing: it sees what other processes (Ray workers) wrote."""
    import s3fs

    return s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)


def make_bucket(name: str) -> str:
    """Create the bucket ``name`` on the server; returns ``s3://name``."""
    fs = s3()
    if not fs.exists(name):
        fs.mkdir(name)
    return f"s3://{name}"


def objects(uri: str) -> dict[str, tuple[str, str]]:
    """``{key: (ETag, LastModified)}`` of every object under ``uri`` (``s3://...``)."""
    fs = s3()
    root = uri.removeprefix("s3://").rstrip("/")
    if not fs.exists(root):
        return {}
    return {path: (str(info["ETag"]), str(info["LastModified"]))
            for path, info in fs.find(root, detail=True).items()}


# -- the cluster ----------------------------------------------------------------------------------------
@dataclass
class LoopbackCluster:
    """A head and ``workers`` worker nodes, each 1 CPU, its own object store and ``{WORKER: 1}``."""

    workers: int = 2
    dashboard: bool = True  # the head's dashboard: the state API (where actors run) and the job server
    cluster: object = None
    dashboard_port: int | None = None
    # short (Ray's socket paths must fit 107 bytes) and private (see the module docstring)
    tmpdir: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="d3c-", dir="/tmp"))
    added: int = 0  # worker nodes started so far (replacements included)
    removed: int = 0

    def start(self) -> None:
        """Start the head and the worker nodes; the caller has set ``RAY_TMPDIR`` to :attr:`tmpdir`."""
        from ray.cluster_utils import Cluster

        head = {"num_cpus": NODE_CPUS, "object_store_memory": OBJECT_STORE_BYTES, "node_ip_address": "127.0.0.1",
                "include_dashboard": self.dashboard, "_system_config": SYSTEM_CONFIG}
        if self.dashboard:
            self.dashboard_port = free_port()
            # the agent's default port (52365) may belong to another Ray on this machine: then it never starts,
            # and the job server answers "No available agent to submit job"
            head.update(dashboard_host="127.0.0.1", dashboard_port=self.dashboard_port,
                        dashboard_agent_listen_port=free_port())
        self.cluster = Cluster(initialize_head=True, connect=False, head_node_args=head)
        for _ in range(self.workers):
            self.add_worker()
        self.cluster.wait_for_nodes(timeout=120)

    @property
    def address(self) -> str:
        return self.cluster.address

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def add_worker(self):
        """A worker node with the ``worker`` resource (a first one, or the replacement of a lost one)."""
        node = self.cluster.add_node(num_cpus=NODE_CPUS, object_store_memory=OBJECT_STORE_BYTES,
                                     node_ip_address="127.0.0.1", resources={WORKER: 1})
        self.added += 1
        return node

    def worker_nodes(self) -> dict[str, object]:
        """``{node id: node}`` of the live worker nodes."""
        return {node.node_id: node for node in self.cluster.worker_nodes}

    def remove(self, node_id: str) -> float:
        """Kill every process of worker node ``node_id`` at once (SIGKILL: a lost machine); returns when."""
        node = self.worker_nodes()[node_id]
        at = time.monotonic()
        self.cluster.remove_node(node, allow_graceful=False)
        self.removed += 1
        return at

    def shutdown(self) -> None:
        if self.cluster is not None:
            self.cluster.shutdown()
        shutil.rmtree(self.tmpdir, ignore_errors=True)


def alive_worker_node_ids() -> set[str]:
    """Node ids the GCS holds alive and that carry the ``worker`` resource."""
    import ray

    return {n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get(WORKER)}


def nodes_of_actors(cluster: LoopbackCluster, class_name: str) -> dict[str, str]:
    """``{actor id: node id}`` of the live actors whose class name contains ``class_name`` (Ray's state API,
    asked at this cluster's dashboard: without an address it picks whichever Ray instance it finds)."""
    from ray.util.state import list_actors

    actors = list_actors(address=cluster.dashboard_url, filters=[("state", "=", "ALIVE")], limit=1000)
    return {a.actor_id: a.node_id for a in actors if class_name in a.class_name}


def tasks(cluster: LoopbackCluster, func_name: str) -> list:
    """Every attempt of the tasks whose name contains ``func_name`` (state, node id, attempt number)."""
    from ray.util.state import list_tasks

    return [t for t in list_tasks(address=cluster.dashboard_url, limit=1000, detail=True) if func_name in t.name]
