"""Routed subnets on the ovs backend (symmetric IRB): a VPC router per VPC and node
(backends/common/router.py, l3="veth"), its gateway and L3 ports in br-int, and
the flows that carry them (backends/ovs/flows.py: the gateway's among the VNI's
local flows, kinds router and routed of the L3VNI).

Nodes are served by their agents (a router namespace must be the node's: the
agent runs in the host's mount namespace). On one OVS node (userspace datapath),
without EVPN, two subnets of one VPC route to each other; across nodes (a lab
with a gobgpd reflector) the L3VNI goes over the tunnel between an OVS node and a
kernel node and between two OVS nodes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from vpcni.lab.cluster import Cluster, Node, seed_network
from vpcni.lab.daemons import Ovs
from vpcni.lab.netns import WORLD, add_world, run, wait_for
from vpcni.lab.traffic import start_ident_server, tcp_ident

pytestmark = [pytest.mark.functional, pytest.mark.slow]

L3VNI = 4000
GATEWAY_MAC = "02:76:70:63:67:77"
RMAC = "02:76:c6:33:64:01"  # router_mac("198.51.100.1")
OURS = "cookie=0x7670630000000000/0xffffff0000000000"


def subnet(vni: int, prefix: str, addr: str) -> dict:
    return seed_network(f"green-{vni}", vni, addr,
                        routing={"vpc": "green", "l3vni": L3VNI, "subnet": prefix})


A = subnet(400, "10.20.0.0/24", "10.20.0.5/24")
B = subnet(401, "10.20.1.0/24", "10.20.1.5/24")


def ovs(node: Node) -> Ovs:
    return Ovs(node.ns, Path(node.node_config["ovs"]["runDir"]))


def flows(node: Node, spec: str = OURS) -> list[str]:
    out = ovs(node).ofctl("dump-flows", spec, options=("--no-stats",))
    return sorted(line.strip() for line in out.splitlines() if "actions=" in line)


def cookie(kind: int, number: int) -> str:
    return f"cookie={(0x767063 << 40) | (kind << 32) | number:#x}/-1"


def port_ids(node: Node) -> dict[str, dict]:
    """br-int's ports -> their Interface's external_ids (and ofport)."""
    names = set(ovs(node).vsctl("list-ports", "br-int").split())
    table = json.loads(ovs(node).vsctl("--format=json", "--columns=name,ofport,external_ids",
                                       "list", "Interface"))
    return {name: {"ofport": ofport, **dict(ext[1])}
            for name, ofport, ext in table["data"] if name in names}


def router_ns(node: Node) -> str:
    return f"{node.ns.name}-r{L3VNI}"


def netns_names() -> set[str]:
    return set(run(["ip", "netns", "list"]).stdout.split()) - {"(id:"}


def set_forwarding(router: str, on: bool) -> None:
    """IPv4 forwarding in a router namespace (off: only br-int's flows route)."""
    run(["nsenter", f"--net=/run/netns/{router}", "sh", "-c",
         f"echo {1 if on else 0} > /proc/sys/net/ipv4/ip_forward"])


def packets(ofctl, table: int, *terms: str) -> int:
    """n_packets of the flows of `table` whose line has every one of `terms`."""
    out = ofctl("dump-flows", f"table={table}")
    return sum(int(re.search(r"n_packets=(\d+)", line).group(1)) for line in out.splitlines()
               if "actions=" in line and all(t in line for t in terms))


def ping_ttl(ns, dst: str, count: int = 1):
    out = ns.exec("ping", "-n", "-c", str(count), "-i", "0.2", "-W", "1", dst,
                  check=False).stdout
    found = re.findall(r"ttl=(\d+)", out)
    return (int(found[0]) if found else None), len(found)


@pytest.fixture
def n1(cluster: Cluster) -> Node:
    return cluster.add_node("n1", "198.51.100.1", agent=True, backend="ovs")


def test_two_subnets_route_on_one_ovs_node(cluster, n1):
    node = n1
    a, b = cluster.add_pod(node, "a"), cluster.add_pod(node, "b")
    res_a = cluster.attach(a, A)
    cluster.attach(b, B)

    # The router and both gateways, their node ends ports of br-int marked as a router's.
    assert router_ns(node) in netns_names()
    ports = port_ids(node)
    assert ports["vgw400"]["vpcni-gateway"] == "400" and "vpcni-vni" not in ports["vgw400"]
    assert ports["vgw401"]["vpcni-gateway"] == "401"
    assert ports[f"vl3{L3VNI}"]["vpcni-router"] == str(L3VNI)
    gw, l3 = ports["vgw400"]["ofport"], ports[f"vl3{L3VNI}"]["ofport"]
    assert f"vpcni-l3vni-{L3VNI}" in ovs(node).vsctl("get", "bridge", "br-int", "external_ids")
    # The pod got the gateway and a default route through it.
    assert res_a["ips"][0]["gateway"] == "10.20.0.1"
    assert "default via 10.20.0.1" in a.ns.ip("route").stdout

    # One routed hop: TTL 64 - 1, both ways.
    out = a.ns.exec("ping", "-n", "-c", "2", "-W", "2", "10.20.1.5", check=False).stdout
    assert "ttl=63" in out and " 0% packet loss" in out, out
    out = b.ns.exec("ping", "-n", "-c", "1", "-W", "2", "10.20.0.5", check=False).stdout
    assert "ttl=63" in out, out
    # The pod's neighbour for the gateway is the anycast MAC.
    assert GATEWAY_MAC in a.ns.ip("neigh", "show", "10.20.0.1").stdout
    # TCP too (checksums filled in on the userspace datapath, through the router).
    start_ident_server(b.ns, "b")
    assert tcp_ident(a.ns, "10.20.1.5") == "b"
    # Out of the VPC: SNAT by the router and the node, to the world behind the
    # underlay's gateway.
    peer = add_world(cluster.sandbox, cluster.fabric.ns, [node.ns])
    start_ident_server(peer, "peer")
    assert a.ns.ping(WORLD, timeout=2)
    assert tcp_ident(a.ns, WORLD) == "peer"

    # The gateway's flows (kind local of VNI 400) and the router's (kind router of the L3VNI).
    local = flows(node, cookie(2, 400))
    assert any(f"priority=100,in_port={gw} actions=set_field:0x190->tun_id,goto_table:20" in f
               for f in local), local
    assert any(f"priority=120,tun_id=0x190,dl_dst={GATEWAY_MAC} actions=output:{gw}" in f
               for f in local), local
    router = flows(node, cookie(5, L3VNI))
    assert any(f"in_port={l3} actions=set_field:0xfa0->tun_id,goto_table:60" in f
               for f in router), router
    assert any(f"dl_dst={RMAC} actions=output:{l3}" in f for f in router), router
    # Converging again changes nothing (what the flows module generates is what OVS prints).
    before = flows(node)
    assert cluster_check(node, a, A, res_a).ok
    assert flows(node) == before

    # The node's stack is kept off the router ports' node ends (the host-port guard).
    rules = node.ns.exec("nft", "list", "table", "arp", "vpcni_ovs").stdout
    assert 'iifname "vgw*"' in rules and 'iifname "vl3*"' in rules


def test_flows_route_between_subnets_without_the_router(cluster, n1):
    """The VPC's FIB in flows: with forwarding off in the router namespace, the two
    subnets still reach each other (one routed hop: dec_ttl in a flow), pods' ARP for
    the gateway is answered by a flow; what the FIB does not route (egress, TTL 1)
    still goes through the router."""
    node = n1
    a, b = cluster.add_pod(node, "a"), cluster.add_pod(node, "b")
    cluster.attach(a, A)
    cluster.attach(b, B)
    of = ovs(node).ofctl
    add_world(cluster.sandbox, cluster.fabric.ns, [node.ns])
    # The gateway's ARP from a flow: the router never hears the pod's request.
    a.ns.ip("neigh", "flush", "dev", "eth1")
    arp = packets(of, 20, "arp_tpa=10.20.0.1")
    assert a.ns.ping("10.20.0.1", timeout=2)
    assert GATEWAY_MAC in a.ns.ip("neigh", "show", "10.20.0.1").stdout
    wait_for(lambda: packets(of, 20, "arp_tpa=10.20.0.1") > arp, timeout=5,
             what="the gateway's ARP answered by a flow")
    set_forwarding(router_ns(node), False)
    try:
        to_b, to_a = packets(of, 70, "nw_dst=10.20.1.5"), packets(of, 70, "nw_dst=10.20.0.5")
        assert ping_ttl(a.ns, "10.20.1.5", count=5) == (63, 5)
        assert ping_ttl(b.ns, "10.20.0.5", count=5) == (63, 5)
        # 5 echoes and 5 replies each way (datapath stats reach the flows lazily)
        wait_for(lambda: packets(of, 70, "nw_dst=10.20.1.5") >= to_b + 10, timeout=5,
                 what="FIB counter for 10.20.1.5")
        wait_for(lambda: packets(of, 70, "nw_dst=10.20.0.5") >= to_a + 10, timeout=5,
                 what="FIB counter for 10.20.0.5")
        start_ident_server(b.ns, "b")
        assert tcp_ident(a.ns, "10.20.1.5") == "b"
        # Egress is the router's (forwarding off: nothing gets out).
        assert not a.ns.ping(WORLD, timeout=1)
    finally:
        set_forwarding(router_ns(node), True)
    assert a.ns.ping(WORLD, timeout=2)
    # TTL 1 is never routed by a flow: the router answers "time exceeded".
    out = a.ns.exec("ping", "-n", "-c", "1", "-t", "1", "-W", "1", "10.20.1.5",
                    check=False).stdout
    assert "From 10.20.0.1" in out and "exceeded" in out.lower(), out
    # The FIB's flows are what the flows module derives, and CHECK says they are there.
    from vpcni.backends.ovs import flows as fl
    fib = fl.parse_dump(of("dump-flows", cookie(6, L3VNI), options=("--no-stats",
                                                                      "--no-names")))
    assert {f.table for f in fib} == {fl.FIB, fl.L3}, fib


def cluster_check(node: Node, pod, conf: dict, prev: dict):
    return node.cni("CHECK", dict(conf, prevResult=prev), pod.container_id, pod.netns, "eth1")


def test_check_names_a_missing_gateway_port(cluster, n1):
    node = n1
    a = cluster.add_pod(node, "a")
    res = cluster.attach(a, A)
    assert cluster_check(node, a, A, res).ok
    ovs(node).vsctl("del-port", "br-int", "vgw400")
    out = cluster_check(node, a, A, res)
    assert not out.ok and "router port vgw400 missing" in out.json["msg"], out.stdout
    # The next ADD in the subnet puts it back.
    b = cluster.add_pod(node, "b")
    cluster.attach(b, subnet(400, "10.20.0.0/24", "10.20.0.6/24"))
    assert cluster_check(node, a, A, res).ok
    assert a.ns.ping("10.20.0.1", timeout=2)
    # The gateway's veth itself gone (both ends): CHECK says so, the next ADD rebuilds
    # it and re-adds the port on the new netdev.
    run(["ip", "-n", router_ns(node), "link", "del", "gw400"])
    out = cluster_check(node, a, A, res)
    assert not out.ok and "gw400 missing" in out.json["msg"], out.stdout
    c = cluster.add_pod(node, "c")
    cluster.attach(c, subnet(400, "10.20.0.0/24", "10.20.0.7/24"))
    assert cluster_check(node, a, A, res).ok
    a.ns.ip("neigh", "flush", "dev", "eth1")
    assert a.ns.ping("10.20.0.1", timeout=2)


def test_release_takes_the_gateway_then_the_router(cluster, n1):
    node = n1
    a, b = cluster.add_pod(node, "a"), cluster.add_pod(node, "b")
    cluster.attach(a, A)
    cluster.attach(b, B)
    cluster.detach(b, B)
    # The subnet's last pod left: its gateway and flows go, the router stays for the other.
    ports = port_ids(node)
    assert "vgw401" not in ports and "vgw400" in ports and f"vl3{L3VNI}" in ports
    assert flows(node, cookie(2, 401)) == []
    assert router_ns(node) in netns_names()
    assert a.ns.ping("10.20.0.1", timeout=2)
    cluster.detach(a, A)
    # The VPC's last subnet left: the router, its port, flows and mark go too.
    assert router_ns(node) not in netns_names()
    ports = port_ids(node)
    assert not any(p.startswith(("vgw", "vl3")) for p in ports), ports
    assert flows(node, cookie(5, L3VNI)) == [] and flows(node, cookie(4, L3VNI)) == []
    assert f"vpcni-l3vni-{L3VNI}" not in ovs(node).vsctl("get", "bridge", "br-int",
                                                        "external_ids")
    links = {l["ifname"] for l in json.loads(node.ns.ip("-j", "link", "show").stdout)}
    assert not any(re.match(r"v(gw|l3)\d+$", name) for name in links), links


# ---------------------------------------------------------------- across nodes (EVPN)

IRB = """
name = "irb"
asn = 65000
underlay = "198.51.100.0/24"

[[reflectors]]
name = "rr1"
address = "198.51.100.201"
daemon = "gobgpd"

[[nodes]]
name = "k1"
address = "198.51.100.11"
backend = "kernel"

[[nodes]]
name = "o1"
address = "198.51.100.12"
backend = "ovs"

[[nodes]]
name = "o2"
address = "198.51.100.13"
backend = "ovs"
"""


def test_l3vni_between_ovs_and_kernel_nodes(tmp_path):
    """Symmetric IRB across nodes: a pod in subnet 400 on OVS node o1 reaches pods of
    subnet 401 on kernel node k1 and on OVS node o2 through the routers of both ends
    (two routed hops), the L3VNI carried by br-int's flows on the OVS side."""
    from tests.functional.labs import lab_up

    with lab_up(tmp_path, IRB, "irb") as (lab, _):
        lab.write_bindings({400: ("green", ["lab"], L3VNI), 401: ("green", ["lab"], L3VNI)})
        pods = {}
        for pod, where, conf in (("a", "o1", A), ("b", "k1", B),
                                 ("c", "o2", subnet(401, "10.20.1.0/24", "10.20.1.6/24")),
                                 ("d", "o2", subnet(400, "10.20.0.0/24", "10.20.0.7/24"))):
            ns = lab.box.netns(f"pod-{pod}")
            res = lab.node(where).cni("ADD", conf, f"{lab.box.prefix}-{pod}", ns.path, "eth1",
                                      args=f"K8S_POD_NAMESPACE=lab;K8S_POD_NAME={pod}")
            assert res.ok, (pod, res.stdout)
            pods[pod] = ns
        a = pods["a"]

        def hops(dst: str, ttl: str) -> bool:
            out = a.exec("ping", "-n", "-c", "1", "-W", "1", dst, check=False).stdout
            return f"ttl={ttl}" in out
        # o1 -> k1 and o1 -> o2: o1's router, the L3VNI, the remote router.
        wait_for(lambda: hops("10.20.1.5", "62"), timeout=30, what="a reaching b (kernel)")
        wait_for(lambda: hops("10.20.1.6", "62"), timeout=30, what="a reaching c (ovs)")
        # Same subnet on another node: bridged, no router.
        wait_for(lambda: hops("10.20.0.7", "64"), timeout=30, what="a reaching d (bridged)")
        start_ident_server(pods["b"], "b")
        assert tcp_ident(a, "10.20.1.5") == "b"

        # The flows route: forwarding off in both OVS nodes' routers, a still reaches
        # b (o1's FIB, then k1's router) and c (o1's FIB, then o2's L3 table), two
        # routed hops; the flows' counters grow on both OVS nodes.
        of1, of2 = lab.ovs("o1").ofctl, lab.ovs("o2").ofctl
        routers_ns = [f"{lab.box.namespaces[n].name}-r{L3VNI}" for n in ("o1", "o2")]
        for r in routers_ns:
            set_forwarding(r, False)
        try:
            before = (packets(of1, 70, "nw_dst=10.20.1.5"), packets(of1, 70, "nw_dst=10.20.1.6"),
                      packets(of2, 60, "nw_dst=10.20.1.6"), packets(of1, 60, "nw_dst=10.20.0.5"))
            assert ping_ttl(a, "10.20.1.5", count=5) == (62, 5)
            assert ping_ttl(a, "10.20.1.6", count=5) == (62, 5)
            assert ping_ttl(pods["c"], "10.20.0.5", count=2) == (62, 2)
            assert tcp_ident(a, "10.20.1.5") == "b"

            def grown() -> bool:
                after = (packets(of1, 70, "nw_dst=10.20.1.5"),
                         packets(of1, 70, "nw_dst=10.20.1.6"),
                         packets(of2, 60, "nw_dst=10.20.1.6"),
                         packets(of1, 60, "nw_dst=10.20.0.5"))
                return all(x >= y + n for x, y, n in zip(after, before, (5, 5, 5, 12)))
            # o1's FIB to b (kernel) and c (OVS); o2's L3 table to c; o1's L3 table to a
            # (replies from b and c, and c's echoes)
            wait_for(grown, timeout=5, what="the FIB counters of o1 and o2 growing")
        finally:
            for r in routers_ns:
                set_forwarding(r, True)
        # The gateway stays local: d's ARP for it (flooded to o1 too, a broadcast of the
        # VNI) reaches o2's router only; o1's never heard of d.
        assert pods["d"].ping("10.20.0.1", timeout=2)
        routers = {n: f"{lab.box.namespaces[n].name}-r{L3VNI}" for n in ("o1", "o2")}
        heard = {n: run(["ip", "-n", r, "neigh", "show", "10.20.0.7"]).stdout
                 for n, r in routers.items()}
        assert "lladdr" in heard["o2"] and heard["o1"].strip() == "", heard

        # On o1: the remote routers' MACs go to their VTEPs, the L3VNI is accepted
        # from them only (kind routed of the L3VNI).
        o1 = lab.ovs("o1")
        routed = o1.ofctl("dump-flows", cookie(4, L3VNI), options=("--no-stats",))
        for vtep, rmac in (("198.51.100.11", "02:76:c6:33:64:0b"),
                           ("198.51.100.13", "02:76:c6:33:64:0d")):
            assert f"dl_dst={rmac} actions=set_field:{vtep}->tun_dst" in routed, routed
            assert f"tun_src={vtep} actions=goto_table:60" in routed, routed
