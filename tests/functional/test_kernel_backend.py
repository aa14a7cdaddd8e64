"""The kernel backend object on two simulated nodes, in real namespaces.

Each node is a namespace on a 198.51.100.0/24 fabric; each pod has its own
namespace. The backend is called directly (not through CNI), every call made
from inside the node's namespace as the plugin runs under `ip netns exec`.
What it built is observed independently with iproute2's JSON output.
"""

from __future__ import annotations

import ipaddress
import json
import sys
import threading

import pytest

from tests.functional.netstate import inside
from tests.functional.compose import Composed
from vpcni.backends.kernel import KernelBackend
from vpcni.backends.veth import VethProvider
from vpcni.backends.kernel.netlink import host_ifname
from vpcni.core.config import NodeConfig
from vpcni.core.errors import BackendError, CheckFailed, InvalidConfig, InvalidEnvironment
from vpcni.core.models import (Attachment, IPConfig, RemoteEndpoint, RemoteState, Route,
                               VpcNetwork)
from vpcni.lab.cluster import Cluster
from vpcni.lab.netns import Netns, wait_for

pytestmark = pytest.mark.functional

VNI = 300
N1, N2 = "198.51.100.1", "198.51.100.2"
NET = VpcNetwork(name="vpc-a", vni=VNI)



class OnNode:
    """A KernelBackend (with the veth provider, composed as core does) whose every call
    runs inside the node's namespace."""

    def __init__(self, ns: Netns, node: NodeConfig):
        self.ns = ns
        self.node = node
        with inside(ns):
            self.backend = KernelBackend(node)
            self.veth = VethProvider(node)
        self.composed = Composed(self.backend, self.veth)

    def close(self) -> None:
        with inside(self.ns):
            self.backend.close()
            self.veth.close()

    def __getattr__(self, name):
        target = self.composed if name in ("attach", "detach", "check") else self.backend
        attr = getattr(target, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            with inside(self.ns):
                return attr(*args, **kwargs)
        return call


class KernelNodes:
    """Two nodes of the lab cluster, each with a KernelBackend of its own."""

    def __init__(self, cluster: Cluster):
        self.cluster = cluster
        self.sandbox = cluster.sandbox
        self.n1 = cluster.add_node("n1", N1).ns
        self.n2 = cluster.add_node("n2", N2).ns
        self.b1 = self.backend(self.n1, vtepAddress=N1)
        self.b2 = self.backend(self.n2, vtepAddress=N2)

    def backend(self, ns: Netns, **cfg) -> OnNode:
        on_node = OnNode(ns, NodeConfig(logFile=None, **cfg))
        self.sandbox.on_cleanup(on_node.close)
        return on_node

    def pod(self, name: str, node: str = "n1") -> Netns:
        return self.cluster.add_pod(self.cluster.nodes[node], name).ns


@pytest.fixture
def nodes(cluster) -> KernelNodes:
    return KernelNodes(cluster)


def attachment(pod: Netns, cid: str, ip: str, ifname: str = "eth1", net: VpcNetwork = NET,
               **extra) -> Attachment:
    return Attachment(network=net.name, vni=net.vni, container_id=cid, ifname=ifname,
                      netns=pod.path, backend="kernel", ips=[IPConfig(address=ip)], **extra)


def links(ns: Netns, *names: str) -> dict:
    out = json.loads(ns.ip("-j", "-d", "link", "show", *names).stdout or "[]")
    return {link["ifname"]: link for link in out}


def has_link(ns: Netns, name: str) -> bool:
    return ns.ip("link", "show", name, check=False).returncode == 0


def remote_fdb(ns: Netns, dev: str) -> set[tuple[str, str]]:
    out = json.loads(ns.exec("bridge", "-j", "fdb", "show", "dev", dev).stdout or "[]")
    return {(e["mac"], e["dst"]) for e in out if "dst" in e}


def neighbours(ns: Netns, dev: str) -> set[tuple[str, str]]:
    out = json.loads(ns.ip("-j", "neigh", "show", "dev", dev, "nud", "permanent").stdout or "[]")
    return {(e["dst"], e["lladdr"]) for e in out}


# ---------------------------------------------------------------- probe


def test_probe_reports_vtep_and_mtu(nodes):
    probe = nodes.b1.probe(nodes.b1.node)
    assert probe.available, probe.reason
    assert probe.score == 10
    assert "VTEP 198.51.100.1 on eth0 (mtu 1500)" in probe.reason
    assert probe.facts["pod_mtu"] == 1450


def test_probe_finds_vtep_from_underlay_interface(nodes):
    on = nodes.backend(nodes.n1, underlayInterface="eth0")
    probe = on.probe(on.node)
    assert probe.available and probe.facts["vtep"] == N1


def test_probe_unavailable_without_vtep_address(nodes):
    node = NodeConfig(vtepAddress="198.51.100.99", logFile=None)
    with inside(nodes.n1):
        probe = KernelBackend.probe(node)
    assert not probe.available
    assert "198.51.100.99" in probe.reason and "not configured" in probe.reason


# ---------------------------------------------------------------- per VNI


def test_ensure_network_builds_vxlan_in_bridge(nodes):
    nodes.b1.ensure_network(NET)
    nodes.b1.ensure_network(NET)  # idempotent
    found = links(nodes.n1)
    vx, br = found[f"vpvx{VNI}"], found[f"vpbr{VNI}"]
    info = vx["linkinfo"]["info_data"]
    assert (info["id"], info["local"], info["port"], info["learning"]) == (VNI, N1, 4789, False)
    assert vx["master"] == br["ifname"] and vx["mtu"] == 1450
    slave = vx["linkinfo"]["info_slave_data"]
    assert slave["learning"] is False and slave["neigh_suppress"] is True
    assert vx["inet6_addr_gen_mode"] == br["inet6_addr_gen_mode"] == "none"
    assert br["linkinfo"]["info_data"]["stp_state"] == 0
    assert br["linkinfo"]["info_data"]["mcast_snooping"] == 0
    assert vx["ifalias"] == br["ifalias"] == f"vpcni:vni={VNI}"
    assert "UP" in vx["flags"] and "UP" in br["flags"]


def test_ensure_network_concurrent_processes(nodes):
    script = ("from vpcni.backends.kernel import KernelBackend;"
              "from vpcni.core.config import NodeConfig; from vpcni.core.models import VpcNetwork;"
              f"b = KernelBackend(NodeConfig(vtepAddress='{N1}', logFile=None));"
              f"b.ensure_network(VpcNetwork(name='vpc-a', vni={VNI}))")
    results = []

    def run():
        results.append(nodes.n1.exec(sys.executable, "-c", script, check=False))
    threads = [threading.Thread(target=run) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.returncode for r in results] == [0] * 6, [r.stderr for r in results]
    found = links(nodes.n1)
    assert found[f"vpvx{VNI}"]["master"] == f"vpbr{VNI}"


def test_ensure_network_waits_for_a_concurrent_creator_to_mark_its_device(nodes):
    # What a concurrent ensure_network looks like between its create and its
    # alias: the device exists, unmarked, for a moment.
    nodes.n1.ip("link", "add", f"vpbr{VNI}", "type", "bridge")
    marker = threading.Timer(0.3, nodes.n1.ip, args=(
        "link", "set", f"vpbr{VNI}", "alias", f"vpcni:vni={VNI}"))
    marker.start()
    try:
        nodes.b1.ensure_network(NET)
    finally:
        marker.join()
    assert links(nodes.n1)[f"vpvx{VNI}"]["master"] == f"vpbr{VNI}"


def test_one_backend_serves_several_threads(nodes):
    # A process of its own, started in the node namespace as the agent is:
    # inside() keeps a per-process stack and cannot serve threads.
    pods = [nodes.pod(f"p{i}") for i in range(6)]
    script = f"""
import sys, threading
from tests.functional.compose import Composed
from vpcni.backends.kernel import KernelBackend
from vpcni.backends.veth import VethProvider
from vpcni.core.config import NodeConfig
from vpcni.core.models import Attachment, IPConfig, VpcNetwork
node = NodeConfig(vtepAddress="{N1}", logFile=None)
switch = KernelBackend(node)
backend = Composed(switch, VethProvider(node))
net = VpcNetwork(name="vpc-a", vni={VNI})
switch.ensure_network(net)
errors = []
def attach(i, path):
    try:
        att = backend.attach(net, Attachment(
            network="vpc-a", vni={VNI}, container_id=f"c{{i}}", ifname="eth1", netns=path,
            backend="kernel", ips=[IPConfig(address=f"172.16.30.{{i + 1}}/24")]))
        backend.check(net, att)
        if i % 2:
            backend.detach(att)
    except Exception as exc:
        errors.append(repr(exc))
threads = [threading.Thread(target=attach, args=(i, p)) for i, p in enumerate(sys.argv[1:])]
for t in threads:
    t.start()
for t in threads:
    t.join()
sys.exit("; ".join(errors) or None)
"""
    nodes.n1.exec(sys.executable, "-c", script, *[p.path for p in pods])
    owned = nodes.b1.owned()
    assert sorted(key[1] for key in owned.attachments.values()) == ["c0", "c2", "c4"]


def test_ensure_network_refuses_a_different_vxlan(nodes):
    nodes.b1.ensure_network(NET)
    with pytest.raises(BackendError, match=r"vpvx300 exists with port 4789 \(want 4790\)"):
        nodes.b1.ensure_network(VpcNetwork(name="vpc-a", vni=VNI, port=4790))


def test_ensure_network_refuses_a_foreign_device(nodes):
    nodes.n1.ip("link", "add", "vpbr301", "type", "bridge")
    with pytest.raises(BackendError, match="vpbr301 exists but is not vpcni's"):
        nodes.b1.ensure_network(VpcNetwork(name="vpc-b", vni=301))


def test_network_mtu_above_what_vxlan_leaves_is_invalid(nodes):
    with pytest.raises(InvalidConfig, match=r"'mtu' 1451 exceeds 1450"):
        nodes.b1.ensure_network(VpcNetwork(name="vpc-a", vni=VNI, mtu=1451))


def test_release_network_removes_only_its_devices(nodes):
    nodes.b1.ensure_network(NET)
    nodes.n1.ip("link", "add", "vpbr301", "type", "bridge")
    nodes.b1.release_network(VNI)
    nodes.b1.release_network(VNI)  # nothing left: still fine
    nodes.b1.release_network(301)
    assert not has_link(nodes.n1, f"vpvx{VNI}") and not has_link(nodes.n1, f"vpbr{VNI}")
    assert has_link(nodes.n1, "vpbr301")


# ---------------------------------------------------------------- per pod


@pytest.fixture
def two_pods(nodes):
    """pod-a on n1 and pod-b on n2 in VNI 300, with static remote state both ways."""
    pa, pb = nodes.pod("pa"), nodes.pod("pb", "n2")
    for b in (nodes.b1, nodes.b2):
        b.ensure_network(NET)
    a = nodes.b1.attach(NET, attachment(pa, "cid-a", "172.16.30.1/24", mac="02:aa:00:00:00:01",
                                          routes=[Route(dst="0.0.0.0/0", gw="172.16.30.254")]))
    b = nodes.b2.attach(NET, attachment(pb, "cid-b", "172.16.30.2/24", routes=[
        Route(dst="172.16.31.0/24", gw="172.16.30.254", mtu=1400),
        Route(dst="172.16.30.0/24")]))  # the kernel's subnet route already: first one wins
    nodes.b1.apply_remote(VNI, RemoteState(
        endpoints=[RemoteEndpoint(mac=b.mac, ip="172.16.30.2", vtep=N2)], flood=[N2]))
    nodes.b2.apply_remote(VNI, RemoteState(
        endpoints=[RemoteEndpoint(mac=a.mac, ip="172.16.30.1", vtep=N1)], flood=[N1]))
    return pa, pb, a, b


def test_attach_fills_the_record(nodes, two_pods):
    pa, pb, a, b = two_pods
    assert a.host_ifname == host_ifname("vpc-a", "cid-a", "eth1")
    assert a.mac == "02:aa:00:00:00:01" and a.mtu == 1450
    pod = links(pa, "eth1")["eth1"]
    assert (pod["address"], pod["mtu"]) == (a.mac, 1450)
    assert pod["ifalias"] == "vpcni:att=vpc-a/cid-a/eth1"
    host = links(nodes.n1, a.host_ifname)[a.host_ifname]
    assert host["master"] == "vpbr300" and host["mtu"] == 1450 and "UP" in host["flags"]
    routes = json.loads(pb.ip("-j", "route", "show", "172.16.31.0/24").stdout)
    assert routes[0]["gateway"] == "172.16.30.254" and routes[0]["dev"] == "eth1"
    assert routes[0]["metrics"] == [{"mtu": 1400}]
    default = json.loads(pa.ip("-j", "route", "show", "default").stdout)
    assert default[0]["gateway"] == "172.16.30.254" and default[0]["dev"] == "eth1"


def test_pods_on_two_nodes_ping_both_ways(nodes, two_pods):
    pa, pb, a, b = two_pods
    wait_for(lambda: pa.ping("172.16.30.2"), timeout=5, what="pod-a -> pod-b")
    wait_for(lambda: pb.ping("172.16.30.1"), timeout=5, what="pod-b -> pod-a")
    nodes.b1.check(NET, a)
    nodes.b2.check(NET, b)


def test_remote_state_is_what_connects_and_vnis_stay_apart(nodes):
    pa, pb, pc = nodes.pod("pa"), nodes.pod("pb", "n2"), nodes.pod("pc", "n2")
    other = VpcNetwork(name="vpc-b", vni=301)
    nodes.b1.ensure_network(NET)
    for net in (NET, other):
        nodes.b2.ensure_network(net)
    a = nodes.b1.attach(NET, attachment(pa, "cid-a", "172.16.30.1/24"))
    b = nodes.b2.attach(NET, attachment(pb, "cid-b", "172.16.30.2/24"))
    # Same subnet, other VPC, same node as pod-b: must stay unreachable.
    nodes.b2.attach(other, attachment(pc, "cid-c", "172.16.30.3/24", net=other))
    assert not pa.ping("172.16.30.2")

    nodes.b1.apply_remote(VNI, RemoteState(
        endpoints=[RemoteEndpoint(mac=b.mac, ip="172.16.30.2", vtep=N2)], flood=[N2]))
    nodes.b2.apply_remote(VNI, RemoteState(
        endpoints=[RemoteEndpoint(mac=a.mac, ip="172.16.30.1", vtep=N1)], flood=[N1]))
    nodes.b2.apply_remote(301, RemoteState(flood=[N1]))
    wait_for(lambda: pa.ping("172.16.30.2"), timeout=5, what="pod-a -> pod-b")
    assert not pa.ping("172.16.30.3")

    nodes.b1.apply_remote(VNI, RemoteState())
    assert not pa.ping("172.16.30.2")


def test_apply_remote_converges_exactly(nodes):
    nodes.b1.ensure_network(NET)
    nodes.n1.ip("neigh", "add", "198.51.100.77", "lladdr", "02:00:00:00:77:77", "dev", "eth0",
                  "nud", "permanent")
    m1, m2, m3 = "02:00:00:00:00:01", "02:00:00:00:00:02", "02:00:00:00:00:03"
    n3, n4 = "198.51.100.3", "198.51.100.4"
    nodes.b1.apply_remote(VNI, RemoteState(endpoints=[
        RemoteEndpoint(mac=m1, ip="172.16.30.11", vtep=N2),
        RemoteEndpoint(mac=m2, ip="172.16.30.12", vtep=n3),
        RemoteEndpoint(mac=m3, vtep=n3)], flood=[N2, n3]))
    assert remote_fdb(nodes.n1, "vpvx300") == {
        (m1, N2), (m2, n3), (m3, n3), ("00:00:00:00:00:00", N2), ("00:00:00:00:00:00", n3)}
    assert neighbours(nodes.n1, "vpbr300") == {("172.16.30.11", m1), ("172.16.30.12", m2)}

    # m1 moves to n4, m2 and m3 leave, n3 leaves the flood list and n4 joins it.
    state = RemoteState(endpoints=[RemoteEndpoint(mac=m1, ip="172.16.30.11", vtep=n4)],
                        flood=[N2, n4])
    nodes.b1.apply_remote(VNI, state)
    nodes.b1.apply_remote(VNI, state)
    assert remote_fdb(nodes.n1, "vpvx300") == {
        (m1, n4), ("00:00:00:00:00:00", N2), ("00:00:00:00:00:00", n4)}
    assert neighbours(nodes.n1, "vpbr300") == {("172.16.30.11", m1)}

    nodes.b1.apply_remote(VNI, RemoteState())
    assert remote_fdb(nodes.n1, "vpvx300") == set()
    assert neighbours(nodes.n1, "vpbr300") == set()
    # The bridge's own entries (no dst) and other devices' neighbours stay.
    assert json.loads(nodes.n1.exec("bridge", "-j", "fdb", "show", "dev", "vpvx300").stdout)
    assert neighbours(nodes.n1, "eth0") == {("198.51.100.77", "02:00:00:00:77:77")}


def test_apply_remote_skips_own_vtep_and_missing_vni(nodes):
    nodes.b1.apply_remote(999, RemoteState(flood=[N2]))
    nodes.b1.ensure_network(NET)
    nodes.b1.apply_remote(VNI, RemoteState(flood=[N1, N2]))
    assert remote_fdb(nodes.n1, "vpvx300") == {("00:00:00:00:00:00", N2)}


def test_attach_removes_leftovers_of_a_crashed_attach(nodes):
    pod = nodes.pod("pa")
    nodes.b1.ensure_network(NET)
    first = nodes.b1.attach(NET, attachment(pod, "cid-a", "172.16.30.1/24"))
    again = nodes.b1.attach(NET, attachment(pod, "cid-a", "172.16.30.1/24"))
    assert again.host_ifname == first.host_ifname
    assert has_link(nodes.n1, again.host_ifname) and has_link(pod, "eth1")


def test_attach_refuses_a_foreign_interface_in_the_pod(nodes):
    pod = nodes.pod("pa")
    nodes.b1.ensure_network(NET)
    pod.ip("link", "add", "eth1", "type", "bridge")
    with pytest.raises(BackendError, match=f"interface eth1 already exists in netns {pod.path}"):
        nodes.b1.attach(NET, attachment(pod, "cid-a", "172.16.30.1/24"))
    assert has_link(pod, "eth1")


def test_failed_attach_leaves_nothing_behind(nodes):
    pod = nodes.pod("pa")
    nodes.b1.ensure_network(NET)
    unreachable = Route(dst="172.16.99.0/24", gw="192.0.2.1")
    with pytest.raises(BackendError, match="could not add route 172.16.99.0/24 via 192.0.2.1"):
        nodes.b1.attach(NET, attachment(pod, "cid-a", "172.16.30.1/24", routes=[unreachable]))
    assert not has_link(nodes.n1, host_ifname("vpc-a", "cid-a", "eth1"))
    assert not has_link(pod, "eth1")


def test_attach_needs_an_existing_netns(nodes):
    nodes.b1.ensure_network(NET)
    att = attachment(nodes.n1, "cid-a", "172.16.30.1/24").model_copy(
        update={"netns": "/var/run/netns/vpcni-no-such-ns"})
    with pytest.raises(InvalidEnvironment, match="CNI_NETNS"):
        nodes.b1.attach(NET, att)
    assert not has_link(nodes.n1, host_ifname("vpc-a", "cid-a", "eth1"))


def test_attach_refuses_a_netns_path_that_is_no_netns(nodes, tmp_path):
    nodes.b1.ensure_network(NET)
    not_a_netns = tmp_path / "file"
    not_a_netns.write_text("")
    att = attachment(nodes.n1, "cid-a", "172.16.30.1/24").model_copy(
        update={"netns": str(not_a_netns)})
    with pytest.raises(InvalidEnvironment, match="CNI_NETNS .* is not a network namespace"):
        nodes.b1.attach(NET, att)


def test_detach_tolerates_what_is_gone(nodes):
    pod = nodes.pod("pa")
    nodes.b1.ensure_network(NET)
    att = nodes.b1.attach(NET, attachment(pod, "cid-a", "172.16.30.1/24"))
    nodes.b1.detach(att)
    assert not has_link(nodes.n1, att.host_ifname) and not has_link(pod, "eth1")
    nodes.b1.detach(att)
    again = nodes.b1.attach(NET, attachment(pod, "cid-a", "172.16.30.1/24"))
    pod.delete()
    nodes.b1.detach(again)
    nodes.b1.detach(attachment(pod, "cid-never", "172.16.30.9/24"))
    wait_for(lambda: not has_link(nodes.n1, again.host_ifname), what="veth gone with its netns")


def test_check_names_what_differs(nodes, two_pods):
    pa, _, a, _ = two_pods
    nodes.b1.check(NET, a)

    nodes.n1.exec("nft", "delete", "element", "bridge", "vpcni", "port_ip4",
                  f'{{ "{a.host_ifname}" . 172.16.30.1 }}')
    with pytest.raises(CheckFailed, match=f"anti-spoofing of {a.host_ifname} lacks port_ip4"):
        nodes.b1.check(NET, a)
    assert nodes.b1.reconcile(lambda: [a.model_copy(update={"state": "ready"})]) == [a.host_ifname]
    nodes.b1.check(NET, a)

    pa.ip("link", "set", "eth1", "mtu", "1400")
    with pytest.raises(CheckFailed, match="eth1 MTU 1400 differs from recorded 1450"):
        nodes.b1.check(NET, a)
    pa.ip("link", "set", "eth1", "mtu", "1450")

    pa.ip("addr", "flush", "dev", "eth1")
    with pytest.raises(CheckFailed, match="lacks recorded address"):
        nodes.b1.check(NET, a)
    pa.ip("addr", "add", "172.16.30.1/24", "dev", "eth1")

    nodes.n1.ip("link", "set", a.host_ifname, "nomaster")
    with pytest.raises(CheckFailed, match=f"host veth {a.host_ifname} is not enslaved to vpbr300"):
        nodes.b1.check(NET, a)

    nodes.n1.ip("link", "set", "vpbr300", "down")
    with pytest.raises(CheckFailed, match="bridge vpbr300 is down"):
        nodes.b1.check(NET, a)

    nodes.n1.ip("link", "del", a.host_ifname)
    with pytest.raises(CheckFailed, match="interface eth1 missing in netns"):
        nodes.b1.check(NET, a)
    with pytest.raises(CheckFailed, match=f"host veth {a.host_ifname} missing"):
        nodes.b1.check(NET, a)

    nodes.n1.ip("link", "del", "vpvx300")
    with pytest.raises(CheckFailed, match="vxlan device vpvx300 missing"):
        nodes.b1.check(NET, a)


# ---------------------------------------------------------------- inventory


def test_owned_lists_only_vpcni_devices(nodes, two_pods):
    _, _, a, _ = two_pods
    nodes.n1.ip("link", "add", "vpbr301", "type", "bridge")
    nodes.n1.ip("link", "add", "hand-br", "type", "bridge")
    nodes.n1.ip("link", "set", "hand-br", "alias", "not-vpcni")
    owned = nodes.b1.owned()
    assert owned.vnis == {VNI}
    assert owned.attachments == {a.host_ifname: ("vpc-a", "cid-a", "eth1")}
    nodes.b1.release_network(301)
    assert has_link(nodes.n1, "vpbr301") and has_link(nodes.n1, "hand-br")


def test_ipv6_pod_addresses_are_usable_at_once(nodes):
    pa, pb = nodes.pod("pa"), nodes.pod("pb")
    nodes.b1.ensure_network(NET)
    a = nodes.b1.attach(NET, attachment(pa, "cid-a", "fd00:30::1/64"))
    b = nodes.b1.attach(NET, attachment(pb, "cid-b", "fd00:30::2/64"))
    found = json.loads(pa.ip("-j", "addr", "show", "dev", "eth1").stdout)[0]["addr_info"]
    mine = [x for x in found if ipaddress.ip_interface(f"{x['local']}/{x['prefixlen']}")
            == ipaddress.ip_interface("fd00:30::1/64")]
    assert mine and mine[0].get("nodad") and not mine[0].get("tentative")
    wait_for(lambda: pa.ping("fd00:30::2"), timeout=5, what="pod-a -> pod-b over IPv6")
    nodes.b1.check(NET, a)
    nodes.b1.check(NET, b)


# ---------------------------------------------------------------- isolation guard


def port_elements(ns: Netns) -> dict[str, set[str]]:
    """set name -> elements of the bridge vpcni port sets, as `nft -j` lists them."""
    out = {}
    for name in ("port_mac", "port_ip4", "port_ip6", "port_v6", "port_l2"):
        data = json.loads(ns.exec("nft", "-j", "list", "set", "bridge", "vpcni", name).stdout)
        elems = [i["set"].get("elem", []) for i in data["nftables"] if "set" in i][0]
        out[name] = {json.dumps(e, sort_keys=True) for e in elems}
    return out


def test_port_filter_follows_the_port(nodes):
    pa = nodes.pod("pa")
    nodes.b1.ensure_network(NET)
    a = nodes.b1.attach(NET, attachment(pa, "cid-a", "172.16.30.1/24", mac="02:aa:00:00:00:07"))
    elems = port_elements(nodes.n1)
    assert any(a.host_ifname in e and "02:aa:00:00:00:07" in e for e in elems["port_mac"])
    assert any(a.host_ifname in e and "172.16.30.1" in e for e in elems["port_ip4"])
    assert not elems["port_l2"]
    nodes.b1.detach(a)
    assert not any(port_elements(nodes.n1).values())


def test_a_crashed_attach_leaves_no_stale_permission(nodes):
    """Elements left by an attach whose record was lost (another IP) go with the leftover
    veth when the attachment is added again, and the new port gets only its own."""
    pa = nodes.pod("pa")
    nodes.b1.ensure_network(NET)
    a = nodes.b1.attach(NET, attachment(pa, "cid-a", "172.16.30.1/24"))
    again = nodes.b1.attach(NET, attachment(pa, "cid-a", "172.16.30.9/24"))
    ip4 = port_elements(nodes.n1)["port_ip4"]
    assert any("172.16.30.9" in e for e in ip4) and not any("172.16.30.1\"" in e for e in ip4)
    assert again.host_ifname == a.host_ifname


def test_reconcile_removes_what_no_record_explains_and_keeps_what_is_being_added(nodes):
    pa, pb = nodes.pod("pa"), nodes.pod("pb")
    nodes.b1.ensure_network(NET)
    a = nodes.b1.attach(NET, attachment(pa, "cid-a", "172.16.30.1/24"))
    b = nodes.b1.attach(NET, attachment(pb, "cid-b", "172.16.30.2/24"))
    ready_a = a.model_copy(update={"state": "ready"})
    adding_b = b.model_copy(update={"state": "adding"})
    # b is mid-ADD (its record says "adding"): left as it is.
    assert nodes.b1.reconcile(lambda: [ready_a, adding_b]) == []
    # b has no record at all: its elements go (its port then drops everything).
    assert nodes.b1.reconcile(lambda: [ready_a]) == [b.host_ifname]
    assert not any(b.host_ifname in e for s in port_elements(nodes.n1).values() for e in s)
    assert any(a.host_ifname in e for e in port_elements(nodes.n1)["port_mac"])


def test_vteps_accepted_per_vni_follow_the_remote_state(nodes):
    nodes.b1.ensure_network(NET)
    nodes.b1.apply_remote(VNI, RemoteState(flood=[N2], endpoints=[
        RemoteEndpoint(mac="02:00:00:00:00:33", ip="172.16.30.3", vtep="198.51.100.3")]))

    def vteps():
        data = json.loads(nodes.n1.exec("nft", "-j", "list", "set", "inet", "vpcni",
                                        "vteps4").stdout)
        elems = [i["set"].get("elem", []) for i in data["nftables"] if "set" in i][0]
        return {(e["concat"][0], e["concat"][1]) for e in elems}
    assert vteps() == {(N2, VNI), ("198.51.100.3", VNI)}
    nodes.b1.apply_remote(VNI, RemoteState(flood=[N2]))
    assert vteps() == {(N2, VNI)}
    nodes.b1.release_network(VNI)
    assert vteps() == set()
