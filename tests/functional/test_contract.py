"""The backend contract: every switch backend (kernel, ovs) with every interface provider
(veth, sriov on a simulated switchdev NIC) through the same cases, as a runtime calls
the installed plugin (agent mode).

Each case names what the contract promises (core/backend.py): ADD builds a pod interface
whose port sits in the VNI's switch; ADD is repeatable; DEL never fails on what is gone
and leaves nothing; CHECK names what differs; GC removes what is not valid; VNIs stay apart.
"""

from __future__ import annotations

import json
import os
import re

import pytest

from tests.functional.outcome import failed, ok
from tests.functional.test_mtu import link_mtu, set_underlay_mtu
from vpcni.lab.cluster import seed_network
from vpcni.lab.netns import NETNS_DIR, wait_for

pytestmark = pytest.mark.functional

COMBOS = [("kernel", "veth"), ("ovs", "veth"), ("kernel", "sriov"), ("ovs", "sriov")]
N1 = "198.51.100.1"


@pytest.fixture(params=COMBOS, ids=[f"{s}+{p}" for s, p in COMBOS])
def combo(request, cluster):
    switch, provider = request.param
    nic = {"vfs": 4, "mode": "switchdev"} if provider == "sriov" else None
    node = cluster.add_node("n1", N1, agent=True, backend=switch, nic=nic)
    extra = {"interface": "vf"} if provider == "sriov" else {}

    def net(name="vpc-c", vni=820, addr=None, **more):
        return seed_network(name, vni, addr, **extra, **more)
    return cluster, node, switch, provider, net


def attached(combo, name: str = "a", addr: str = "172.16.82.1/24"):
    """A pod of `combo`'s node attached to the network; (pod, its config, the result)."""
    cluster, node, _, _, net = combo
    pod = cluster.add_pod(node, name)
    cfg = net(addr=addr)
    return pod, cfg, cluster.attach(pod, cfg)


def pod_side(res: dict) -> dict:
    return [i for i in res["interfaces"] if i.get("sandbox")][0]


def port_of(res: dict) -> str:
    return [i for i in res["interfaces"] if not i.get("sandbox")][0]["name"]


def in_switch(node, switch: str, port: str, vni: int) -> bool:
    if switch == "kernel":
        out = node.ns.ip("-j", "link", "show", "master", f"vpbr{vni}", check=False).stdout
        return any(l["ifname"] == port for l in json.loads(out or "[]"))
    from tests.functional.leftovers import node_ovs

    return port in node_ovs(node).vsctl("list-ports", "br-int").split()


def test_add_builds_a_pod_interface_whose_port_is_in_the_switch(combo):
    cluster, node, switch, provider, net = combo
    pod = cluster.add_pod(node, "a")
    res = cluster.attach(pod, net(addr="172.16.82.1/24"))
    itf = pod_side(res)
    assert itf["name"] == "eth1" and itf["sandbox"] == pod.netns
    assert ("pciID" in itf) == (provider == "sriov")
    assert [ip["address"] for ip in res["ips"]] == ["172.16.82.1/24"]
    addrs = json.loads(pod.ns.ip("-j", "addr", "show", "eth1").stdout)[0]
    assert addrs["address"] == itf["mac"] and any(
        a["local"] == "172.16.82.1" for a in addrs["addr_info"])
    assert in_switch(node, switch, port_of(res), 820)
    ok(node.cni("CHECK", net(addr="172.16.82.1/24", prevResult=res), pod.container_id,
                pod.netns))
    if switch == "ovs":
        from tests.functional.leftovers import node_ovs

        # A switchdev NIC on the node: OVS is told to offload (the simulated one is
        # in switchdev mode whenever the provider is sriov).
        offload = node_ovs(node).vsctl("get", "Open_vSwitch", ".", "other_config").strip()
        assert ('hw-offload="true"' in offload) == (provider == "sriov"), offload


def test_add_is_repeatable_and_del_twice_leaves_nothing(combo):
    cluster, node, switch, provider, net = combo
    pod = cluster.add_pod(node, "a")
    cfg = net(addr="172.16.82.1/24", runtimeConfig={"mac": "02:00:00:82:00:01"})
    first = cluster.attach(pod, cfg)
    again = cluster.attach(pod, cfg)
    assert pod_side(again)["mac"] == pod_side(first)["mac"] == "02:00:00:82:00:01"
    assert in_switch(node, switch, port_of(again), 820)
    cluster.detach(pod, cfg)
    cluster.detach(pod, cfg)
    assert not in_switch(node, switch, port_of(again), 820)
    links = {l["ifname"] for l in json.loads(pod.ns.ip("-j", "link", "show").stdout)}
    assert links == {"lo"}
    assert not list((node.state_dir / "attachments").rglob("*.json"))
    if provider == "sriov":
        assert not list((node.state_dir / "sriov" / "claims").glob("*.json"))


def test_pods_of_one_vni_reach_each_other_and_not_another_vni(combo):
    cluster, node, switch, provider, net = combo
    a, b, c = (cluster.add_pod(node, n) for n in "abc")
    cluster.attach(a, net(addr="172.16.82.1/24"))
    cluster.attach(b, net(addr="172.16.82.2/24"))
    cluster.attach(c, net(name="vpc-other", vni=821, addr="172.16.82.3/24"))
    wait_for(lambda: a.ns.ping("172.16.82.2"), timeout=10, what="a -> b")
    assert not a.ns.ping("172.16.82.3", count=2)


def test_del_with_the_netns_gone_succeeds_and_frees_the_port(combo):
    _, node, switch, _, _ = combo
    pod, cfg, res = attached(combo)
    pod.ns.delete()
    ok(node.cni("DEL", cfg, pod.container_id, pod.netns))
    assert not in_switch(node, switch, port_of(res), 820)


def test_check_names_what_differs(combo):
    node = combo[1]
    pod, cfg, res = attached(combo)
    pod.ns.ip("addr", "flush", "dev", "eth1")
    body = failed(node.cni("CHECK", cfg | {"prevResult": res}, pod.container_id, pod.netns))
    assert "lacks recorded address" in body["msg"] and "172.16.82.1/24" in body["msg"]


def test_gc_removes_what_is_not_valid(combo):
    cluster, node, switch, provider, net = combo
    keep, drop = cluster.add_pod(node, "keep"), cluster.add_pod(node, "drop")
    kept = cluster.attach(keep, net(addr="172.16.82.1/24"))
    dropped = cluster.attach(drop, net(addr="172.16.82.2/24"))
    cfg = net() | {"cniVersion": "1.1.0", "cni.dev/valid-attachments": [
        {"containerID": keep.container_id, "ifname": "eth1"}]}
    ok(node.cni("GC", cfg))
    assert in_switch(node, switch, port_of(kept), 820)
    assert not in_switch(node, switch, port_of(dropped), 820)
    if provider == "sriov":
        # The dropped pod's VF is free again; the kept one's is still claimed.
        claims = sorted(p.stem for p in (node.state_dir / "sriov" / "claims").glob("*.json"))
        assert claims == [pod_side(kept)["pciID"]]


def test_bad_input_is_a_clean_error_and_keeps_the_attachment(combo):
    node = combo[1]
    pod, cfg, res = attached(combo)
    body = failed(node.cni("ADD", cfg | {"runtimeConfig": {"mac": "01:00:00:00:00:01"}},
                           pod.container_id, pod.netns), code=7)
    assert "runtimeConfig.mac" in body["msg"]
    body = failed(node.cni("ADD", cfg | {"deviceID": "0000:0g:00.1"}, pod.container_id,
                           pod.netns), code=7)
    assert "deviceID" in body["msg"]
    # Well formed but not a VF here: refused before the working attachment is touched.
    body = failed(node.cni("ADD", cfg | {"deviceID": "0000:77:00.1"}, pod.container_id,
                           pod.netns))
    assert "0000:77:00.1" in body["msg"] and body["code"] in (7, 50)
    ok(node.cni("CHECK", cfg | {"prevResult": res}, pod.container_id, pod.netns))


def test_pods_follow_the_underlay_mtu(combo):
    """The node's underlay MTU drops and comes back (in the node's namespace): the agent's
    reconcile brings the pod interface and its port along, and CHECK agrees."""
    cluster, node, switch, provider, net = combo
    pod, cfg, res = attached(combo)
    assert link_mtu(pod.ns, "eth1") == 1450
    for underlay, pod_mtu in ((1400, 1350), (1500, 1450)):
        set_underlay_mtu(cluster, node, underlay)
        wait_for(lambda: link_mtu(pod.ns, "eth1") == pod_mtu, timeout=20,
                 what=f"the pod's eth1 at {pod_mtu}")
        wait_for(lambda: link_mtu(node.ns, port_of(res)) == pod_mtu, timeout=5,
                 what=f"its port at {pod_mtu}")
        ok(node.cni("CHECK", cfg | {"prevResult": res}, pod.container_id, pod.netns))


def test_routed_subnets_route_through_the_anycast_gateway(combo):
    """Two routed subnets of one VPC on the node (docs/routing.md): a pod in each reaches
    the other through its gateway, one routed hop; the VPC's router goes with its last
    pod."""
    cluster, node, switch, provider, net = combo
    a, b = cluster.add_pod(node, "ga"), cluster.add_pod(node, "gb")
    cfg_a = net("green-a", 830, "10.30.0.5/24",
                routing={"vpc": "green", "l3vni": 8300, "subnet": "10.30.0.0/24"})
    cfg_b = net("green-b", 831, "10.30.1.5/24",
                routing={"vpc": "green", "l3vni": 8300, "subnet": "10.30.1.0/24"})
    res_a, res_b = cluster.attach(a, cfg_a), cluster.attach(b, cfg_b)
    out = a.ns.exec("ping", "-n", "-c", "1", "-W", "2", "10.30.1.5", check=False).stdout
    assert re.search(r"ttl=63", out), out
    ok(node.cni("CHECK", cfg_a | {"prevResult": res_a}, a.container_id, a.netns))
    ok(node.cni("CHECK", cfg_b | {"prevResult": res_b}, b.container_id, b.netns))
    router = f"{node.node_config['routerNamespacePrefix']}8300"
    assert (NETNS_DIR / router).exists()
    cluster.detach(a, cfg_a)
    cluster.detach(b, cfg_b)
    assert router not in os.listdir(NETNS_DIR)
