"""VPC isolation against a hostile tenant and a host on the underlay (docs/security.md).

One lab: two kernel nodes and one OVS node, a gobgpd reflector, two VPCs on
one CIDR with a pod of each on every node. Every frame a test sends is
counted where it must not arrive, with tcpdump in the receiving pods; each
test also shows that the same capture sees what may arrive (a positive
control), so a silent capture cannot pass for isolation.
"""

from __future__ import annotations

import json
import time

import pytest

from vpcni.lab.frames import (BROADCAST, Capture, UdpListener, arp_frame, ethernet, send_frames,
                              send_frames_paced, send_udp, udp_frame, vxlan, vxlan_frame)
from tests.functional.labs import lab_up
from vpcni.lab.lab import Lab
from vpcni.lab.netns import Netns, wait_for

pytestmark = [pytest.mark.functional, pytest.mark.slow]

INJECT_PORT = 7777   # the inner frames' UDP port: nothing else in the lab uses it
SPOOF_PORT = 7778
INTRUDER = "198.51.100.99"

TOPOLOGY = """
name = "{name}"
asn = 65000
underlay = "198.51.100.0/24"

[[reflectors]]
name = "rr1"
address = "198.51.100.201"
daemon = "gobgpd"

[[nodes]]
name = "k1"
address = "198.51.100.21"
backend = "kernel"

[[nodes]]
name = "k2"
address = "198.51.100.22"
backend = "kernel"

[[nodes]]
name = "o1"
address = "198.51.100.23"
backend = "ovs"

[[vpcs]]
name = "blue"
vni = 300
cidr = "172.16.32.0/24"

[[vpcs]]
name = "red"
vni = 301
cidr = "172.16.32.0/24"
"""
PODS = [("blue-k1", "k1", "blue", "172.16.32.11/24"), ("red-k1", "k1", "red", "172.16.32.11/24"),
        ("blue-k2", "k2", "blue", "172.16.32.12/24"), ("red-k2", "k2", "red", "172.16.32.12/24"),
        ("blue-o1", "o1", "blue", "172.16.32.13/24"), ("red-o1", "o1", "red", "172.16.32.13/24"),
        ("blue-k1b", "k1", "blue", "172.16.32.21/24")]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    text = TOPOLOGY.format(name="isolation")
    for pod, node, vpc, address in PODS:
        text += f'\n[[pods]]\nname = "{pod}"\nnode = "{node}"\nvpc = "{vpc}"\naddress = "{address}"\n'
    with lab_up(tmp_path_factory.mktemp("isolation"), text, "isolation") as (up, _):
        yield up


def ns_of(lab: Lab, pod: str) -> Netns:
    return Netns(lab.pods[pod].netns, lab.box, create=False)


def node_ns(lab: Lab, node: str) -> Netns:
    return lab.box.namespaces[node]


def node_address(lab: Lab, node: str) -> str:
    return str(lab.topo.node(node).address)


def captures(lab: Lab, pods, bpf: str) -> dict[str, Capture]:
    return {p: Capture(ns_of(lab, p), bpf).start() for p in pods}


def seen(caps: dict[str, Capture]) -> dict[str, list[str]]:
    time.sleep(0.5)  # frames in flight through VXLAN and the OVS userspace datapath
    return {p: c.stop() for p, c in caps.items()}


def inner_broadcast(marker: bytes) -> bytes:
    """What an attacker wants delivered into another VPC: a broadcast UDP frame."""
    return udp_frame(BROADCAST, "02:66:66:66:66:66", "172.16.32.250", "255.255.255.255",
                     INJECT_PORT, marker)


def test_pods_cannot_inject_vxlan_into_another_vpc(lab):
    """From every pod, crafted VXLAN for every other VNI towards every node's underlay
    address (broadcast and unicast to the node's bridge MAC): no pod of another VPC
    receives any of it."""
    vnis = {v.name: v.vni for v in lab.topo.vpcs}
    bridge_macs = {}
    for node in ("k1", "k2"):
        for vni in vnis.values():
            out = node_ns(lab, node).ip("-j", "link", "show", f"vpbr{vni}").stdout
            bridge_macs[(node, vni)] = json.loads(out)[0]["address"]
    victims = list(lab.pods)
    caps = captures(lab, victims, f"udp dst port {INJECT_PORT}")
    sent = 0
    try:
        for attacker, info in lab.pods.items():
            frames = []
            for node in ("k1", "k2", "o1"):
                for vpc, vni in vnis.items():
                    if vni == info.vni:
                        continue
                    dst_macs = [BROADCAST] + [m for (n, v), m in bridge_macs.items()
                                              if n == info.node and v == info.vni]
                    for dst_mac in dst_macs:
                        frames += [vxlan_frame(dst_mac, info.mac, info.ip, node_address(lab, node),
                                               vni, inner_broadcast(f"{attacker}>{node}".encode()),
                                               sport=49152 + i) for i in range(5)]
            sent += send_frames(ns_of(lab, attacker), "eth1", frames)
    finally:
        got = seen(caps)
    assert sent > 100
    leaked = {p: lines for p, lines in got.items() if lines}
    assert not leaked, f"injected frames reached: {leaked}"


def test_injection_capture_sees_frames_that_may_arrive(lab):
    """The positive control: the same inner frame sent by a pod into its own VPC is seen."""
    caps = captures(lab, ["blue-k2", "blue-o1", "red-k1"], f"udp dst port {INJECT_PORT}")
    try:
        info = lab.pods["blue-k1"]
        frame = udp_frame(BROADCAST, info.mac, info.ip, "255.255.255.255", INJECT_PORT, b"own-vpc")
        send_frames(ns_of(lab, "blue-k1"), "eth1", [frame] * 3)
    finally:
        got = seen(caps)
    assert got["blue-k2"] and got["blue-o1"], got
    assert not got["red-k1"], got


def test_nothing_from_a_pod_reaches_the_node(lab):
    """A pod's UDP to its node's own underlay address (broadcast, and unicast to the
    VNI bridge's MAC): a socket listening on the node receives none of it, while the
    same socket receives what the node sends itself (the positive control)."""
    for node, pod in (("k1", "blue-k1"), ("o1", "blue-o1")):
        info, nns = lab.pods[pod], node_ns(lab, node)
        listener = UdpListener(nns, INJECT_PORT, seconds=2.0)
        frames = [udp_frame(BROADCAST, info.mac, info.ip, node_address(lab, node),
                            INJECT_PORT, b"to-node")] * 3
        if node == "k1":
            mac = json.loads(nns.ip("-j", "link", "show", "vpbr300").stdout)[0]["address"]
            frames += [udp_frame(mac, info.mac, info.ip, node_address(lab, node),
                                 INJECT_PORT, b"to-node")] * 3
        # Link-local group addresses (LLDP, STP, ...): a Linux bridge hands these to
        # the port's own stack without its netfilter hooks; forged sources too.
        for group in ("01:80:c2:00:00:0e", "01:80:c2:00:00:00", "01:80:c2:00:00:03"):
            frames += [udp_frame(group, info.mac, info.ip, node_address(lab, node),
                                 INJECT_PORT, b"to-node"),
                       udp_frame(group, "02:de:ad:be:ef:02", "8.8.8.8",
                                 node_address(lab, node), INJECT_PORT, b"to-node")]
        send_frames(ns_of(lab, pod), "eth1", frames)
        send_udp(nns, None, node_address(lab, node), INJECT_PORT, b"control")
        assert listener.count() == 1, f"{node}'s stack received a pod's datagrams"
    assert rule_packets(lab, "k1", "bridge", "input", "vpc-to-node") >= 6
    assert rule_packets(lab, "k1", "inet", "prerouting", "port-to-node") >= 1


def rule_packets(lab: Lab, node: str, family: str, chain: str, comment: str) -> int:
    """The packet counter of the vpcni rule with `comment`."""
    out = node_ns(lab, node).exec("nft", "-j", "list", "chain", family, "vpcni", chain).stdout
    for item in json.loads(out)["nftables"]:
        rule = item.get("rule")
        if rule and rule.get("comment") == comment:
            return sum(e["counter"]["packets"] for e in rule["expr"] if "counter" in e)
    raise AssertionError(f"no rule {comment!r} in {family} vpcni {chain} on {node}")


# ---------------------------------------------------------------- spoofing


SPOOF_CASES = [("k1", "blue-k1", "blue-k1b", "blue-k2"), ("o1", "blue-o1", None, "blue-k2")]


@pytest.mark.parametrize("node,attacker,neighbour,remote", SPOOF_CASES,
                         ids=["kernel", "ovs"])
def test_spoofed_source_mac_and_ip_are_dropped(lab, node, attacker, neighbour, remote):
    info = lab.pods[attacker]
    other = lab.pods[remote]
    receivers = [p for p in (neighbour, remote) if p]
    caps = captures(lab, receivers, f"udp dst port {SPOOF_PORT} or ether proto 0x88b5")
    try:
        frames = [
            # forged source MAC, own IP
            udp_frame(BROADCAST, "02:de:ad:be:ef:01", info.ip, "255.255.255.255", SPOOF_PORT,
                      b"forged-mac"),
            # own MAC, forged source IP (another pod's of the same VPC)
            udp_frame(BROADCAST, info.mac, other.ip, "255.255.255.255", SPOOF_PORT, b"forged-ip"),
            udp_frame(other.mac, info.mac, other.ip, other.ip, SPOOF_PORT, b"forged-ip-unicast"),
            # a non-IP ethertype from the pod's own MAC
            ethernet(BROADCAST, info.mac, 0x88B5, b"local-experimental" * 3),
        ]
        send_frames(ns_of(lab, attacker), "eth1", frames * 5)
        # Positive control: the same frame with the pod's own MAC and IP arrives.
        send_frames(ns_of(lab, attacker), "eth1", [
            udp_frame(BROADCAST, info.mac, info.ip, "255.255.255.255", SPOOF_PORT, b"honest")])
    finally:
        got = seen(caps)
    for pod, lines in got.items():
        assert len(lines) == 1, f"{pod} saw {lines}"
        assert info.mac in lines[0], lines


def test_kernel_pod_cannot_take_over_a_neighbours_mac(lab):
    """blue-k1 keeps sending from blue-k1b's MAC (same node, same VPC) while blue-k2
    pings blue-k1b: the bridge never learns the MAC on the attacker's port, so the
    victim gets every echo request and the attacker none."""
    victim = lab.pods["blue-k1b"]
    takeover = udp_frame(BROADCAST, victim.mac, victim.ip, "255.255.255.255", SPOOF_PORT,
                         b"takeover")
    cap_attacker = Capture(ns_of(lab, "blue-k1"), f"icmp and dst host {victim.ip}").start()
    cap_victim = Capture(ns_of(lab, "blue-k1b"), f"icmp and dst host {victim.ip}").start()
    poisoner = send_frames_paced(ns_of(lab, "blue-k1"), "eth1", takeover, count=300,
                                 interval=0.01)
    try:
        ns_of(lab, "blue-k2").ping(victim.ip, count=10, timeout=1)
    finally:
        poisoner.wait(timeout=30)
        time.sleep(0.3)
        to_attacker, to_victim = cap_attacker.stop(), cap_victim.stop()
    assert not to_attacker, to_attacker
    assert len(to_victim) == 10, to_victim
    # The bridge has the victim's MAC behind the victim's port only.
    fdb = node_ns(lab, "k1").exec("bridge", "fdb", "show", "br", "vpbr300").stdout
    entries = [l for l in fdb.splitlines() if l.startswith(victim.mac)]
    assert entries and all(f"dev {lab_host_ifname(lab, 'blue-k1b')} " in l for l in entries), entries


def lab_host_ifname(lab: Lab, pod: str) -> str:
    from vpcni.backends.kernel import host_ifname

    info = lab.pods[pod]
    return host_ifname(f"vpc-{info.vpc}", info.container_id, "eth1")


@pytest.mark.parametrize("node,attacker,neighbour,remote", SPOOF_CASES, ids=["kernel", "ovs"])
def test_gratuitous_arp_poisoning_is_dropped(lab, node, attacker, neighbour, remote):
    """The attacker claims another pod's address with a gratuitous ARP (request and
    reply forms): no pod receives it, and the victim's neighbours still reach it."""
    info = lab.pods[attacker]
    victim = lab.pods[remote]
    receivers = [p for p in (neighbour, remote) if p]
    caps = captures(lab, receivers, f"arp and ether src {info.mac}")
    try:
        poison = [arp_frame(info.mac, info.mac, victim.ip, victim.ip, op=1),
                  arp_frame(info.mac, info.mac, victim.ip, victim.ip, op=2)]
        send_frames(ns_of(lab, attacker), "eth1", poison * 10)
        # Positive control: an honest gratuitous ARP for its own address passes.
        send_frames(ns_of(lab, attacker), "eth1", [arp_frame(info.mac, info.mac, info.ip, info.ip)])
    finally:
        got = seen(caps)
    poisoned = {p: [l for l in lines if victim.ip in l] for p, lines in got.items()}
    assert not any(poisoned.values()), poisoned
    # Positive control: the honest one reached the neighbour on the node (the kernel
    # backend keeps ARP from crossing VTEPs: suppression) or the remote pod (OVS floods it).
    assert got[neighbour or remote], got
    if neighbour:
        nb = ns_of(lab, neighbour)
        assert nb.ping(victim.ip, count=3, timeout=1)
        neigh = nb.exec("ip", "neigh", "show", victim.ip).stdout
        assert victim.mac in neigh and info.mac not in neigh, neigh


# ---------------------------------------------------------------- the underlay


def vteps_of(lab: Lab, node: str) -> set[tuple[str, int]]:
    out = node_ns(lab, node).exec("nft", "-j", "list", "set", "inet", "vpcni", "vteps4").stdout
    elems = [i["set"].get("elem", []) for i in json.loads(out)["nftables"] if "set" in i][0]
    return {(e["concat"][0], int(e["concat"][1])) for e in elems}


@pytest.fixture(scope="module")
def intruder(lab):
    """A host on the underlay that is no VTEP."""
    return lab.add_underlay_host("intruder", INTRUDER)


def vxlan_payload(vni: int, marker: bytes) -> bytes:
    return vxlan(vni, inner_broadcast(marker))


def test_vxlan_from_an_unknown_underlay_host_is_dropped(lab, intruder):
    caps = captures(lab, list(lab.pods), f"udp dst port {INJECT_PORT}")
    try:
        for node in ("k1", "k2", "o1"):
            for vni in (300, 301):
                send_udp(intruder, INTRUDER, node_address(lab, node), 4789,
                         vxlan_payload(vni, b"intruder"), count=5)
    finally:
        got = seen(caps)
    assert not any(got.values()), got
    assert ("198.51.100.22", 300) in vteps_of(lab, "k1")
    assert all(addr != INTRUDER for addr, _ in vteps_of(lab, "k1"))


def test_vxlan_from_a_known_vtep_passes_until_it_leaves(lab):
    """k2 is a VTEP of VNI 300 for k1 (its type-3 route): VXLAN from k2's address reaches
    k1's blue pods. When k2's last blue pod goes, its type-3 route is withdrawn, k1
    drops (k2, 300) from the set, and the same packet no longer arrives."""
    k2 = node_ns(lab, "k2")
    k1_address, k2_address = node_address(lab, "k1"), node_address(lab, "k2")

    def inject() -> list[str]:
        caps = captures(lab, ["blue-k1", "red-k1"], f"udp dst port {INJECT_PORT}")
        try:
            send_udp(k2, k2_address, k1_address, 4789, vxlan_payload(300, b"from-k2"), count=3)
        finally:
            got = seen(caps)
        assert not got["red-k1"], got
        return got["blue-k1"]

    assert len(inject()) == 3
    info = lab.pods["blue-k2"]
    lab.remove_pod("blue-k2")
    try:
        wait_for(lambda: (k2_address, 300) not in vteps_of(lab, "k1"), timeout=15,
                 what="k1 forgets k2 as a VTEP of VNI 300")
        assert (k2_address, 301) in vteps_of(lab, "k1")  # red-k2 is still there
        assert inject() == []
    finally:
        lab.add_pod("blue-k2", "k2", "blue", info.address)
    wait_for(lambda: (k2_address, 300) in vteps_of(lab, "k1"), timeout=15,
             what="k1 accepts k2 in VNI 300 again")


def test_isolation_rules_come_back_after_a_ruleset_flush(lab):
    """A firewall reload that flushes the ruleset: within the agent's quick check (5 s)
    the tables, every port's and every VTEP's elements are back, without a restart."""
    k1 = node_ns(lab, "k1")
    before = vteps_of(lab, "k1")
    k1.exec("nft", "flush", "ruleset")
    wait_for(lambda: k1.exec("nft", "list", "table", "bridge", "vpcni", check=False).returncode == 0
             and vteps_of(lab, "k1") == before, timeout=15, interval=0.2,
             what="k1's vpcni tables restored")
    ports = k1.exec("nft", "list", "set", "bridge", "vpcni", "port_mac").stdout
    for pod in ("blue-k1", "red-k1", "blue-k1b"):
        assert lab.pods[pod].mac in ports
    assert k1.exec("nft", "list", "table", "arp", "vpcni", check=False).returncode == 0
    wait_for(lambda: ns_of(lab, "blue-k1").ping(lab.pods["blue-k2"].ip), timeout=10,
             what="blue-k1 reaches blue-k2 again")
    test_pods_cannot_inject_vxlan_into_another_vpc(lab)


def test_ovs_host_port_rules_come_back_after_a_ruleset_flush(lab):
    o1 = node_ns(lab, "o1")
    o1.exec("nft", "flush", "ruleset")
    wait_for(lambda: o1.exec("nft", "list", "table", "inet", "vpcni_ovs",
                             check=False).returncode == 0, timeout=15, interval=0.2,
             what="o1's host-port rules restored")
    test_nothing_from_a_pod_reaches_the_node(lab)
