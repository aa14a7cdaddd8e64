"""Symmetric IRB routes between gobgpd nodes through a reflector (FRR bgpd or
gobgpd): type-2 routes with an L3VNI (two labels, a router MAC) and type-5
IP prefix routes, announced by one speaker and seen in another's routed state.

The lab is tests/functional/test_evpn.py's: fabric 198.51.100.0/24, reflector
.10, gobgpd nodes .1, .2 and .3, every daemon in a namespace of the test's
sandbox. gobgpd waits 5-10 s before its first connection to the reflector.
"""

from __future__ import annotations

import threading

import pytest

from tests.functional.test_evpn import ASN, N1, N2, EvpnLab, Recorder, until
from vpcni.evpn.routes import LocalRoute
from vpcni.evpn.speaker import EvpnSpeaker

pytestmark = pytest.mark.functional

N3 = "198.51.100.3"
VNI, L3VNI = 100, 5000
RMAC1, RMAC2, RMAC3 = "02:00:00:00:0a:01", "02:00:00:00:0a:02", "02:00:00:00:0a:03"

T3 = LocalRoute.inclusive_multicast(VNI)
HOST = LocalRoute.mac_ip(VNI, "02:00:00:00:01:0a", "10.1.0.5", l3vni=L3VNI, rmac=RMAC1)
HOST_L2 = LocalRoute.mac_ip(VNI, "02:00:00:00:01:0a", "10.1.0.5")  # HOST without its L3VNI
HOST6 = LocalRoute.mac_ip(VNI, "02:00:00:00:01:0b", "fd00:1::5", l3vni=L3VNI, rmac=RMAC1)
NET = LocalRoute.ip_prefix(L3VNI, "10.1.0.0/24", RMAC1)
NET6 = LocalRoute.ip_prefix(L3VNI, "fd00:1::/64", RMAC1)


@pytest.fixture(params=["frr", "gobgpd"])
def lab(request, sandbox) -> EvpnLab:
    return EvpnLab(sandbox, request.param)


def hosts(speaker: EvpnSpeaker, l3vni: int = L3VNI) -> list[tuple]:
    return [(str(h.ip), str(h.vtep), h.rmac) for h in speaker.routed_state(l3vni).hosts]


def prefixes(speaker: EvpnSpeaker, l3vni: int = L3VNI) -> list[tuple]:
    return [(str(p.prefix), str(p.vtep), p.rmac) for p in speaker.routed_state(l3vni).prefixes]


def endpoints(speaker: EvpnSpeaker, vni: int = VNI) -> set[tuple]:
    return {(e.mac, str(e.ip), str(e.vtep)) for e in speaker.remote_state(vni).endpoints}


def rib_line(node, needle: str) -> str:
    """The line of `gobgp global rib -a evpn` that shows the route `needle` names
    (e.g. "[mac:...]" or "[prefix:...]"); "" when it is not there."""
    lines = [line for line in node.gobgp("global", "rib", "-a", "evpn").splitlines()
             if needle in line]
    assert len(lines) <= 1, lines
    return lines[0] if lines else ""


def test_irb_routes_propagate_and_withdraw(lab):
    n1, n2, n3 = lab.node("n1", N1), lab.node("n2", N2), lab.node("n3", N3)
    rec2 = Recorder()
    s1 = lab.speaker(n1, N1)
    s2 = lab.speaker(n2, N2, on_change=rec2)
    s3 = lab.speaker(n3, N3)
    for node in (n1, n2, n3):
        lab.established(node)

    assert s1.set_local({T3, HOST, HOST6, NET, NET6}) is True
    # Node3 serves 10.1.0.0/24 too: its own RD, so the reflector passes both on (ECMP).
    assert s3.set_local({LocalRoute.ip_prefix(L3VNI, "10.1.0.0/24", RMAC3)}) is True
    until(lambda: hosts(s2) == [("10.1.0.5", N1, RMAC1), ("fd00:1::5", N1, RMAC1)]
          and prefixes(s2) == [("10.1.0.0/24", N1, RMAC1), ("10.1.0.0/24", N3, RMAC3),
                               ("fd00:1::/64", N1, RMAC1)],
          "node2 to route node1's hosts and both nodes' prefixes", timeout=15)
    # The L2 view is as before; nothing of the L3VNI in it.
    assert endpoints(s2) == {("02:00:00:00:01:0a", "10.1.0.5", N1),
                             ("02:00:00:00:01:0b", "fd00:1::5", N1)}
    assert [str(v) for v in s2.remote_state(VNI).flood] == [N1]
    assert s2.remote_state(L3VNI).endpoints == [] and s2.routed_state(VNI).hosts == []
    until(lambda: any(L3VNI in call for call in rec2.calls), "node2's on_change with the L3VNI")
    assert s2.remote_vnis() == {VNI, L3VNI}
    c2 = s2.counters()
    assert (c2["remote_type2"], c2["remote_type3"], c2["remote_type5"]) == (2, 1, 3)
    assert c2["received_type5"] == 3 and c2["rejected"] == 0
    # Node1 does not route to itself: it only sees node3's prefix.
    until(lambda: hosts(s1) == [] and prefixes(s1) == [("10.1.0.0/24", N3, RMAC3)],
          "node1 to see node3's prefix")

    # As gobgp shows them, on the receiving node: both labels, both RTs, the router MAC.
    for node in (n1, n2):
        line = rib_line(node, "[mac:02:00:00:00:01:0a][ip:10.1.0.5]")
        assert "[100,5000]" in line and f"[router's mac: {RMAC1}]" in line, line
        assert "[65000:100], [65000:5000], [VXLAN]" in line, line
        line = rib_line(node, f"[rd:{N1}:{L3VNI}][etag:0][prefix:10.1.0.0/24]")
        assert "[5000]" in line and f"[router's mac: {RMAC1}]" in line, line
        assert "[65000:5000], [VXLAN]" in line and "[GW: 0.0.0.0]" in line, line
        line = rib_line(node, f"[rd:{N1}:{L3VNI}][etag:0][prefix:fd00:1::/64]")
        assert "[5000]" in line and "[GW: ::]" in line, line

    # The host leaves the routed subnet: the same NLRI without its L3VNI replaces
    # it in place (no withdraw), node2 keeps the endpoint and drops the host.
    withdrawals = s2.counters()["received_withdrawals"]
    assert s1.update_local(add=[HOST_L2], remove=[HOST]) is True
    assert s1.counters()["withdrawn"] == 0
    until(lambda: hosts(s2) == [("fd00:1::5", N1, RMAC1)], "node2 to stop routing 10.1.0.5")
    assert ("02:00:00:00:01:0a", "10.1.0.5", N1) in endpoints(s2)
    line = rib_line(n2, "[mac:02:00:00:00:01:0a][ip:10.1.0.5]")
    assert "[100] " in line and "router's mac" not in line and "65000:5000" not in line, line
    assert s2.counters()["received_withdrawals"] == withdrawals
    # And back.
    assert s1.update_local(add=[HOST], remove=[HOST_L2]) is True
    until(lambda: ("10.1.0.5", N1, RMAC1) in hosts(s2), "node2 to route 10.1.0.5 again")

    # Withdrawals: node1's prefixes and hosts go, node3's prefix stays.
    assert s1.set_local({T3, HOST_L2}) is True
    until(lambda: hosts(s2) == [] and prefixes(s2) == [("10.1.0.0/24", N3, RMAC3)],
          "node2 to drop node1's routed state")
    assert endpoints(s2) == {("02:00:00:00:01:0a", "10.1.0.5", N1)}
    assert rib_line(n2, f"[rd:{N1}:{L3VNI}][etag:0][prefix:10.1.0.0/24]") == ""
    assert s3.set_local(set()) is True
    until(lambda: prefixes(s2) == [] and s2.remote_vnis() == {VNI}, "node3's prefix withdrawn")
    assert s1.set_local(set()) is True
    until(lambda: s2.remote_vnis() == set(), "everything withdrawn on node2")
    assert s2.counters()["remote_type5"] == 0


def test_irb_agent_restart_withdraws_nothing_still_wanted(lab):
    n1, n2 = lab.node("n1", N1), lab.node("n2", N2)
    s2_ref: list[EvpnSpeaker] = []
    armed = threading.Event()
    # From the first time node2 routes HOST until the routed subnet goes, it keeps it.
    rec2 = Recorder(lambda: s2_ref[0] if s2_ref and armed.is_set() else None,
                    lambda s: ("10.1.0.5", N1, RMAC1) in hosts(s)
                    and ("10.1.0.0/24", N1, RMAC1) in prefixes(s))
    s2 = lab.speaker(n2, N2, on_change=rec2)
    s2_ref.append(s2)
    old = lab.speaker(n1, N1)
    lab.established(n1)
    lab.established(n2)
    wanted = {T3, HOST, HOST6, NET, NET6}
    assert old.set_local(wanted) is True
    until(lambda: len(hosts(s2)) == 2 and len(prefixes(s2)) == 2, "node2 to route node1's",
          timeout=15)
    armed.set()
    before = s2.counters()

    # The agent restarts: gobgpd's listed type-2 (two labels) and type-5 paths
    # decode to exactly what is wanted, so nothing is re-sent or withdrawn.
    old.close()
    new = EvpnSpeaker(n1.target, N1, ASN)
    lab.sandbox.on_cleanup(new.close)
    new.start()
    assert new.wait_connected(10)
    assert new.set_local(wanted) is True
    assert (new.counters()["announced"], new.counters()["withdrawn"]) == (0, 0)
    marker = LocalRoute.ip_prefix(L3VNI, "10.7.0.0/24", RMAC1)
    new.update_local(add=[marker])
    until(lambda: ("10.7.0.0/24", N1, RMAC1) in prefixes(s2), "the marker on node2")
    after = s2.counters()
    assert after["received_withdrawals"] == before["received_withdrawals"]
    assert after["received_type5"] == before["received_type5"] + 1  # only the marker
    assert after["received_type2"] == before["received_type2"]
    assert rec2.violations == []

    # Restarted with HOST out of the routed subnet and NET6 gone: HOST is
    # replaced in place (one AddPath), NET6 and the marker are deleted.
    armed.clear()
    new.close()
    third = EvpnSpeaker(n1.target, N1, ASN)
    lab.sandbox.on_cleanup(third.close)
    third.start()
    assert third.wait_connected(10)
    assert third.set_local({T3, HOST_L2, HOST6, NET}) is True
    assert (third.counters()["announced"], third.counters()["withdrawn"]) == (1, 2)
    until(lambda: hosts(s2) == [("fd00:1::5", N1, RMAC1)]
          and prefixes(s2) == [("10.1.0.0/24", N1, RMAC1)], "node2 to converge")
    assert ("02:00:00:00:01:0a", "10.1.0.5", N1) in endpoints(s2)
    assert s2.counters()["received_withdrawals"] == after["received_withdrawals"] + 2
