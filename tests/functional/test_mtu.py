"""Pod MTU drift (issue 12, item 7): the underlay's MTU changes under existing pods.

Two nodes of one backend on the lab fabric, one VPC with a pod on each, flooding
to each other through the network's static `vteps`. The test lowers node n1's
underlay inside n1's namespace (its eth0, which OVS's br-phy follows, and the
fabric's port towards it: the path then really carries no more) and looks at
what happens to the pods that were there before: with the agent they follow
(both veth ends, the VNI's VXLAN device and bridge), a large packet passes at
the new size with DF set, a pinned MTU is left alone and reported; without an
agent (standalone) CHECK says what differs until GC's reconcile brings them to it.
"""

from __future__ import annotations

import json

import pytest

from tests.functional.outcome import failed, ok
from vpcni.lab.cluster import Cluster, Node, seed_network
from vpcni.lab.netns import Netns, wait_for

pytestmark = pytest.mark.functional

VNI, PINNED_VNI = 640, 641
N1, N2 = "198.51.100.1", "198.51.100.2"
ICMP = 28  # IPv4 + ICMP headers: `ping -s` payload = MTU - 28


def net(addr: str, **extra) -> dict:
    return seed_network("vpc-mtu", VNI, addr, vteps=[N1, N2], **extra)


def pinned(addr: str, mtu: int) -> dict:
    return seed_network("vpc-mtu-pinned", PINNED_VNI, addr, vteps=[N1, N2], mtu=mtu)


def link_mtu(ns: Netns, ifname: str) -> int:
    return json.loads(ns.ip("-j", "link", "show", ifname).stdout)[0]["mtu"]


def fabric_port(cluster: Cluster, node: Node) -> str:
    """The fabric's end of the veth that is `node`'s eth0."""
    peer = json.loads(node.ns.ip("-j", "link", "show", "eth0").stdout)[0]["link_index"]
    for link in json.loads(cluster.fabric.ns.ip("-j", "link", "show").stdout):
        if link["ifindex"] == peer:
            return link["ifname"]
    raise AssertionError(f"no fabric port for {node.name}")


def set_underlay_mtu(cluster: Cluster, node: Node, mtu: int) -> None:
    """The node's underlay to `mtu`, in the node's namespace and the fabric's (never the
    root namespace's): eth0, and for an OVS node br-phy, which carries the VTEP address
    and follows its port (ovs-vswitchd sets it)."""
    port = fabric_port(cluster, node)
    if mtu < link_mtu(node.ns, "eth0"):
        cluster.fabric.ns.ip("link", "set", port, "mtu", str(mtu))
        node.ns.ip("link", "set", "eth0", "mtu", str(mtu))
    else:
        node.ns.ip("link", "set", "eth0", "mtu", str(mtu))
        cluster.fabric.ns.ip("link", "set", port, "mtu", str(mtu))
    if node.node_config.get("backend") == "ovs":
        wait_for(lambda: link_mtu(node.ns, "br-phy") == mtu, timeout=10,
                 what=f"br-phy of {node.name} at MTU {mtu}")


def port_of(res: dict) -> str:
    return [i["name"] for i in res["interfaces"] if not i.get("sandbox")][0]


def ping_df(src: Netns, dst: str, mtu: int) -> bool:
    """A ping of exactly `mtu` bytes of IP, DF set (never fragmented), answered?"""
    proc = src.exec("ping", "-n", "-q", "-c", "2", "-i", "0.2", "-W", "1", "-M", "do",
                    "-s", str(mtu - ICMP), dst, check=False, timeout=15)
    return proc.returncode == 0


def two_nodes(cluster: Cluster, backend: str, agent: bool) -> tuple[Node, Node]:
    extra = {"reconcileInterval": 1.0} if agent else {}
    return (cluster.add_node("n1", N1, agent=agent, backend=backend, **extra),
            cluster.add_node("n2", N2, agent=agent, backend=backend, **extra))


def attached(cluster: Cluster, node: Node, name: str, cfg: dict):
    pod = cluster.add_pod(node, name)
    return pod, cluster.attach(pod, cfg)


def test_old_pods_follow_the_underlay_mtu_down_and_back_up(cluster, backend):
    n1, n2 = two_nodes(cluster, backend, agent=True)
    a, res_a = attached(cluster, n1, "a", net("172.16.64.1/24"))
    b, _ = attached(cluster, n2, "b", net("172.16.64.2/24"))
    # Pinned at what the underlay carries now: kept when it carries less, and reported.
    p, res_p = attached(cluster, n1, "p", pinned("172.16.65.1/24", 1450))
    assert link_mtu(a.ns, "eth1") == 1450
    wait_for(lambda: ping_df(a.ns, "172.16.64.2", 1450), timeout=10, what="a -> b at 1450")
    # The agent's reconcile has seen both VNIs (at the MTU they were built with).
    wait_for(lambda: n1.agent_status()["mtu"]["podMtu"] == {str(VNI): 1450,
                                                             str(PINNED_VNI): 1450},
             timeout=10, what="both VNIs in the agent's status")

    set_underlay_mtu(cluster, n1, 1400)
    host_a = port_of(res_a)
    wait_for(lambda: link_mtu(a.ns, "eth1") == 1350, timeout=15, what="a's eth1 at 1350")
    wait_for(lambda: link_mtu(n1.ns, host_a) == 1350, timeout=5, what="a's port at 1350")
    if backend == "kernel":
        assert link_mtu(n1.ns, f"vpvx{VNI}") == 1350
        assert link_mtu(n1.ns, f"vpbr{VNI}") == 1350
    # The path carries 1350 bytes of pod packet with DF, and the pod sends no more.
    assert ping_df(a.ns, "172.16.64.2", 1350)
    assert ping_df(b.ns, "172.16.64.1", 1350)
    assert not ping_df(a.ns, "172.16.64.2", 1351)
    ok(n1.cni("CHECK", net("172.16.64.1/24") | {"prevResult": res_a}, a.container_id,
              a.netns))
    # The other node's underlay did not change: its pod keeps its MTU.
    assert link_mtu(b.ns, "eth1") == 1450

    assert link_mtu(p.ns, "eth1") == 1450
    status = n1.agent_status()["mtu"]
    assert status["podMtu"][str(VNI)] == 1350
    assert status["differ"] == 1, status
    entry = status["attachments"][0]
    assert entry["attachment"] == f"vpc-mtu-pinned/{p.container_id}/eth1"
    assert (entry["mtu"], entry["expected"]) == (1450, 1350) and "pinned" in entry["why"]
    body = failed(n1.cni("CHECK", pinned("172.16.65.1/24", 1450) | {"prevResult": res_p},
                         p.container_id, p.netns))
    assert "eth1" in body["msg"] and "1450" in body["msg"] and "1350" in body["msg"], body

    set_underlay_mtu(cluster, n1, 1500)
    wait_for(lambda: link_mtu(a.ns, "eth1") == 1450, timeout=15, what="a's eth1 back at 1450")
    wait_for(lambda: link_mtu(n1.ns, host_a) == 1450, timeout=5, what="a's port at 1450")
    if backend == "kernel":
        assert link_mtu(n1.ns, f"vpvx{VNI}") == 1450
        wait_for(lambda: link_mtu(n1.ns, f"vpbr{VNI}") == 1450, timeout=5, what="bridge")
    assert ping_df(a.ns, "172.16.64.2", 1450)
    wait_for(lambda: n1.agent_status()["mtu"]["differ"] == 0, timeout=10,
             what="no attachment left at another MTU")
    ok(n1.cni("CHECK", net("172.16.64.1/24") | {"prevResult": res_a}, a.container_id,
              a.netns))
    # Logged once per change, however many reconcile passes ran meanwhile.
    log = (n1.dir / "vpcni.log").read_text()
    down = [line for line in log.splitlines() if "pod MTU 1350 (was 1450" in line]
    up = [line for line in log.splitlines() if "pod MTU 1450 (was 1350" in line]
    assert len(down) == len(up) == 1, log
    assert f"in VNI {VNI}, {PINNED_VNI}: 1 attachment(s) brought to it; 1 left" in down[0]
    assert log.count(f"attachment vpc-mtu-pinned/{p.container_id}/eth1 keeps MTU") == 0


def test_standalone_check_reports_drift_until_gc_brings_pods_to_it(cluster, backend):
    n1, n2 = two_nodes(cluster, backend, agent=False)
    a, res_a = attached(cluster, n1, "a", net("172.16.64.1/24"))
    b, _ = attached(cluster, n2, "b", net("172.16.64.2/24"))
    check_a = net("172.16.64.1/24") | {"prevResult": res_a}
    ok(n1.cni("CHECK", check_a, a.container_id, a.netns))

    set_underlay_mtu(cluster, n1, 1400)
    # No agent: nothing has changed the pod, and CHECK says so.
    assert link_mtu(a.ns, "eth1") == 1450
    body = failed(n1.cni("CHECK", check_a, a.container_id, a.netns), code=None)
    assert f"eth1 (port {port_of(res_a)}) has MTU 1450, expected 1350" in body["msg"], body

    # GC (the runtime's periodic call) reconciles: the pod follows, CHECK passes.
    gc = net("172.16.64.1/24") | {"cni.dev/valid-attachments": [
        {"containerID": a.container_id, "ifname": "eth1"}]}
    gc.pop("addr")
    ok(n1.cni("GC", gc))
    assert link_mtu(a.ns, "eth1") == 1350
    assert link_mtu(n1.ns, port_of(res_a)) == 1350
    ok(n1.cni("CHECK", check_a, a.container_id, a.netns))
    assert ping_df(a.ns, "172.16.64.2", 1350)
    assert ping_df(b.ns, "172.16.64.1", 1350)
