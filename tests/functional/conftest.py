"""Fixtures of the functional tests: the backends and serving modes they run over."""

from __future__ import annotations

import pytest

# Every functional test that takes `backend` runs once per backend.
BACKENDS = ["kernel", "ovs"]
# Tests that take `node` (or `mode`) run once per way a node serves CNI calls:
# the agent behind the shim (the production default) for every backend, and
# the plugin in-process (standalone, chosen explicitly) once, since the
# handler and backends it runs are the same.
SERVED = [("kernel", "agent"), ("kernel", "standalone"), ("ovs", "agent")]


def pytest_generate_tests(metafunc):
    if "mode" in metafunc.fixturenames:
        metafunc.parametrize(("backend", "mode"), SERVED, scope="module",
                             ids=[f"{b}-{m}" for b, m in SERVED])
    elif "backend" in metafunc.fixturenames:
        metafunc.parametrize("backend", BACKENDS, scope="module")


@pytest.fixture
def node(cluster, backend, mode):
    """One node on the fabric, its node config pinned to `backend`, served in `mode`.

    For ovs, Cluster.add_node also starts the node's ovsdb-server and ovs-vswitchd."""
    return cluster.add_node("n1", "198.51.100.1", agent=(mode == "agent"), backend=backend)
