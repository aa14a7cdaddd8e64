"""Fixtures of the functional tests: the backends and serving modes they run over."""

from __future__ import annotations

import pytest

# Every functional test that takes `backend` (or `node`) runs once per entry.
BACKENDS = ["kernel"]
# How the node serves CNI calls: the agent behind the shim (the default in
# production) or the plugin in-process (standalone, chosen explicitly).
MODES = ["agent", "standalone"]


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request) -> str:
    return request.param


@pytest.fixture(params=MODES)
def mode(request) -> str:
    return request.param


@pytest.fixture
def node(cluster, backend, mode):
    """One node on the fabric, its node config pinned to `backend`, served in `mode`."""
    return cluster.add_node("n1", "198.51.100.1", agent=(mode == "agent"), backend=backend)
