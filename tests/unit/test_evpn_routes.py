"""EVPN routes to and from gobgpd's API messages, the remote table, and the daemon configs."""

from __future__ import annotations

import ipaddress
import shutil
import tomllib

import pytest
from google.protobuf.any_pb2 import Any as AnyMsg
from pydantic import ValidationError

from vpcni.evpn import genstubs, render, routes
from vpcni.evpn.gobgpapi import attribute_pb2 as attr
from vpcni.evpn.gobgpapi import gobgp_pb2 as api
from vpcni.evpn.routes import LocalRoute, RouteError
from vpcni.evpn.speaker import EvpnSpeaker
from vpcni.evpn.table import RemoteTable

ASN = 65000
ME, PEER, OTHER = "198.51.100.1", "198.51.100.2", "198.51.100.3"
MAC = "02:00:00:00:02:01"
L3VNI = 5000
RMAC, RMAC2 = "02:00:00:00:0a:01", "02:00:00:00:0a:02"


def pack(msg) -> AnyMsg:
    out = AnyMsg()
    out.Pack(msg)
    return out


def received(route: LocalRoute, vtep: str = PEER, asn: int = ASN, withdraw: bool = False,
             neighbor: str = "198.51.100.10") -> api.Path:
    """`route` as gobgpd hands a received path out: next hop in MP_REACH, a neighbor set."""
    path = routes.encode(route, vtep, asn)
    pattrs = []
    for packed in path.pattrs:
        if packed.Is(attr.NextHopAttribute.DESCRIPTOR):
            packed = pack(attr.MpReachNLRIAttribute(family=routes.EVPN_FAMILY,
                                                    next_hops=[vtep], nlris=[path.nlri]))
        pattrs.append(packed)
    del path.pattrs[:]
    path.pattrs.extend([] if withdraw else pattrs)
    path.neighbor_ip = neighbor
    path.is_withdraw = withdraw
    return path


def unpacked(path: api.Path, cls):
    for packed in [path.nlri, *path.pattrs]:
        if packed.Is(cls.DESCRIPTOR):
            msg = cls()
            packed.Unpack(msg)
            return msg
    return None


# ---------------------------------------------------------------- LocalRoute


def test_local_route_normalises_and_compares_by_value():
    a = LocalRoute.mac_ip(300, "02:AA:00:00:00:01", "172.16.0.1")
    b = LocalRoute(vni=300, mac="02:aa:00:00:00:01", ip=ipaddress.ip_address("172.16.0.1"))
    assert a == b and hash(a) == hash(b) and a.route_type == 2
    assert LocalRoute.inclusive_multicast(300).route_type == 3
    assert len({a, b, LocalRoute.mac_ip(300, "02:aa:00:00:00:01")}) == 2


@pytest.mark.parametrize("kw", [{"vni": 300, "ip": "172.16.0.1"}, {"vni": 0},
                                {"vni": 2 ** 24}, {"vni": 1, "mac": "02:00:00:00:00"}])
def test_local_route_rejects(kw):
    with pytest.raises(ValidationError):
        LocalRoute(**kw)


# ---------------------------------------------------------------- encode


def test_type2_encodes_the_documented_shape():
    path = routes.encode(LocalRoute.mac_ip(300, MAC, "172.16.0.5"), ME, ASN)
    assert path.family == routes.EVPN_FAMILY
    nlri = unpacked(path, attr.EVPNMACIPAdvertisementRoute)
    rd = attr.RouteDistinguisherIPAddress()
    assert nlri.rd.Unpack(rd) and (rd.admin, rd.assigned) == (ME, 300)
    assert nlri.esi == attr.EthernetSegmentIdentifier(type=0, value=bytes(9))
    assert (nlri.ethernet_tag, nlri.mac_address, nlri.ip_address, list(nlri.labels)) == \
        (0, MAC, "172.16.0.5", [300])
    assert unpacked(path, attr.NextHopAttribute).next_hop == ME
    assert unpacked(path, attr.OriginAttribute).origin == 2
    communities = unpacked(path, attr.ExtendedCommunitiesAttribute).communities
    rt, encap = attr.TwoOctetAsSpecificExtended(), attr.EncapExtended()
    assert communities[0].Unpack(rt) and communities[1].Unpack(encap)
    assert (rt.is_transitive, rt.sub_type, rt.asn, rt.local_admin) == (True, 2, ASN, 300)
    assert encap.tunnel_type == 8
    assert unpacked(path, attr.PmsiTunnelAttribute) is None


def test_type3_carries_pmsi_ingress_replication():
    path = routes.encode(LocalRoute.inclusive_multicast(300), ME, ASN)
    nlri = unpacked(path, attr.EVPNInclusiveMulticastEthernetTagRoute)
    assert (nlri.ethernet_tag, nlri.ip_address) == (0, ME)
    pmsi = unpacked(path, attr.PmsiTunnelAttribute)
    assert (pmsi.type, pmsi.label, pmsi.id) == (6, 300, bytes([198, 51, 100, 1]))


def test_mac_only_route_has_no_ip():
    nlri = unpacked(routes.encode(LocalRoute.mac_ip(300, MAC), ME, ASN),
                    attr.EVPNMACIPAdvertisementRoute)
    assert nlri.ip_address == ""


def test_large_vni_gets_an_as_rd_and_four_byte_asn_its_low_bits_in_the_rt():
    path = routes.encode(LocalRoute.inclusive_multicast(70000), ME, 4200000001)
    rd = attr.RouteDistinguisherTwoOctetASN()
    assert unpacked(path, attr.EVPNInclusiveMulticastEthernetTagRoute).rd.Unpack(rd)
    assert (rd.admin, rd.assigned) == (4200000001 & 0xFFFF, 70000)
    assert routes.decode(path, 4200000001).route_targets == {(4200000001 & 0xFFFF, 70000)}


def test_ipv6_vtep_is_refused():
    with pytest.raises(ValueError, match="IPv4"):
        routes.encode(LocalRoute.inclusive_multicast(300), "2001:db8::1", ASN)


# ---------------------------------------------------------------- decode


@pytest.mark.parametrize("route", [
    LocalRoute.mac_ip(300, MAC, "172.16.0.5"),
    LocalRoute.mac_ip(300, MAC, "fd00::5"),
    LocalRoute.mac_ip(16777215, MAC),
    LocalRoute.inclusive_multicast(300),
])
def test_round_trip(route):
    for path in (routes.encode(route, PEER, ASN), received(route)):
        got = routes.decode(path, ASN)
        assert got.local_route() == route
        assert got.vni == route.vni and got.vtep == ipaddress.ip_address(PEER)
        assert got.nexthop == ipaddress.ip_address(PEER)
        assert got.local == (path.neighbor_ip == "")
    endpoint = routes.decode(received(route), ASN).endpoint()
    if route.route_type == 2:
        assert (endpoint.mac, endpoint.ip, str(endpoint.vtep)) == (route.mac, route.ip, PEER)
    else:
        assert endpoint is None


def test_withdraw_names_the_same_nlri():
    route = LocalRoute.mac_ip(300, MAC, "172.16.0.5")
    assert routes.nlri_key(received(route, withdraw=True)) == routes.decode(received(route),
                                                                            ASN).key
    other_vtep = routes.nlri_key(received(route, vtep=OTHER))
    assert other_vtep != routes.nlri_key(received(route))


def test_label_vni_must_have_its_route_target():
    path = received(LocalRoute.mac_ip(300, MAC))
    nlri = attr.EVPNMACIPAdvertisementRoute()
    path.nlri.Unpack(nlri)
    nlri.labels[0] = 301
    path.nlri.Pack(nlri)
    with pytest.raises(RouteError, match="without route target 65000:301"):
        routes.decode(path, ASN)
    with pytest.raises(RouteError, match="route target 65001:300"):
        routes.decode(received(LocalRoute.inclusive_multicast(300)), 65001)


def test_type3_needs_ingress_replication():
    path = received(LocalRoute.inclusive_multicast(300))
    for i, packed in enumerate(path.pattrs):
        if packed.Is(attr.PmsiTunnelAttribute.DESCRIPTOR):
            path.pattrs[i].Pack(attr.PmsiTunnelAttribute(type=3, label=300, id=b"\xc6\x33\x64\x02"))
    with pytest.raises(RouteError, match="not ingress replication"):
        routes.decode(path, ASN)
    without = received(LocalRoute.inclusive_multicast(300))
    kept = [p for p in without.pattrs if not p.Is(attr.PmsiTunnelAttribute.DESCRIPTOR)]
    del without.pattrs[:]
    without.pattrs.extend(kept)
    with pytest.raises(RouteError, match="no PMSI"):
        routes.decode(without, ASN)


def test_other_route_types_are_not_ours():
    path = api.Path(family=routes.EVPN_FAMILY, nlri=pack(attr.EVPNEthernetSegmentRoute(
        rd=routes.route_distinguisher(PEER, 300, ASN), esi=routes.ESI_ZERO, ip_address=PEER)))
    assert routes.decode(path, ASN) is None and routes.nlri_key(path) is None


def test_own_routes_are_recognisable():
    got = routes.decode(received(LocalRoute.mac_ip(300, MAC), vtep=ME), ASN)
    assert got.is_from(ipaddress.ip_address(ME))
    assert not got.is_from(ipaddress.ip_address(PEER))
    assert routes.is_local(api.Path(neighbor_ip="<nil>")) and routes.is_local(api.Path())
    assert not routes.is_local(api.Path(neighbor_ip="198.51.100.10"))


# ---------------------------------------------------------------- remote table


def test_table_builds_remote_state_per_vni():
    table = RemoteTable(ME, ASN)
    changed = table.apply([
        received(LocalRoute.mac_ip(300, MAC, "172.16.0.2")),
        received(LocalRoute.mac_ip(300, MAC)),
        received(LocalRoute.inclusive_multicast(300)),
        received(LocalRoute.inclusive_multicast(300), vtep=OTHER),
        received(LocalRoute.inclusive_multicast(400), vtep=OTHER),
    ], snapshot=True)
    assert changed == {300, 400}
    state = table.state(300)
    assert [(e.mac, e.ip and str(e.ip), str(e.vtep)) for e in state.endpoints] == \
        [(MAC, None, PEER), (MAC, "172.16.0.2", PEER)]
    assert [str(v) for v in state.flood] == [PEER, OTHER]
    assert table.vnis() == {300, 400} and table.state(500).endpoints == []
    counts = table.counts()
    assert (counts["received_type2"], counts["received_type3"]) == (2, 3)
    assert (counts["remote_type2"], counts["remote_type3"]) == (2, 3)


def test_table_withdraw_removes_exactly_that_route():
    table = RemoteTable(ME, ASN)
    a, b = LocalRoute.mac_ip(300, MAC, "172.16.0.2"), LocalRoute.mac_ip(300, MAC)
    table.apply([received(a), received(b)], snapshot=True)
    assert table.apply([received(a, withdraw=True)]) == {300}
    assert [e.ip for e in table.state(300).endpoints] == [None]
    assert table.apply([received(a, withdraw=True)]) == set()  # nothing left to remove
    assert table.apply([received(b)]) == set()  # the same best path again: no change


def test_table_ignores_local_own_and_malformed_paths():
    table = RemoteTable(ME, ASN)
    own = received(LocalRoute.mac_ip(300, MAC), vtep=ME)  # reflected back to us
    local = routes.encode(LocalRoute.inclusive_multicast(300), ME, ASN)
    wrong_rt = received(LocalRoute.inclusive_multicast(300), asn=65001)
    assert table.apply([own, local, wrong_rt], snapshot=True) == set()
    assert table.vnis() == set()
    counts = table.counts()
    assert (counts["ignored_own"], counts["rejected"]) == (1, 1)


def test_a_best_path_that_becomes_ours_drops_the_remote_one():
    table = RemoteTable(ME, ASN)
    route = LocalRoute.mac_ip(300, MAC)
    table.apply([received(route, vtep=PEER)], snapshot=True)
    # Same NLRI (same RD), now best from our own gobgpd: no longer remote.
    local = received(route, vtep=PEER, neighbor="")
    assert table.apply([local]) == {300} and table.state(300).endpoints == []


def test_snapshot_replaces_the_table():
    table = RemoteTable(ME, ASN)
    keep, stale = LocalRoute.mac_ip(300, MAC), LocalRoute.mac_ip(400, "02:00:00:00:04:01")
    table.apply([received(keep), received(stale)], snapshot=True)
    assert table.apply([received(keep)], snapshot=True) == {400}
    assert table.vnis() == {300}
    assert table.apply([], snapshot=True) == {300} and table.vnis() == set()


def test_a_moved_mac_follows_the_newest_vtep():
    table = RemoteTable(ME, ASN)
    route = LocalRoute.mac_ip(300, MAC, "172.16.0.9")
    table.apply([received(route, vtep=PEER)], snapshot=True)
    table.apply([received(route, vtep=OTHER)])  # another RD: both routes exist for a while
    assert [str(e.vtep) for e in table.state(300).endpoints] == [OTHER]
    table.apply([received(route, vtep=OTHER, withdraw=True)])
    assert [str(e.vtep) for e in table.state(300).endpoints] == [PEER]


# ---------------------------------------------------------------- speaker, without gobgpd


def test_speaker_keeps_the_desired_set_until_gobgpd_answers(tmp_path):
    speaker = EvpnSpeaker(f"unix://{tmp_path}/absent.sock", ME, ASN)
    try:
        with pytest.raises(RuntimeError, match="set_local"):
            speaker.update_local(add=[LocalRoute.inclusive_multicast(300)])
        assert speaker.set_local({LocalRoute.inclusive_multicast(300)}) is False
        assert speaker.update_local(add=[LocalRoute.mac_ip(300, MAC)]) is False
        assert speaker.local_routes() == {LocalRoute.inclusive_multicast(300),
                                          LocalRoute.mac_ip(300, MAC)}
        assert not speaker.connected and speaker.counters()["announced"] == 0
    finally:
        speaker.close()


def test_speaker_refuses_an_ipv6_vtep():
    with pytest.raises(ValueError, match="IPv4"):
        EvpnSpeaker("unix:///nonexistent", "2001:db8::1", ASN)


# ---------------------------------------------------------------- renderers


def test_gobgpd_node_config():
    text = render.gobgpd_node_toml(ME, ASN, ["198.51.100.10", "198.51.100.11", "198.51.100.10"])
    cfg = tomllib.loads(text)
    assert cfg["global"]["config"] == {"as": ASN, "router-id": ME, "port": -1}
    assert [n["config"]["neighbor-address"] for n in cfg["neighbors"]] == \
        ["198.51.100.10", "198.51.100.11"]
    for n in cfg["neighbors"]:
        assert n["config"]["peer-as"] == ASN
        assert n["timers"]["config"] == {"connect-retry": 2, "hold-time": 9,
                                         "keepalive-interval": 3}
        assert n["transport"]["config"]["local-address"] == ME
        assert [a["config"]["afi-safi-name"] for a in n["afi-safis"]] == ["l2vpn-evpn"]
        # Graceful restart advertised for EVPN: reflectors keep our routes while we restart.
        assert n["graceful-restart"]["config"] == {
            "enabled": True, "restart-time": render.NODE_RESTART_TIME,
            "notification-enabled": True}
        assert n["afi-safis"][0]["mp-graceful-restart"]["config"] == {"enabled": True}


def test_gobgpd_reflector_config():
    cfg = tomllib.loads(render.gobgpd_reflector_toml("198.51.100.10", ASN, "198.51.100.0/24"))
    group = cfg["peer-groups"][0]
    assert group["config"] == {"peer-group-name": "vtep", "peer-as": ASN}
    assert group["route-reflector"]["config"] == {"route-reflector-client": True,
                                                  "route-reflector-cluster-id": "198.51.100.10"}
    assert group["timers"]["config"] == {"hold-time": 9, "keepalive-interval": 3}
    assert [a["config"]["afi-safi-name"] for a in group["afi-safis"]] == ["l2vpn-evpn"]
    # A helper only: it keeps a restarting node's routes and asks nodes to keep none of
    # its own (gobgpd 3.10 crashes marking EVPN paths stale where it originates some).
    assert group["graceful-restart"]["config"]["helper-only"] is True
    assert "mp-graceful-restart" not in group["afi-safis"][0]
    assert cfg["dynamic-neighbors"][0]["config"] == {"prefix": "198.51.100.0/24",
                                                     "peer-group": "vtep"}


def test_frr_reflector_config():
    text = render.frr_reflector_bgpd("198.51.100.10", ASN, "198.51.100.7/24",
                                     cluster_id="198.51.100.250")
    lines = text.splitlines()
    assert lines[0] == "router bgp 65000"
    for line in (" bgp router-id 198.51.100.10", " bgp cluster-id 198.51.100.250",
                 " no bgp default ipv4-unicast", " neighbor VTEP remote-as 65000",
                 " neighbor VTEP timers 3 9", " bgp listen range 198.51.100.0/24 peer-group VTEP",
                 "  neighbor VTEP route-reflector-client"):
        assert line in lines
    af = lines.index(" address-family l2vpn evpn")
    assert lines[af + 1:] == ["  neighbor VTEP activate", "  neighbor VTEP route-reflector-client",
                              " exit-address-family"]


def test_frr_vtep_config():
    lines = render.frr_vtep_bgpd(OTHER, ASN, ["198.51.100.10"]).splitlines()
    assert lines == [
        "router bgp 65000", " bgp router-id 198.51.100.3", " no bgp default ipv4-unicast",
        " neighbor 198.51.100.10 remote-as 65000", " neighbor 198.51.100.10 timers 3 9",
        " neighbor 198.51.100.10 timers connect 1", " address-family l2vpn evpn",
        "  neighbor 198.51.100.10 activate", "  advertise-all-vni", " exit-address-family"]
    assert render.frr_zebra("fv-1") == "hostname fv-1\n"


@pytest.mark.parametrize("call", [
    lambda: render.gobgpd_node_toml("2001:db8::1", ASN, ["198.51.100.10"]),
    lambda: render.gobgpd_node_toml(ME, ASN, []),
    lambda: render.gobgpd_node_toml(ME, 0, ["198.51.100.10"]),
    lambda: render.gobgpd_node_toml(ME, ASN, ['198.51.100.10"\n[x]']),
    lambda: render.gobgpd_reflector_toml("198.51.100.10", ASN, "not-a-prefix"),
    lambda: render.frr_reflector_bgpd("198.51.100.10\n!", ASN, "198.51.100.0/24"),
    lambda: render.frr_zebra("bad host\nline vty"),
])
def test_renderers_refuse_bad_input(call):
    with pytest.raises(ValueError):
        call()


# ---------------------------------------------------------------- stub generation


def fake_gobgpd(tmp_path, version: str) -> str:
    exe = tmp_path / "gobgpd"
    exe.write_text(f"#!/bin/sh\necho 'gobgpd version {version}'\n")
    exe.chmod(0o755)
    return str(exe)


def test_genstubs_refuses_another_gobgpd_series(tmp_path):
    with pytest.raises(genstubs.StubError,
                       match=r"gobgpd is 3\.11\.0, vpcni is pinned to 3\.10\.x"):
        genstubs.check_inputs(genstubs.PROTO_DIR, fake_gobgpd(tmp_path, "3.11.0"))


def test_genstubs_refuses_missing_protos(tmp_path):
    with pytest.raises(genstubs.StubError, match="golang-github-osrg-gobgp-dev"):
        genstubs.check_inputs(tmp_path, fake_gobgpd(tmp_path, "3.10.0"))


@pytest.mark.skipif(shutil.which("gobgpd") is None or not genstubs.PROTO_DIR.is_dir(),
                    reason="needs Debian's gobgpd and golang-github-osrg-gobgp-dev")
def test_genstubs_generates_relative_imports_once(tmp_path):
    out = tmp_path / "gobgpapi"
    assert genstubs.generate(out_dir=out) is True
    assert genstubs.generate(out_dir=out) is False  # up to date: untouched
    names = sorted(p.name for p in out.iterdir())
    assert names == ["attribute_pb2.py", "capability_pb2.py", "gobgp_pb2.py", "gobgp_pb2_grpc.py"]
    grpc_stub = (out / "gobgp_pb2_grpc.py").read_text()
    assert "from . import gobgp_pb2 as gobgp__pb2" in grpc_stub
    assert "\nimport gobgp_pb2" not in grpc_stub
    stale = out / "attribute_pb2.py"
    stale.write_text(stale.read_text().replace("sha256", "sha1", 1))
    assert genstubs.generate(out_dir=out) is True


# ---------------------------------------------------------------- symmetric IRB


def set_labels(path: api.Path, labels: list[int]) -> api.Path:
    nlri = attr.EVPNMACIPAdvertisementRoute()
    path.nlri.Unpack(nlri)
    del nlri.labels[:]
    nlri.labels.extend(labels)
    path.nlri.Pack(nlri)
    return path


def drop_communities(path: api.Path, keep) -> api.Path:
    """`path` without the extended communities `keep(community)` is false for."""
    for packed in path.pattrs:
        if packed.Is(attr.ExtendedCommunitiesAttribute.DESCRIPTOR):
            msg = attr.ExtendedCommunitiesAttribute()
            packed.Unpack(msg)
            kept = [c for c in msg.communities if keep(c)]
            del msg.communities[:]
            msg.communities.extend(kept)
            packed.Pack(msg)
    return path


def is_rt(vni: int):
    def match(community) -> bool:
        rt = attr.TwoOctetAsSpecificExtended()
        return community.Unpack(rt) and rt.local_admin == vni
    return match


def is_rmac(community) -> bool:
    return community.Is(attr.RouterMacExtended.DESCRIPTOR)


def host(ip: str, mac: str = MAC, vni: int = 300, l3vni: int = L3VNI,
         rmac: str = RMAC) -> LocalRoute:
    return LocalRoute.mac_ip(vni, mac, ip, l3vni=l3vni, rmac=rmac)


def routed(table: RemoteTable, l3vni: int = L3VNI) -> tuple[list, list]:
    state = table.routed(l3vni)
    return ([(str(h.ip), str(h.vtep), h.rmac) for h in state.hosts],
            [(str(p.prefix), str(p.vtep), p.rmac) for p in state.prefixes])


def test_irb_local_routes_normalise_and_print():
    t2 = LocalRoute.mac_ip(100, "AA:BB:CC:00:00:01", "10.1.0.5", l3vni=5000,
                           rmac="02:AA:00:00:0A:01")
    assert (t2.route_type, t2.rmac, t2.l3vni) == (2, "02:aa:00:00:0a:01", 5000)
    assert str(t2) == "type-2 vni 100 aa:bb:cc:00:00:01 10.1.0.5 l3vni 5000 rmac 02:aa:00:00:0a:01"
    t5 = LocalRoute.ip_prefix(5000, "10.1.0.77/24", "02:AA:00:00:0A:01")
    assert (t5.route_type, t5.vni, t5.prefix, t5.l3vni) == \
        (5, 5000, ipaddress.ip_network("10.1.0.0/24"), None)
    assert str(t5) == "type-5 l3vni 5000 10.1.0.0/24 rmac 02:aa:00:00:0a:01"
    assert t5 == LocalRoute(vni=5000, prefix=ipaddress.ip_network("10.1.0.0/24"),
                            rmac="02:aa:00:00:0a:01")
    assert LocalRoute.ip_prefix(5000, "fd00:1::1/64", RMAC).prefix == \
        ipaddress.ip_network("fd00:1::/64")
    # Attributes are not the NLRI: the same route with and without its L3VNI.
    plain = LocalRoute.mac_ip(100, "aa:bb:cc:00:00:01", "10.1.0.5")
    assert plain != t2 and plain.nlri_identity == t2.nlri_identity
    assert t5.nlri_identity != LocalRoute.ip_prefix(5000, "10.1.0.0/25", RMAC).nlri_identity


@pytest.mark.parametrize("kw, match", [
    ({"vni": 300, "mac": MAC, "l3vni": L3VNI, "rmac": RMAC}, "with an IP"),
    ({"vni": 300, "mac": MAC, "ip": "10.1.0.5", "l3vni": L3VNI}, "router MAC"),
    ({"vni": 300, "mac": MAC, "ip": "10.1.0.5", "rmac": RMAC}, "goes with an 'l3vni'"),
    ({"vni": 300, "rmac": RMAC}, "goes with an 'l3vni'"),
    ({"vni": 300, "mac": MAC, "ip": "10.1.0.5", "l3vni": 0, "rmac": RMAC}, "l3vni"),
    ({"vni": 300, "mac": MAC, "ip": "10.1.0.5", "l3vni": 2 ** 24, "rmac": RMAC}, "l3vni"),
    ({"vni": L3VNI, "prefix": "10.1.0.0/24"}, "router MAC"),
    ({"vni": L3VNI, "prefix": "10.1.0.0/24", "rmac": RMAC, "mac": MAC}, "no 'mac' or 'ip'"),
    ({"vni": L3VNI, "prefix": "10.1.0.0/24", "rmac": RMAC, "l3vni": L3VNI}, "leave 'l3vni'"),
    ({"vni": L3VNI, "prefix": "10.1.0.0/33", "rmac": RMAC}, "prefix"),
    ({"vni": L3VNI, "prefix": "10.1.0.0/24", "rmac": "02:00:00:00:0a"}, "rmac"),
])
def test_irb_local_route_rejects(kw, match):
    with pytest.raises(ValidationError, match=match):
        LocalRoute(**kw)


def test_type2_with_l3vni_encodes_two_labels_two_rts_and_the_router_mac():
    path = routes.encode(host("10.1.0.5", vni=100), ME, ASN)
    nlri = unpacked(path, attr.EVPNMACIPAdvertisementRoute)
    rd = attr.RouteDistinguisherIPAddress()
    assert nlri.rd.Unpack(rd) and (rd.admin, rd.assigned) == (ME, 100)  # the L2 VNI's RD
    assert (nlri.mac_address, nlri.ip_address, list(nlri.labels)) == (MAC, "10.1.0.5",
                                                                      [100, L3VNI])
    communities = unpacked(path, attr.ExtendedCommunitiesAttribute).communities
    rts = []
    for community in communities[:2]:
        rt = attr.TwoOctetAsSpecificExtended()
        assert community.Unpack(rt)
        rts.append((rt.is_transitive, rt.sub_type, rt.asn, rt.local_admin))
    assert rts == [(True, 2, ASN, 100), (True, 2, ASN, L3VNI)]
    encap, rmac = attr.EncapExtended(), attr.RouterMacExtended()
    assert communities[2].Unpack(encap) and encap.tunnel_type == 8
    assert communities[3].Unpack(rmac) and rmac.mac == RMAC
    assert len(communities) == 4
    assert unpacked(path, attr.NextHopAttribute).next_hop == ME
    assert unpacked(path, attr.PmsiTunnelAttribute) is None


@pytest.mark.parametrize("prefix, address, gateway", [("10.1.0.0/24", "10.1.0.0", "0.0.0.0"),
                                                      ("fd00:1::/64", "fd00:1::", "::")])
def test_type5_encodes_the_documented_shape(prefix, address, gateway):
    path = routes.encode(LocalRoute.ip_prefix(L3VNI, prefix, RMAC), ME, ASN)
    assert path.family == routes.EVPN_FAMILY
    nlri = unpacked(path, attr.EVPNIPPrefixRoute)
    rd = attr.RouteDistinguisherIPAddress()
    assert nlri.rd.Unpack(rd) and (rd.admin, rd.assigned) == (ME, L3VNI)
    assert nlri.esi == routes.ESI_ZERO
    assert (nlri.ethernet_tag, nlri.ip_prefix, nlri.ip_prefix_len, nlri.gw_address,
            nlri.label) == (0, address, int(prefix.split("/")[1]), gateway, L3VNI)
    assert unpacked(path, attr.NextHopAttribute).next_hop == ME
    assert unpacked(path, attr.OriginAttribute).origin == 2
    communities = unpacked(path, attr.ExtendedCommunitiesAttribute).communities
    rt, encap, rmac = attr.TwoOctetAsSpecificExtended(), attr.EncapExtended(), \
        attr.RouterMacExtended()
    assert communities[0].Unpack(rt) and (rt.asn, rt.local_admin) == (ASN, L3VNI)
    assert communities[1].Unpack(encap) and encap.tunnel_type == 8
    assert communities[2].Unpack(rmac) and rmac.mac == RMAC
    assert len(communities) == 3
    assert unpacked(path, attr.PmsiTunnelAttribute) is None


@pytest.mark.parametrize("route", [
    host("10.1.0.5"),
    host("fd00:1::5"),
    host("10.1.0.5", vni=16777215, l3vni=16777214),
    LocalRoute.ip_prefix(L3VNI, "10.1.0.0/24", RMAC),
    LocalRoute.ip_prefix(L3VNI, "0.0.0.0/0", RMAC),
    LocalRoute.ip_prefix(L3VNI, "fd00:1::/64", RMAC),
    LocalRoute.ip_prefix(70000, "10.1.0.0/24", RMAC),
])
def test_irb_round_trip(route):
    for path in (routes.encode(route, PEER, ASN), received(route)):
        got = routes.decode(path, ASN)
        assert got.local_route() == route
        assert (got.route_type, got.vni, got.l3vni, got.rmac, got.prefix) == \
            (route.route_type, route.vni, route.l3vni, route.rmac, route.prefix)
        assert got.vtep == got.nexthop == ipaddress.ip_address(PEER)
    got = routes.decode(received(route), ASN)
    if route.route_type == 2:
        assert got.routed_host().model_dump() == {"ip": route.ip, "vtep": got.vtep,
                                                  "rmac": RMAC}
        assert got.routed_prefix() is None and got.endpoint().ip == route.ip
    else:
        assert got.routed_prefix().model_dump() == {"prefix": route.prefix, "vtep": got.vtep,
                                                    "rmac": RMAC}
        assert got.routed_host() is None and got.endpoint() is None


def test_plain_type2_has_no_routed_host():
    got = routes.decode(received(LocalRoute.mac_ip(300, MAC, "10.1.0.5")), ASN)
    assert (got.l3vni, got.rmac, got.routed_host(), got.routed_prefix()) == (None,) * 4


@pytest.mark.parametrize("spoil", [
    lambda p: drop_communities(p, lambda c: not is_rt(L3VNI)(c)),  # no RT for the 2nd label
    lambda p: drop_communities(p, lambda c: not is_rmac(c)),        # no router MAC
    lambda p: set_labels(p, [300, 0]),                               # not a VNI
    lambda p: set_labels(p, [300, 4242]),                            # no RT for it
])
def test_a_second_label_without_its_rt_and_router_mac_is_a_plain_l2_route(spoil):
    route = host("10.1.0.5")
    got = routes.decode(spoil(received(route)), ASN)
    assert (got.vni, got.mac, got.ip, got.l3vni, got.rmac) == \
        (300, MAC, ipaddress.ip_address("10.1.0.5"), None, None)
    assert got.local_route() == LocalRoute.mac_ip(300, MAC, "10.1.0.5")
    assert got.routed_host() is None and got.endpoint() is not None


def test_a_mac_only_route_with_two_labels_is_a_plain_l2_route():
    path = received(LocalRoute.mac_ip(300, MAC))
    set_labels(path, [300, L3VNI])
    for packed in path.pattrs:
        if packed.Is(attr.ExtendedCommunitiesAttribute.DESCRIPTOR):
            msg = attr.ExtendedCommunitiesAttribute()
            packed.Unpack(msg)
            msg.communities.extend([routes._route_target(ASN, L3VNI),
                                    pack(attr.RouterMacExtended(mac=RMAC))])
            packed.Pack(msg)
    got = routes.decode(path, ASN)
    assert (got.l3vni, got.rmac) == (None, None)
    assert got.local_route() == LocalRoute.mac_ip(300, MAC)


def test_type5_needs_router_mac_rt_and_next_hop():
    route = LocalRoute.ip_prefix(L3VNI, "10.1.0.0/24", RMAC)
    with pytest.raises(RouteError, match="no router MAC"):
        routes.decode(drop_communities(received(route), lambda c: not is_rmac(c)), ASN)
    with pytest.raises(RouteError, match="without route target 65000:5000"):
        routes.decode(drop_communities(received(route), lambda c: not is_rt(L3VNI)(c)), ASN)
    path = received(route)
    kept = [p for p in path.pattrs if not p.Is(attr.MpReachNLRIAttribute.DESCRIPTOR)]
    del path.pattrs[:]
    path.pattrs.extend(kept)
    with pytest.raises(RouteError, match="no next hop"):
        routes.decode(path, ASN)


def test_type5_gateway_address_is_ignored_and_host_bits_are_refused():
    route = LocalRoute.ip_prefix(L3VNI, "10.1.0.0/24", RMAC)
    path = received(route)
    nlri = unpacked(path, attr.EVPNIPPrefixRoute)
    nlri.gw_address = "10.1.0.1"
    path.nlri.Pack(nlri)
    got = routes.decode(path, ASN)
    assert got.local_route() == route and got.key == routes.decode(received(route), ASN).key
    nlri.ip_prefix = "10.1.0.7"
    path.nlri.Pack(nlri)
    with pytest.raises(RouteError, match="host bits"):
        routes.nlri_key(path)
    table = RemoteTable(ME, ASN)
    assert table.apply([path], snapshot=True) == set()


def test_type5_withdraw_names_the_same_nlri():
    route = LocalRoute.ip_prefix(L3VNI, "10.1.0.0/24", RMAC)
    key = routes.decode(received(route), ASN).key
    assert key == (5, f"{PEER}:{L3VNI}", 0, ipaddress.ip_network("10.1.0.0/24"), 0)
    assert routes.nlri_key(received(route, withdraw=True)) == key
    # The router MAC and the label are attributes: another rmac is the same NLRI.
    assert routes.nlri_key(received(LocalRoute.ip_prefix(L3VNI, "10.1.0.0/24", RMAC2))) == key
    # Labels are attributes too: a type-2 with and without its L3VNI is one NLRI.
    assert routes.nlri_key(received(host("10.1.0.5"))) == \
        routes.nlri_key(received(LocalRoute.mac_ip(300, MAC, "10.1.0.5")))


def test_table_routes_hosts_and_prefixes_per_l3vni():
    table = RemoteTable(ME, ASN)
    changed = table.apply([
        received(host("10.1.0.5")),
        received(host("10.1.0.6", mac="02:00:00:00:02:02", rmac=RMAC2), vtep=OTHER),
        received(host("10.2.0.5", vni=301, mac="02:00:00:00:02:03")),
        received(LocalRoute.mac_ip(300, "02:00:00:00:02:04", "10.1.0.7")),  # L2 only
        received(LocalRoute.inclusive_multicast(300)),
        received(LocalRoute.ip_prefix(L3VNI, "10.1.0.0/24", RMAC2), vtep=OTHER),
        received(LocalRoute.ip_prefix(L3VNI, "10.1.0.0/24", RMAC)),
        received(LocalRoute.ip_prefix(L3VNI, "10.0.0.0/16", RMAC)),
        received(LocalRoute.ip_prefix(L3VNI, "fd00:1::/64", RMAC)),
        received(LocalRoute.ip_prefix(6000, "10.9.0.0/24", RMAC)),
    ], snapshot=True)
    assert changed == {300, 301, L3VNI, 6000} and table.vnis() == changed
    hosts, prefixes = routed(table)
    assert hosts == [("10.1.0.5", PEER, RMAC), ("10.1.0.6", OTHER, RMAC2),
                     ("10.2.0.5", PEER, RMAC)]
    # Every VTEP announcing a prefix (ECMP), in a stable order.
    assert prefixes == [("10.0.0.0/16", PEER, RMAC), ("10.1.0.0/24", PEER, RMAC),
                        ("10.1.0.0/24", OTHER, RMAC2), ("fd00:1::/64", PEER, RMAC)]
    assert routed(table, 6000) == ([], [("10.9.0.0/24", PEER, RMAC)])
    assert routed(table, 300) == ([], [])
    # The L2 view is as before: type-2 routes with an L3VNI are endpoints of their
    # VNI, and nothing of the L3VNI shows up as an L2 VNI's state.
    assert [(e.mac, str(e.ip)) for e in table.state(300).endpoints] == [
        (MAC, "10.1.0.5"), ("02:00:00:00:02:02", "10.1.0.6"), ("02:00:00:00:02:04", "10.1.0.7")]
    assert table.state(L3VNI) == table.state(6000) == table.state(12345)
    assert table.state(L3VNI).endpoints == [] and table.state(L3VNI).flood == []
    counts = table.counts()
    assert (counts["received_type2"], counts["received_type3"], counts["received_type5"]) == \
        (4, 1, 5)
    assert (counts["remote_type2"], counts["remote_type3"], counts["remote_type5"]) == (4, 1, 5)


def test_table_routed_withdrawals_and_changes():
    table = RemoteTable(ME, ASN)
    a = LocalRoute.ip_prefix(L3VNI, "10.1.0.0/24", RMAC)
    h = host("10.1.0.5")
    table.apply([received(a), received(a, vtep=OTHER), received(h)], snapshot=True)
    # One VTEP withdraws the prefix: the other still serves it.
    assert table.apply([received(a, withdraw=True)]) == {L3VNI}
    assert routed(table)[1] == [("10.1.0.0/24", OTHER, RMAC)]
    assert table.apply([received(a)]) == {L3VNI}
    assert table.apply([received(a)]) == set()  # the same best path again
    # A new router MAC is a change of the same NLRI.
    assert table.apply([received(LocalRoute.ip_prefix(L3VNI, "10.1.0.0/24", RMAC2))]) == {L3VNI}
    assert routed(table)[1] == [("10.1.0.0/24", PEER, RMAC2), ("10.1.0.0/24", OTHER, RMAC)]
    # The host's route loses its L3VNI: both its VNI and the L3VNI changed.
    assert table.apply([received(LocalRoute.mac_ip(300, MAC, "10.1.0.5"))]) == {300, L3VNI}
    assert routed(table)[0] == [] and len(table.state(300).endpoints) == 1
    assert table.apply([received(h)]) == {300, L3VNI}
    assert table.apply([received(h, withdraw=True)]) == {300, L3VNI}
    assert routed(table)[0] == [] and table.vnis() == {L3VNI}
    table.apply([received(a, withdraw=True), received(a, vtep=OTHER, withdraw=True)])
    assert routed(table) == ([], []) and table.vnis() == set()
    assert table.apply([received(h)], snapshot=True) == {300, L3VNI}
    assert table.apply([], snapshot=True) == {300, L3VNI}


def test_a_moved_host_follows_the_newest_vtep():
    table = RemoteTable(ME, ASN)
    table.apply([received(host("10.1.0.9"), vtep=PEER)], snapshot=True)
    # The pod moved: a new MAC behind another VTEP, while the old route lingers.
    assert table.apply([received(host("10.1.0.9", mac="02:00:00:00:02:09", rmac=RMAC2),
                                 vtep=OTHER)]) == {300, L3VNI}
    assert routed(table)[0] == [("10.1.0.9", OTHER, RMAC2)]
    table.apply([received(host("10.1.0.9", mac="02:00:00:00:02:09", rmac=RMAC2), vtep=OTHER,
                          withdraw=True)])
    assert routed(table)[0] == [("10.1.0.9", PEER, RMAC)]


def test_table_ignores_own_irb_routes():
    table = RemoteTable(ME, ASN)
    own = [received(host("10.1.0.5"), vtep=ME),
           received(LocalRoute.ip_prefix(L3VNI, "10.1.0.0/24", RMAC), vtep=ME),
           routes.encode(LocalRoute.ip_prefix(L3VNI, "10.2.0.0/24", RMAC), ME, ASN)]
    assert table.apply(own, snapshot=True) == set() and table.counts()["ignored_own"] == 2


def test_speaker_announces_one_route_per_nlri(tmp_path):
    speaker = EvpnSpeaker(f"unix://{tmp_path}/absent.sock", ME, ASN)
    plain, irb = LocalRoute.mac_ip(300, MAC, "10.1.0.5"), host("10.1.0.5")
    try:
        # Two routes of one NLRI: the routed one is kept, the rest still announced.
        prefix = LocalRoute.ip_prefix(L3VNI, "10.1.0.0/24", RMAC)
        assert speaker.set_local({plain, irb, prefix}) is False
        assert speaker.local_routes() == {irb, prefix}
        assert speaker.set_local({plain, prefix}) is False
        assert speaker.update_local(add=[irb]) is False
        assert speaker.local_routes() == {irb, prefix}
        assert speaker.update_local(add=[plain], remove=[irb]) is False
        assert plain in speaker.local_routes() and irb not in speaker.local_routes()
        assert speaker.routed_state(L3VNI).hosts == []
    finally:
        speaker.close()
