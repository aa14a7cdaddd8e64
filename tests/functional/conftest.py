"""Fixtures of the functional tests: the backends they run over, one node pinned to each."""

from __future__ import annotations

import pytest

# Every functional test that takes `backend` (or `node`) runs once per entry.
BACKENDS = ["kernel"]


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request) -> str:
    return request.param


@pytest.fixture
def node(cluster, backend):
    """One node on the fabric, its node config pinned to `backend`."""
    return cluster.add_node("n1", "198.51.100.1", backend=backend)
