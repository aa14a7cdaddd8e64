"""Configs of the BGP daemons vpcni runs or expects: gobgpd (node speaker, reflector), FRR.

Pure functions returning the file's text. Every session is iBGP in one AS,
address family l2vpn-evpn only, with short timers (keepalive 3 s, hold 9 s)
so that a dead peer's routes go within seconds.
"""

from __future__ import annotations

import ipaddress
import json
import re
from typing import Optional, Sequence, Union

Address = Union[str, ipaddress.IPv4Address, ipaddress.IPv6Address]

KEEPALIVE = 3
HOLD = 9
CONNECT_RETRY = 2
# BGP graceful restart (RFC 4724, with RFC 8538's notification support so a
# SIGTERM'd gobgpd restarts gracefully too), for l2vpn-evpn, one way only: a
# node's gobgpd advertises it, so gobgpd reflectors keep the node's routes for
# NODE_RESTART_TIME while its gobgpd restarts (a sidecar is back in seconds; a
# dead node's pods must not be announced for long). Reflectors are helpers only
# and advertise no family: gobgpd 3.10 dereferences a nil pointer
# (TableManager.handleMacMobility) when it marks a peer's EVPN paths stale
# while it originates MAC/IP routes itself, i.e. on every node (tested; a
# reflector originates none, so helping is safe there). When reflectors go,
# the agent's own hold keeps the learned entries instead (agent/server.py),
# for FRR reflectors too (FRR 8.4 has no graceful restart for l2vpn-evpn).
NODE_RESTART_TIME = 60
_HOSTNAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.\-]{0,62}$")


def _ip(value: Address, what: str) -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise ValueError(f"{what}: {value!r} is not an IP address") from None


def _router_id(value: Address, what: str = "router-id") -> str:
    addr = _ip(value, what)
    if ipaddress.ip_address(addr).version != 4:
        raise ValueError(f"{what}: {addr} must be IPv4 (a BGP identifier is 32 bits)")
    return addr


def _prefix(value: str, what: str) -> str:
    try:
        return str(ipaddress.ip_network(value, strict=False))
    except ValueError:
        raise ValueError(f"{what}: {value!r} is not a prefix") from None


def _asn(asn: int) -> int:
    if not 1 <= asn <= 4294967294:
        raise ValueError(f"asn: {asn} is out of range 1..4294967294")
    return asn


def _reflectors(reflectors: Sequence[Address]) -> list[str]:
    out = list(dict.fromkeys(_ip(r, "reflector") for r in reflectors))
    if not out:
        raise ValueError("reflectors: at least one route reflector address is needed")
    return out


def _reflector(router_id: Address, asn: int, vtep_prefix: str,
               cluster_id: Optional[Address]) -> tuple[str, int, str, str]:
    """Checked router-id, ASN, cluster-id (default: the router-id) and client prefix."""
    router_id = _router_id(router_id)
    return (router_id, _asn(asn), _router_id(cluster_id or router_id, "cluster-id"),
            _prefix(vtep_prefix, "vtep_prefix"))


def _toml_str(value: str) -> str:
    return json.dumps(value)  # a TOML basic string for these ASCII values


def _graceful_restart(table: str, restart_time: int, helper_only: bool) -> list[str]:
    return [f"  [{table}.graceful-restart.config]",
            "    enabled = true",
            f"    restart-time = {restart_time}",
            "    notification-enabled = true",
            *(["    helper-only = true"] if helper_only else [])]


def _evpn_afi_safi(table: str, graceful: bool) -> list[str]:
    return [f"  [[{table}.afi-safis]]",
            f"    [{table}.afi-safis.config]",
            '      afi-safi-name = "l2vpn-evpn"',
            *([f"    [{table}.afi-safis.mp-graceful-restart.config]",
               "      enabled = true"] if graceful else [])]


def gobgpd_node_toml(vtep: Address, asn: int, reflectors: Sequence[Address]) -> str:
    """A node's gobgpd: router-id = VTEP, one iBGP l2vpn-evpn session per reflector,
    with graceful restart (run it with -r when it restarts).

    It does not listen (port -1): the node only connects out to reflectors.
    """
    vtep, asn = _router_id(vtep, "vtep"), _asn(asn)
    lines = ["[global.config]", f"  as = {asn}", f"  router-id = {_toml_str(vtep)}",
             "  port = -1"]
    for rr in _reflectors(reflectors):
        lines += [
            "",
            "[[neighbors]]",
            "  [neighbors.config]",
            f"    neighbor-address = {_toml_str(rr)}",
            f"    peer-as = {asn}",
            "  [neighbors.timers.config]",
            f"    connect-retry = {CONNECT_RETRY}",
            f"    hold-time = {HOLD}",
            f"    keepalive-interval = {KEEPALIVE}",
            "  [neighbors.transport.config]",
            f"    local-address = {_toml_str(vtep)}",
            *_graceful_restart("neighbors", NODE_RESTART_TIME, helper_only=False),
            *_evpn_afi_safi("neighbors", graceful=True),
        ]
    return "\n".join(lines) + "\n"


def gobgpd_reflector_toml(router_id: Address, asn: int, vtep_prefix: str,
                          cluster_id: Optional[Address] = None) -> str:
    """A gobgpd route reflector accepting every VTEP of `vtep_prefix` as a client."""
    router_id, asn, cluster, prefix = _reflector(router_id, asn, vtep_prefix, cluster_id)
    return "\n".join([
        "[global.config]",
        f"  as = {asn}",
        f"  router-id = {_toml_str(router_id)}",
        "",
        "[[peer-groups]]",
        "  [peer-groups.config]",
        '    peer-group-name = "vtep"',
        f"    peer-as = {asn}",
        "  [peer-groups.timers.config]",
        f"    hold-time = {HOLD}",
        f"    keepalive-interval = {KEEPALIVE}",
        "  [peer-groups.route-reflector.config]",
        "    route-reflector-client = true",
        f"    route-reflector-cluster-id = {_toml_str(cluster)}",
        *_graceful_restart("peer-groups", NODE_RESTART_TIME, helper_only=True),
        *_evpn_afi_safi("peer-groups", graceful=False),
        "",
        "[[dynamic-neighbors]]",
        "  [dynamic-neighbors.config]",
        f"    prefix = {_toml_str(prefix)}",
        '    peer-group = "vtep"',
    ]) + "\n"


def frr_reflector_bgpd(router_id: Address, asn: int, vtep_prefix: str,
                       cluster_id: Optional[Address] = None) -> str:
    """FRR bgpd.conf of a route reflector for every VTEP of `vtep_prefix` (l2vpn evpn only)."""
    router_id, asn, cluster, prefix = _reflector(router_id, asn, vtep_prefix, cluster_id)
    return "\n".join([
        f"router bgp {asn}",
        f" bgp router-id {router_id}",
        f" bgp cluster-id {cluster}",
        " no bgp default ipv4-unicast",
        " neighbor VTEP peer-group",
        f" neighbor VTEP remote-as {asn}",
        f" neighbor VTEP timers {KEEPALIVE} {HOLD}",
        f" bgp listen range {prefix} peer-group VTEP",
        " address-family l2vpn evpn",
        "  neighbor VTEP activate",
        "  neighbor VTEP route-reflector-client",
        " exit-address-family",
    ]) + "\n"


def frr_vtep_bgpd(router_id: Address, asn: int, reflectors: Sequence[Address]) -> str:
    """FRR bgpd.conf of a plain VTEP (the seed's deployment): every local VNI advertised."""
    router_id, asn = _router_id(router_id), _asn(asn)
    lines = [f"router bgp {asn}", f" bgp router-id {router_id}", " no bgp default ipv4-unicast"]
    peers = _reflectors(reflectors)
    for rr in peers:
        lines += [f" neighbor {rr} remote-as {asn}", f" neighbor {rr} timers {KEEPALIVE} {HOLD}",
                  f" neighbor {rr} timers connect 1"]
    lines.append(" address-family l2vpn evpn")
    lines += [f"  neighbor {rr} activate" for rr in peers]
    lines += ["  advertise-all-vni", " exit-address-family"]
    return "\n".join(lines) + "\n"


def frr_zebra(hostname: str) -> str:
    """zebra.conf: zebra needs nothing but a hostname here."""
    if not _HOSTNAME.match(hostname):
        raise ValueError(f"hostname: {hostname!r} is not a valid host name")
    return f"hostname {hostname}\n"
