"""The pod end of an attachment: configure and read back one interface inside
a container network namespace, through pyroute2.

Backend-neutral: whatever put the interface into the namespace (a veth peer,
an SR-IOV VF, an OVS internal port), the addresses, routes, MTU and MAC are
set the same way, and CHECK reads them back the same way. The namespace is
opened by path with its own netlink socket; the calling thread never enters it.
"""

from __future__ import annotations

import array
import errno
import hashlib
import logging
import fcntl
import ipaddress
import os
import socket
import struct
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional

from pyroute2.netlink import NETLINK_ROUTE
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl.ifaddrmsg import IFA_F_NODAD

from vpcni.core.errors import BackendError, InvalidEnvironment

from .rtnl import Rtnl, socket_in
from vpcni.core.models import Attachment, IPInterface, IPConfig, Route

LOG = logging.getLogger(__name__)
IFF_UP = 0x1
RT_TABLE_MAIN = 254
IN6_ADDR_GEN_MODE_NONE = 1
ATTACHMENT_ALIAS = "vpcni:att="
# The link group (IFLA_GROUP) of every link vpcni creates, given in the very request
# that creates it: the kernel ignores an alias there, so a crash between creating a
# link and marking it with its alias left a link nobody recognised. ("vp" in ASCII.)
LINK_GROUP = 0x7670


def port_name(prefix: str, network: str, container_id: str, ifname: str) -> str:
    """An attachment's node-side port name: `prefix` + 11 hex digits (fits IFNAMSIZ)."""
    digest = hashlib.sha256(f"{network}/{container_id}/{ifname}".encode()).hexdigest()
    return prefix + digest[:11]


def attachment_alias(network: str, container_id: str, ifname: str) -> str:
    """The mark (IFLA_IFALIAS) of an attachment's links: whose they are."""
    return f"{ATTACHMENT_ALIAS}{network}/{container_id}/{ifname}"


def unclaimed(link) -> bool:
    """A link vpcni created (its group) and never got to mark (no alias)."""
    return link.get("IFLA_GROUP") == LINK_GROUP and not link.get("IFLA_IFALIAS")


def alias_attachment(alias: Optional[str]) -> Optional[tuple[str, str, str]]:
    """(network, container_id, ifname) of an attachment alias, or None when not ours."""
    if not alias or not alias.startswith(ATTACHMENT_ALIAS):
        return None
    parts = alias[len(ATTACHMENT_ALIAS):].split("/")
    # None of the three may contain '/', so anything else is not ours.
    return (parts[0], parts[1], parts[2]) if len(parts) == 3 and all(parts) else None


NO_IPV6_LINK_LOCAL = {"attrs": [["AF_INET6", {"attrs": [
    ["IFLA_INET6_ADDR_GEN_MODE", IN6_ADDR_GEN_MODE_NONE]]}]]}


def claim_port(ipr: Rtnl, index: int, alias: str, **attrs) -> None:
    """Mark a node-side port as the attachment's and keep IPv6 from giving it a
    link-local address (the node has no business in a VPC at layer 3); `attrs`
    (a new name, ...) go in the same message. The kernel ignores IFLA_IFALIAS and
    IFLA_AF_SPEC on creation, hence a call of its own, before the link goes up."""
    ipr.link("set", index=index, ifalias=alias, **attrs, af_spec=NO_IPV6_LINK_LOCAL)


def claim_port_named(ipr: Rtnl, name: str, alias: str) -> None:
    """claim_port for the link called `name` (the kernel finds it: no lookup first)."""
    ipr.link("set", ifname=name, ifalias=alias, af_spec=NO_IPV6_LINK_LOCAL)


def describe(exc: BaseException) -> str:
    """An errno-bearing error as 'File exists (EEXIST)'."""
    code = exc.code if isinstance(exc, NetlinkError) else getattr(exc, "errno", None)
    if isinstance(code, int) and code in errno.errorcode:
        return f"{os.strerror(code)} ({errno.errorcode[code]})"
    return str(exc)


def get_link(ipr: Rtnl, ifname: str):
    """The link message of `ifname`, or None when there is no such link."""
    try:
        return ipr.link("get", ifname=ifname)[0]
    except NetlinkError as exc:
        if exc.code == errno.ENODEV:
            return None
        raise


def delete_if_exists(ipr: Rtnl, ifname: str) -> bool:
    """Delete link `ifname`; False when it was already gone."""
    link = get_link(ipr, ifname)
    if link is None:
        return False
    try:
        ipr.link("del", index=link["index"])
    except NetlinkError as exc:
        if exc.code == errno.ENODEV:
            return False
        raise
    return True


def _check_netns_path(path: Optional[str]) -> str:
    if not path:
        raise InvalidEnvironment("CNI_NETNS is empty: the runtime must pass the container's "
                                 "network namespace path")
    # pyroute2 reads a bare name as /var/run/netns/<name>; CNI_NETNS is a path.
    if not os.path.isabs(path):
        raise InvalidEnvironment(f"CNI_NETNS {path!r} is not an absolute path")
    return path


@contextmanager
def netns_fd(path: Optional[str]) -> Iterator[int]:
    """An open fd of the namespace at `path`, for IFLA_NET_NS_FD."""
    path = _check_netns_path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise InvalidEnvironment(f"CNI_NETNS {path!r} cannot be opened: {describe(exc)}") from None
    try:
        yield fd
    finally:
        os.close(fd)


def _netlink_socket_in(fd: int) -> socket.socket:
    return socket_in(fd, socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_ROUTE)


ETH_P_ARP = 0x0806


def send_only_packet_socket(netns_fd: Optional[int] = None) -> socket.socket:
    """An AF_PACKET socket for sending only, in the namespace of `netns_fd` (or ours).

    Protocol 0 and no bind: the socket never hooks into packet reception, so
    creating and closing it does not wait for the kernel to synchronise its
    receive path (a bound ARP socket costs ~30 ms to bind and close here).
    Send with sendto(frame, (ifname, ethertype)).
    """
    if netns_fd is None:
        return socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    return socket_in(netns_fd, socket.AF_PACKET, socket.SOCK_RAW, 0)


def gratuitous_arp(mac: str, ip: ipaddress.IPv4Address) -> bytes:
    """An Ethernet broadcast ARP request for `ip` from `ip` (RFC 5227 announcement)."""
    hw = bytes.fromhex(mac.replace(":", ""))
    arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, hw, ip.packed, b"\0" * 6, ip.packed)
    return b"\xff" * 6 + hw + struct.pack("!H", ETH_P_ARP) + arp


def announce(path: str, ifname: str, mac: str, ips: list[IPConfig]) -> None:
    """Send a gratuitous ARP for each IPv4 address from `ifname` in the pod.

    As the reference bridge plugin does: pods that cached the MAC an earlier
    holder of the address had (a pod moved or was recreated) update their
    ARP entry now instead of after it ages out. Best effort: a failure here
    never fails the ADD.
    """
    v4 = [ip.address.ip for ip in ips if ip.address.version == 4]
    if not v4:
        return
    try:
        with netns_fd(path) as fd:
            sock = send_only_packet_socket(fd)
        with sock:
            for ip in v4:
                sock.sendto(gratuitous_arp(mac, ip), (ifname, ETH_P_ARP))
    except (OSError, InvalidEnvironment) as exc:
        LOG.warning("gratuitous ARP from %s in netns %s not sent: %s", ifname, path, exc)


SIOCETHTOOL = 0x8946
ETHTOOL_STXCSUM = 0x17


def disable_tx_checksum(path: str, ifname: str) -> None:
    """`ethtool -K <ifname> tx off` inside the pod, through the ethtool ioctl.

    For dataplanes that read the host end of a veth with a packet socket (the
    OVS userspace datapath): with tx checksum offload on, the pod's TCP/UDP
    packets leave with CHECKSUM_PARTIAL and the checksum is never filled in,
    so the peer drops every TCP segment (measured: pings pass, TCP does not).
    """
    with netns_fd(path) as fd:
        sock = socket_in(fd, socket.AF_INET, socket.SOCK_DGRAM, 0)
    with sock:
        value = array.array("I", [ETHTOOL_STXCSUM, 0])
        # struct ifreq: 16 bytes of name, then a union of 24 whose first member
        # is the pointer to struct ethtool_value.
        ifreq = struct.pack("16sP16x", ifname.encode(), value.buffer_info()[0])
        fcntl.ioctl(sock.fileno(), SIOCETHTOOL, ifreq)


@dataclass(frozen=True)
class PodNetns:
    """A container namespace opened by path: its netlink socket and the path, for messages."""

    path: str
    ipr: Rtnl


@contextmanager
def open_netns(path: Optional[str]) -> Iterator[PodNetns]:
    """A netlink socket inside the namespace at `path` (never creates one)."""
    with netns_fd(path) as fd:
        try:
            sock = _netlink_socket_in(fd)
        except OSError as exc:
            raise InvalidEnvironment(f"CNI_NETNS {path!r} is not a network namespace: "
                                     f"{describe(exc)}") from None
    try:
        ipr = Rtnl(sock=sock)
    except OSError as exc:
        sock.close()
        raise InvalidEnvironment(f"CNI_NETNS {path!r}: no netlink socket there: "
                                 f"{describe(exc)}") from None
    with ipr:
        yield PodNetns(path, ipr)


@dataclass(frozen=True)
class PodInterface:
    """What CHECK compares with the record."""

    index: int
    name: str
    mac: str
    mtu: int
    alias: Optional[str]
    up: bool
    addresses: frozenset[IPInterface]


def read_interface(ns: PodNetns, ifname: str,
                   addresses: Optional[frozenset] = None) -> Optional[PodInterface]:
    """`ifname` as namespace `ns` has it, or None when it is missing; its addresses
    are read too unless given (`addresses`: what the caller just configured)."""
    link = get_link(ns.ipr, ifname)
    if link is None:
        return None
    if addresses is None:
        addresses = frozenset(
            ipaddress.ip_interface(f"{msg.get('IFA_ADDRESS')}/{msg['prefixlen']}")
            for msg in ns.ipr.addr("dump", index=link["index"]))
    return PodInterface(index=link["index"], name=ifname, mac=link.get("IFLA_ADDRESS"),
                        mtu=link.get("IFLA_MTU"), alias=link.get("IFLA_IFALIAS"),
                        up=bool(link["flags"] & IFF_UP), addresses=addresses)


def _add_address(ns: PodNetns, index: int, ifname: str, ip: IPConfig) -> None:
    spec = dict(index=index, address=str(ip.address.ip), prefixlen=ip.address.network.prefixlen)
    if ip.address.version == 4:
        spec["broadcast"] = True
    else:
        # IPAM already made the address unique in the VPC; DAD would only
        # delay its use (and routes through it) by a second or more.
        spec["flags"] = IFA_F_NODAD
    try:
        ns.ipr.addr("add", **spec)
    except NetlinkError as exc:
        if exc.code != errno.EEXIST:
            raise BackendError(f"could not add address {ip.address} to {ifname} in "
                               f"netns {ns.path}: {describe(exc)}") from exc


def _route_spec(index: int, route: Route) -> dict:
    family = socket.AF_INET if route.dst.version == 4 else socket.AF_INET6
    spec: dict = dict(dst=str(route.dst), oif=index, family=family)
    if route.gw is not None:
        spec["gateway"] = str(route.gw)
    for field in ("priority", "table", "scope"):
        value = getattr(route, field)
        if value is not None:
            spec[field] = value
    metrics = {name: value for name, value in (("mtu", route.mtu), ("advmss", route.advmss))
               if value}
    if metrics:
        spec["metrics"] = metrics
    return spec


def route_text(route: Route) -> str:
    """A route as `ip route` would name it in a message."""
    return f"{route.dst} via {route.gw}" if route.gw else str(route.dst)


def _add_route(ns: PodNetns, index: int, ifname: str, route: Route) -> None:
    try:
        ns.ipr.route("add", **_route_spec(index, route))
    except NetlinkError as exc:
        # As the reference plugins do: the first of duplicate routes wins
        # (e.g. the subnet route the kernel made for the address).
        if exc.code != errno.EEXIST:
            raise BackendError(f"could not add route {route_text(route)} on {ifname} in "
                               f"netns {ns.path}: {describe(exc)}") from exc


def configure_interface(ns: PodNetns, ifname: str, ips: list[IPConfig], routes: list[Route], *,
                        mtu: Optional[int] = None, mac: Optional[str] = None,
                        alias: Optional[str] = None) -> PodInterface:
    """Set MTU/MAC/alias, bring `ifname` up, add `ips` then `routes`; return it read back.

    Repeating it is harmless: existing addresses and routes are kept.
    """
    link = get_link(ns.ipr, ifname)
    if link is None:
        raise BackendError(f"interface {ifname} missing in netns {ns.path}")
    index = link["index"]
    settings = {key: value for key, value in (("mtu", mtu), ("address", mac), ("ifalias", alias))
                if value is not None}
    try:
        # One message: the kernel applies MTU, MAC and alias before the up flag.
        # Up before routes: a gateway is only reachable once the address's
        # subnet route exists, which needs the link up.
        ns.ipr.link("set", index=index, state="up", **settings)
    except NetlinkError as exc:
        what = ", ".join(f"{k} {v}" for k, v in settings.items())
        raise BackendError(f"could not set {what + ', ' if what else ''}up on {ifname} in "
                           f"netns {ns.path}: {describe(exc)}") from exc
    for ip in ips:
        _add_address(ns, index, ifname, ip)
    for route in routes:
        _add_route(ns, index, ifname, route)
    # Read back for the MAC and MTU the kernel settled on (a veth's MAC is random
    # unless asked for); the addresses are the ones just added (EEXIST included).
    pod = read_interface(ns, ifname, addresses=frozenset(ip.address for ip in ips))
    if pod is None:
        raise BackendError(f"interface {ifname} vanished from netns {ns.path} while being "
                           "configured")
    return pod


def missing_routes(ns: PodNetns, pod: PodInterface, routes: list[Route]) -> list[Route]:
    """The routes of `routes` that are not on `pod` (matched on table, dst and gateway)."""
    present = set()
    for msg in ns.ipr.route("dump"):
        if msg.get("RTA_OIF") != pod.index:
            continue
        unspecified = "0.0.0.0" if msg["family"] == socket.AF_INET else "::"
        dst = ipaddress.ip_network(f"{msg.get('RTA_DST') or unspecified}/{msg['dst_len']}")
        gw = msg.get("RTA_GATEWAY")
        present.add((msg.get("RTA_TABLE"), dst, ipaddress.ip_address(gw) if gw else None))
    return [r for r in routes if (r.table or RT_TABLE_MAIN, r.dst, r.gw) not in present]


def check_pod(att: Attachment) -> list[str]:
    """What differs between the pod end of `att` and its record (empty: nothing)."""
    with open_netns(att.netns) as pod_ns:
        pod = read_interface(pod_ns, att.ifname)
        if pod is None:
            return [f"interface {att.ifname} missing in netns {att.netns}"]
        problems = []
        if att.mac and pod.mac.lower() != att.mac.lower():
            problems.append(f"{att.ifname} MAC {pod.mac} differs from recorded {att.mac}")
        if att.mtu and pod.mtu != att.mtu:
            problems.append(f"{att.ifname} MTU {pod.mtu} differs from recorded {att.mtu}")
        if not pod.up:
            problems.append(f"{att.ifname} is down")
        missing = [str(ip.address) for ip in att.ips if ip.address not in pod.addresses]
        if missing:
            problems.append(f"{att.ifname} lacks recorded address(es) {', '.join(missing)}")
        routes = missing_routes(pod_ns, pod, att.routes)
        if routes:
            problems.append(f"{att.ifname} lacks recorded route(s) "
                            + ", ".join(route_text(r) for r in routes))
        return problems


def set_mtu(ipr: Rtnl, att: Attachment, mtu: int) -> None:
    """Bring the attachment's node-side port (`att.host_ifname`, if any) and its pod
    interface (`att.ifname` in `att.netns`), both marked with its alias, to `mtu`.

    Lowering changes the pod end first (it stops sending what the port would
    drop), raising the port first. A link already at `mtu` is not set again. A
    missing or foreign link is a BackendError naming it (nothing of it is changed).
    """
    alias = attachment_alias(*att.key)

    def node_side() -> None:
        if att.host_ifname:
            _set_link_mtu(ipr, att.host_ifname, alias, mtu, "on the node")

    def pod_side() -> None:
        with open_netns(att.netns) as pod_ns:
            _set_link_mtu(pod_ns.ipr, att.ifname, alias, mtu, f"in netns {att.netns}")

    lowering = att.mtu is None or mtu < att.mtu
    for step in ((pod_side, node_side) if lowering else (node_side, pod_side)):
        step()


def _set_link_mtu(ipr: Rtnl, ifname: str, alias: str, mtu: int, where: str) -> None:
    link = get_link(ipr, ifname)
    if link is None or link.get("IFLA_IFALIAS") != alias:
        raise BackendError(f"{ifname} {where} is missing or not marked as the attachment's: "
                           f"its MTU is left alone")
    if link.get("IFLA_MTU") == mtu:
        return
    try:
        ipr.link("set", index=link["index"], mtu=mtu)
    except NetlinkError as exc:
        raise BackendError(f"could not set MTU {mtu} on {ifname} {where}: "
                           f"{describe(exc)}") from exc


def delete_host_link(ipr: Rtnl, host: str, att: Attachment, alias: str) -> bool:
    """Delete the node-side link `host` of `att` if it carries `alias` (our mark);
    a link of that name that is not this attachment's is left alone. True when
    this call deleted it."""
    link = get_link(ipr, host)
    if link is None:
        return False
    if link.get("IFLA_IFALIAS") != alias and not unclaimed(link):
        LOG.warning("detach %s: %s is not this attachment's (alias %r): left alone",
                    att.key, host, link.get("IFLA_IFALIAS"))
        return False
    try:
        return delete_if_exists(ipr, host)
    except NetlinkError as exc:
        raise BackendError(f"could not delete {host}: {describe(exc)}") from exc


def delete_pod_interface(att: Attachment, alias: str) -> None:
    """Delete `att.ifname` in the pod if it carries `alias` (the attachment's mark).

    A missing namespace or interface is success (DEL never fails on what is
    gone); an interface with another alias is not ours and stays.
    """
    if not att.netns:
        return
    try:
        with open_netns(att.netns) as pod_ns:
            pod = get_link(pod_ns.ipr, att.ifname)
            if pod is not None and (pod.get("IFLA_IFALIAS") == alias or unclaimed(pod)):
                try:
                    delete_if_exists(pod_ns.ipr, att.ifname)
                except NetlinkError as exc:
                    raise BackendError(f"could not delete {att.ifname} in netns {att.netns}: "
                                       f"{describe(exc)}") from exc
    except InvalidEnvironment:
        pass  # the namespace is gone, and the interface with it
