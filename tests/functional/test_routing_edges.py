"""Routed subnets at the edges: bad input is refused before anything is left behind,
a node that cannot make a router says why, the router goes with the VPC's last pod,
and the node's own rules and probe routes follow. One kernel node with its agent
(no EVPN: routing within the node), one standalone node."""

from __future__ import annotations

import json
import os

import pytest

from vpcni.lab.cluster import Cluster, seed_network
from vpcni.lab.netns import NETNS_DIR, Sandbox, wait_for
from tests.functional.leftovers import assert_no_leftovers, links

pytestmark = pytest.mark.functional

ROUTER_LINKS = ("vgw", "vl3", "vrt")


def routed(name: str, vni: int, subnet: str, addr: str, **routing) -> dict:
    return seed_network(name, vni, addr, routing={"vpc": "green", "l3vni": 4000,
                                                  "subnet": subnet} | routing)


@pytest.fixture(scope="module")
def world():
    box = Sandbox()
    try:
        cluster = Cluster(box)
        agent = cluster.add_node("n1", "198.51.100.1", agent=True, backend="kernel",
                                 reconcileInterval=2)
        standalone = cluster.add_node("n2", "198.51.100.2", backend="kernel")
        yield cluster, agent, standalone
    finally:
        box.cleanup()


def routers(node) -> list[str]:
    prefix = node.node_config["routerNamespacePrefix"]
    return sorted(n for n in os.listdir(NETNS_DIR) if n.startswith(prefix))


def router_links(node) -> set[str]:
    return {n for n in links(node.ns.name) if n.startswith(ROUTER_LINKS)}


def error(res) -> dict:
    assert not res.ok, res.stdout
    return json.loads(res.stdout)


@pytest.mark.parametrize("addr, needle", [
    ("10.21.0.5/24", "address 10.21.0.5/24 is outside routing.subnet 10.20.0.0/24"),
    ("10.20.0.1/24", "address 10.20.0.1/24 is routing.gateway"),
])
def test_a_pod_address_that_does_not_fit_the_subnet_is_refused_cleanly(world, addr, needle):
    cluster, node, _ = world
    pod = cluster.add_pod(node, f"bad{addr.split('.')[2]}{addr[-4]}")
    res = node.cni("ADD", routed("green-a", 400, "10.20.0.0/24", addr), pod.container_id,
                   pod.netns)
    err = error(res)
    assert err["code"] == 7 and needle in err["msg"], err
    assert_no_leftovers(node, "kernel", pods=[pod])
    assert not router_links(node) and not routers(node)


def test_the_router_comes_with_the_first_pod_and_goes_with_the_last(world):
    cluster, node, _ = world
    a, b = cluster.add_pod(node, "ra"), cluster.add_pod(node, "rb")
    conf_a = routed("green-a", 400, "10.20.0.0/24", "10.20.0.5/24")
    conf_b = routed("green-b", 401, "10.20.1.0/24", "10.20.1.5/24")
    res = cluster.attach(a, conf_a)
    assert res["ips"][0]["gateway"] == "10.20.0.1"
    assert {"dst": "0.0.0.0/0", "gw": "10.20.0.1"} in res["routes"]
    cluster.attach(b, conf_b)
    assert routers(node) == [f"{node.ns.name}-r4000"]
    # (the L3VNI device is in the router: moved there)
    assert router_links(node) == {"vgw400", "vgw401", "vrt4000"}
    assert a.ns.ping("10.20.1.5")
    # CHECK passes, and sees a gateway that went away.
    assert node.cni("CHECK", conf_a | {"prevResult": res}, a.container_id, a.netns).ok
    node.ns.ip("link", "del", "vgw400")
    err = error(node.cni("CHECK", conf_a | {"prevResult": res}, a.container_id, a.netns))
    assert "vgw400" in err["msg"] or "gw400" in err["msg"], err
    # A repeated ADD repairs it.
    cluster.attach(a, conf_a)
    assert a.ns.ping("10.20.1.5")
    # The node reaches its pods (kubelet probes) through the transit link.
    assert node.ns.ping("10.20.0.5") and node.ns.ping("10.20.1.5")
    cluster.detach(a, conf_a)
    assert router_links(node) == {"vgw401", "vrt4000"}
    assert not node.ns.ping("10.20.0.5")
    cluster.detach(b, conf_b)
    assert not router_links(node) and not routers(node)
    assert "10.20." not in node.ns.ip("route", "show").stdout
    assert_no_leftovers(node, "kernel", pods=[a, b])


def test_a_node_that_cannot_keep_a_router_says_why(world):
    """The standalone plugin runs through `ip netns exec` here: its /run/netns is a slave
    mount, where a router namespace would vanish with the process."""
    cluster, _, node = world
    pod = cluster.add_pod(node, "rs")
    res = node.cni("ADD", routed("green-a", 400, "10.20.0.0/24", "10.20.0.5/24"),
                   pod.container_id, pod.netns)
    err = error(res)
    assert err["code"] == 50 and "slave mount" in err["msg"], err
    assert_no_leftovers(node, "kernel", pods=[pod])
    assert not router_links(node) and not routers(node)



def test_the_nodes_routing_rules_come_back_after_a_flush(world):
    """A firewall reload flushes the node's `table inet vpcni_route` while a router
    exists: the agent's next full reconcile puts it back, and egress isolation with it."""
    cluster, node, _ = world
    pod = cluster.add_pod(node, "rf")
    conf = routed("green-a", 400, "10.20.0.0/24", "10.20.0.5/24")
    cluster.attach(pod, conf)
    try:
        node.ns.exec("nft", "delete", "table", "inet", "vpcni_route")
        wait_for(lambda: node.ns.exec("nft", "list", "table", "inet", "vpcni_route",
                                      check=False).returncode == 0, timeout=10,
                 what="the routing rules re-installed")
        assert "into-vpc" in node.ns.exec("nft", "list", "table", "inet", "vpcni_route").stdout
    finally:
        cluster.detach(pod, conf)


@pytest.mark.parametrize("conf, needle", [
    # The subnet over the node's underlay: its probe routes would take the node's traffic.
    (routed("green-u", 402, "198.51.100.0/24", "198.51.100.77/24"),
     "overlaps the node's underlay 198.51.100.0/24"),
    # An L3VNI that is a VNI in use here (the plain network below holds VNI 500).
    (routed("green-l", 403, "10.20.3.0/24", "10.20.3.5/24", l3vni=500),
     "routing.l3vni 500 of network 'green-l' is the VNI of network 'plain'"),
])
def test_a_routed_subnet_that_would_take_what_is_not_its_own_is_refused(world, conf, needle):
    cluster, node, _ = world
    holder = cluster.add_pod(node, f"hold{conf['vni']}")
    plain = seed_network("plain", 500, "172.16.50.5/24")
    cluster.attach(holder, plain)
    try:
        pod = cluster.add_pod(node, f"t{conf['vni']}")
        err = error(node.cni("ADD", conf, pod.container_id, pod.netns))
        assert err["code"] == 7 and needle in err["msg"], err
        assert not router_links(node) and not routers(node)
    finally:
        cluster.detach(holder, plain)
    assert_no_leftovers(node, "kernel", pods=[holder, pod])
