"""A chain in which the reference `tuning` plugin runs after vpcni.

The calls are made as libcni makes them for a conflist: ADD in order, each
plugin after the first gets the previous result as prevResult; CHECK and DEL
get the chain's final result; DEL runs in reverse order.
"""

from __future__ import annotations

import pytest

from tests.functional.leftovers import assert_no_leftovers, links
from tests.functional.netstate import pod_interface, sysctl
from vpcni.lab.cluster import seed_network

pytestmark = pytest.mark.functional

SYSCTL = "net.ipv4.conf.eth1.arp_notify"


def test_tuning_after_vpcni_add_check_del(cluster, node, backend):
    pod = cluster.add_pod(node, "a")
    backups = cluster.sandbox.dir("tuning")
    name = f"{cluster.sandbox.prefix}-chain"
    vpcni = seed_network(name, 342, "172.16.42.1/24", version="1.0.0")
    tuning = {"cniVersion": "1.0.0", "name": name, "type": "tuning",
              "sysctl": {SYSCTL: "1"}, "allmulti": True, "dataDir": str(backups)}

    def call(command, config, plugin, prev=None):
        config = config | ({"prevResult": prev} if prev is not None else {})
        res = node.cni(command, config, pod.container_id, pod.netns, plugin=plugin)
        assert res.ok, f"{plugin} {command}: {res.stdout or res.stderr}"
        return res.json

    first = call("ADD", vpcni, "vpcni")
    final = call("ADD", tuning, "tuning", first)
    # tuning changes no identity, so the chain's result is vpcni's.
    assert final["interfaces"] == first["interfaces"]
    assert final["ips"] == first["ips"]
    _, itf = pod_interface(final, pod.netns)
    assert sysctl(pod.ns, SYSCTL) == "1"
    assert "ALLMULTI" in links(pod.ns.name)["eth1"]["flags"]
    assert [p.name for p in backups.iterdir()] == [f"{pod.container_id}_eth1.json"]

    call("CHECK", vpcni, "vpcni", final)
    call("CHECK", tuning, "tuning", final)

    call("DEL", tuning, "tuning", final)
    assert "ALLMULTI" not in links(pod.ns.name)["eth1"]["flags"]
    assert list(backups.iterdir()) == []
    call("DEL", vpcni, "vpcni", final)
    assert_no_leftovers(node, backend, pods=[pod], macs=[itf["mac"]])
