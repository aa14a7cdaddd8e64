"""The ovs backend's pipeline as data (backends/ovs/flows.py): no switch needed."""

from __future__ import annotations

import ipaddress

from vpcni.backends.ovs import flows as fl
from vpcni.core.models import RemoteEndpoint, router_mac

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


# ---------------------------------------------------------------- routed subnets

GW = 7  # the gateway port vgw<VNI>
L3VNI, L3PORT = 4000, 8
RMAC = "02:76:c6:33:64:01"  # router_mac("198.51.100.1")


def test_gateway_is_a_local_port_that_floods_locally_only():
    flows = fl.local_flows(VNI, [PORT], tunnel_ofport=1, gateway_ofport=GW)
    # trusted: no anti-spoofing, straight to the ARP responder with the VNI
    [classify] = [f for f in flows if f.table == fl.CLASSIFY and f"in_port={GW}" in f.match]
    assert classify.actions == f"set_field:0x64->tun_id,goto_table:{fl.ARP_RESPONDER}"
    assert not any(f"in_port={GW}" in f.match for f in flows if f.table == fl.ANTI_SPOOF)
    # the gateway MAC goes to the gateway, above every other MAC; from the tunnel nowhere
    l2 = {f.priority: f for f in flows if f.table == fl.L2 and "dl_dst=02:76:70:63:67:77" in f.match}
    assert l2[120].actions == f"output:{GW}" and l2[120].match == {"tun_id=0x64",
                                                                    "dl_dst=02:76:70:63:67:77"}
    assert l2[130].actions == "drop" and "in_port=1" in l2[130].match
    floods = {frozenset(f.match): f.actions for f in flows if f.table == fl.FLOOD_LOCAL}
    # pods flood to the gateway too (their ARP for it) and on to the remote VTEPs
    assert floods[frozenset({"tun_id=0x64"})] == f"output:2,output:{GW},goto_table:50"
    # the gateway floods to the local pods only; the tunnel never to the gateway
    assert floods[frozenset({"tun_id=0x64", f"in_port={GW}"})] == "output:2"
    assert floods[frozenset({"tun_id=0x64", "in_port=1"})] == "output:2"
    # without pods the gateway's floods go nowhere (never on to FLOOD_REMOTE)
    alone = fl.local_flows(VNI, [], tunnel_ofport=1, gateway_ofport=GW)
    assert {f.actions for f in alone if f.table == fl.FLOOD_LOCAL} == {"drop"}
    # and without a gateway, what was
    assert fl.local_flows(VNI, [PORT], 1, None) == fl.parse_dump(DUMP)


def test_router_flows_carry_the_l3vni_to_and_from_the_router():
    flows = fl.router_flows(L3VNI, L3PORT, RMAC.upper())
    assert {(f.table, f.priority, f.match, f.actions) for f in flows} == {
        (fl.CLASSIFY, 100, frozenset({f"in_port={L3PORT}"}),
         f"set_field:0xfa0->tun_id,goto_table:{fl.L3}"),
        (fl.L3, 110, frozenset({"tun_id=0xfa0", f"dl_dst={RMAC}"}), f"output:{L3PORT}")}
    assert {fl.cookie_scope(f.cookie) for f in flows} == {(fl.ROUTER, L3VNI)}


def test_routed_state_flows():
    v2, v3 = ipaddress.ip_address("198.51.100.2"), ipaddress.ip_address("198.51.100.3")
    flows = fl.routed_flows(L3VNI, {"02:76:c6:33:64:02": v2, "02:76:C6:33:64:03": v3}, 1)
    assert {fl.cookie_scope(f.cookie) for f in flows} == {(fl.ROUTED, L3VNI)}
    l3 = {f.match: f.actions for f in flows if f.table == fl.L3}
    assert l3 == {
        frozenset({"tun_id=0xfa0", "dl_dst=02:76:c6:33:64:02"}): "set_field:198.51.100.2->tun_dst,output:1",
        frozenset({"tun_id=0xfa0", "dl_dst=02:76:c6:33:64:03"}): "set_field:198.51.100.3->tun_dst,output:1"}
    assert {f.match: f.actions for f in flows if f.table == fl.TUNNEL_IN} == {
        frozenset({"tun_id=0xfa0", "tun_src=198.51.100.2"}): f"goto_table:{fl.L3}",
        frozenset({"tun_id=0xfa0", "tun_src=198.51.100.3"}): f"goto_table:{fl.L3}"}
    assert fl.routed_flows(L3VNI, {}, 1) == set()


def test_l3_table_drops_what_no_router_mac_claims():
    assert fl.flow(fl.BASE, 0, fl.L3, 0, (), "drop") in fl.base_flows([1])
    # the pipeline only goes forward: classify and tunnel-in may jump to L3
    assert fl.L3 > max(fl.CLASSIFY, fl.TUNNEL_IN)


# As OVS 3.1 printed them for a routed subnet (VNI 400: gateway port 2, pod port 4,
# tunnel 1; L3VNI 4000: L3 port 3, this node 198.51.100.1, a remote router 198.51.100.2).
ROUTED_DUMP = """\
 cookie=0x7670630200000190, priority=100,in_port=2 actions=set_field:0x190->tun_id,goto_table:20
 cookie=0x7670630200000190, table=40, priority=110,tun_id=0x190,in_port=2 actions=output:4
 cookie=0x7670630200000190, table=40, priority=110,tun_id=0x190,in_port=1 actions=output:4
 cookie=0x7670630200000190, table=40, priority=100,tun_id=0x190 actions=output:2,output:4,goto_table:50
 cookie=0x7670630200000190, table=30, priority=110,tun_id=0x190,dl_dst=a2:cb:43:8e:6a:85 actions=output:4
 cookie=0x7670630200000190, table=10, priority=100,ip,in_port=4,dl_src=a2:cb:43:8e:6a:85,nw_src=10.20.0.5 actions=goto_table:30
 cookie=0x7670630200000190, table=10, priority=100,arp,in_port=4,dl_src=a2:cb:43:8e:6a:85,arp_spa=10.20.0.5,arp_sha=a2:cb:43:8e:6a:85 actions=goto_table:20
 cookie=0x7670630200000190, priority=100,in_port=4 actions=set_field:0x190->tun_id,goto_table:10
 cookie=0x7670630200000190, table=30, priority=130,tun_id=0x190,in_port=1,dl_dst=02:76:70:63:67:77 actions=drop
 cookie=0x7670630200000190, table=30, priority=120,tun_id=0x190,dl_dst=02:76:70:63:67:77 actions=output:2
 cookie=0x7670630500000fa0, priority=100,in_port=3 actions=set_field:0xfa0->tun_id,goto_table:60
 cookie=0x7670630500000fa0, table=60, priority=110,tun_id=0xfa0,dl_dst=02:76:c6:33:64:01 actions=output:3
 cookie=0x7670630400000fa0, table=5, priority=100,tun_id=0xfa0,tun_src=198.51.100.2 actions=goto_table:60
 cookie=0x7670630400000fa0, table=60, priority=100,tun_id=0xfa0,dl_dst=02:76:c6:33:64:02 actions=set_field:198.51.100.2->tun_dst,output:1
"""


def test_routed_flows_equal_what_the_switch_prints():
    pod = fl.LocalPort("vo25b6b82429f", 4, "a2:cb:43:8e:6a:85",
                       (ipaddress.ip_address("10.20.0.5"),))
    desired = (fl.local_flows(400, [pod], tunnel_ofport=1, gateway_ofport=2)
               | fl.router_flows(L3VNI, 3, router_mac("198.51.100.1"))
               | fl.routed_flows(L3VNI, {router_mac("198.51.100.2"):
                                         ipaddress.ip_address("198.51.100.2")}, 1))
    assert fl.parse_dump(ROUTED_DUMP) == desired
    assert fl.changes(fl.parse_dump(ROUTED_DUMP), desired) == []
