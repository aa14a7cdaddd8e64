"""The node's underlay as every VXLAN backend sees it: the VTEP address, the
interface carrying it, and the pod MTU that leaves after encapsulation.

Backend-neutral (the kernel and ovs backends both use it), read through a
netlink socket of the node's namespace.
"""

from __future__ import annotations

import ipaddress
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional

from pyroute2.netlink.exceptions import NetlinkError

from vpcni.core.config import NodeConfig
from vpcni.core.errors import BackendError, InvalidConfig
from vpcni.core.models import IPAddress, VpcNetwork, vxlan_overhead
from .podif import IFF_UP, describe, get_link

RT_SCOPE_UNIVERSE = 0


@dataclass(frozen=True)
class Underlay:
    """The node's VTEP address and the interface carrying it."""

    address: IPAddress
    ifname: str
    mtu: int

    @property
    def pod_mtu(self) -> int:
        return self.mtu - vxlan_overhead(self.address)


@contextmanager
def netlink_errors(what: str) -> Iterator[None]:
    """Turn a netlink/OS failure into BackendError('<what>: <reason>')."""
    try:
        yield
    except (NetlinkError, OSError) as exc:
        raise BackendError(f"{what}: {describe(exc)}") from exc


def interface_with_address(ipr, address: IPAddress) -> Optional[int]:
    """The index of the link that carries `address`, or None."""
    family = socket.AF_INET if address.version == 4 else socket.AF_INET6
    for msg in ipr.addr("dump", family=family):
        if ipaddress.ip_address(msg.get("IFA_ADDRESS")) == address:
            return msg["index"]
    return None


def first_address(ipr, index: int) -> Optional[IPAddress]:
    """The first IPv4 address of link `index`, else its first global IPv6 one."""
    for family in (socket.AF_INET, socket.AF_INET6):
        for msg in ipr.addr("dump", family=family, index=index, dump_filter=None):
            if msg["index"] == index and msg["scope"] == RT_SCOPE_UNIVERSE:
                return ipaddress.ip_address(msg.get("IFA_ADDRESS"))
    return None


def find_underlay(ipr, node: NodeConfig) -> Underlay:
    """The VTEP from the node config, as configured in this namespace; BackendError says why not."""
    if node.vtepAddress is not None:
        index = interface_with_address(ipr, node.vtepAddress)
        if index is None:
            raise BackendError(f"VTEP address {node.vtepAddress} (vtepAddress in {node.source}) is "
                               "not configured on any interface in this network namespace")
        link = ipr.link("get", index=index)[0]
        return Underlay(node.vtepAddress, link.get("IFLA_IFNAME"), link.get("IFLA_MTU"))
    link = get_link(ipr, node.underlayInterface)
    if link is None:
        raise BackendError(f"underlay interface {node.underlayInterface} (underlayInterface in "
                           f"{node.source}) does not exist in this network namespace")
    address = first_address(ipr, link["index"])
    if address is None:
        raise BackendError(f"underlay interface {node.underlayInterface} has no IPv4 or global "
                           "IPv6 address to use as VTEP")
    return Underlay(address, node.underlayInterface, link.get("IFLA_MTU"))


IFF_LOWER_UP = 0x10000


def underlay_problems(ipr, node: NodeConfig) -> list[str]:
    """What is wrong with the underlay now: no VTEP address, or its link down."""
    try:
        underlay = find_underlay(ipr, node)
    except BackendError as exc:
        return [str(exc)]
    link = get_link(ipr, underlay.ifname)
    if link is None:
        return [f"underlay interface {underlay.ifname} vanished"]
    if not link["flags"] & IFF_UP:
        return [f"underlay interface {underlay.ifname} is down"]
    if not link["flags"] & IFF_LOWER_UP:
        return [f"underlay interface {underlay.ifname} has no carrier (lower layer down)"]
    return []


class UnderlayCache:
    """find_underlay, remembered for `ttl` seconds (failures are not remembered).

    An ADD asks for the underlay two or three times (the VNI's devices, the pod's
    MTU, the filters); the answer changes when an operator renumbers or re-MTUs
    the node, which the next lookup after `ttl` sees.
    """

    def __init__(self, ttl: float = 1.0):
        self.ttl = ttl
        self._value: Optional[Underlay] = None
        self._at = 0.0

    def get(self, ipr, node: NodeConfig) -> Underlay:
        now = time.monotonic()
        value = self._value
        if value is None or now - self._at > self.ttl:
            value = find_underlay(ipr, node)
            self._value, self._at = value, now
        return value


def pod_mtu(net: VpcNetwork, underlay: Underlay) -> int:
    """The network's `mtu`, or the most VXLAN leaves over the underlay; InvalidConfig if above it."""
    if net.mtu is None:
        return underlay.pod_mtu
    if net.mtu > underlay.pod_mtu:
        raise InvalidConfig(
            f"network {net.name}: 'mtu' {net.mtu} exceeds {underlay.pod_mtu}, the most VXLAN "
            f"leaves over {underlay.ifname} (mtu {underlay.mtu} - "
            f"{vxlan_overhead(underlay.address)} bytes of encapsulation)")
    return net.mtu
