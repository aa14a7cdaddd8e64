"""Routed subnets (docs/routing.md) in the routed lab: two VPCs with the same two
subnets over two kernel nodes and an OVS node, symmetric IRB over EVPN through a
gobgpd and an FRR route reflector, egress through SNAT on each pod's node.

One lab (lab/topologies/routed.toml) brought up with `vpcnictl lab up` under a
unique name is shared by the module; tests that move pods put them back.
"""

from __future__ import annotations

import concurrent.futures
import json
import re
import subprocess
import time

import pytest

from vpcni.lab.lab import Lab
from vpcni.lab.netns import WORLD as WORLD_ADDRESS, Netns, wait_for
from vpcni.lab.topology import DEFAULT_TOPOLOGY
from vpcni.lab.traffic import continuous_ping, tcp_ident
from vpcni.core.models import GATEWAY_MAC, router_mac
from tests.functional.labs import lab_up

pytestmark = [pytest.mark.functional, pytest.mark.slow]

TOPOLOGY = DEFAULT_TOPOLOGY.with_name("routed.toml")
WORLD = WORLD_ADDRESS

# A TCP server that answers each connection with what the client sent and the
# address it came from: "<token> <peer address>".
_ECHO = """
import socket, sys, threading
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 7007)); s.listen(64)
print("ready", flush=True)
def serve(c, peer):
    with c:
        data = c.recv(100)
        c.sendall(data + b" " + peer[0].encode())
def udp():
    # Answers a datagram with 1472 bytes, never fragmented (DF).
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.setsockopt(socket.IPPROTO_IP, 10, 2)  # IP_MTU_DISCOVER = IP_PMTUDISC_DO
    u.bind(("0.0.0.0", 7008))
    while True:
        data, peer = u.recvfrom(100)
        try:
            u.sendto(b"x" * 1472, peer)
        except OSError:
            pass
threading.Thread(target=udp, daemon=True).start()
while True:
    c, peer = s.accept()
    threading.Thread(target=serve, args=(c, peer), daemon=True).start()
"""
_CLIENT = """
import socket, sys
c = socket.create_connection((sys.argv[1], 7007), timeout=3)
c.sendall(sys.argv[2].encode()); print(c.recv(200).decode())
"""


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    with lab_up(tmp_path_factory.mktemp("routed"), TOPOLOGY.read_text(), "routed") as (up, _):
        wait_for(lambda: ttl(up, "green-2", "green-1") is not None, timeout=30,
                 what="routes between green's subnets")
        yield up


@pytest.fixture(scope="module")
def world(lab):
    """A host outside every VPC (behind the underlay's gateway), serving _ECHO."""
    ns = lab.add_world()
    proc = ns.spawn("/usr/bin/python3", "-S", "-c", _ECHO, stdout=subprocess.PIPE)
    assert proc.stdout.readline().decode().strip() == "ready"
    return ns


def pod_ns(lab: Lab, pod: str) -> Netns:
    return Netns(lab.pods[pod].netns, lab.box, create=False)


def ttl(lab: Lab, src: str, dst: str):
    out = pod_ns(lab, src).exec("ping", "-n", "-c", "1", "-W", "1", lab.pods[dst].ip,
                                check=False).stdout
    found = re.search(r"ttl=(\d+)", out)
    return int(found.group(1)) if found else None


def evpn_rib(lab: Lab, reflector: str = "rr1") -> str:
    return lab.gobgpd(reflector).gobgp("global", "rib", "-a", "evpn")


def test_subnets_of_a_vpc_reach_each_other_and_vpcs_stay_apart(lab):
    rows = lab.matrix()
    wrong = [(s, d, e, r, who) for s, d, e, r, who in rows if e != r]
    assert not wrong, wrong
    # green-b's pods reach green-a's pod across nodes (kernel and OVS) through the
    # anycast gateway; orange, with the same addresses, reaches its own pod.
    for src in ("green-2", "green-3", "green-4"):
        assert tcp_ident(pod_ns(lab, src), "10.20.0.11") == "green-1"
    assert tcp_ident(pod_ns(lab, "orange-2"), "10.20.0.11") == "orange-1"
    assert tcp_ident(pod_ns(lab, "orange-1"), "10.20.1.12") == "orange-2"


def test_routed_hops_show_in_the_ttl(lab):
    # Same node: one routed hop (the node's router). Across nodes: the source node's
    # router and the destination node's router (symmetric IRB): two.
    assert ttl(lab, "green-4", "green-1") == 63
    assert ttl(lab, "green-2", "green-1") == 62
    assert ttl(lab, "green-3", "green-1") == 62   # from the OVS node
    assert ttl(lab, "green-1", "green-3") == 62   # to the OVS node
    # Same subnet across nodes stays bridged: no hop.
    assert ttl(lab, "green-2", "green-3") == 64


def test_gateway_is_anycast(lab):
    for pod in ("green-1", "green-2", "green-3"):
        ns = pod_ns(lab, pod)
        gw = "10.20.0.1" if pod == "green-1" else "10.20.1.1"
        assert ns.ping(gw)
        neigh = ns.exec("ip", "neigh", "show", gw).stdout
        assert GATEWAY_MAC in neigh, (pod, neigh)


def test_second_vpc_with_the_same_cidrs_sees_nothing_of_the_first(lab):
    """green-2 pings 10.20.0.11 (green-1) while a capture runs on orange-1, which has
    the same address in orange: nothing of green's reaches it."""
    orange = pod_ns(lab, "orange-1")
    cap = orange.spawn("tcpdump", "-n", "-l", "-i", "eth1", "icmp", stdout=subprocess.PIPE,
                       stderr=subprocess.DEVNULL)
    try:
        time.sleep(1.0)
        sent = pod_ns(lab, "green-2").exec("ping", "-n", "-c", "20", "-i", "0.05", "-W", "1",
                                           "10.20.0.11", check=False).stdout
        assert " 0% packet loss" in sent, sent
        time.sleep(0.5)
    finally:
        lab.box.kill_pid(cap.pid)
    captured = cap.stdout.read().decode()
    assert "ICMP" not in captured, captured


def test_egress_through_snat_on_the_pods_own_node(lab, world):
    """green-1 and orange-1 (same address, same node) talk to the world at once: each
    gets its own answers back, and the world sees the node's address."""
    def connect(pod: str, token: str) -> str:
        return pod_ns(lab, pod).exec("/usr/bin/python3", "-S", "-c", _CLIENT, WORLD, token,
                                     check=False).stdout.strip()
    jobs = [(pod, f"{pod}-{i}") for i in range(10) for pod in ("green-1", "orange-1", "green-3")]
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda job: connect(*job), jobs))
    node_address = {"green-1": "198.51.100.11", "orange-1": "198.51.100.11",
                    "green-3": "198.51.100.13"}
    for (pod, token), answer in zip(jobs, answers):
        assert answer == f"{token} {node_address[pod]}", (pod, token, answer)


def test_the_world_cannot_open_a_connection_into_a_vpc(lab, world):
    node1 = lab.box.namespaces["node1"]
    gateway = lab.box.namespaces["wgw"]
    gateway.ip("route", "replace", "10.20.0.0/16", "via", "198.51.100.11")
    try:
        assert tcp_ident(world, "10.20.0.11", timeout=1.0) is None
        # Nor to another VPC's pod through a VPC's way out: node1 forwards nothing
        # between routers.
        assert tcp_ident(pod_ns(lab, "green-4"), "169.254.64.1", timeout=1.0) is None
    finally:
        gateway.ip("route", "del", "10.20.0.0/16", check=False)
    counters = node1.exec("nft", "list", "table", "inet", "vpcni_route").stdout
    assert "into-vpc" in counters


def test_gateway_reports_the_overlay_mtu(lab, world):
    """The world answers a pod with a datagram bigger than the VPC's MTU, DF set: the
    pod's router sends "fragmentation needed" with the pod MTU, which reaches the
    world (through the node's SNAT) and lowers its path MTU to the node."""
    pod = pod_ns(lab, "green-1")
    pod_mtu = int(pod.exec("cat", "/sys/class/net/eth1/mtu").stdout)
    assert pod_mtu < 1500
    world.exec("ip", "route", "flush", "cache", check=False)
    pod.exec("/usr/bin/python3", "-S", "-c",
             "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
             f"s.sendto(b'hi', ('{WORLD}', 7008))")

    def world_path_mtu():
        out = world.exec("ip", "route", "get", "198.51.100.11").stdout
        found = re.search(r"mtu (\d+)", out)
        return int(found.group(1)) if found else None
    wait_for(lambda: world_path_mtu() == pod_mtu, timeout=5,
             what=f"the world's path MTU to node1 lowered to {pod_mtu}")


def test_evpn_routes_carry_the_l3vni_and_router_mac_and_type5_subnets(lab):
    rib = evpn_rib(lab)
    rmac1 = router_mac("198.51.100.11")
    # green-1 (10.20.0.11, VNI 400) from node1: labels 400 and 4000, node1's router MAC.
    line = next((l for l in rib.splitlines() if "10.20.0.11" in l and "198.51.100.11" in l
                 and "[400,4000]" in l.replace(" ", "")), None)
    assert line is not None, rib
    assert rmac1 in rib.lower()
    # type-5: each node announces the subnets it serves.
    assert re.search(r"\[type:Prefix\].*10\.20\.0\.0/24", rib), rib
    assert re.search(r"\[type:Prefix\].*10\.20\.1\.0/24", rib), rib


def test_a_node_that_leaves_withdraws_its_routes(lab):
    """green-3 is node3's only green pod: removing it withdraws its type-2 and node3's
    type-5 for green-b; putting it back announces them again."""
    def node3_green_routes() -> list[str]:
        return [l for l in evpn_rib(lab).splitlines()
                if "198.51.100.13" in l and ("10.20.1.13" in l or "10.20.1.0/24" in l)]
    assert node3_green_routes()
    info = lab.pods["green-3"]
    lab.remove_pod("green-3")
    try:
        wait_for(lambda: not node3_green_routes(), timeout=10, what="node3's routes withdrawn")
        assert tcp_ident(pod_ns(lab, "green-1"), "10.20.1.13", timeout=1.0) is None
    finally:
        lab.add_pod("green-3", info.node, info.vpc, address=info.address)
    wait_for(lambda: tcp_ident(pod_ns(lab, "green-1"), "10.20.1.13") == "green-3",
             timeout=15, what="green-3 back")


def test_a_pod_that_moves_keeps_its_gateway(lab):
    """green-2 moves from node2 to node3 (DEL there, ADD here with its MAC and address)
    while green-1 (another subnet, node1) pings it: under 1 s of loss."""
    info = lab.pods["green-2"]
    ns = pod_ns(lab, "green-2")
    conf = lab.pod_config(info)
    args = "K8S_POD_NAMESPACE=lab;K8S_POD_NAME=green-2"
    ping = continuous_ping(pod_ns(lab, "green-1"), info.ip, seconds=8, interval=0.05)
    try:
        time.sleep(2)
        res = lab.cni_node("node2").cni("DEL", conf, info.container_id, ns.path, "eth1")
        assert res.ok, res.stdout
        res = lab.cni_node("node3").cni("ADD", conf, info.container_id, ns.path, "eth1",
                                         args=f"{args};MAC={info.mac}")
        assert res.ok, res.stdout
    finally:
        ping.join()
    sent, received = ping.result
    lost_ms = (sent - received) * 50
    print(f"pod move: {sent - received} of {sent} probes lost (~{lost_ms} ms)")
    assert lost_ms < 1000, f"{sent - received} of {sent} lost (~{lost_ms} ms)"
    assert tcp_ident(pod_ns(lab, "green-1"), info.ip) == "green-2"
    # Back to node2, as the other tests expect.
    assert lab.cni_node("node3").cni("DEL", conf, info.container_id, ns.path, "eth1").ok
    assert lab.cni_node("node2").cni("ADD", conf, info.container_id, ns.path, "eth1",
                                     args=f"{args};MAC={info.mac}").ok
    wait_for(lambda: tcp_ident(pod_ns(lab, "green-1"), info.ip) == "green-2", timeout=10,
             what="green-2 back on node2")


def test_a_static_route_leads_to_the_appliance(lab):
    """green routes 192.0.2.0/24 via green-4 (10.20.1.14, node1): node1 announces it as
    a type-5 route, and traffic to it from the other nodes (kernel and OVS) reaches
    green-4. Orange has no such route."""
    assert re.search(r"\[type:Prefix\].*192\.0\.2\.0/24", evpn_rib(lab))
    appliance = pod_ns(lab, "green-4")
    cap = appliance.spawn("tcpdump", "-n", "-l", "-i", "eth1", "icmp and dst host 192.0.2.1",
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        time.sleep(1.0)
        # orange-1 has green-1's address: its probes are told apart by their size.
        for src, size in (("green-1", "56"), ("green-2", "56"), ("green-3", "56"),
                          ("orange-1", "99")):
            pod_ns(lab, src).exec("ping", "-n", "-c", "5", "-i", "0.2", "-W", "1", "-s", size,
                                  "192.0.2.1", check=False)
        time.sleep(0.5)
    finally:
        lab.box.kill_pid(cap.pid)
    captured = cap.stdout.read().decode()
    for src in ("10.20.0.11", "10.20.1.12", "10.20.1.13"):
        assert f"{src} > 192.0.2.1" in captured, (src, captured)
    assert "length 107" not in captured, captured   # orange-1's (99 bytes + 8)


def test_the_node_reaches_its_pods_for_probes_unless_ambiguous(lab):
    """kubelet probes come from the node: it reaches a routed pod through the VPC's
    transit link. An address two VPCs use on one node is unreachable for the node
    rather than the wrong pod's."""
    node1, node3 = lab.box.namespaces["node1"], lab.box.namespaces["node3"]
    assert tcp_ident(node1, "10.20.1.14") == "green-4"
    assert tcp_ident(node3, "10.20.1.13") == "green-3"
    assert tcp_ident(node1, "10.20.0.11", timeout=1.0) is None   # green-1 and orange-1
    assert "unreachable 10.20.0.11" in node1.exec("ip", "route", "show", "proto", "197").stdout


def test_a_vpc_reaches_neither_the_node_nor_the_underlay_through_its_way_out(lab):
    """Egress is for the world: a pod cannot reach its node's own address, nor VXLAN or
    BGP anywhere (they would leave with the node's address, which every VTEP and
    reflector trusts), nor the underlay's own prefix (nodes, reflectors)."""
    node1 = lab.box.namespaces["node1"]
    pod = pod_ns(lab, "green-1")

    def counter(comment: str) -> int:
        out = node1.exec("nft", "list", "chain", "inet", "vpcni_route", "forward"
                         if comment != "vpc-to-node" else "input").stdout
        line = next(l for l in out.splitlines() if comment in l)
        return int(re.search(r"packets (\d+)", line).group(1))
    names = ("vxlan-from-vpc", "vpc-to-node", "bgp-from-vpc", "vpc-to-underlay")
    before = [counter(n) for n in names]
    assert not pod.ping("198.51.100.11")
    pod.exec("/usr/bin/python3", "-S", "-c",
             "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
             "[s.sendto(bytes(8) + bytes(50), ('198.51.100.12', 4789)) for _ in range(5)]")
    # BGP to a reflector as the node, anything else on the underlay (another node).
    assert tcp_ident(pod, "198.51.100.201", port=179, timeout=1.0) is None
    assert not pod.ping("198.51.100.12")
    after = [counter(n) for n in names]
    assert after[0] >= before[0] + 5, (before, after)
    assert all(a > b for a, b in zip(after[1:], before[1:])), (before, after)


def test_cluster_services_are_reached_through_the_nodes_dnat(lab, world):
    """Services as kube-proxy makes them (DNAT in the node's namespace; here one nft rule
    each, standing in for kube-proxy): one backed by a host on the underlay (DNS), one
    by the node itself (an API server on the host network). A pod reaches both through
    its VPC's way out; the node's own address it does not reach directly."""
    node1 = lab.box.namespaces["node1"]
    api = node1.spawn("/usr/bin/python3", "-S", "-c",
                      _ECHO.replace('("0.0.0.0", 7007)', '("198.51.100.11", 6443)'),
                      stdout=subprocess.PIPE)
    assert api.stdout.readline().decode().strip() == "ready"
    node1.exec("nft", "-f", "-", input="""
table ip kubesim {
  chain prerouting {
    type nat hook prerouting priority dstnat; policy accept;
    ip daddr 10.96.0.10 tcp dport 53 dnat to 203.0.113.10:7007
    ip daddr 10.96.0.1 tcp dport 443 dnat to 198.51.100.11:6443
  }
}
""")
    try:
        def connect(address: str, port: int) -> str:
            code = _CLIENT.replace("7007", str(port))
            return pod_ns(lab, "green-1").exec("/usr/bin/python3", "-S", "-c", code, address,
                                               "svc", check=False).stdout.strip()
        assert connect("10.96.0.10", 53) == "svc 198.51.100.11"   # the world saw node1
        assert connect("10.96.0.1", 443).startswith("svc ")        # the node's API server
        assert connect("198.51.100.11", 6443) == ""                # not without the Service
    finally:
        node1.exec("nft", "delete", "table", "ip", "kubesim", check=False)
        lab.box.kill_pid(api.pid)


def test_a_tenant_cannot_route_its_subnet_into_another_vpc(lab):
    """green-a's namespace writes its own NAD: green-a's VNI and network, but orange's
    L3VNI (or orange as the VPC). Tenancy refuses it (the bindings name each routed
    subnet's VPC and L3VNI) before anything is touched."""
    info = lab.pods["green-1"]
    ns = lab.box.netns("pod-intruder")
    for routing in ({"l3vni": 4100}, {"vpc": "orange"}):
        conf = lab.pod_config(info)
        conf["routing"] = conf["routing"] | routing
        res = lab.cni_node("node1").cni("ADD", conf, f"{lab.box.prefix}-intruder", ns.path,
                                        "eth1", args="K8S_POD_NAMESPACE=lab;K8S_POD_NAME=x")
        body = json.loads(res.stdout)
        assert not res.ok and body["code"] == 101, body
        assert "may not route VNI 400" in body["msg"], body
    assert tcp_ident(pod_ns(lab, "green-2"), "10.20.0.11") == "green-1"
    assert tcp_ident(pod_ns(lab, "orange-2"), "10.20.0.11") == "orange-1"
