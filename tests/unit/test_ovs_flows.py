"""The ovs backend's pipeline as data (backends/ovs/flows.py): no switch needed."""

from __future__ import annotations

import ipaddress

from vpcni.backends.ovs import flows as fl
from vpcni.core.models import RemoteEndpoint

VNI = 100
PORT = fl.LocalPort("vo1", 2, "CA:99:D7:4C:8C:A1", (ipaddress.ip_address("172.16.1.1"),))
# As `ovs-ofctl -O OpenFlow13 dump-flows --no-stats --no-names` printed them (OVS 3.1).
DUMP = """\
OFPST_FLOW reply (OF1.3) (xid=0x2):
 cookie=0x7670630200000064, priority=100,in_port=2 actions=set_field:0x64->tun_id,goto_table:10
 cookie=0x7670630200000064, table=10, priority=100,arp,in_port=2,dl_src=ca:99:d7:4c:8c:a1,arp_spa=172.16.1.1,arp_sha=ca:99:d7:4c:8c:a1 actions=goto_table:20
 cookie=0x7670630200000064, table=10, priority=100,ip,in_port=2,dl_src=ca:99:d7:4c:8c:a1,nw_src=172.16.1.1 actions=goto_table:30
 cookie=0x7670630200000064, table=30, priority=110,tun_id=0x64,dl_dst=ca:99:d7:4c:8c:a1 actions=output:2
 cookie=0x7670630200000064, table=40, priority=110,tun_id=0x64,in_port=1 actions=output:2
 cookie=0x7670630200000064, table=40, priority=100,tun_id=0x64 actions=output:2,goto_table:50
"""


def test_generated_flows_equal_what_the_switch_prints():
    assert fl.parse_dump(DUMP) == fl.local_flows(VNI, [PORT], tunnel_ofport=1)


def test_converging_an_equal_set_changes_nothing():
    assert fl.changes(fl.parse_dump(DUMP), fl.local_flows(VNI, [PORT], 1)) == []


def test_changed_actions_are_replaced_not_deleted():
    current = fl.local_flows(VNI, [PORT], 1)
    other = fl.LocalPort("vo2", 3, "02:00:00:00:00:02", ())
    lines = fl.changes(current, fl.local_flows(VNI, [PORT, other], 1))
    assert all(line.startswith("add ") for line in lines)
    assert any("actions=output:2,output:3,goto_table:50" in line for line in lines)


def test_removed_flows_are_deleted_strictly_and_only_with_our_cookie():
    lines = fl.changes(fl.local_flows(VNI, [PORT], 1), set())
    assert lines and all(line.startswith("delete_strict cookie=0x7670630200000064/-1,")
                         for line in lines)


def test_cookies_name_kind_and_vni_and_nothing_foreign():
    assert fl.cookie_scope(fl.cookie(fl.REMOTE, 4100)) == (fl.REMOTE, 4100)
    assert fl.cookie_scope(0x42) is None


def test_anti_spoofing_per_address_family():
    v6 = fl.LocalPort("vo3", 4, "02:00:00:00:00:03", (ipaddress.ip_address("fd00::3"),))
    matches = {frozenset(f.match) for f in fl.port_flows(VNI, v6) if f.table == fl.ANTI_SPOOF}
    assert frozenset({"in_port=4", "dl_src=02:00:00:00:00:03", "ipv6",
                      "ipv6_src=fe80::/10"}) in matches
    assert not any("arp" in m for m in matches)  # no IPv4 address: no ARP either
    bare = fl.LocalPort("vo4", 5, "02:00:00:00:00:04", ())
    [only] = [f for f in fl.port_flows(VNI, bare) if f.table == fl.ANTI_SPOOF]
    assert only.match == {"in_port=5", "dl_src=02:00:00:00:00:04"}


def test_remote_state_flows():
    vtep2, vtep3 = ipaddress.ip_address("198.51.100.2"), ipaddress.ip_address("198.51.100.3")
    eps = [RemoteEndpoint(mac="02:00:00:00:00:09", ip="172.16.1.9", vtep=vtep3)]
    flows = fl.remote_flows(VNI, eps, [vtep3, vtep2], tunnel_ofport=1)
    [flood] = [f for f in flows if f.table == fl.FLOOD_REMOTE]
    assert flood.actions == ("set_field:198.51.100.2->tun_dst,output:1,"
                             "set_field:198.51.100.3->tun_dst,output:1")
    [l2] = [f for f in flows if f.table == fl.L2]
    assert l2.actions == "set_field:198.51.100.3->tun_dst,output:1"
    [arp] = [f for f in flows if f.table == fl.ARP_RESPONDER]
    assert "arp_tpa=172.16.1.9" in arp.match and arp.actions.endswith("IN_PORT")
    assert {f.match for f in flows if f.table == fl.TUNNEL_IN} == {
        frozenset({"tun_id=0x64", "tun_src=198.51.100.2"}),
        frozenset({"tun_id=0x64", "tun_src=198.51.100.3"})}
