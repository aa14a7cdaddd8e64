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
    flows = fl.local_flows(VNI, [PORT], tunnel_ofport=1, gateway=GW)
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
    alone = fl.local_flows(VNI, [], tunnel_ofport=1, gateway=GW)
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
    desired = (fl.local_flows(400, [pod], tunnel_ofport=1, gateway=2)
               | fl.router_flows(L3VNI, 3, router_mac("198.51.100.1"))
               | fl.routed_flows(L3VNI, {router_mac("198.51.100.2"):
                                         ipaddress.ip_address("198.51.100.2")}, 1))
    assert fl.parse_dump(ROUTED_DUMP) == desired
    assert fl.changes(fl.parse_dump(ROUTED_DUMP), desired) == []


# ---------------------------------------------------------------- the VPC's FIB in flows

GW400 = fl.Gateway(2, L3VNI, ipaddress.IPv4Interface("10.20.0.1/24"))
GW401 = fl.Gateway(5, L3VNI, ipaddress.IPv4Interface("10.20.1.1/24"),
                   (ipaddress.IPv4Network("192.0.2.0/24"),))
POD_A = fl.LocalPort("voa", 4, "4a:51:d8:c9:c3:fa", (ipaddress.ip_address("10.20.0.5"),))
POD_B = fl.LocalPort("vob", 6, "4E:75:54:DF:33:36", (ipaddress.ip_address("10.20.1.5"),
                                                     ipaddress.ip_address("fd00::5")))
# As OVS 3.1 printed them (one node 198.51.100.1: subnets 400 and 401 of L3VNI 4000,
# gateway ports 2 and 5, pods 4 and 6, L3 port 3, tunnel 1): the gateways' new flows
# (kind local of their VNI) and the VPC's local FIB (kind fib of the L3VNI).
FIB_DUMP = """\
 cookie=0x7670630200000190, table=20, priority=110,arp,tun_id=0x190,arp_tpa=10.20.0.1,arp_op=1 actions=move:NXM_OF_ETH_SRC[]->NXM_OF_ETH_DST[],set_field:02:76:70:63:67:77->eth_src,set_field:2->arp_op,move:NXM_NX_ARP_SHA[]->NXM_NX_ARP_THA[],move:NXM_OF_ARP_SPA[]->NXM_OF_ARP_TPA[],set_field:02:76:70:63:67:77->arp_sha,set_field:10.20.0.1->arp_spa,IN_PORT
 cookie=0x7670630200000190, table=30, priority=125,ip,tun_id=0x190,dl_dst=02:76:70:63:67:77 actions=write_metadata:0xfa0,goto_table:70
 cookie=0x7670630200000190, table=75, priority=100,tun_id=0x190 actions=output:2
 cookie=0x7670630600000fa0, table=60, priority=130,ip,tun_id=0xfa0,dl_dst=02:76:c6:33:64:01,nw_ttl=0 actions=output:3
 cookie=0x7670630600000fa0, table=60, priority=130,ip,tun_id=0xfa0,dl_dst=02:76:c6:33:64:01,nw_ttl=1 actions=output:3
 cookie=0x7670630600000fa0, table=60, priority=120,ip,tun_id=0xfa0,dl_dst=02:76:c6:33:64:01,nw_dst=10.20.0.5 actions=dec_ttl,set_field:02:76:70:63:67:77->eth_src,set_field:4a:51:d8:c9:c3:fa->eth_dst,output:4
 cookie=0x7670630600000fa0, table=60, priority=120,ip,tun_id=0xfa0,dl_dst=02:76:c6:33:64:01,nw_dst=10.20.1.5 actions=dec_ttl,set_field:02:76:70:63:67:77->eth_src,set_field:4e:75:54:df:33:36->eth_dst,output:6
 cookie=0x7670630600000fa0, table=70, priority=400,ip,metadata=0xfa0,nw_ttl=0 actions=goto_table:75
 cookie=0x7670630600000fa0, table=70, priority=400,ip,metadata=0xfa0,nw_ttl=1 actions=goto_table:75
 cookie=0x7670630600000fa0, table=70, priority=300,ip,metadata=0xfa0,nw_dst=10.20.0.5 actions=dec_ttl,set_field:02:76:70:63:67:77->eth_src,set_field:4a:51:d8:c9:c3:fa->eth_dst,output:4
 cookie=0x7670630600000fa0, table=70, priority=300,ip,metadata=0xfa0,nw_dst=10.20.1.5 actions=dec_ttl,set_field:02:76:70:63:67:77->eth_src,set_field:4e:75:54:df:33:36->eth_dst,output:6
 cookie=0x7670630600000fa0, table=70, priority=149,ip,metadata=0xfa0,nw_dst=10.20.0.0/24 actions=goto_table:75
 cookie=0x7670630600000fa0, table=70, priority=149,ip,metadata=0xfa0,nw_dst=10.20.1.0/24 actions=goto_table:75
 cookie=0x7670630600000fa0, table=70, priority=149,ip,metadata=0xfa0,nw_dst=192.0.2.0/24 actions=goto_table:75
"""


def test_gateway_of_a_routed_subnet_answers_arp_and_leads_to_the_fib():
    flows = fl.local_flows(400, [POD_A], tunnel_ofport=1, gateway=GW400)
    new = flows - fl.local_flows(400, [POD_A], tunnel_ofport=1, gateway=2)
    assert new == {f for f in fl.parse_dump(FIB_DUMP) if fl.cookie_scope(f.cookie) == (2, 400)}
    # the ARP responder answers before the pod's request floods (to the gateway port)
    assert fl.ARP_RESPONDER < fl.FLOOD_LOCAL
    # IPv4 to the gateway MAC: the FIB, above the gateway port (120), below the drop of
    # the tunnel's frames for it (130); ARP and IPv6 still reach the gateway port
    [to_fib] = [f for f in new if f.table == fl.L2]
    assert to_fib.priority == 125 and "ip" in to_fib.match
    # a gateway recorded without its subnet (or only its ofport): the slow path only
    assert fl.local_flows(400, [POD_A], 1, fl.Gateway(2)) == fl.local_flows(400, [POD_A], 1, 2)


def test_local_fib_equals_what_the_switch_prints():
    desired = fl.fib_local_flows(L3VNI, RMAC.upper(), 3, [GW400, GW401], [POD_A, POD_B])
    assert desired == {f for f in fl.parse_dump(FIB_DUMP) if f.cookie == fl.cookie(fl.FIB_LOCAL,
                                                                                   L3VNI)}
    installed = {f for f in fl.parse_dump(FIB_DUMP) if f.table in (fl.L3, fl.FIB)}
    assert fl.changes(installed, desired) == []
    # no L3 port (yet): no flows into it
    assert not any(f.table == fl.L3 and "nw_ttl" in str(f) for f in
                   fl.fib_local_flows(L3VNI, RMAC, None, [GW400], [POD_A]))


def test_fib_ttl():
    """One dec_ttl per routed hop and node; never on the slow path (the router decrements);
    TTL 0 and 1 go to the router (ICMP time exceeded), above everything."""
    local = fl.fib_local_flows(L3VNI, RMAC, 3, [GW400], [POD_A])
    for f in local | fl.local_flows(400, [POD_A], 1, GW400):
        hops = f.actions.split(",").count("dec_ttl")
        assert hops == (1 if f.actions.endswith(f"output:{POD_A.ofport}")
                        and f.table in (fl.FIB, fl.L3) else 0), f
    guards = [f for f in local if any(t.startswith("nw_ttl=") for t in f.match)]
    assert len(guards) == 4
    assert all(g.priority > max(f.priority for f in local if f.table == g.table and f not in guards)
               for g in guards)
    assert {g.actions for g in guards} == {f"goto_table:{fl.SLOW_PATH}", "output:3"}


V1, V2, V3 = (ipaddress.ip_address(f"198.51.100.{i}") for i in (1, 2, 3))


def _state(hosts=(), prefixes=()):
    from vpcni.core.models import RoutedHost, RoutedPrefix, RoutedState
    return RoutedState(
        hosts=[RoutedHost(ip=ip, vtep=v, rmac=router_mac(v)) for ip, v in hosts],
        prefixes=[RoutedPrefix(prefix=p, vtep=v, rmac=router_mac(v)) for p, v in prefixes])


def test_remote_fib_routes_hosts_and_prefixes_to_their_routers():
    state = _state(hosts=[("10.20.1.6", V3), ("10.20.0.9", V1), ("fd00::9", V2)],
                   prefixes=[("10.20.1.0/24", V3), ("10.20.1.0/24", V2), ("10.20.0.0/24", V1),
                             ("192.0.2.7/32", V2), ("0.0.0.0/0", V3)])
    flows = fl.fib_remote_flows(L3VNI, state, V1, tunnel_ofport=1)
    assert {fl.cookie_scope(f.cookie) for f in flows} == {(fl.ROUTED, L3VNI)}
    got = {(f.priority, f.match): f.actions for f in flows}

    def encap(v):
        return ("dec_ttl,set_field:02:76:c6:33:64:01->eth_src,"
                f"set_field:{router_mac(v)}->eth_dst,set_field:0xfa0->tun_id,"
                f"set_field:{v}->tun_dst,output:1")
    meta = ("ip", "metadata=0xfa0")
    assert got == {
        (200, frozenset({*meta, "nw_dst=10.20.1.6"})): encap(V3),
        # ECMP in the router; the lowest VTEP in flows
        (148, frozenset({*meta, "nw_dst=10.20.1.0/24"})): encap(V2),
        (164, frozenset({*meta, "nw_dst=192.0.2.7"})): encap(V2),   # a /32 as OVS prints it
        (100, frozenset(meta)): encap(V3),                          # /0: no nw_dst at all
    }  # this node's own routes (V1) and IPv6 are not remote FIB entries
    # longest prefix first, and a prefix this node's router serves above a remote one
    assert fl.prefix_priority(24, local=True) == fl.prefix_priority(24, local=False) + 1
    assert fl.prefix_priority(25, local=False) > fl.prefix_priority(24, local=True)
    assert fl.FIB_TTL > fl.FIB_POD > fl.FIB_HOST > fl.prefix_priority(32, local=True)
    assert fl.fib_remote_flows(L3VNI, _state(), V1, 1) == set()


def test_fib_tables_come_after_anti_spoofing_and_l2():
    assert fl.ANTI_SPOOF < fl.L2 < fl.L3 < fl.FIB < fl.SLOW_PATH
    base = fl.base_flows([1])
    assert fl.flow(fl.BASE, 0, fl.FIB, 0, (), f"goto_table:{fl.SLOW_PATH}") in base
    assert fl.flow(fl.BASE, 0, fl.SLOW_PATH, 0, (), "drop") in base


# As OVS 3.1 printed the routed state's FIB on o1 (198.51.100.12) of the IRB lab
# (tests/functional/test_ovs_routing.py): k1 (.11) and o2 (.13) both announce 10.20.1.0/24.
REMOTE_FIB_DUMP = """\
 cookie=0x7670630400000fa0, table=70, priority=200,ip,metadata=0xfa0,nw_dst=10.20.0.7 actions=dec_ttl,set_field:02:76:c6:33:64:0c->eth_src,set_field:02:76:c6:33:64:0d->eth_dst,set_field:0xfa0->tun_id,set_field:198.51.100.13->tun_dst,output:1
 cookie=0x7670630400000fa0, table=70, priority=148,ip,metadata=0xfa0,nw_dst=10.20.0.0/24 actions=dec_ttl,set_field:02:76:c6:33:64:0c->eth_src,set_field:02:76:c6:33:64:0d->eth_dst,set_field:0xfa0->tun_id,set_field:198.51.100.13->tun_dst,output:1
 cookie=0x7670630400000fa0, table=70, priority=200,ip,metadata=0xfa0,nw_dst=10.20.1.6 actions=dec_ttl,set_field:02:76:c6:33:64:0c->eth_src,set_field:02:76:c6:33:64:0d->eth_dst,set_field:0xfa0->tun_id,set_field:198.51.100.13->tun_dst,output:1
 cookie=0x7670630400000fa0, table=70, priority=200,ip,metadata=0xfa0,nw_dst=10.20.1.5 actions=dec_ttl,set_field:02:76:c6:33:64:0c->eth_src,set_field:02:76:c6:33:64:0b->eth_dst,set_field:0xfa0->tun_id,set_field:198.51.100.11->tun_dst,output:1
 cookie=0x7670630400000fa0, table=70, priority=148,ip,metadata=0xfa0,nw_dst=10.20.1.0/24 actions=dec_ttl,set_field:02:76:c6:33:64:0c->eth_src,set_field:02:76:c6:33:64:0b->eth_dst,set_field:0xfa0->tun_id,set_field:198.51.100.11->tun_dst,output:1
"""


def test_remote_fib_equals_what_the_switch_prints():
    k1, o1, o2 = (ipaddress.ip_address(f"198.51.100.{i}") for i in (11, 12, 13))
    state = _state(hosts=[("10.20.0.7", o2), ("10.20.1.6", o2), ("10.20.1.5", k1),
                          ("10.20.0.5", o1)],
                   prefixes=[("10.20.0.0/24", o2), ("10.20.0.0/24", o1), ("10.20.1.0/24", o2),
                             ("10.20.1.0/24", k1)])
    desired = fl.fib_remote_flows(L3VNI, state, o1, tunnel_ofport=1)
    assert desired == fl.parse_dump(REMOTE_FIB_DUMP)
    assert fl.changes(fl.parse_dump(REMOTE_FIB_DUMP), desired) == []
