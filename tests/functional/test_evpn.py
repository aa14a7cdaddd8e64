"""The EVPN speaker against real daemons in namespaces: gobgpd per node, a route
reflector (FRR bgpd or gobgpd), and a plain FRR VTEP for interop.

Fabric 198.51.100.0/24: reflector .10, gobgpd nodes .1 and .2, FRR VTEP .3.
Every daemon runs in a namespace of the test's sandbox and dies with it.
gobgpd waits 5-10 s before its first connection to a reflector (its minimum
connect retry), so each lab takes that long to come up.
"""

from __future__ import annotations

import ipaddress
import json
import statistics
import threading
import time
from typing import Callable, Optional

import pytest

from vpcni.evpn import render
from vpcni.lab.daemons import Frr, Gobgpd
from vpcni.evpn.routes import LocalRoute
from vpcni.evpn.speaker import EvpnSpeaker
from vpcni.lab.netns import Fabric, Netns, Sandbox, wait_for

pytestmark = pytest.mark.functional

ASN = 65000
VNI = 300
RR, N1, N2, FRR_VTEP = "198.51.100.10", "198.51.100.1", "198.51.100.2", "198.51.100.3"
PREFIX = "198.51.100.0/24"
SESSION_TIMEOUT = 60  # gobgpd: first connect after 5-10 s, retries every 5 s or more
ESTABLISHED = 6

T3 = LocalRoute.inclusive_multicast(VNI)
POD_A = LocalRoute.mac_ip(VNI, "02:00:00:00:01:0a", "172.16.0.10")
POD_A_MAC = LocalRoute.mac_ip(VNI, "02:00:00:00:01:0a")
POD_B = LocalRoute.mac_ip(VNI, "02:00:00:00:01:0b", "172.16.0.11")
POD_C = LocalRoute.mac_ip(VNI, "02:00:00:00:01:0c", "172.16.0.12")
POD_D = LocalRoute.mac_ip(VNI, "02:00:00:00:01:0d", "172.16.0.13")
FRR_POD_MAC = "02:00:00:00:03:03"


class EvpnLab:
    """A reflector on a fabric; gobgpd nodes, speakers and an FRR VTEP added on demand."""

    def __init__(self, sandbox: Sandbox, rr_kind: str):
        self.sandbox = sandbox
        self.rr_kind = rr_kind
        self.fabric = Fabric(sandbox)
        rr = sandbox.netns("rr")
        self.fabric.connect(rr, RR)
        if rr_kind == "frr":
            Frr(rr, sandbox.dir("rr"), render.frr_reflector_bgpd(RR, ASN, PREFIX),
                render.frr_zebra("rr")).start()
        else:
            Gobgpd(rr, sandbox.dir("rr"), render.gobgpd_reflector_toml(RR, ASN, PREFIX)).start()
        self.nodes: dict[str, Gobgpd] = {}

    def node(self, name: str, address: str) -> Gobgpd:
        ns = self.sandbox.netns(name)
        self.fabric.connect(ns, address)
        daemon = Gobgpd(ns, self.sandbox.dir(name), render.gobgpd_node_toml(address, ASN, [RR]))
        self.nodes[address] = daemon
        return daemon.start()

    def speaker(self, node: Gobgpd, vtep: str,
                on_change: Optional[Callable[[set[int]], None]] = None) -> EvpnSpeaker:
        speaker = EvpnSpeaker(node.target, vtep, ASN, on_change=on_change).start()
        self.sandbox.on_cleanup(speaker.close)
        assert speaker.wait_connected(10), f"speaker never connected to {node.target}"
        wait_for(lambda: speaker.synced, what=f"gobgpd's table dump from {node.target}")
        return speaker

    @staticmethod
    def established(node: Gobgpd, timeout: float = SESSION_TIMEOUT) -> None:
        def up():
            peers = json.loads(node.gobgp("-j", "neighbor"))
            return peers and all(p["state"].get("session_state") == ESTABLISHED for p in peers)
        wait_for(up, timeout=timeout, interval=0.2, what=f"BGP sessions of {node.target}")

    def frr_vtep(self) -> tuple[Frr, Netns, Netns]:
        """A plain FRR VTEP as the seed runs it: vxlan300 in br300, one pod on a veth."""
        fv = self.sandbox.netns("fv")
        self.fabric.connect(fv, FRR_VTEP)
        fv.ip("link", "add", "br300", "type", "bridge")
        fv.ip("link", "add", "vxlan300", "type", "vxlan", "id", str(VNI), "local", FRR_VTEP,
              "dstport", "4789", "nolearning")
        fv.ip("link", "set", "vxlan300", "master", "br300", "addrgenmode", "none")
        fv.ip("link", "set", "vxlan300", "up")
        fv.ip("link", "set", "br300", "up")
        pod = self.sandbox.netns("fvpod")
        self.sandbox.veth(fv, "vpod", pod, "eth0")
        fv.ip("link", "set", "vpod", "master", "br300", "up")
        pod.ip("link", "set", "eth0", "address", FRR_POD_MAC, "mtu", "1450", "up")
        pod.ip("addr", "add", "172.16.0.3/24", "dev", "eth0")
        frr = Frr(fv, self.sandbox.dir("fv"),
                  render.frr_vtep_bgpd(FRR_VTEP, ASN, [RR]), render.frr_zebra("fv")).start()
        return frr, fv, pod


@pytest.fixture(params=["frr", "gobgpd"])
def lab(request, sandbox) -> EvpnLab:
    return EvpnLab(sandbox, request.param)


class Recorder:
    """on_change target: remembers every call and checks an invariant at each."""

    def __init__(self, speaker_ref: Callable[[], Optional[EvpnSpeaker]] = lambda: None,
                 invariant: Optional[Callable[[EvpnSpeaker], bool]] = None):
        self.calls: list[set[int]] = []
        self.violations: list[str] = []
        self.speaker_ref = speaker_ref
        self.invariant = invariant
        self.lock = threading.Lock()

    def __call__(self, vnis: set[int]) -> None:
        with self.lock:
            self.calls.append(set(vnis))
        speaker = self.speaker_ref()
        if speaker is not None and self.invariant is not None and not self.invariant(speaker):
            self.violations.append(f"after {sorted(vnis)}: {speaker.remote_state(VNI)}")


def endpoints(speaker: EvpnSpeaker, vni: int = VNI) -> set[tuple]:
    return {(e.mac, e.ip and str(e.ip), str(e.vtep))
            for e in speaker.remote_state(vni).endpoints}


def flood(speaker: EvpnSpeaker, vni: int = VNI) -> list[str]:
    return [str(v) for v in speaker.remote_state(vni).flood]


def seen(route: LocalRoute, vtep: str) -> tuple:
    return (route.mac, route.ip and str(route.ip), vtep)


def until(cond, what: str, timeout: float = 10.0, interval: float = 0.001):
    return wait_for(cond, timeout=timeout, interval=interval, what=what)


def test_routes_propagate_and_withdraw(lab, record_property):
    n1, n2 = lab.node("n1", N1), lab.node("n2", N2)
    rec1 = Recorder()
    s1 = lab.speaker(n1, N1, on_change=rec1)
    rec2 = Recorder()
    s2 = lab.speaker(n2, N2, on_change=rec2)
    lab.established(n1)
    lab.established(n2)

    assert s1.set_local({POD_A, POD_A_MAC, T3}) is True
    until(lambda: endpoints(s2) == {seen(POD_A, N1), seen(POD_A_MAC, N1)} and flood(s2) == [N1],
          "node2 to see node1's type-2 and type-3", timeout=15)
    until(lambda: {VNI} in rec2.calls, "node2's on_change({300})")
    assert s2.remote_vnis() == {VNI}
    c1, c2 = s1.counters(), s2.counters()
    assert (c1["announced"], c1["withdrawn"]) == (3, 0)
    assert (c2["received_type2"], c2["received_type3"]) == (2, 1)
    assert (c2["remote_type2"], c2["remote_type3"]) == (2, 1)

    # Propagation node1 -> reflector -> node2, measured once the sessions are warm.
    adds, dels = [], []
    for i in range(5):
        route = LocalRoute.mac_ip(VNI, f"02:00:00:00:09:{i:02x}", f"172.16.9.{i + 1}")
        start = time.monotonic()
        s1.update_local(add=[route])
        until(lambda: seen(route, N1) in endpoints(s2), f"{route} on node2")
        adds.append((time.monotonic() - start) * 1000)
        start = time.monotonic()
        s1.update_local(remove=[route])
        until(lambda: seen(route, N1) not in endpoints(s2), f"{route} withdrawn on node2")
        dels.append((time.monotonic() - start) * 1000)
    record_property("propagation_add_ms_median", round(statistics.median(adds), 1))
    record_property("propagation_withdraw_ms_median", round(statistics.median(dels), 1))
    print(f"\nRR {lab.rr_kind}: node->node add {statistics.median(adds):.1f} ms "
          f"(min {min(adds):.1f}, max {max(adds):.1f}), withdraw {statistics.median(dels):.1f} ms "
          f"(min {min(dels):.1f}, max {max(dels):.1f})")

    # Concurrent ADDs: 200 routes from 8 threads, none lost on the way.
    many = [LocalRoute.mac_ip(VNI, f"02:00:00:00:{i // 256:02x}:{i % 256:02x}",
                              f"172.16.{10 + i // 250}.{1 + i % 250}") for i in range(200)]
    start = time.monotonic()
    threads = [threading.Thread(target=lambda part: [s1.update_local(add=[r]) for r in part],
                                args=(many[k::8],)) for k in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    until(lambda: {seen(r, N1) for r in many} <= endpoints(s2), "200 routes on node2",
          timeout=30, interval=0.01)
    print(f"RR {lab.rr_kind}: 200 concurrent adds on node2 after "
          f"{(time.monotonic() - start) * 1000:.0f} ms")
    s1.update_local(remove=many)
    until(lambda: endpoints(s2) == {seen(POD_A, N1), seen(POD_A_MAC, N1)}, "200 withdrawn",
          timeout=30, interval=0.01)

    # Withdraw one type-2, then everything.
    assert s1.set_local({POD_A_MAC, T3}) is True
    until(lambda: endpoints(s2) == {seen(POD_A_MAC, N1)}, "POD_A's IP route withdrawn")
    assert flood(s2) == [N1]
    assert s1.set_local(set()) is True
    until(lambda: not endpoints(s2) and not flood(s2), "everything withdrawn on node2")
    until(lambda: s2.remote_vnis() == set(), "VNI 300 gone from node2's table")
    assert s2.counters()["received_withdrawals"] >= 3

    # Node1 never took its own routes for remote ones.
    assert s1.remote_vnis() == set() and not any(VNI in call for call in rec1.calls)


def test_own_routes_are_ignored(lab):
    n1, n2 = lab.node("n1", N1), lab.node("n2", N2)
    rec1 = Recorder()
    s1 = lab.speaker(n1, N1, on_change=rec1)
    lab.established(n1)
    lab.established(n2)
    s1.set_local({POD_A, T3})
    if lab.rr_kind == "frr":
        # FRR 8.4 reflects a route back to its originator; gobgpd keeps it in
        # adj-in, and once our local path goes it would be the best path.
        until(lambda: "02:00:00:00:01:0a" in n1.gobgp("neighbor", RR, "adj-in", "-a", "evpn"),
              "FRR to reflect node1's route back", timeout=15, interval=0.05)
    # Another speaker announcing with next hop = node1's VTEP (a stale or
    # spoofed route): node1 must not install a remote route to itself.
    impostor = EvpnSpeaker(n2.target, N1, ASN).start()
    lab.sandbox.on_cleanup(impostor.close)
    assert impostor.wait_connected(10)
    impostor.set_local({POD_B})
    until(lambda: s1.counters()["ignored_own"] >= 1, "node1 to receive and ignore POD_B",
          timeout=15)
    assert "02:00:00:00:01:0b" in n1.gobgp("global", "rib", "-a", "evpn")
    s1.set_local(set())
    until(lambda: "02:00:00:00:01:0a" not in n1.gobgp("global", "rib", "-a", "evpn"),
          "node1's own route gone everywhere", timeout=15, interval=0.05)
    assert s1.remote_vnis() == set() and rec1.calls == []


def test_agent_restart_withdraws_nothing_still_wanted(lab):
    n1, n2 = lab.node("n1", N1), lab.node("n2", N2)
    s2_ref: list[EvpnSpeaker] = []
    # From the first time node2 has POD_A until the end, it must never lose it.
    armed = threading.Event()
    rec2 = Recorder(lambda: s2_ref[0] if s2_ref and armed.is_set() else None,
                    lambda s: seen(POD_A, N1) in endpoints(s))
    s2 = lab.speaker(n2, N2, on_change=rec2)
    s2_ref.append(s2)
    old = lab.speaker(n1, N1)
    lab.established(n1)
    lab.established(n2)
    old.set_local({POD_A, POD_B, T3})
    until(lambda: endpoints(s2) == {seen(POD_A, N1), seen(POD_B, N1)} and flood(s2) == [N1],
          "node2 to see A, B and node1's type-3", timeout=15)
    armed.set()
    before = s2.counters()

    # The agent restarts: a new speaker, the same desired set.
    old.close()
    new = EvpnSpeaker(n1.target, N1, ASN)
    lab.sandbox.on_cleanup(new.close)
    new.start()
    assert new.wait_connected(10)
    assert new.set_local({POD_A, POD_B, T3}) is True
    assert (new.counters()["announced"], new.counters()["withdrawn"]) == (0, 0)
    # A marker sent after the restart: once node2 has it, anything the restart
    # sent before it (a withdraw, a re-announce) has arrived too.
    new.update_local(add=[POD_C])
    until(lambda: seen(POD_C, N1) in endpoints(s2), "the marker on node2")
    after = s2.counters()
    assert after["received_withdrawals"] == before["received_withdrawals"]
    assert after["received_type2"] == before["received_type2"] + 1  # only the marker
    assert after["received_type3"] == before["received_type3"]

    # Restart with a changed set: stale B and C go, D comes, A stays put.
    new.close()
    third = EvpnSpeaker(n1.target, N1, ASN)
    lab.sandbox.on_cleanup(third.close)
    third.start()
    assert third.wait_connected(10)
    assert third.set_local({POD_A, POD_D, T3}) is True
    assert (third.counters()["announced"], third.counters()["withdrawn"]) == (1, 2)
    until(lambda: endpoints(s2) == {seen(POD_A, N1), seen(POD_D, N1)}, "node2 to converge")
    assert rec2.violations == []


def test_gobgpd_restart_resends_and_rebuilds(lab):
    n1, n2 = lab.node("n1", N1), lab.node("n2", N2)
    s1 = lab.speaker(n1, N1)
    s2 = lab.speaker(n2, N2)
    lab.established(n1)
    lab.established(n2)
    s1.set_local({POD_A, T3})
    until(lambda: endpoints(s2) == {seen(POD_A, N1)}, "node2 to see A", timeout=15)

    # node1's gobgpd dies and comes back empty: the speaker re-sends.
    n1.stop()
    until(lambda: not s1.connected and not s1.synced, "node1's speaker to notice")
    n1.start()
    until(lambda: s1.synced, "node1's speaker to reconnect", timeout=15)
    assert s1.counters()["disconnects"] == 1
    assert s1.counters()["announced"] == 4
    lab.established(n1)
    until(lambda: endpoints(s2) == {seen(POD_A, N1)} and flood(s2) == [N1],
          "node2 to get node1's routes back", timeout=15)

    # node2's gobgpd restarts while node1 changes its routes: node2's table is
    # rebuilt from the new gobgpd's dump, without the stale A.
    n2.stop()
    until(lambda: not s2.connected, "node2's speaker to notice")
    s1.update_local(add=[POD_B], remove=[POD_A])
    n2.start()
    until(lambda: s2.connected, "node2's speaker to reconnect", timeout=15)
    lab.established(n2)
    until(lambda: endpoints(s2) == {seen(POD_B, N1)} and flood(s2) == [N1],
          "node2 to see B and node1's type-3", timeout=15)


def test_plain_frr_vtep_interoperates(lab):
    n1 = lab.node("n1", N1)
    s1 = lab.speaker(n1, N1)
    s1.set_local({POD_A, T3})
    frr, fv, pod = lab.frr_vtep()
    lab.established(n1)
    # Zebra learns the pod's MAC from its first frame (an ARP request); the
    # target is node1's announced pod, so nothing leaves the namespaces.
    pod.ping(str(POD_A.ip), count=1)

    # FRR's type-2 and type-3 decode to the right VNI, MAC and VTEP here.
    until(lambda: endpoints(s1) == {(FRR_POD_MAC, None, FRR_VTEP)} and flood(s1) == [FRR_VTEP],
          "node1 to see the FRR VTEP's routes", timeout=30, interval=0.05)
    assert s1.remote_vnis() == {VNI}
    assert s1.counters()["rejected"] == 0

    # Ours show up in FRR: in bgpd, in zebra's VNI, and in the kernel.
    def frr_has_ours():
        macs = frr.vtysh_json(f"show evpn mac vni {VNI} json").get("macs", {})
        vni = frr.vtysh_json(f"show evpn vni {VNI} json")
        mac = macs.get(POD_A.mac, {})
        return (mac.get("type") == "remote" and mac.get("remoteVtep") == N1
                and N1 in vni.get("numRemoteVteps", []))
    until(frr_has_ours, "FRR to import node1's routes", timeout=30, interval=0.05)
    evpn = frr.vtysh_json("show bgp l2vpn evpn json")
    assert f"{N1}:{VNI}" in evpn  # our RD
    fdb = json.loads(fv.exec("bridge", "-j", "fdb", "show", "dev", "vxlan300").stdout)
    assert any(e["mac"] == POD_A.mac and e.get("dst") == N1 for e in fdb)
    assert any(e["mac"] == "00:00:00:00:00:00" and e.get("dst") == N1 for e in fdb)

    # A withdraw from us reaches FRR.
    s1.set_local({T3})
    until(lambda: POD_A.mac not in frr.vtysh_json(f"show evpn mac vni {VNI} json")
          .get("macs", {}), "FRR to drop node1's MAC", timeout=15, interval=0.05)
    assert ipaddress.ip_address(FRR_VTEP) in s1.remote_state(VNI).flood
