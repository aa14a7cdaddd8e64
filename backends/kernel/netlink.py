"""The kernel backend's netlink helpers: small functions taking plain values.

They raise pyroute2's NetlinkError for anything but the errnos that mean
"already done" (EEXIST on add, ENODEV/ENOENT on delete); the backend turns
errors into messages naming the object.
"""

from __future__ import annotations

import errno
import ipaddress
from typing import Optional

from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import ndmsg

from vpcni.core.models import IPAddress
from vpcni.backends.common.podif import IFF_UP, LINK_GROUP, claim_port, get_link, port_name
from vpcni.backends.common.rtnl import Rtnl

ALIAS_PREFIX = "vpcni:"
VNI_ALIAS = ALIAS_PREFIX + "vni="
FLOOD_MAC = "00:00:00:00:00:00"
FDB_STATE = ndmsg.states["permanent"] | ndmsg.states["noarp"]
NUD_PERMANENT = ndmsg.states["permanent"]


def bridge_name(vni: int) -> str:
    return f"vpbr{vni}"


def vxlan_name(vni: int) -> str:
    return f"vpvx{vni}"


def host_ifname(network: str, container_id: str, ifname: str) -> str:
    """The node-side port name of an attachment: 'vp' + 11 hex digits (fits IFNAMSIZ)."""
    return port_name("vp", network, container_id, ifname)


def vni_alias(vni: int) -> str:
    return f"{VNI_ALIAS}{vni}"


def alias_vni(alias: Optional[str]) -> Optional[int]:
    """The VNI a bridge/VXLAN alias names, or None when it is not one of ours."""
    if not alias or not alias.startswith(VNI_ALIAS):
        return None
    value = alias[len(VNI_ALIAS):]
    return int(value) if value.isdigit() else None


def link_alias(link) -> Optional[str]:
    return link.get("IFLA_IFALIAS")


def link_kind(link) -> Optional[str]:
    return link.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND")


def is_up(link) -> bool:
    return bool(link["flags"] & IFF_UP)


def vxlan_settings(link) -> dict:
    """The VNI, dstport and local address a VXLAN link was created with."""
    data = link.get_nested("IFLA_LINKINFO", "IFLA_INFO_DATA")
    local = data.get("IFLA_VXLAN_LOCAL") or data.get("IFLA_VXLAN_LOCAL6")
    return {"vni": data.get("IFLA_VXLAN_ID"), "port": data.get("IFLA_VXLAN_PORT"),
            "local": ipaddress.ip_address(local) if local else None}


def port_settings(link) -> dict:
    """Bridge-port flags of an enslaved link (learning, neigh_suppress)."""
    data = link.get_nested("IFLA_LINKINFO", "IFLA_INFO_SLAVE_DATA")
    if data is None:
        return {}
    return {"learning": data.get("IFLA_BRPORT_LEARNING"),
            "neigh_suppress": data.get("IFLA_BRPORT_NEIGH_SUPPRESS")}


def add_link(ipr: Rtnl, ifname: str, kind: str, **attrs) -> bool:
    """Create a link; False when one of that name appeared first (EEXIST)."""
    try:
        ipr.link("add", ifname=ifname, kind=kind, **attrs)
    except NetlinkError as exc:
        if exc.code == errno.EEXIST:
            return False
        raise
    return True


def create_claimed(ipr: Rtnl, ifname: str, kind: str, alias: str, **attrs) -> bool:
    """add_link (in vpcni's link group) + claim, deleting the link again when claiming
    fails."""
    if not add_link(ipr, ifname, kind, group=LINK_GROUP, **attrs):
        return False
    link = get_link(ipr, ifname)
    if link is None:
        return False
    try:
        claim_port(ipr, link["index"], alias)
    except NetlinkError:
        ipr.link("del", index=link["index"])
        raise
    return True


def set_link(ipr: Rtnl, index: int, **attrs) -> None:
    ipr.link("set", index=index, **attrs)


def set_port_flags(ipr: Rtnl, index: int) -> None:
    """No learning on the VXLAN port (remote MACs come from the control plane);
    ARP/ND suppression: the bridge answers for remote IPs from its neighbour table."""
    ipr.brport("set", index=index, learning=0, neigh_suppress=1)


def fdb_entries(ipr: Rtnl, index: int) -> tuple[set[tuple[str, IPAddress]], set[str]]:
    """From one dump of link `index`'s FDB: the (mac, dst) entries that point at a
    remote VTEP, and the MACs the bridge forwards to the port because vpcni put them
    there (externally learned entries, as an EVPN daemon writes them).

    The socket must have strict_check on: the kernel then filters by the
    header's ifindex instead of sending every port's FDB.
    """
    remotes, bridged = set(), set()
    for msg in ipr.fdb("dump", ifindex=index, dump_filter=None):
        if msg["ifindex"] != index:
            continue
        dst = msg.get("NDA_DST")
        if dst:
            remotes.add((msg.get("NDA_LLADDR"), ipaddress.ip_address(dst)))
        elif msg["flags"] & ndmsg.flags["ext_learned"]:
            bridged.add(msg.get("NDA_LLADDR"))
    return remotes, bridged


def fdb_bridge_set(ipr: Rtnl, index: int, mac: str) -> None:
    """Tell the bridge that `mac` lives behind port `index` (the VXLAN device).

    Without it the bridge, which learns nothing on that port, floods frames
    for remote MACs to every local port of the VNI: each pod would see its
    neighbours' traffic to other nodes.
    """
    # As FRR's zebra writes them: dynamic (so local learning can take the MAC
    # over when the endpoint moves to this node) but externally learned (never aged).
    ipr.fdb("replace", ifindex=index, lladdr=mac, state=ndmsg.states["reachable"],
            flags=ndmsg.flags["master"] | ndmsg.flags["ext_learned"])


def fdb_bridge_delete(ipr: Rtnl, index: int, mac: str) -> None:
    try:
        ipr.fdb("del", ifindex=index, lladdr=mac, flags=ndmsg.flags["master"])
    except NetlinkError as exc:
        if exc.code not in (errno.ENOENT, errno.ENODEV):
            raise


def _fdb(ipr: Rtnl, command: str, index: int, mac: str, dst: IPAddress) -> None:
    ipr.fdb(command, ifindex=index, lladdr=mac, dst=str(dst), state=FDB_STATE,
            flags=ndmsg.flags["self"])


def fdb_set_remote(ipr: Rtnl, index: int, mac: str, dst: IPAddress) -> None:
    """Point unicast `mac` at `dst` (replacing its remote: a MAC lives behind one VTEP)."""
    _fdb(ipr, "replace", index, mac, dst)


def fdb_append_flood(ipr: Rtnl, index: int, dst: IPAddress) -> None:
    """Add `dst` to the flood list (the all-zero MAC entry keeps one remote per VTEP)."""
    _fdb(ipr, "append", index, FLOOD_MAC, dst)


def fdb_delete(ipr: Rtnl, index: int, mac: str, dst: IPAddress) -> None:
    try:
        _fdb(ipr, "del", index, mac, dst)
    except NetlinkError as exc:
        if exc.code not in (errno.ENOENT, errno.ENODEV):
            raise


def permanent_neighbours(ipr: Rtnl, index: int) -> dict[IPAddress, str]:
    """ip -> mac of the permanent neighbour entries on link `index`.

    Only permanent ones: the kernel itself adds NOARP entries for the
    multicast groups it reports to, and those are not ours to remove.
    """
    return {ipaddress.ip_address(msg.get("NDA_DST")): msg.get("NDA_LLADDR")
            for msg in ipr.neigh("dump", NDA_IFINDEX=index, dump_filter=None)
            if msg["ifindex"] == index and msg["state"] & NUD_PERMANENT}


def neigh_set(ipr: Rtnl, index: int, ip: IPAddress, mac: str) -> None:
    ipr.neigh("replace", ifindex=index, dst=str(ip), lladdr=mac, state=NUD_PERMANENT)


def neigh_delete(ipr: Rtnl, index: int, ip: IPAddress) -> None:
    try:
        ipr.neigh("del", ifindex=index, dst=str(ip))
    except NetlinkError as exc:
        if exc.code not in (errno.ENOENT, errno.ENODEV):
            raise


def link_by_index(ipr: Rtnl, index: int):
    return ipr.link("get", index=index)[0]


def all_links(ipr: Rtnl):
    return ipr.link("dump")
