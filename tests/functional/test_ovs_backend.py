"""The ovs backend in a mixed lab: one kernel node and two OVS nodes (userspace
datapath) sharing two VPCs with one CIDR, learning each other through EVPN only.

One lab (lab/topologies/mixed.toml, under a unique name) is shared by the
module; tests that add pods remove them again.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest

from vpcni.lab.cluster import installed_executable
from vpcni.lab.daemons import Ovs
from vpcni.lab.lab import Lab
from vpcni.lab.netns import Netns, wait_for
from vpcni.lab.topology import Topology
from vpcni.lab.traffic import tcp_ident
from tests.functional.test_lab import vpcnictl
from vpcni.lab.traffic import continuous_ping

pytestmark = [pytest.mark.functional, pytest.mark.slow]

MIXED = Path(__file__).resolve().parents[2] / "lab" / "topologies" / "mixed.toml"
OURS = "cookie=0x7670630000000000/0xffffff0000000000"


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    name = f"m{time.time_ns() % 10**6:06d}"
    topo = tmp_path_factory.mktemp("mixed") / "topology.toml"
    topo.write_text(MIXED.read_text().replace('name = "mixed"', f'name = "{name}"', 1))
    assert Topology.load(topo).node("node2").backend == "ovs"
    try:
        vpcnictl("lab", "up", str(topo))
        lab = Lab.load(name)
        # VNIs the tests attach outside the topology, bound to the lab's namespace.
        lab.write_bindings({302: ("green", ["lab"]), 303: ("chk", ["lab"])})
        yield lab
    finally:
        vpcnictl("lab", "down", name, check=False)


def pod_ns(lab: Lab, pod: str) -> Netns:
    return Netns(lab.pods[pod].netns, lab.box, create=False)


def flows(lab: Lab, node: str, spec: str = OURS, stats: bool = False) -> list[str]:
    out = lab.ovs(node).ofctl("dump-flows", spec, options=() if stats else ("--no-stats",))
    return sorted(line.strip() for line in out.splitlines() if "actions=" in line)


def vni_cookie(vni: int) -> str:
    return f"cookie={(0x767063 << 40) | vni:#x}/0xffffff00ffffffff"


def ports(lab: Lab, node: str, bridge: str = "br-int") -> set[str]:
    return set(lab.ovs(node).vsctl("list-ports", bridge).split())


def cni(lab: Lab, node: str, command: str, name: str, vni: int, addr: str, ns: Netns,
        extra: dict | None = None):
    conf = {"cniVersion": "1.1.0", "name": name, "type": "vpcni", "vni": vni, "addr": addr,
            **(extra or {})}
    return lab.node(node).cni(command, conf, f"{lab.box.prefix}-{ns.name}", ns.path, "eth1",
                              args="K8S_POD_NAMESPACE=lab;K8S_POD_NAME=" + ns.name)


def test_mixed_lab_reaches_inside_and_isolates_across(lab):
    rows = lab.matrix()
    wrong = [(s, d, who) for s, d, expected, reached, who in rows if expected != reached]
    assert not wrong, wrong
    # every pair of nodes is crossed inside a VPC: kernel<->ovs, ovs<->ovs, ovs local
    nodes = {(lab.pods[s].node, lab.pods[d].node) for s, d, e, r, _ in rows if e and r}
    assert {("node1", "node2"), ("node2", "node1"), ("node1", "node3"), ("node3", "node1"),
            ("node2", "node3"), ("node3", "node2"), ("node2", "node2")} <= nodes
    # the same address answers from the caller's own VPC only
    assert tcp_ident(pod_ns(lab, "red-3"), lab.pods["blue-2"].ip) == "red-2"
    assert tcp_ident(pod_ns(lab, "blue-3"), lab.pods["blue-2"].ip) == "blue-2"
    # learned through EVPN: no static flood list in any record
    for rec in (lab.box.root_dir / "node2" / "state" / "attachments").rglob("*.json"):
        assert json.loads(rec.read_text())["vteps"] == []
    st = lab.node("node2").agent_status()
    assert st["backend"]["backend"] == "ovs" and "pinned" in st["backend"]["why"]


def test_remote_state_becomes_flows(lab):
    """Type-2 routes: L2 flows to the remote VTEP and ARP answers; type-3: the flood list."""
    l2 = flows(lab, "node2", "table=30,tun_id=300")
    assert any(f"dl_dst={lab.pods['blue-1'].mac} actions=set_field:198.51.100.11->tun_dst" in f
               for f in l2), l2
    arp = flows(lab, "node2", "table=20,tun_id=300")
    assert any(f"arp_tpa={lab.pods['blue-3'].ip}" in f and lab.pods["blue-3"].mac in f
               for f in arp), arp
    [flood] = flows(lab, "node2", "table=50,tun_id=300")
    assert re.findall(r"set_field:([\d.]+)->tun_dst", flood) == ["198.51.100.11",
                                                                 "198.51.100.13"]


class Capture:
    """tcpdump on a pod's eth1 (ICMP and ARP), read line by line."""

    def __init__(self, ns: Netns):
        # Started through the sandbox: killed by pid at cleanup even if a test fails.
        self.proc = ns.spawn("tcpdump", "-n", "-l", "-e", "--immediate-mode", "-i", "eth1",
                             "icmp or arp", stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
        wait_for(lambda: "listening" in self.proc.stderr.readline(), timeout=10, what="tcpdump")
        self.lines: list[str] = []

    def stop(self) -> list[str]:
        self.proc.terminate()
        out, _ = self.proc.communicate(timeout=10)
        return out.splitlines()


SEND_ARP = r"""
import socket, struct, sys
ifname, mac, spa, tpa = sys.argv[1:5]
hw = bytes.fromhex(mac.replace(":", ""))
arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 2, hw, socket.inet_aton(spa),
                  b"\xff" * 6, socket.inet_aton(tpa))
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((ifname, 0))
s.send(b"\xff" * 6 + hw + b"\x08\x06" + arp)
"""


def test_forged_source_mac_or_ip_reaches_nobody(lab):
    src, me = pod_ns(lab, "blue-2"), lab.pods["blue-2"]
    targets = ["blue-1", "blue-3", "blue-4"]  # kernel node, other OVS node, same OVS node
    forged_ip, forged_mac = "172.16.32.99", "02:00:00:66:66:66"
    for t in targets:
        src.ip("neigh", "replace", lab.pods[t].ip, "lladdr", lab.pods[t].mac, "dev", "eth1",
               "nud", "permanent")
    src.ip("addr", "add", f"{forged_ip}/32", "dev", "eth1")
    caps = {t: Capture(pod_ns(lab, t)) for t in targets}
    try:
        for t in targets:
            src.exec("ping", "-n", "-c", "1", "-W", "0.2", "-I", forged_ip, lab.pods[t].ip,
                     check=False)
        # ARP claiming another pod's address (blue-1's), from blue-2's own MAC
        src.exec("/usr/bin/python3", "-S", "-c", SEND_ARP, "eth1", me.mac, lab.pods["blue-1"].ip,
                 lab.pods["blue-1"].ip)
        src.ip("link", "set", "eth1", "address", forged_mac)
        for t in targets:
            src.exec("ping", "-n", "-c", "1", "-W", "0.2", lab.pods[t].ip, check=False)
    finally:
        src.ip("link", "set", "eth1", "address", me.mac)
        src.ip("addr", "del", f"{forged_ip}/32", "dev", "eth1")
    # The barrier and the control: the genuine source gets through to every target.
    for t in targets:
        wait_for(lambda: src.ping(lab.pods[t].ip, count=1, timeout=1), timeout=10,
                 what=f"blue-2 reaching {t}")
    seen = {t: cap.stop() for t, cap in caps.items()}
    for t, lines in seen.items():
        assert any(f"{me.ip} > {lab.pods[t].ip}: ICMP echo request" in l for l in lines), \
            (t, lines)
        forged = [l for l in lines if forged_ip in l or forged_mac in l
                  or (me.mac in l and f"{lab.pods['blue-1'].ip} is-at" in l)]
        assert not forged, f"forged frames reached {t}: {forged}"


def test_agent_restart_keeps_forwarding_and_flows(lab):
    node = lab.node("node2")
    before = flows(lab, "node2")
    ping = continuous_ping(pod_ns(lab, "blue-2"), lab.pods["blue-1"].ip, seconds=5, interval=0.1)
    t0 = time.monotonic()
    node.restart_agent()

    def reconciled():
        out = node.ns.exec("curl", "-s", "http://127.0.0.1:9471/metrics", check=False).stdout
        m = re.search(r'^vpcni_reconcile_runs_total\{result="ok"\} (\S+)', out, re.M)
        return m and float(m.group(1)) >= 1
    wait_for(reconciled, timeout=20, what="a reconcile run of the new agent")
    ping.join()
    sent, received = ping.result
    assert sent - received <= 1, f"lost {sent - received} of {sent} probes across the restart"
    assert flows(lab, "node2") == before
    # ...and not rewritten to the same: every flow is older than the restart.
    age = time.monotonic() - t0
    durations = [float(m) for m in re.findall(r"duration=([\d.]+)s", "\n".join(
        flows(lab, "node2", stats=True)))]
    assert durations and min(durations) > age - 0.5, (min(durations), age)


def test_del_removes_port_and_flows_and_leaves_foreign_alone(lab):
    ovs = lab.ovs("node3")
    ovs.vsctl("add-br", "br-x", "--", "set", "bridge", "br-x", "datapath_type=netdev")
    ovs.ofctl("add-flow", "cookie=0x42,priority=5,actions=drop", bridge="br-x")
    ovs.ofctl("add-flow", "cookie=0x42,table=60,priority=1,actions=drop")
    ovs.ofctl("add-flow", "cookie=0x43,table=0,priority=1000,dl_type=0x88b5,actions=drop")
    foreign = flows(lab, "node3", "cookie=0x42/0xff")
    before_ports = ports(lab, "node3")

    green = lab.box.netns("pod-green")
    res = cni(lab, "node3", "ADD", "vpc-green", 302, "172.16.33.1/24", green)
    assert res.ok, res.stdout
    host = res.json["interfaces"][0]["name"]
    mac = res.json["interfaces"][1]["mac"]
    assert ports(lab, "node3") == before_ports | {host}
    green_flows = flows(lab, "node3", vni_cookie(302))
    # its anti-spoofing (IP, ARP) and L2 flows name its MAC; classify and flooding its port
    assert len([f for f in green_flows if mac in f]) == 3, green_flows
    assert "vpcni-vni-302" in ovs.vsctl("get", "bridge", "br-int", "external_ids")

    # One attachment leaves a VNI that stays: only its flows go.
    lab.add_pod("blue-5", "node3", "blue", "172.16.32.15/24")
    mac5 = lab.pods["blue-5"].mac
    assert any(mac5 in f for f in flows(lab, "node3", vni_cookie(300)))
    lab.remove_pod("blue-5")
    left = flows(lab, "node3", vni_cookie(300))
    assert left and not any(mac5 in f for f in left)

    # The VNI leaves the node: its port, every flow and its mark go.
    assert cni(lab, "node3", "DEL", "vpc-green", 302, "172.16.33.1/24", green).ok
    assert ports(lab, "node3") == before_ports
    assert flows(lab, "node3", vni_cookie(302)) == []
    assert "vpcni-vni-302" not in ovs.vsctl("get", "bridge", "br-int", "external_ids")
    assert host not in {l["ifname"] for l in json.loads(
        lab.box.namespaces["node3"].ip("-j", "link", "show").stdout)}
    # What vpcni never made is still there.
    assert flows(lab, "node3", "cookie=0x42/0xff") == foreign
    assert len(flows(lab, "node3", "cookie=0x43/-1")) == 1
    assert "br-x" in ovs.vsctl("list-br").split()
    assert len(flows(lab, "node3", "cookie=0x42/-1")) == 1 and \
        "priority=5" in ovs.ofctl("dump-flows", options=("--no-stats",), bridge="br-x")
    assert tcp_ident(pod_ns(lab, "blue-1"), lab.pods["blue-3"].ip) == "blue-3"


def test_check_detects_deleted_port_and_missing_flow(lab):
    ns = lab.box.netns("pod-chk")
    res = cni(lab, "node3", "ADD", "vpc-chk", 303, "172.16.34.1/24", ns)
    assert res.ok, res.stdout
    host = res.json["interfaces"][0]["name"]
    extra = {"prevResult": res.json}
    assert cni(lab, "node3", "CHECK", "vpc-chk", 303, "172.16.34.1/24", ns, extra).ok

    lab.ovs("node3").ofctl("del-flows", f"{vni_cookie(303)},table=10,ip,nw_src=172.16.34.1")
    out = cni(lab, "node3", "CHECK", "vpc-chk", 303, "172.16.34.1/24", ns, extra)
    assert not out.ok and "lacks flow" in out.json["msg"] and "nw_src=172.16.34.1" in \
        out.json["msg"], out.stdout

    lab.ovs("node3").vsctl("del-port", "br-int", host)
    out = cni(lab, "node3", "CHECK", "vpc-chk", 303, "172.16.34.1/24", ns, extra)
    assert not out.ok and f"OVS port {host} missing" in out.json["msg"], out.stdout

    assert cni(lab, "node3", "DEL", "vpc-chk", 303, "172.16.34.1/24", ns).ok
    assert flows(lab, "node3", vni_cookie(303)) == []
    assert host not in ports(lab, "node3")


def test_probe_says_why_and_the_node_policy_decides(cluster):
    """Both backends usable: no pin -> the score (kernel 10 > ovs on netdev 5); the
    probe names what is missing once ovs-vswitchd is gone."""
    node = cluster.add_node("n1", "198.51.100.1", backend="ovs")
    node.write_node_config(**{k: v for k, v in node.node_config.items() if k != "backend"})

    def probe() -> dict:
        out = node.ns.exec(installed_executable("vpcnictl"), "probe", "--json",
                           "--node-config", str(node.config_path), check=False).stdout
        return {p["name"]: p for p in json.loads(out)["backends"]}
    probes = probe()
    assert probes["ovs"]["available"] and probes["kernel"]["available"], probes
    assert "datapath netdev" in probes["ovs"]["reason"]
    assert probes["kernel"]["score"] > probes["ovs"]["score"]
    node.write_node_config(**(node.node_config | {"mode": "agent", "healthAddress": "",
                                                   "agentSocket": str(node.dir / "agent.sock")}))
    node.start_agent()
    status = node.wait_agent_ready()
    assert (status["backend"]["backend"], status["backend"]["why"]) == ("kernel",
                                                                        "best available probe")
    node.stop_agent()
    ovs = Ovs(node.ns, Path(node.node_config["ovs"]["runDir"]))
    for pid in cluster.sandbox.pids(node.ns.name, "ovs-vswitchd"):
        cluster.sandbox.kill_pid(pid)
    assert "ovs-vswitchd is not running" in probe()["ovs"]["reason"]
    ovs.stop()
    assert "no OVSDB socket" in probe()["ovs"]["reason"] or \
        "does not answer" in probe()["ovs"]["reason"]
