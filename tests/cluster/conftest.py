"""Fixtures of the multi-node tests: an S3 server and a loopback Ray cluster for each test module (a node-loss
test leaves the cluster as it found it: it adds a replacement for the node it removes).

Module scope, not package scope: ``tests/cluster`` is no Python package, and pytest scopes a "package" fixture
of such a directory to the whole session. The cluster (this process its driver, ``RAY_TMPDIR`` set) then
outlived these tests, and every later ``ray.init()`` in the suite joined it or failed.

Tests marked ``cluster_full`` are the slower ones: they are skipped unless ``D3RAY_CLUSTER_TESTS=1``
(``D3RAY_CLUSTER_TESTS=1 pytest -m cluster tests/cluster`` runs them all).
"""

from __future__ import annotations

import os

import pytest

from cluster_env import LoopbackCluster, S3Server, environment

FULL_ENV = "D3RAY_CLUSTER_TESTS"


def pytest_runtest_setup(item):
    if item.get_closest_marker("cluster_full") and os.environ.get(FULL_ENV) != "1":
        pytest.skip(f"a slower multi-node test: run it with {FULL_ENV}=1 pytest -m cluster tests/cluster")


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    """moto's S3 server on 127.0.0.1, its endpoint and dummy credentials in this process's environment
    (and so in every Ray node started while it runs)."""
    pytest.importorskip("s3fs")
    pytest.importorskip("moto.server")
    import s3fs

    server = S3Server(log=tmp_path_factory.mktemp("s3") / "moto.log")
    server.start()
    try:
        with environment(server.env):
            s3fs.S3FileSystem.clear_instance_cache()  # an instance made before has no endpoint
            yield server
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        server.stop()


@pytest.fixture(scope="module")
def cluster(s3_server):
    """The cluster, with this process connected to its head as the driver."""
    import ray
    from ray._private import auto_init_hook

    from faults import ship_by_value

    cluster = LoopbackCluster()
    # A stage still running in a test's thread at teardown calls Ray APIs after ray.shutdown(); Ray's
    # auto-connect would then join this cluster again (ray.init() finds its address) and block its removal.
    auto_connect, auto_init_hook.enable_auto_connect = auto_init_hook.enable_auto_connect, False
    with environment({"RAY_TMPDIR": cluster.tmpdir}):
        try:
            cluster.start()
            ray.init(address=cluster.address, log_to_driver=False)
            ship_by_value()  # the tests' worker hooks travel by value (Ray workers cannot import tests/)
            yield cluster
        finally:
            ray.shutdown()
            cluster.shutdown()
            auto_init_hook.enable_auto_connect = auto_connect
