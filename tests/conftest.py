"""Fixtures shared by the whole suite.

Functional tests build everything in network namespaces created here with a
unique prefix, and the fixtures remove them even when a test fails.
"""

from __future__ import annotations

import pytest

from vpcni.lab.cluster import Cluster, environment_ok
from vpcni.lab.netns import Sandbox


def pytest_collection_modifyitems(config, items):
    why = environment_ok()
    if why is None:
        return
    skip = pytest.mark.skip(reason=f"functional: {why}")
    for item in items:
        if "functional" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def sandbox():
    box = Sandbox()
    try:
        yield box
    finally:
        box.cleanup()


@pytest.fixture
def cluster(sandbox):
    """An empty simulated cluster: a fabric on 198.51.100.0/24, no nodes yet."""
    return Cluster(sandbox)


@pytest.fixture
def two_nodes(cluster):
    """The seed's two nodes, 198.51.100.1 and .2, each with its node config."""
    n1 = cluster.add_node("n1", "198.51.100.1")
    n2 = cluster.add_node("n2", "198.51.100.2")
    return cluster, n1, n2
