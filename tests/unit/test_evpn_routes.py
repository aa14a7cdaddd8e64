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
    path = api.Path(family=routes.EVPN_FAMILY, nlri=pack(attr.EVPNIPPrefixRoute(
        rd=routes.route_distinguisher(PEER, 300, ASN), ip_prefix="172.16.0.0", ip_prefix_len=24)))
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
