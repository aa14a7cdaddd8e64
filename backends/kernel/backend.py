"""The kernel backend: per VNI a VXLAN device in a Linux bridge, per pod a veth.

    pod netns          node netns (where the plugin runs)
    eth1 ── veth ──  vp<hash> ── vpbr<VNI> ── vpvx<VNI> ── UDP/4789 from the VTEP address

Remote endpoints arrive as the whole desired set per VNI (apply_remote) and
become static FDB entries on vpvx<VNI> (per MAC, plus one all-zero "flood"
entry per remote VTEP) and permanent neighbour entries on vpbr<VNI>. Every
device this backend creates carries an IFLA_IFALIAS starting with "vpcni:";
a device without it is never changed or deleted, whatever its name.

Isolation (guard.py): nftables rules let a pod port send only from its
attachment's MAC and addresses, deliver nothing from a VNI bridge to the node
itself, and accept VXLAN only on the underlay from the VTEPs each VNI knows.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from typing import Optional

from pyroute2.netlink.exceptions import NetlinkError

from vpcni.backends.common.modules import SYS_MODULE, kernel_support
from vpcni.backends.common.nft import load_binding
from vpcni.backends.common import podif
from vpcni.backends.common.router import Routers, usable
from vpcni.backends.common.rtnl import Rtnl, ThreadRtnl
from vpcni.core.backend import Backend
from vpcni.core.config import NodeConfig
from vpcni.core.errors import BackendError
from vpcni.core.models import (Attachment, Capabilities, IPAddress, Owned, Probe, RemoteEndpoint,
                               RemoteState, RoutedState, VpcNetwork)
from vpcni.backends.common.podif import delete_if_exists, describe, get_link
from vpcni.backends.common.underlay import (Underlay, UnderlayCache, find_underlay, netlink_errors,
                                            pod_mtu, underlay_problems)

from . import netlink
from .guard import Guard, port_elements
from .netlink import bridge_name, host_ifname, vxlan_name

LOG = logging.getLogger(__name__)

# How long ensure_network waits for a concurrent creator of the same device
# to finish marking it; the window is two netlink calls wide.
CLAIM_TIMEOUT = 2.0


class KernelBackend(Backend):
    name = "kernel"

    def __init__(self, node: NodeConfig):
        super().__init__(node)
        # strict_check lets the kernel filter FDB and address dumps by ifindex.
        self.ipr = ThreadRtnl(strict_check=True)
        self._packets = podif.send_only_packet_socket()  # for gratuitous ARPs
        self.guard = Guard()
        self._underlays = UnderlayCache()
        self._bridges: dict[int, int] = {}  # VNI -> index of its bridge, as last verified
        # Routed subnets: each VPC's router, reaching its L3VNI through a VXLAN device.
        self.routers = Routers(node, self.ipr, l3="vxlan")

    def close(self) -> None:
        self.routers.close()
        self.ipr.close()
        self._packets.close()

    # ------------------------------------------------------------ probe

    @classmethod
    def probe(cls, node: NodeConfig) -> Probe:
        support = {m: kernel_support(m) for m in ("vxlan", "bridge")}
        missing = [m for m, how in support.items() if how is None]
        if missing:
            return Probe(name=cls.name, available=False, facts=support,
                         reason=f"no {' or '.join(missing)} support in kernel "
                                f"{os.uname().release} (not in {SYS_MODULE}, modules.builtin "
                                "or modules.dep)")
        try:
            load_binding()
        except BackendError as exc:
            return Probe(name=cls.name, available=False, facts=support, reason=str(exc))
        try:
            ipr = Rtnl(strict_check=True)
        except OSError as exc:
            return Probe(name=cls.name, available=False, facts=support,
                         reason=f"cannot open a netlink socket: {describe(exc)}")
        try:
            underlay = find_underlay(ipr, node)
        except BackendError as exc:
            return Probe(name=cls.name, available=False, facts=support, reason=str(exc))
        finally:
            ipr.close()
        facts = dict(support, vtep=str(underlay.address), underlay=underlay.ifname,
                     underlay_mtu=underlay.mtu, pod_mtu=underlay.pod_mtu)
        return Probe(name=cls.name, available=True, score=10, facts=facts,
                     reason=f"vxlan and bridge support present, VTEP {underlay.address} on "
                            f"{underlay.ifname} (mtu {underlay.mtu})")

    # ------------------------------------------------------------ per VNI

    def _underlay(self) -> Underlay:
        return self._underlays.get(self.ipr, self.node)

    @staticmethod
    def _verify(name: str, link, alias: str, kind: str):
        """`link` itself when it is ours and of `kind`, else BackendError."""
        if netlink.link_alias(link) != alias:
            raise BackendError(f"{name} exists but is not vpcni's (alias "
                               f"{netlink.link_alias(link)!r}, expected {alias!r}); "
                               "vpcni leaves it alone: rename or delete it")
        if netlink.link_kind(link) != kind:
            raise BackendError(f"{name} is a {netlink.link_kind(link)} device, expected {kind}")
        return link

    def _wait_for_claim(self, name: str):
        """Link `name` once it has an alias (or is gone), giving a concurrent
        creator the moment it needs between creating and marking it."""
        deadline = time.monotonic() + CLAIM_TIMEOUT
        while True:
            link = get_link(self.ipr, name)
            if link is None or netlink.link_alias(link) is not None or time.monotonic() > deadline:
                return link
            time.sleep(0.01)

    def _ensure_device(self, name: str, kind: str, vni: int, **attrs):
        """(link, whether it had to be created or waited for)."""
        alias = netlink.vni_alias(vni)
        link = get_link(self.ipr, name)
        fresh = link is None or netlink.link_alias(link) is None
        if link is None:
            with netlink_errors(f"could not create {kind} {name}"):
                netlink.create_claimed(self.ipr, name, kind, alias, **attrs)
        if fresh:
            link = self._wait_for_claim(name)
        if link is None:
            raise BackendError(f"{name} disappeared while being created (a concurrent "
                               f"release_network of VNI {vni}?)")
        if podif.unclaimed(link):
            # Created by vpcni and never marked (a crash between the two requests).
            with netlink_errors(f"could not mark {name}"):
                podif.claim_port(self.ipr, link["index"], alias)
            link = get_link(self.ipr, name) or link
        return self._verify(name, link, alias, kind), fresh

    def _ensure_bridge(self, vni: int):
        name = bridge_name(vni)
        # Snooping would make the node's own stack send IGMP/MLD reports into
        # the VPC when the bridge comes up; flooding multicast is what VXLAN
        # with a flood list does anyway.
        link, fresh = self._ensure_device(name, "bridge", vni, br_stp_state=0,
                                          br_mcast_snooping=0)
        if not netlink.is_up(link):
            with netlink_errors(f"could not set {name} up"):
                netlink.set_link(self.ipr, link["index"], state="up")
            fresh = True
        return link, fresh

    def _ensure_vxlan(self, net: VpcNetwork, underlay: Underlay, bridge) -> bool:
        """Whether the device had to be created or repaired."""
        name = vxlan_name(net.vni)
        local = "vxlan_local" if underlay.address.version == 4 else "vxlan_local6"
        link, fresh = self._ensure_device(name, "vxlan", net.vni, vxlan_id=net.vni,
                                   vxlan_port=net.port, vxlan_learning=0,
                                   mtu=underlay.pod_mtu, master=bridge["index"],
                                   **{local: str(underlay.address)})
        have = netlink.vxlan_settings(link)
        want = {"vni": net.vni, "port": net.port, "local": underlay.address}
        wrong = [f"{k} {have[k]} (want {want[k]})" for k in want if have[k] != want[k]]
        if wrong:
            raise BackendError(f"{name} exists with {', '.join(wrong)}: delete it or fix the "
                               "network/node config")
        index = link["index"]
        with netlink_errors(f"could not add {name} to {bridge_name(net.vni)}"):
            if link.get("IFLA_MASTER") != bridge["index"]:
                netlink.set_link(self.ipr, index, master=bridge["index"])
                link = netlink.link_by_index(self.ipr, index)
                fresh = True
            if netlink.port_settings(link) != {"learning": 0, "neigh_suppress": 1}:
                netlink.set_port_flags(self.ipr, index)
                fresh = True
        with netlink_errors(f"could not configure {name}"):
            if link.get("IFLA_MTU") != underlay.pod_mtu:
                netlink.set_link(self.ipr, index, mtu=underlay.pod_mtu)
                fresh = True
            if not netlink.is_up(link):
                netlink.set_link(self.ipr, index, state="up")
                fresh = True
        return fresh

    def ensure_network(self, net: VpcNetwork) -> bool:
        underlay = self._underlay()
        pod_mtu(net, underlay)
        self.guard.set_underlay(underlay.ifname, net.port)
        self.routers.note_port(net.port)
        bridge, fresh = self._ensure_bridge(net.vni)
        fresh = self._ensure_vxlan(net, underlay, bridge) or fresh
        if net.subnet is not None:
            fresh = self._ensure_gateway(net, underlay, bridge) or fresh
        return fresh

    def _ensure_gateway(self, net: VpcNetwork, underlay: Underlay, bridge) -> bool:
        """The subnet's VPC router and its gateway, a port of the VNI's bridge."""
        port, built = self.routers.ensure(net, underlay, pod_mtu(net, underlay))
        link = get_link(self.ipr, port)
        if link is None:
            raise BackendError(f"gateway port {port} of VNI {net.vni} disappeared")
        if link.get("IFLA_MASTER") != bridge["index"]:
            with netlink_errors(f"could not add {port} to {bridge_name(net.vni)}"):
                netlink.set_link(self.ipr, link["index"], master=bridge["index"], state="up")
            built = True
        return built

    def apply_routed(self, l3vni: int, state: RoutedState) -> None:
        state = usable(state, self._underlay().address)
        # The L3VNI's VXLAN is accepted from the VTEPs that route into the VPC.
        self.guard.set_peers(l3vni, {h.vtep for h in state.hosts} |
                             {p.vtep for p in state.prefixes})
        self.routers.apply(l3vni, state)

    def release_network(self, vni: int) -> None:
        # The subnet's gateway (and the router with the VPC's last subnet) first: a crash
        # after the bridge went would leave a router nothing points to any more.
        l3vni = self.routers.release(vni)
        if l3vni is not None:
            self.guard.set_peers(l3vni, ())
        alias = netlink.vni_alias(vni)
        self._bridges.pop(vni, None)
        for name in (vxlan_name(vni), bridge_name(vni)):
            link = get_link(self.ipr, name)
            if link is None:
                continue
            if netlink.link_alias(link) != alias:
                LOG.warning("release of VNI %d: %s is not vpcni's (alias %r): left alone",
                            vni, name, netlink.link_alias(link))
                continue
            with netlink_errors(f"could not delete {name}"):
                delete_if_exists(self.ipr, name)
        self.guard.set_peers(vni, ())

    # ------------------------------------------------------------ ports

    def describe(self) -> Capabilities:
        # A representor in a Linux bridge is offloaded by the NIC's switchdev driver.
        return Capabilities(ports=["veth", "representor"], offload=True, port_prefix="vp",
                            routing=True)

    def port_name(self, att: Attachment) -> str:
        return host_ifname(att.network, att.container_id, att.ifname)

    def pod_mtu(self, net: VpcNetwork) -> int:
        return pod_mtu(net, self._underlay())

    def set_network_mtu(self, vni: int, mtu: int) -> bool:
        """The VNI's VXLAN device to `mtu` (the bridge follows its ports by itself: the
        kernel gives a bridge nobody set an MTU on the smallest of its ports')."""
        name = vxlan_name(vni)
        link = get_link(self.ipr, name)
        if link is None or netlink.link_alias(link) != netlink.vni_alias(vni) or \
                link.get("IFLA_MTU") == mtu:
            return False
        with netlink_errors(f"could not set MTU {mtu} on {name}"):
            netlink.set_link(self.ipr, link["index"], mtu=mtu)
        return True

    def _bridge_for_attach(self, vni: int):
        name = bridge_name(vni)
        link = get_link(self.ipr, name)
        if link is None:
            raise BackendError(f"bridge {name} does not exist: ensure_network for VNI {vni} "
                               "must come before add_port")
        return self._verify(name, link, netlink.vni_alias(vni), "bridge")

    def add_port(self, net: VpcNetwork, att: Attachment) -> None:
        host = att.host_ifname
        bridge = bridge_name(net.vni)
        bridge_index = self._bridge_for_attach(net.vni)["index"]
        link = get_link(self.ipr, host)
        alias = podif.attachment_alias(*att.key)
        if link is None or link.get("IFLA_IFALIAS") != alias:
            raise BackendError(f"port {host} of attachment {'/'.join(att.key)} is missing or "
                               "not marked as its own")
        with netlink_errors(f'could not add "{host}" to {bridge}'):
            # One message: the kernel enslaves the port before it applies the up flag.
            netlink.set_link(self.ipr, link["index"], master=bridge_index, state="up")
        # Until this the port drops everything (the guard fails closed).
        self.guard.add_port(host, att.mac, [ip.address.ip for ip in att.ips])
        self.routers.port_changed(att, added=True)
        # The pods of this node that knew the address behind another MAC
        # (it moved here) learn the new one now.
        self._refresh_pod_caches(bridge, [(ip.address.ip, att.mac) for ip in att.ips])

    def remove_port(self, att: Attachment) -> None:
        host = att.host_ifname or self.port_name(att)
        self.guard.remove_port(host, att.mac, [ip.address.ip for ip in att.ips])
        self.routers.port_changed(att, added=False)
        if att.interface == "veth":
            return  # the provider deletes the veth, and the bridge lets go of it
        link = get_link(self.ipr, host)
        if link is not None and link.get("IFLA_IFALIAS") == podif.attachment_alias(*att.key):
            try:
                netlink.set_link(self.ipr, link["index"], master=0, state="down")
            except NetlinkError as exc:
                # Gone meanwhile (a simulated VF's representor dies with the pod's
                # namespace, which the kernel tears down asynchronously): nothing to do.
                if exc.code != errno.ENODEV:
                    raise BackendError(f"could not take {host} out of its bridge: "
                                       f"{describe(exc)}") from exc

    def check_port(self, net: VpcNetwork, att: Attachment) -> list[str]:
        problems = self._check_node(net, att)
        if net.subnet is not None:
            problems += self.routers.problems(net)
        return problems

    def _check_node(self, net: VpcNetwork, att: Attachment) -> list[str]:
        problems = []
        bridge, vxlan = bridge_name(net.vni), vxlan_name(net.vni)
        br = get_link(self.ipr, bridge)
        if br is None:
            problems.append(f"bridge {bridge} missing")
        elif not netlink.is_up(br):
            problems.append(f"bridge {bridge} is down")
        vx = get_link(self.ipr, vxlan)
        if vx is None:
            problems.append(f"vxlan device {vxlan} missing")
        else:
            have = netlink.vxlan_settings(vx)
            for key, want in (("vni", net.vni), ("port", net.port)):
                if have[key] != want:
                    problems.append(f"{vxlan} has {key} {have[key]}, expected {want}")
            if br is not None and vx.get("IFLA_MASTER") != br["index"]:
                problems.append(f"{vxlan} is not a port of {bridge}")
            problems += self._vxlan_mtu_problems(vxlan, vx)
        host = att.host_ifname or host_ifname(att.network, att.container_id, att.ifname)
        what = "host veth" if att.interface == "veth" else "representor"
        veth = get_link(self.ipr, host)
        if veth is None:
            problems.append(f"{what} {host} missing")
        else:
            if br is None or veth.get("IFLA_MASTER") != br["index"]:
                problems.append(f"{what} {host} is not enslaved to {bridge}")
            if att.mtu and veth.get("IFLA_MTU") != att.mtu:
                problems.append(f"{what} {host} MTU {veth.get('IFLA_MTU')} differs from "
                                f"recorded {att.mtu}")
        missing = self.guard.missing(host, att.mac, [ip.address.ip for ip in att.ips])
        if missing:
            problems.append(f"anti-spoofing of {host} lacks {', '.join(missing)} "
                            "(nftables table bridge vpcni)")
        return problems

    def _vxlan_mtu_problems(self, name: str, vx) -> list[str]:
        """The VXLAN device's MTU against what the underlay carries now."""
        try:
            underlay = self._underlay()
        except BackendError as exc:
            return [str(exc)]
        if vx.get("IFLA_MTU") == underlay.pod_mtu:
            return []
        return [f"vxlan device {name} has MTU {vx.get('IFLA_MTU')}, expected "
                f"{underlay.pod_mtu} (underlay {underlay.ifname} mtu {underlay.mtu} - "
                f"{underlay.mtu - underlay.pod_mtu} bytes of encapsulation)"]

    # ------------------------------------------------------------ remote state

    def _vni_bridge(self, vni: int, vxlan) -> Optional[int]:
        """The index of VNI `vni`'s bridge, which `vxlan` must be a port of; None when it
        is missing or not vpcni's. The bridge is looked up only when the VXLAN device's
        master is not the bridge already seen for the VNI (a reconcile converges every
        VNI: half its lookups were bridges that had not changed)."""
        master = vxlan.get("IFLA_MASTER")
        if master and self._bridges.get(vni) == master:
            return master
        bridge = get_link(self.ipr, bridge_name(vni))
        if bridge is None or netlink.link_alias(bridge) != netlink.vni_alias(vni):
            self._bridges.pop(vni, None)
            return None
        if bridge["index"] == master:
            self._bridges[vni] = master
        return bridge["index"]

    def apply_remote(self, vni: int, remote: RemoteState) -> None:
        vxlan = get_link(self.ipr, vxlan_name(vni))
        if vxlan is None:
            return
        bridge_index = self._vni_bridge(vni, vxlan) \
            if netlink.link_alias(vxlan) == netlink.vni_alias(vni) else None
        if bridge_index is None:
            if get_link(self.ipr, bridge_name(vni)) is not None:
                LOG.warning("apply_remote VNI %d: %s/%s are not vpcni's: left alone",
                            vni, vxlan_name(vni), bridge_name(vni))
            return
        # A route reflected back to us would make the VTEP send to itself. (The
        # device's own local address is the underlay's: ensure_network checks that.)
        local = self._underlay().address
        endpoints = [ep for ep in remote.endpoints if ep.vtep != local]
        flood = {vtep for vtep in remote.flood if vtep != local}
        # VXLAN of this VNI is accepted from its flood list and the VTEPs of its
        # endpoints, and from nowhere else.
        self.guard.set_peers(vni, flood | {ep.vtep for ep in endpoints})
        with netlink_errors(f"could not converge the FDB of {vxlan_name(vni)}"):
            self._converge_fdb(vxlan["index"], endpoints, flood)
        with netlink_errors(f"could not converge the neighbours of {bridge_name(vni)}"):
            changed = self._converge_neighbours(bridge_index, endpoints)
        self._refresh_pod_caches(bridge_name(vni), changed)

    def _converge_fdb(self, index: int, endpoints: list[RemoteEndpoint],
                      flood: set[IPAddress]) -> None:
        unicast = {ep.mac.lower(): ep.vtep for ep in endpoints}
        desired = {(mac, vtep) for mac, vtep in unicast.items()}
        desired |= {(netlink.FLOOD_MAC, vtep) for vtep in flood}
        current, bridged = netlink.fdb_entries(self.ipr, index)
        # Add before removing, so a MAC that moved never has a gap.
        for mac, vtep in desired - current:
            if mac == netlink.FLOOD_MAC:
                netlink.fdb_append_flood(self.ipr, index, vtep)
            else:
                netlink.fdb_set_remote(self.ipr, index, mac, vtep)
        for mac in unicast.keys() - bridged:
            netlink.fdb_bridge_set(self.ipr, index, mac)
        for mac, vtep in current - desired:
            netlink.fdb_delete(self.ipr, index, mac, vtep)
        for mac in bridged - unicast.keys():
            netlink.fdb_bridge_delete(self.ipr, index, mac)

    def _converge_neighbours(self, index: int,
                             endpoints: list[RemoteEndpoint]) -> list[tuple[IPAddress, str]]:
        """Converge the bridge's neighbour table; the (ip, mac) entries it set."""
        desired = {ep.ip: ep.mac.lower() for ep in endpoints if ep.ip is not None}
        current = netlink.permanent_neighbours(self.ipr, index)
        changed = []
        for ip, mac in desired.items():
            if current.get(ip) != mac:
                netlink.neigh_set(self.ipr, index, ip, mac)
                changed.append((ip, mac))
        for ip in current.keys() - desired.keys():
            netlink.neigh_delete(self.ipr, index, ip)
        return changed

    def _refresh_pod_caches(self, bridge: str, bindings: list[tuple[IPAddress, str]]) -> None:
        """Tell the pods on `bridge` that these IPs now have these MACs (gratuitous ARP).

        With ARP suppression on the VXLAN port the kernel keeps gratuitous ARPs
        from crossing VTEPs, so a pod that cached the MAC of an address's
        earlier holder (a pod that moved or was recreated elsewhere) would keep
        sending to it until the entry ages out, tens of seconds. Sent out of
        the bridge device, the frame reaches the node's own pods of the VNI only.
        One long-lived socket: a packet socket's close waits for the kernel
        (~10 ms here), too much for every ADD.
        """
        frames = [podif.gratuitous_arp(mac, ip) for ip, mac in bindings if ip.version == 4]
        if not frames:
            return
        try:
            for frame in frames:
                self._packets.sendto(frame, (bridge, podif.ETH_P_ARP))
        except OSError as exc:
            LOG.warning("gratuitous ARP on %s not sent: %s", bridge, describe(exc))

    # ------------------------------------------------------------ inventory

    def reconcile(self, records, full: bool = True, locked=None) -> list[str]:
        """Converge the port filters to the attachment records, re-installing the guard's
        tables when they are not intact (a firewall reload flushed them). A quick pass
        (`full` false) only checks that the tables are intact and that no operation
        found them lost. Returns the ports corrected, or ["(nftables tables)"] when the
        tables were re-installed: the caller then converges every VNI's remote state,
        which puts the VTEP sets back.

        Ports are compared without locks; each that differs is then corrected on a
        fresh read under its attachment's lock (`locked`), so an ADD or DEL that ran
        between the reads is never undone by a stale decision."""
        reinstalled = self.guard.ensure_base() or self.guard.lost
        if not (full or reinstalled):
            return []
        self.guard.lost = False
        self.guard.forget_peers()
        current = self.guard.ports()  # before reading the records: see Backend.reconcile
        atts = records()
        if atts:
            underlay = self._underlay()
            for port in sorted({att.port for att in atts}):
                self.guard.set_underlay(underlay.ifname, port)
        self.routers.converge_probe_routes(atts)
        if self.routers.reconcile(records):
            reinstalled = True
        known = {self._host(att): att for att in atts}
        desired = self._port_filters(atts)
        suspects = {port for port in current if port not in known}
        suspects |= {port for port, (mac, ips) in desired.items()
                     if {(n, t) for n, ts in port_elements(port, mac, ips).items() for t in ts}
                     != current.get(port, set())}
        changed = [port for port in sorted(suspects)
                   if self._recheck_port(port, known.get(port), locked)]
        if changed:
            LOG.warning("port filters of %s were not as recorded: corrected", ", ".join(changed))
        return (["(nftables tables)"] if reinstalled else []) + changed

    def _recheck_port(self, port: str, att: Optional[Attachment], locked) -> bool:
        """Correct one port's filters on a fresh read; True when they changed."""
        if locked is None:  # no core around (a test): the records given are the truth
            with self.guard.port_lock(port):
                return self._fix_port(port, att)
        key = att.key if att is not None else self._attachment_of(port)
        if key is not None:
            with locked(key) as fresh:
                return self._fix_port(port, fresh)
        with self.guard.port_lock(port):
            if get_link(self.ipr, port) is not None:
                return False  # a link again: an ADD is under way (the next pass decides)
            return self.guard.set_port(port, None)

    def _fix_port(self, port: str, att: Optional[Attachment]) -> bool:
        if att is not None and att.state != "ready":
            return False  # mid-ADD: its own steps set the filters
        want = None if att is None or not att.mac else \
            (att.mac, sorted((ip.address.ip for ip in att.ips), key=str))
        return self.guard.set_port(port, want)

    def _attachment_of(self, port: str) -> Optional[tuple[str, str, str]]:
        """The attachment a node link of that name is marked as (None: no such link)."""
        link = get_link(self.ipr, port)
        return podif.alias_attachment(link.get("IFLA_IFALIAS")) if link is not None else None

    @staticmethod
    def _host(att: Attachment) -> str:
        return att.host_ifname or host_ifname(att.network, att.container_id, att.ifname)

    def _port_filters(self, atts: list[Attachment]) -> dict[str, tuple]:
        return {self._host(a): (a.mac, sorted((ip.address.ip for ip in a.ips), key=str))
                for a in atts if a.state == "ready" and a.mac}

    def health(self) -> list[str]:
        return underlay_problems(self.ipr, self.node)

    def owned(self) -> Owned:
        vnis: set[int] = set()
        attachments: dict[str, tuple[str, str, str]] = {}
        for link in netlink.all_links(self.ipr):
            alias = netlink.link_alias(link)
            vni = netlink.alias_vni(alias)
            if vni is not None:
                vnis.add(vni)
            key = podif.alias_attachment(alias)
            if key is not None:
                attachments[link.get("IFLA_IFNAME")] = key
        return Owned(vnis=vnis, attachments=attachments)
