"""EVPN routes <-> gobgpd API messages: pure encode/decode, no I/O.

What we announce (RFC 7432 routes over VXLAN as RFC 8365 profiles them, and
as FRR originates them, so a plain FRR VTEP shares a VPC with us):

- type-2 MAC/IP advertisement: RD <vtep>:<vni>, ESI 0, ethernet tag 0, MAC,
  optional IP, label = VNI (the 24-bit label field holds the VNI);
- type-3 inclusive multicast: RD <vtep>:<vni>, ethernet tag 0, originating
  IP = vtep, PMSI tunnel = ingress replication, label = VNI, id = vtep;
- all: origin, next hop = vtep, route target <asn>:<vni> (two-octet-AS
  type with the low 16 bits of the ASN, FRR's auto-derived RT), and the
  VXLAN encapsulation extended community.

Symmetric IRB (RFC 9135, as FRR does it), for a routed subnet whose VPC has
an L3VNI:

- a type-2 MAC/IP route of an address in the subnet carries two labels,
  [VNI, L3VNI], the route targets <asn>:<vni> and <asn>:<l3vni>, and the
  router MAC extended community (the MAC of this node's L3VNI device: the
  inner destination MAC of routed packets sent to us);
- type-5 IP prefix (RFC 9136, interface-less model): RD <vtep>:<l3vni>,
  ESI 0, ethernet tag 0, the prefix (network address and length), gateway
  address 0 (no overlay index), label = L3VNI, route target <asn>:<l3vni>,
  the VXLAN encapsulation and the router MAC. IPv4 and IPv6 prefixes (the
  next hop stays the IPv4 VTEP).

An RD of the IP type has only 16 bits for the assigned number: VNIs above
65535 get a two-octet-AS RD <asn>:<vni> instead (still unique per VNI; type-3
NLRIs still differ per VTEP through the originating IP).

Received routes are accepted only when their label VNI has the matching route
target, as FRR imports by RT. A type-2 route's second label is its L3VNI only
with the route target <asn>:<l3vni>, a router MAC and an IP; otherwise the
route is still a plain L2 route. A type-5 route needs its route target, a
router MAC and a next hop; a gateway address other than 0 (an overlay index)
is accepted and ignored: the route is used as if its gateway were 0.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Optional, Union

from google.protobuf.any_pb2 import Any as AnyMsg
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from vpcni.core.models import (MAC_PATTERN, VNI_MAX, IPAddress, IPNetwork, Mac, RemoteEndpoint,
                               RoutedHost, RoutedPrefix)

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
_MAC = re.compile(MAC_PATTERN)
# How gobgpd renders an absent address (Go's nil net.IP).
_NO_ADDRESS = ("", "<nil>")

IPv4 = ipaddress.IPv4Address
AnyIP = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
AnyNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


class RouteError(ValueError):
    """A path that is not a valid EVPN route for us; the message says why."""


class LocalRoute(BaseModel):
    """A route this node originates.

    - type-2 (vni, mac, ip or None): MAC/IP advertisement; with an `l3vni` and
      its `rmac` (symmetric IRB, only with an ip) it also carries the L3VNI;
    - type-3 (vni): inclusive multicast;
    - type-5 (vni, prefix, rmac): IP prefix; `vni` is the L3VNI (`l3vni` unset).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    vni: int = Field(ge=1, le=VNI_MAX)
    mac: Optional[Mac] = None
    ip: Optional[IPAddress] = None
    l3vni: Optional[int] = Field(default=None, ge=1, le=VNI_MAX)
    rmac: Optional[Mac] = None
    prefix: Optional[IPNetwork] = None

    @field_validator("mac", "rmac")
    @classmethod
    def _lower(cls, v: Optional[str]) -> Optional[str]:
        return v.lower() if v is not None else None

    @field_validator("prefix", mode="before")
    @classmethod
    def _network(cls, v):
        # 10.1.0.5/24 means its network, 10.1.0.0/24.
        return ipaddress.ip_network(v, strict=False) if isinstance(v, str) else v

    @model_validator(mode="after")
    def _consistent(self) -> "LocalRoute":
        if self.prefix is not None:
            if self.mac is not None or self.ip is not None:
                raise ValueError("a type-5 route (prefix) has no 'mac' or 'ip'")
            if self.l3vni is not None:
                raise ValueError("a type-5 route's 'vni' is its L3VNI: leave 'l3vni' unset")
            if self.rmac is None:
                raise ValueError("a type-5 route (prefix) needs the router MAC 'rmac'")
            return self
        if self.ip is not None and self.mac is None:
            raise ValueError("an IP is announced with its MAC (type-2): set 'mac'")
        if self.l3vni is not None:
            if self.ip is None:
                raise ValueError("an L3VNI is announced with an IP (type-2 MAC/IP): set 'ip'")
            if self.rmac is None:
                raise ValueError("an L3VNI is announced with the router MAC: set 'rmac'")
        elif self.rmac is not None:
            raise ValueError("a router MAC goes with an 'l3vni' (type-2) or a 'prefix' (type-5)")
        return self

    @classmethod
    def mac_ip(cls, vni: int, mac: str, ip: Optional[Union[str, AnyIP]] = None,
               l3vni: Optional[int] = None, rmac: Optional[str] = None) -> "LocalRoute":
        """Type-2 MAC/IP advertisement (MAC only when `ip` is None); with
        `l3vni` and `rmac` the host is also routed over the L3VNI (symmetric IRB)."""
        return cls(vni=vni, mac=mac, ip=ip, l3vni=l3vni, rmac=rmac)

    @classmethod
    def inclusive_multicast(cls, vni: int) -> "LocalRoute":
        """Type-3: this node takes part in `vni` (its flood list entry elsewhere)."""
        return cls(vni=vni)

    @classmethod
    def ip_prefix(cls, l3vni: int, prefix: Union[str, AnyNetwork], rmac: str) -> "LocalRoute":
        """Type-5: `prefix` is reached through this node over `l3vni`."""
        return cls(vni=l3vni, prefix=prefix, rmac=rmac)

    @property
    def route_type(self) -> int:
        if self.prefix is not None:
            return 5
        return 3 if self.mac is None else 2

    @property
    def nlri_identity(self) -> tuple:
        """What the route's NLRI is made of, from one VTEP: two routes that
        differ only in attributes (l3vni, rmac) are the same BGP route."""
        return (self.route_type, self.vni, self.mac, self.ip, self.prefix)

    def __str__(self) -> str:
        if self.prefix is not None:
            return f"type-5 l3vni {self.vni} {self.prefix} rmac {self.rmac}"
        if self.mac is None:
            return f"type-3 vni {self.vni}"
        return (f"type-2 vni {self.vni} {self.mac}" + (f" {self.ip}" if self.ip else "")
                + (f" l3vni {self.l3vni} rmac {self.rmac}" if self.l3vni is not None else ""))


@dataclass(frozen=True)
class Received:
    """One decoded EVPN path, as a received route or one of gobgpd's local ones."""

    key: tuple        # the NLRI's identity: what a withdraw of this route names
    route_type: int   # 2, 3 or 5
    vni: int          # type-2/3: the (L2) VNI; type-5: the L3VNI
    nexthop: Optional[AnyIP]
    vtep: Optional[AnyIP]  # type-2/5: next hop; type-3: PMSI tunnel id (ingress replication)
    mac: Optional[str] = None
    ip: Optional[AnyIP] = None
    rd: str = ""
    route_targets: frozenset = frozenset()
    local: bool = False
    l3vni: Optional[int] = None  # type-2 only: its second label, when it is an L3VNI for us
    rmac: Optional[str] = None   # the router MAC: type-2 with an l3vni, and type-5
    prefix: Optional[AnyNetwork] = None  # type-5

    def endpoint(self) -> Optional[RemoteEndpoint]:
        if self.route_type != 2 or self.vtep is None:
            return None
        return RemoteEndpoint(mac=self.mac, ip=self.ip, vtep=self.vtep)

    def routed_host(self) -> Optional[RoutedHost]:
        """The host a type-2 route with an L3VNI stands for (None otherwise)."""
        if self.route_type != 2 or self.l3vni is None or self.vtep is None:
            return None
        return RoutedHost(ip=self.ip, vtep=self.vtep, rmac=self.rmac)

    def routed_prefix(self) -> Optional[RoutedPrefix]:
        """The prefix a type-5 route stands for (None for other routes)."""
        if self.route_type != 5 or self.vtep is None:
            return None
        return RoutedPrefix(prefix=self.prefix, vtep=self.vtep, rmac=self.rmac)

    def local_route(self) -> LocalRoute:
        return LocalRoute(vni=self.vni, mac=self.mac, ip=self.ip, l3vni=self.l3vni,
                          rmac=self.rmac, prefix=self.prefix)

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


def _route_target(asn: int, vni: int) -> AnyMsg:
    rt_asn, rt_vni = route_target(asn, vni)
    return _pack(attr.TwoOctetAsSpecificExtended(is_transitive=True, sub_type=RT_SUB_TYPE,
                                                 asn=rt_asn, local_admin=rt_vni))


def encode(route: LocalRoute, vtep: Union[str, AnyIP], asn: int) -> api.Path:
    """The gobgpd Path announcing `route` from `vtep` in `asn`."""
    vtep = _vtep(vtep)
    rd = route_distinguisher(vtep, route.vni, asn)
    if route.prefix is not None:
        nlri = attr.EVPNIPPrefixRoute(
            rd=rd, esi=ESI_ZERO, ethernet_tag=0, ip_prefix=str(route.prefix.network_address),
            ip_prefix_len=route.prefix.prefixlen,
            gw_address="0.0.0.0" if route.prefix.version == 4 else "::", label=route.vni)
    elif route.mac is None:
        nlri = attr.EVPNInclusiveMulticastEthernetTagRoute(rd=rd, ethernet_tag=0,
                                                            ip_address=str(vtep))
    else:
        labels = [route.vni] if route.l3vni is None else [route.vni, route.l3vni]
        nlri = attr.EVPNMACIPAdvertisementRoute(
            rd=rd, esi=ESI_ZERO, ethernet_tag=0, mac_address=route.mac,
            ip_address=str(route.ip) if route.ip is not None else "", labels=labels)
    communities = [_route_target(asn, route.vni)]
    if route.l3vni is not None:
        communities.append(_route_target(asn, route.l3vni))
    communities.append(_pack(attr.EncapExtended(tunnel_type=TUNNEL_TYPE_VXLAN)))
    if route.rmac is not None:
        communities.append(_pack(attr.RouterMacExtended(mac=route.rmac)))
    pattrs = [
        attr.OriginAttribute(origin=ORIGIN_INCOMPLETE),
        attr.NextHopAttribute(next_hop=str(vtep)),
        attr.ExtendedCommunitiesAttribute(communities=communities),
    ]
    if route.route_type == 3:
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


def _prefix(address: str, length: int) -> AnyNetwork:
    try:
        return ipaddress.ip_network(f"{ipaddress.ip_address(address)}/{length}")
    except ValueError as exc:
        raise RouteError(f"bad prefix {address}/{length}: {exc}") from None


def nlri_key(path: api.Path) -> Optional[tuple]:
    """The identity of an EVPN type-2/3/5 NLRI (None for other routes).

    As BGP keys them: a type-2's labels and a type-5's gateway and label are
    attributes, not part of the key. RouteError for an unreadable address or
    a prefix with host bits."""
    if path.nlri.Is(attr.EVPNMACIPAdvertisementRoute.DESCRIPTOR):
        n = attr.EVPNMACIPAdvertisementRoute()
        path.nlri.Unpack(n)
        return (2, _rd_text(n.rd), n.ethernet_tag, n.mac_address.lower(),
                _address(n.ip_address), path.identifier)
    if path.nlri.Is(attr.EVPNInclusiveMulticastEthernetTagRoute.DESCRIPTOR):
        n = attr.EVPNInclusiveMulticastEthernetTagRoute()
        path.nlri.Unpack(n)
        return (3, _rd_text(n.rd), n.ethernet_tag, _address(n.ip_address), path.identifier)
    if path.nlri.Is(attr.EVPNIPPrefixRoute.DESCRIPTOR):
        n = attr.EVPNIPPrefixRoute()
        path.nlri.Unpack(n)
        return (5, _rd_text(n.rd), n.ethernet_tag, _prefix(n.ip_prefix, n.ip_prefix_len),
                path.identifier)
    return None


def decode(path: api.Path, asn: int) -> Optional[Received]:
    """Decode a type-2/3/5 path; None for other routes, RouteError when malformed.

    The VNI is the label (type-2: first label; type-3: the PMSI tunnel's;
    type-5: the NLRI's, the L3VNI), and must come with the route target
    asn:VNI. A type-2's second label is its L3VNI when the route also has an
    IP, the route target asn:L3VNI and a router MAC; else l3vni is None (a
    plain L2 route). A type-5 needs a router MAC; its gateway address is
    ignored.
    """
    key = nlri_key(path)
    if key is None:
        return None
    nexthop = None
    route_targets = set()
    pmsi = None
    rmac = None
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
                elif community.Is(attr.RouterMacExtended.DESCRIPTOR):
                    router_mac = attr.RouterMacExtended()
                    community.Unpack(router_mac)
                    if _MAC.fullmatch(router_mac.mac):
                        rmac = router_mac.mac.lower()
        elif packed.Is(attr.PmsiTunnelAttribute.DESCRIPTOR):
            pmsi = attr.PmsiTunnelAttribute()
            packed.Unpack(pmsi)

    what = f"type-{key[0]} rd {key[1]}"
    mac = ip = l3vni = prefix = None
    if key[0] == 2:
        n = attr.EVPNMACIPAdvertisementRoute()
        path.nlri.Unpack(n)
        if not n.labels:
            raise RouteError(f"type-2 {n.mac_address}: no label (VNI)")
        vni = n.labels[0]
        mac, ip, vtep = key[3], key[4], nexthop
        # FRR sends a second label only with an L3VNI; without its RT, the
        # router MAC or an IP, the route is still a good L2 route.
        if (len(n.labels) > 1 and 1 <= n.labels[1] <= VNI_MAX and ip is not None
                and rmac is not None and route_target(asn, n.labels[1]) in route_targets):
            l3vni = n.labels[1]
        else:
            rmac = None
    elif key[0] == 5:
        n = attr.EVPNIPPrefixRoute()
        path.nlri.Unpack(n)
        vni, prefix, vtep = n.label, key[3], nexthop
        # A gateway address (an overlay index, RFC 9136 section 3.2) is not
        # used: the prefix is reached through the next hop's router MAC.
        if rmac is None:
            raise RouteError(f"{what} {prefix}: no router MAC extended community")
    else:
        rmac = None
        if pmsi is None:
            raise RouteError(f"type-3 from {key[3]}: no PMSI tunnel attribute")
        if pmsi.type != PMSI_INGRESS_REPLICATION:
            raise RouteError(f"type-3 from {key[3]}: PMSI tunnel type {pmsi.type} "
                             "is not ingress replication")
        vni = pmsi.label
        vtep = ipaddress.ip_address(pmsi.id) if len(pmsi.id) in (4, 16) else key[3]
    if not 1 <= vni <= VNI_MAX:
        raise RouteError(f"{what}: label {vni} is not a VNI")
    if route_target(asn, vni) not in route_targets:
        have = ", ".join(f"{a}:{v}" for a, v in sorted(route_targets)) or "none"
        raise RouteError(f"{what}: label VNI {vni} without route target "
                         f"{asn & 0xFFFF}:{vni} (has {have})")
    if vtep is None:
        raise RouteError(f"{what}: no next hop")
    return Received(key=key, route_type=key[0], vni=vni, nexthop=nexthop, vtep=vtep, mac=mac,
                    ip=ip, rd=key[1], route_targets=frozenset(route_targets),
                    local=is_local(path), l3vni=l3vni, rmac=rmac, prefix=prefix)
