"""The ovs backend's OpenFlow pipeline as data: desired flows from desired state.

No I/O here. A flow is kept in the shape `ovs-ofctl -O OpenFlow13 dump-flows
--no-stats --no-names` prints it (match terms as a set, actions as text), so
that what is installed and what is desired compare directly, and converging
is a diff. Every flow carries a cookie that says whose it is:

    cookie = 0x767063 ("vpc") << 40 | kind << 32 | VNI

kind 1 = base (the pipeline's skeleton, VNI 0), 2 = local (derived from the
attachment ports of the VNI and, in a routed subnet, its gateway port), 3 =
remote (derived from the VNI's EVPN remote state); for a VPC router, keyed by
its L3VNI: 4 = routed (the remote router MACs, hosts and prefixes of its EVPN
routed state), 5 = router (its L3 port), 6 = fib (the VPC's local part of the
FIB: its pods on this node and the prefixes this node's router serves). A flow
whose cookie does not carry the tag is never touched.
See docs/backends/ovs.md for the pipeline table by table.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Iterable, Optional

from vpcni.core.models import GATEWAY_MAC, IPAddress, RemoteEndpoint, router_mac

TAG = 0x767063
BASE, LOCAL, REMOTE, ROUTED, ROUTER, FIB_LOCAL = 1, 2, 3, 4, 5, 6
KINDS = {BASE: "base", LOCAL: "local", REMOTE: "remote", ROUTED: "routed", ROUTER: "router",
         FIB_LOCAL: "fib"}
OURS = (TAG << 40, 0xFFFFFF0000000000)  # (cookie, mask) of every vpcni flow

# Tables, in the order a packet crosses them.
CLASSIFY = 0        # by in_port: a pod's port sets its VNI (tun_id); the tunnel goes to TUNNEL_IN
TUNNEL_IN = 5       # from the tunnel: only VNIs present here, only from VTEPs known in them
ANTI_SPOOF = 10     # from a pod: only its own MAC and IPs (ARP included)
ARP_RESPONDER = 20  # ARP requests for known remote IPs answered on the node
L2 = 30             # per VNI: known MAC -> local port or remote VTEP
FLOOD_LOCAL = 40    # broadcast/unknown/multicast -> the VNI's local ports
FLOOD_REMOTE = 50   # ... and, from pods only, every VTEP of the VNI's flood list
L3 = 60             # per L3VNI (routed subnets): router MAC -> the local router or a remote VTEP
FIB = 70            # per VPC (metadata = L3VNI): pods' routed IPv4 -> a local pod or a remote router
SLOW_PATH = 75      # per routed VNI: what the FIB does not route -> the subnet's gateway port

# FIB priorities: the TTL guard, local pods, remote hosts (type-2), then prefixes by
# length (longest first; a prefix this node's router serves above a remote one).
FIB_TTL, FIB_POD, FIB_HOST = 400, 300, 200


def prefix_priority(prefixlen: int, local: bool) -> int:
    return 100 + 2 * prefixlen + (1 if local else 0)


def cookie(kind: int, vni: int = 0) -> int:
    return (TAG << 40) | (kind << 32) | vni


def cookie_scope(value: int) -> Optional[tuple[int, int]]:
    """(kind, vni) of one of our cookies, else None."""
    if value >> 40 != TAG:
        return None
    return (value >> 32) & 0xFF, value & 0xFFFFFFFF


@dataclass(frozen=True)
class Flow:
    cookie: int
    table: int
    priority: int
    match: frozenset[str]
    actions: str

    @property
    def key(self) -> tuple[int, int, frozenset[str]]:
        return (self.table, self.priority, self.match)

    def _head(self) -> str:
        terms = ",".join(sorted(self.match))
        return f"table={self.table},priority={self.priority}" + (f",{terms}" if terms else "")

    def add(self) -> str:
        """This flow as a line of `ovs-ofctl add-flows` input."""
        return f"add cookie={self.cookie:#x},{self._head()} actions={self.actions}"

    def delete(self) -> str:
        """A line deleting exactly this flow, and only if it still carries our cookie."""
        return f"delete_strict cookie={self.cookie:#x}/-1,{self._head()}"

    def __str__(self) -> str:
        return f"cookie={self.cookie:#x}, {self._head()} actions={self.actions}"


def flow(kind: int, vni: int, table: int, priority: int, match: Iterable[str],
         actions: str) -> Flow:
    return Flow(cookie(kind, vni), table, priority, frozenset(match), actions)


def parse_dump(text: str) -> set[Flow]:
    """The flows of `ovs-ofctl -O OpenFlow13 dump-flows --no-stats --no-names` output."""
    flows = set()
    for line in text.splitlines():
        if " actions=" not in line:
            continue
        head, actions = line.strip().split(" actions=", 1)
        fields = {"cookie": "0", "table": "0", "priority": "32768"}
        match = set()
        for term in head.replace(" ", "").split(","):
            name, _, value = term.partition("=")
            if name in fields:
                fields[name] = value
            elif term:
                match.add(term)
        flows.add(Flow(int(fields["cookie"], 0), int(fields["table"]),
                       int(fields["priority"]), frozenset(match), actions))
    return flows


def changes(current: set[Flow], desired: set[Flow]) -> list[str]:
    """add-flows lines that turn `current` into `desired` (both of one scope)."""
    keys = {f.key for f in desired}
    adds = [f.add() for f in sorted(desired - current, key=str)]
    deletes = [f.delete() for f in sorted(current, key=str) if f.key not in keys]
    return adds + deletes


# ---------------------------------------------------------------- desired state


@dataclass(frozen=True)
class LocalPort:
    """An attachment's port on the integration bridge, as the flows need it."""

    name: str
    ofport: int
    mac: str
    ips: tuple[IPAddress, ...]


def base_flows(tunnel_ofports: Iterable[int]) -> set[Flow]:
    """The skeleton: what every table does with what no other flow matches."""
    flows = {
        flow(BASE, 0, CLASSIFY, 0, (), "drop"),
        flow(BASE, 0, TUNNEL_IN, 0, (), "drop"),
        flow(BASE, 0, ANTI_SPOOF, 0, (), "drop"),
        flow(BASE, 0, ARP_RESPONDER, 0, (), f"goto_table:{L2}"),
        flow(BASE, 0, L2, 0, (), f"goto_table:{FLOOD_LOCAL}"),
        flow(BASE, 0, FLOOD_LOCAL, 0, (), "drop"),
        flow(BASE, 0, FLOOD_REMOTE, 0, (), "drop"),
        flow(BASE, 0, L3, 0, (), "drop"),
        # What the FIB does not route goes to the router namespace (slow path).
        flow(BASE, 0, FIB, 0, (), f"goto_table:{SLOW_PATH}"),
        flow(BASE, 0, SLOW_PATH, 0, (), "drop"),
    }
    for ofport in tunnel_ofports:
        flows.add(flow(BASE, 0, CLASSIFY, 100, (f"in_port={ofport}",), f"goto_table:{TUNNEL_IN}"))
    return flows


def tun_id(vni: int) -> str:
    return f"tun_id={vni:#x}"


def port_flows(vni: int, port: LocalPort) -> set[Flow]:
    """The flows one attachment owns (its VNI's flood flows also name its port)."""
    mac = port.mac.lower()
    src = (f"in_port={port.ofport}", f"dl_src={mac}")
    flows = {
        flow(LOCAL, vni, CLASSIFY, 100, (f"in_port={port.ofport}",),
             f"set_field:{vni:#x}->tun_id,goto_table:{ANTI_SPOOF}"),
        # Higher than remote MACs: a MAC reflected back from EVPN stays local.
        flow(LOCAL, vni, L2, 110, (tun_id(vni), f"dl_dst={mac}"), f"output:{port.ofport}"),
    }
    v4 = [ip for ip in port.ips if ip.version == 4]
    v6 = [ip for ip in port.ips if ip.version == 6]
    for ip in v4:
        flows.add(flow(LOCAL, vni, ANTI_SPOOF, 100, (*src, "ip", f"nw_src={ip}"),
                       f"goto_table:{L2}"))
        flows.add(flow(LOCAL, vni, ANTI_SPOOF, 100,
                       (*src, "arp", f"arp_spa={ip}", f"arp_sha={mac}"),
                       f"goto_table:{ARP_RESPONDER}"))
    if v6:
        # Link-local and the unspecified address (DAD) are how IPv6 starts.
        for ip in [*v6, "fe80::/10", "::"]:
            flows.add(flow(LOCAL, vni, ANTI_SPOOF, 100, (*src, "ipv6", f"ipv6_src={ip}"),
                           f"goto_table:{L2}"))
    if not port.ips:
        # No address recorded (L2-only attachment): its MAC is all there is to check.
        flows.add(flow(LOCAL, vni, ANTI_SPOOF, 90, src, f"goto_table:{ARP_RESPONDER}"))
    return flows


@dataclass(frozen=True)
class Gateway:
    """A routed subnet's gateway port (the node end of gw<VNI>) and what the FIB needs of
    it: its VPC (L3VNI), the gateway address in its subnet, and the destinations of the
    VPC's static routes through a next hop in the subnet (the router's, slow path).
    Without `l3vni`/`address` (a port recorded without them) only the slow path."""

    ofport: int
    l3vni: Optional[int] = None
    address: Optional[ipaddress.IPv4Interface] = None
    statics: tuple[ipaddress.IPv4Network, ...] = ()

    @property
    def routed(self) -> bool:
        return self.l3vni is not None and self.address is not None


def gateway_flows(vni: int, gateway: "Gateway | int", tunnel_ofport: int) -> set[Flow]:
    """The flows of a routed subnet's gateway port (its router end has GATEWAY_MAC): the
    router is vpcni's own (no anti-spoofing), and it serves this node only. With the
    subnet's routing known, pods' ARP for the gateway is answered by a flow and their
    routed IPv4 goes to the FIB (table FIB), whose misses come back here (SLOW_PATH)."""
    gw = gateway if isinstance(gateway, Gateway) else Gateway(gateway)
    flows = {
        # Its ARP requests may be answered here for remote IPs (a host the routed state
        # has no route for: reached through the VNI, asymmetrically).
        flow(LOCAL, vni, CLASSIFY, 100, (f"in_port={gw.ofport}",),
             f"set_field:{vni:#x}->tun_id,goto_table:{ARP_RESPONDER}"),
        # Above every MAC a pod or a remote route could claim.
        flow(LOCAL, vni, L2, 120, (tun_id(vni), f"dl_dst={GATEWAY_MAC}"),
             f"output:{gw.ofport}"),
        # Every node has a gateway of its own (the same MAC): one that comes through
        # the tunnel is not for this node's.
        flow(LOCAL, vni, L2, 130, (tun_id(vni), f"in_port={tunnel_ofport}",
                                   f"dl_dst={GATEWAY_MAC}"), "drop"),
    }
    if gw.routed:
        ip = gw.address.ip
        flows |= {
            # The anycast gateway's ARP answered on the node (pods' requests only: they
            # come here through anti-spoofing; the gateway's own never ask for it).
            flow(LOCAL, vni, ARP_RESPONDER, 110,
                 ("arp", tun_id(vni), f"arp_tpa={ip}", "arp_op=1"),
                 _arp_reply(GATEWAY_MAC, ip)),
            # Pods' IPv4 to the gateway MAC: routed by the VPC's FIB (metadata = L3VNI).
            flow(LOCAL, vni, L2, 125, ("ip", tun_id(vni), f"dl_dst={GATEWAY_MAC}"),
                 f"write_metadata:{gw.l3vni:#x},goto_table:{FIB}"),
            # ... and what it does not route, unchanged to the router (TTL untouched:
            # the router decrements it once).
            flow(LOCAL, vni, SLOW_PATH, 100, (tun_id(vni),), f"output:{gw.ofport}"),
        }
    return flows


def local_flows(vni: int, ports: list[LocalPort], tunnel_ofport: int,
                gateway: "Gateway | int | None" = None) -> set[Flow]:
    """Everything the VNI's local ports need: theirs plus the local flooding; with
    `gateway` (a routed subnet: a Gateway, or its ofport alone) also the gateway's,
    which floods locally only and is never flooded to from the tunnel."""
    gateway_ofport = gateway.ofport if isinstance(gateway, Gateway) else gateway
    flows: set[Flow] = set()
    for port in ports:
        flows |= port_flows(vni, port)
    pods = ",".join(f"output:{p.ofport}" for p in sorted(ports, key=lambda p: p.ofport))
    if ports:
        # From the tunnel: local ports only (split horizon, VTEPs flood themselves).
        flows.add(flow(LOCAL, vni, FLOOD_LOCAL, 110, (tun_id(vni), f"in_port={tunnel_ofport}"),
                       pods))
        out = ",".join(f"output:{o}" for o in sorted(
            [p.ofport for p in ports] + ([gateway_ofport] if gateway_ofport else [])))
        flows.add(flow(LOCAL, vni, FLOOD_LOCAL, 100, (tun_id(vni),),
                       f"{out},goto_table:{FLOOD_REMOTE}"))
    if gateway_ofport:
        flows |= gateway_flows(vni, gateway, tunnel_ofport)
        # From the gateway: this node's pods only, never the remote VTEPs.
        flows.add(flow(LOCAL, vni, FLOOD_LOCAL, 110, (tun_id(vni), f"in_port={gateway_ofport}"),
                       pods or "drop"))
    return flows


def _arp_reply(mac: str, ip: ipaddress.IPv4Address) -> str:
    """Turn the ARP request into the reply `ip is-at mac` and send it back where it came from."""
    return ("move:NXM_OF_ETH_SRC[]->NXM_OF_ETH_DST[],"
            f"set_field:{mac}->eth_src,"
            "set_field:2->arp_op,"
            "move:NXM_NX_ARP_SHA[]->NXM_NX_ARP_THA[],"
            "move:NXM_OF_ARP_SPA[]->NXM_OF_ARP_TPA[],"
            f"set_field:{mac}->arp_sha,"
            f"set_field:{ip}->arp_spa,"
            "IN_PORT")


def remote_flows(vni: int, endpoints: list[RemoteEndpoint], flood: Iterable[IPAddress],
                 tunnel_ofport: int) -> set[Flow]:
    """The VNI's remote MACs, ARP answers, accepted VTEPs and flood list."""
    flows: set[Flow] = set()
    by_mac = {ep.mac.lower(): ep for ep in endpoints}  # a MAC lives behind one VTEP
    for mac, ep in by_mac.items():
        flows.add(flow(REMOTE, vni, L2, 100, (tun_id(vni), f"dl_dst={mac}"),
                       f"set_field:{ep.vtep}->tun_dst,output:{tunnel_ofport}"))
    for ep in endpoints:
        if ep.ip is not None and ep.ip.version == 4:
            flows.add(flow(REMOTE, vni, ARP_RESPONDER, 100,
                           ("arp", tun_id(vni), f"arp_tpa={ep.ip}", "arp_op=1"),
                           _arp_reply(ep.mac.lower(), ep.ip)))
    flood = sorted(set(flood), key=lambda a: (a.version, a))
    vteps = sorted({*flood, *(ep.vtep for ep in endpoints)}, key=lambda a: (a.version, a))
    for vtep in vteps:
        src = "tun_src" if vtep.version == 4 else "tun_ipv6_src"
        flows.add(flow(REMOTE, vni, TUNNEL_IN, 100, (tun_id(vni), f"{src}={vtep}"),
                       f"goto_table:{L2}"))
    if flood:
        out = ",".join(f"set_field:{vtep}->{'tun_dst' if vtep.version == 4 else 'tun_ipv6_dst'},"
                       f"output:{tunnel_ofport}" for vtep in flood)
        flows.add(flow(REMOTE, vni, FLOOD_REMOTE, 100, (tun_id(vni),), out))
    return flows


# ---------------------------------------------------------------- routed subnets


def router_flows(l3vni: int, l3_ofport: int, rmac: str) -> set[Flow]:
    """The VPC router's L3 port (the node end of its veth; the router's end has this
    node's router MAC): what it sends carries the L3VNI, what comes through the
    tunnel with the L3VNI and this node's router MAC goes to it."""
    return {
        flow(ROUTER, l3vni, CLASSIFY, 100, (f"in_port={l3_ofport}",),
             f"set_field:{l3vni:#x}->tun_id,goto_table:{L3}"),
        flow(ROUTER, l3vni, L3, 110, (tun_id(l3vni), f"dl_dst={rmac.lower()}"),
             f"output:{l3_ofport}"),
    }


def routed_flows(l3vni: int, nexthops: dict[str, IPAddress], tunnel_ofport: int) -> set[Flow]:
    """The L3VNI's remote routers (router MAC -> VTEP, from the EVPN routed state):
    frames to a remote router MAC go to its VTEP; the L3VNI is accepted from these
    VTEPs only."""
    flows: set[Flow] = set()
    for rmac, vtep in nexthops.items():
        dst = "tun_dst" if vtep.version == 4 else "tun_ipv6_dst"
        flows.add(flow(ROUTED, l3vni, L3, 100, (tun_id(l3vni), f"dl_dst={rmac.lower()}"),
                       f"set_field:{vtep}->{dst},output:{tunnel_ofport}"))
    for vtep in set(nexthops.values()):
        src = "tun_src" if vtep.version == 4 else "tun_ipv6_src"
        flows.add(flow(ROUTED, l3vni, TUNNEL_IN, 100, (tun_id(l3vni), f"{src}={vtep}"),
                       f"goto_table:{L3}"))
    return flows


# ---------------------------------------------------------------- the VPC's FIB
#
# East-west routing in flows (symmetric IRB as the routers do it, one routed hop per
# node): a pod's IPv4 to the gateway MAC enters FIB with the VPC's L3VNI in metadata;
# IPv4 from the tunnel with the L3VNI and this node's router MAC is looked up in L3.
# Each routed hop is `dec_ttl` and a MAC rewrite. What the FIB does not match goes to
# the router namespace unchanged (slow path: egress, ICMP errors, unknown hosts).


def _nw_dst(net: ipaddress.IPv4Network) -> tuple[str, ...]:
    """A destination prefix as OVS prints it (a /32 without its length, /0 as nothing)."""
    if net.prefixlen == 0:
        return ()
    return (f"nw_dst={net.network_address if net.prefixlen == 32 else net}",)


def _to_pod(port: LocalPort) -> str:
    return (f"dec_ttl,set_field:{GATEWAY_MAC}->eth_src,set_field:{port.mac.lower()}->eth_dst,"
            f"output:{port.ofport}")


def fib_local_flows(l3vni: int, rmac: str, l3_ofport: Optional[int],
                    gateways: Iterable[Gateway], pods: Iterable[LocalPort]) -> set[Flow]:
    """The VPC's FIB for what is on this node (kind fib of the L3VNI): `pods` (the local
    ports of every routed subnet of the VPC here) routed to directly, from local pods
    and from the tunnel (this node's router MAC `rmac`); the subnets and static-route
    destinations of this node's router (`gateways`) left to the router, above the
    remote prefixes of the same length. TTL 0 and 1 are never routed by flows: the
    router sends the ICMP time exceeded."""
    rmac = rmac.lower()
    meta = f"metadata={l3vni:#x}"
    slow = f"goto_table:{SLOW_PATH}"
    flows = {flow(FIB_LOCAL, l3vni, FIB, FIB_TTL, ("ip", meta, f"nw_ttl={ttl}"), slow)
             for ttl in (0, 1)}
    from_tunnel = ("ip", tun_id(l3vni), f"dl_dst={rmac}")
    if l3_ofport:
        flows |= {flow(FIB_LOCAL, l3vni, L3, 130, (*from_tunnel, f"nw_ttl={ttl}"),
                       f"output:{l3_ofport}") for ttl in (0, 1)}
    for port in pods:
        for ip in port.ips:
            if ip.version != 4:
                continue
            flows.add(flow(FIB_LOCAL, l3vni, FIB, FIB_POD, ("ip", meta, f"nw_dst={ip}"),
                           _to_pod(port)))
            flows.add(flow(FIB_LOCAL, l3vni, L3, 120, (*from_tunnel, f"nw_dst={ip}"),
                           _to_pod(port)))
    for gw in gateways:
        if not gw.routed:
            continue
        for net in (gw.address.network, *gw.statics):
            flows.add(flow(FIB_LOCAL, l3vni, FIB, prefix_priority(net.prefixlen, local=True),
                           ("ip", meta, *_nw_dst(net)), slow))
    return flows


def fib_remote_flows(l3vni: int, state, local_vtep: IPAddress,
                     tunnel_ofport: int) -> set[Flow]:
    """The VPC's FIB for its EVPN routed state (kind routed of the L3VNI): a remote host
    (type-2 with the L3VNI) or prefix (type-5) goes to its VTEP's router, one routed hop
    here (dec_ttl, this node's router MAC to the remote one, the L3VNI). A prefix that
    several VTEPs announce goes to the lowest VTEP (no ECMP in flows; the router's
    route is ECMP). IPv4 only, as the router; this node's own routes are not remote."""
    own = router_mac(local_vtep)
    meta = f"metadata={l3vni:#x}"

    def encap(vtep, rmac: str) -> str:
        dst = "tun_dst" if vtep.version == 4 else "tun_ipv6_dst"
        return (f"dec_ttl,set_field:{own}->eth_src,set_field:{rmac.lower()}->eth_dst,"
                f"set_field:{l3vni:#x}->tun_id,set_field:{vtep}->{dst},output:{tunnel_ofport}")

    flows: set[Flow] = set()
    hosts = {h.ip: h for h in state.hosts if h.vtep != local_vtep and h.ip.version == 4}
    for ip, host in hosts.items():
        flows.add(flow(ROUTED, l3vni, FIB, FIB_HOST, ("ip", meta, f"nw_dst={ip}"),
                       encap(host.vtep, host.rmac)))
    prefixes: dict = {}
    for p in state.prefixes:
        if p.vtep != local_vtep and p.prefix.version == 4:
            prefixes.setdefault(p.prefix, []).append(p)
    for prefix, announced in prefixes.items():
        first = min(announced, key=lambda p: (p.vtep.version, p.vtep))
        flows.add(flow(ROUTED, l3vni, FIB, prefix_priority(prefix.prefixlen, local=False),
                       ("ip", meta, *_nw_dst(prefix)), encap(first.vtep, first.rmac)))
    return flows
