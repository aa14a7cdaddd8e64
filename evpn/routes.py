"""EVPN routes <-> gobgpd API messages: pure encode/decode, no I/O.

What we announce (RFC 7432 routes over VXLAN as RFC 8365 profiles them, and
as FRR originates them, so a plain FRR VTEP shares a VPC with us):

- type-2 MAC/IP advertisement: RD <vtep>:<vni>, ESI 0, ethernet tag 0, MAC,
  optional IP, label = VNI (the 24-bit label field holds the VNI);
- type-3 inclusive multicast: RD <vtep>:<vni>, ethernet tag 0, originating
  IP = vtep, PMSI tunnel = ingress replication, label = VNI, id = vtep;
- both: origin, next hop = vtep, route target <asn>:<vni> (two-octet-AS
  type with the low 16 bits of the ASN, FRR's auto-derived RT), and the
  VXLAN encapsulation extended community.

An RD of the IP type has only 16 bits for the assigned number: VNIs above
65535 get a two-octet-AS RD <asn>:<vni> instead (still unique per VNI; type-3
NLRIs still differ per VTEP through the originating IP).

Received routes are accepted only when their label VNI has the matching route
target, as FRR imports by RT.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Optional, Union

from google.protobuf.any_pb2 import Any as AnyMsg
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from vpcni.core.models import VNI_MAX, IPAddress, Mac, RemoteEndpoint

try:
    from .gobgpapi import attribute_pb2 as attr
    from .gobgpapi import gobgp_pb2 as api
except ImportError as exc:  # pragma: no cover - depends on the build step
    raise ImportError("gobgpd API stubs are missing: the package's build generates them "
                      "(reinstall vpcni where gobgpd 3.10 and its .proto files are installed; "
                      "scripts/setup.sh does), or run `python -m vpcni.evpn.genstubs`: "
                      f"{exc}") from exc

EVPN_FAMILY = api.Family(afi=api.Family.AFI_L2VPN, safi=api.Family.SAFI_EVPN)
ORIGIN_INCOMPLETE = 2
RT_SUB_TYPE = 0x02
TUNNEL_TYPE_VXLAN = 8
PMSI_INGRESS_REPLICATION = 6
RD_IP_ASSIGNED_MAX = 0xFFFF
ESI_ZERO = attr.EthernetSegmentIdentifier(type=0, value=bytes(9))
# How gobgpd renders an absent address (Go's nil net.IP).
_NO_ADDRESS = ("", "<nil>")

IPv4 = ipaddress.IPv4Address
AnyIP = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]


class RouteError(ValueError):
    """A path that is not a valid EVPN route for us; the message says why."""


class LocalRoute(BaseModel):
    """A route this node originates: type-2 (vni, mac, ip or None) or type-3 (vni)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    vni: int = Field(ge=1, le=VNI_MAX)
    mac: Optional[Mac] = None
    ip: Optional[IPAddress] = None

    @field_validator("mac")
    @classmethod
    def _lower(cls, v: Optional[str]) -> Optional[str]:
        return v.lower() if v is not None else None

    @model_validator(mode="after")
    def _ip_needs_mac(self) -> "LocalRoute":
        if self.ip is not None and self.mac is None:
            raise ValueError("an IP is announced with its MAC (type-2): set 'mac'")
        return self

    @classmethod
    def mac_ip(cls, vni: int, mac: str, ip: Optional[Union[str, AnyIP]] = None) -> "LocalRoute":
        """Type-2 MAC/IP advertisement (MAC only when `ip` is None)."""
        return cls(vni=vni, mac=mac, ip=ip)

    @classmethod
    def inclusive_multicast(cls, vni: int) -> "LocalRoute":
        """Type-3: this node takes part in `vni` (its flood list entry elsewhere)."""
        return cls(vni=vni)

    @property
    def route_type(self) -> int:
        return 3 if self.mac is None else 2

    def __str__(self) -> str:
        if self.mac is None:
            return f"type-3 vni {self.vni}"
        return f"type-2 vni {self.vni} {self.mac}" + (f" {self.ip}" if self.ip else "")


@dataclass(frozen=True)
class Received:
    """One decoded EVPN path, as a received route or one of gobgpd's local ones."""

    key: tuple        # the NLRI's identity: what a withdraw of this route names
    route_type: int   # 2 or 3
    vni: int
    nexthop: Optional[AnyIP]
    vtep: Optional[AnyIP]  # type-2: next hop; type-3: PMSI tunnel id (ingress replication)
    mac: Optional[str] = None
    ip: Optional[AnyIP] = None
    rd: str = ""
    route_targets: frozenset = frozenset()
    local: bool = False

    def endpoint(self) -> Optional[RemoteEndpoint]:
        if self.route_type != 2 or self.vtep is None:
            return None
        return RemoteEndpoint(mac=self.mac, ip=self.ip, vtep=self.vtep)

    def local_route(self) -> LocalRoute:
        return LocalRoute(vni=self.vni, mac=self.mac, ip=self.ip)

    def is_from(self, vtep: AnyIP) -> bool:
        """True when this route was originated by `vtep` (e.g. reflected back to it)."""
        return vtep in (self.nexthop, self.vtep)


# ---------------------------------------------------------------- encode


def _pack(msg) -> AnyMsg:
    out = AnyMsg()
    out.Pack(msg)
    return out


def _vtep(vtep: Union[str, AnyIP]) -> IPv4:
    addr = ipaddress.ip_address(vtep)
    if not isinstance(addr, IPv4):
        raise ValueError(f"VTEP {addr}: EVPN RDs and PMSI tunnel ids here are IPv4 only")
    return addr


def route_target(asn: int, vni: int) -> tuple[int, int]:
    """FRR's auto-derived RT: low 16 bits of the ASN, VNI as local admin."""
    return (asn & 0xFFFF, vni)


def route_distinguisher(vtep: Union[str, AnyIP], vni: int, asn: int) -> AnyMsg:
    if vni <= RD_IP_ASSIGNED_MAX:
        return _pack(attr.RouteDistinguisherIPAddress(admin=str(_vtep(vtep)), assigned=vni))
    return _pack(attr.RouteDistinguisherTwoOctetASN(admin=asn & 0xFFFF, assigned=vni))


def encode(route: LocalRoute, vtep: Union[str, AnyIP], asn: int) -> api.Path:
    """The gobgpd Path announcing `route` from `vtep` in `asn`."""
    vtep = _vtep(vtep)
    rd = route_distinguisher(vtep, route.vni, asn)
    if route.mac is None:
        nlri = attr.EVPNInclusiveMulticastEthernetTagRoute(rd=rd, ethernet_tag=0,
                                                            ip_address=str(vtep))
    else:
        nlri = attr.EVPNMACIPAdvertisementRoute(
            rd=rd, esi=ESI_ZERO, ethernet_tag=0, mac_address=route.mac,
            ip_address=str(route.ip) if route.ip is not None else "", labels=[route.vni])
    rt_asn, rt_vni = route_target(asn, route.vni)
    pattrs = [
        attr.OriginAttribute(origin=ORIGIN_INCOMPLETE),
        attr.NextHopAttribute(next_hop=str(vtep)),
        attr.ExtendedCommunitiesAttribute(communities=[
            _pack(attr.TwoOctetAsSpecificExtended(is_transitive=True, sub_type=RT_SUB_TYPE,
                                                  asn=rt_asn, local_admin=rt_vni)),
            _pack(attr.EncapExtended(tunnel_type=TUNNEL_TYPE_VXLAN)),
        ]),
    ]
    if route.mac is None:
        pattrs.append(attr.PmsiTunnelAttribute(type=PMSI_INGRESS_REPLICATION, label=route.vni,
                                               id=vtep.packed))
    return api.Path(family=EVPN_FAMILY, nlri=_pack(nlri), pattrs=[_pack(p) for p in pattrs])


# ---------------------------------------------------------------- decode


def _address(text: str) -> Optional[AnyIP]:
    if text in _NO_ADDRESS:
        return None
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise RouteError(f"bad address {text!r}") from None


def _rd_text(rd: AnyMsg) -> str:
    for cls in (attr.RouteDistinguisherIPAddress, attr.RouteDistinguisherTwoOctetASN,
                attr.RouteDistinguisherFourOctetASN):
        if rd.Is(cls.DESCRIPTOR):
            msg = cls()
            rd.Unpack(msg)
            return f"{msg.admin}:{msg.assigned}"
    return rd.type_url.rsplit(".", 1)[-1]


def is_local(path: api.Path) -> bool:
    """Originated by this gobgpd (AddPath), not received from a neighbor."""
    return path.neighbor_ip in _NO_ADDRESS


def nlri_key(path: api.Path) -> Optional[tuple]:
    """The identity of an EVPN type-2/3 NLRI (None for other routes)."""
    if path.nlri.Is(attr.EVPNMACIPAdvertisementRoute.DESCRIPTOR):
        n = attr.EVPNMACIPAdvertisementRoute()
        path.nlri.Unpack(n)
        return (2, _rd_text(n.rd), n.ethernet_tag, n.mac_address.lower(),
                _address(n.ip_address), path.identifier)
    if path.nlri.Is(attr.EVPNInclusiveMulticastEthernetTagRoute.DESCRIPTOR):
        n = attr.EVPNInclusiveMulticastEthernetTagRoute()
        path.nlri.Unpack(n)
        return (3, _rd_text(n.rd), n.ethernet_tag, _address(n.ip_address), path.identifier)
    return None


def decode(path: api.Path, asn: int) -> Optional[Received]:
    """Decode a type-2/3 path; None for other routes, RouteError when malformed.

    The VNI is the label (type-2: first label; type-3: the PMSI tunnel's), and
    must come with the route target asn:VNI.
    """
    key = nlri_key(path)
    if key is None:
        return None
    nexthop = None
    route_targets = set()
    pmsi = None
    for packed in path.pattrs:
        if packed.Is(attr.NextHopAttribute.DESCRIPTOR):
            msg = attr.NextHopAttribute()
            packed.Unpack(msg)
            nexthop = _address(msg.next_hop)
        elif packed.Is(attr.MpReachNLRIAttribute.DESCRIPTOR):
            msg = attr.MpReachNLRIAttribute()
            packed.Unpack(msg)
            if msg.next_hops:
                nexthop = _address(msg.next_hops[0])
        elif packed.Is(attr.ExtendedCommunitiesAttribute.DESCRIPTOR):
            msg = attr.ExtendedCommunitiesAttribute()
            packed.Unpack(msg)
            for community in msg.communities:
                if community.Is(attr.TwoOctetAsSpecificExtended.DESCRIPTOR):
                    rt = attr.TwoOctetAsSpecificExtended()
                    community.Unpack(rt)
                    if rt.sub_type == RT_SUB_TYPE:
                        route_targets.add((rt.asn, rt.local_admin))
        elif packed.Is(attr.PmsiTunnelAttribute.DESCRIPTOR):
            pmsi = attr.PmsiTunnelAttribute()
            packed.Unpack(pmsi)

    mac = ip = None
    if key[0] == 2:
        n = attr.EVPNMACIPAdvertisementRoute()
        path.nlri.Unpack(n)
        if not n.labels:
            raise RouteError(f"type-2 {n.mac_address}: no label (VNI)")
        vni = n.labels[0]
        mac, ip, vtep = key[3], key[4], nexthop
    else:
        if pmsi is None:
            raise RouteError(f"type-3 from {key[3]}: no PMSI tunnel attribute")
        if pmsi.type != PMSI_INGRESS_REPLICATION:
            raise RouteError(f"type-3 from {key[3]}: PMSI tunnel type {pmsi.type} "
                             "is not ingress replication")
        vni = pmsi.label
        vtep = ipaddress.ip_address(pmsi.id) if len(pmsi.id) in (4, 16) else key[3]
    if not 1 <= vni <= VNI_MAX:
        raise RouteError(f"type-{key[0]} rd {key[1]}: label {vni} is not a VNI")
    if route_target(asn, vni) not in route_targets:
        have = ", ".join(f"{a}:{v}" for a, v in sorted(route_targets)) or "none"
        raise RouteError(f"type-{key[0]} rd {key[1]}: label VNI {vni} without route target "
                         f"{asn & 0xFFFF}:{vni} (has {have})")
    if vtep is None:
        raise RouteError(f"type-{key[0]} rd {key[1]}: no next hop")
    return Received(key=key, route_type=key[0], vni=vni, nexthop=nexthop, vtep=vtep, mac=mac,
                    ip=ip, rd=key[1], route_targets=frozenset(route_targets),
                    local=is_local(path))
