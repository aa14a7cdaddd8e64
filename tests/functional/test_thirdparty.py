"""A third-party switch backend, installed as a package of its own (tests/plugins/toy),
serves attachments through its entry point alone: no line of vpcni changes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.functional.outcome import ok
from vpcni.lab.cluster import installed_executable, seed_network
from vpcni.lab.netns import wait_for

pytestmark = [pytest.mark.functional, pytest.mark.slow]
PLUGIN = Path(__file__).resolve().parents[1] / "plugins" / "toy"


@pytest.fixture(scope="module")
def toy_installed():
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(pip + ["install", "--no-deps", "--no-build-isolation", "--no-index",
                          str(PLUGIN)], check=True, capture_output=True, timeout=300)
    try:
        yield
    finally:
        subprocess.run(pip + ["uninstall", "-y", "vpcni-toy-switch"], capture_output=True,
                       timeout=300)


def test_a_network_pinned_to_the_toy_backend_is_served_by_it(toy_installed, cluster):
    node = cluster.add_node("n1", "198.51.100.1", agent=True, toy={"mtu": 1300})
    probe = node.ns.exec(installed_executable("vpcnictl"), "probe", "--node-config",
                         str(node.config_path)).stdout
    assert "toy" in probe and "a Linux bridge per VNI" in probe
    a, b = cluster.add_pod(node, "a"), cluster.add_pod(node, "b")
    net = seed_network("vpc-toy", 901, backend="toy")
    ra = cluster.attach(a, net | {"addr": "172.16.90.1/24"})
    cluster.attach(b, net | {"addr": "172.16.90.2/24"})
    pod_if = [i for i in ra["interfaces"] if i.get("sandbox")][0]
    assert pod_if["mtu"] == 1300  # the toy's own config section, validated by its model
    port = [i for i in ra["interfaces"] if not i.get("sandbox")][0]["name"]
    assert port.startswith("ty")
    bridged = json.loads(node.ns.ip("-j", "link", "show", "master", "toy901").stdout)
    assert {l["ifname"] for l in bridged} >= {port}
    wait_for(lambda: a.ns.ping("172.16.90.2"), timeout=10, what="a -> b over the toy bridge")
    ok(node.cni("CHECK", net | {"addr": "172.16.90.1/24", "prevResult": ra},
                a.container_id, a.netns))
    cluster.detach(a, net | {"addr": "172.16.90.1/24"})
    cluster.detach(b, net | {"addr": "172.16.90.2/24"})
    assert node.ns.ip("link", "show", "toy901", check=False).returncode != 0
