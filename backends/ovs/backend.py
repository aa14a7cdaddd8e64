"""The ovs backend: VPCs on Open vSwitch, over OVSDB with an OpenFlow pipeline.

    pod netns          node netns
    eth1 ── veth ──  vo<hash> ─┐
                               br-int (fail_mode secure, our flows) ── vpcni-vx<port>
    eth1 ── veth ──  vo<hash> ─┘        flow-based VXLAN: key=flow, remote_ip=flow, local_ip=VTEP
                      br-int ──┬── vgw<VNI>   ═══ veth ═══ gw<VNI>     (GATEWAY_MAC)  in the VPC's router,
                               └── vl3<L3VNI> ═══ veth ═══ vl3<L3VNI>  (router MAC)   netns <prefix><L3VNI>

Per pod a veth whose host end is a port of the integration bridge, with
external_ids naming its attachment (network, container ID, ifname, VNI, MAC,
IPs); per VNI a mark on the bridge (external_ids vpcni-vni-<VNI>); per UDP
port one flow-based VXLAN port. Forwarding is entirely OpenFlow (flows.py),
derived from the ports of a VNI (local flows) and from its EVPN remote state
(remote flows), converged per VNI and kind in one atomic bundle each. Speaks
the same VXLAN as the kernel backend, so both serve one VNI through EVPN.

A routed subnet (net.subnet) also gets its VPC's router (backends/common/router.py,
a namespace per VPC) with two veths into br-int: the subnet's gateway port
vgw<VNI> (a local port of the VNI, flooding locally only) and the router's L3
port vl3<L3VNI>, whose traffic br-int carries over the tunnel with the L3VNI to
the remote router MACs of the EVPN routed state (flows of kinds router and routed).
East-west routing itself is in flows: br-int answers pods' ARP for the gateway
and has the VPC's FIB (kind fib: local pods and the router's own prefixes; kind
routed: remote hosts and prefixes), each routed hop a dec_ttl and a MAC rewrite;
the router namespace is the slow path (egress, ICMP errors, what the FIB misses).
"""

from __future__ import annotations

import fcntl
import importlib
import ipaddress
import logging
import threading
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator, Optional


from vpcni.backends.common.modules import switchdev_ports
from vpcni.backends.common.nft import load_binding
from vpcni.backends.common import podif
from vpcni.backends.common.router import Routers, gateway_names, l3_name, netns_path, usable
from vpcni.backends.common.rtnl import Rtnl, ThreadRtnl
from vpcni.core.backend import Backend
from vpcni.core.config import NodeConfig
from vpcni.core.errors import BackendError
from vpcni.core.models import (Attachment, Capabilities, Owned, Probe, RemoteState, RoutedState,
                               VpcNetwork, router_mac)
from vpcni.backends.common.podif import describe, get_link
from vpcni.backends.common.underlay import (Underlay, UnderlayCache, find_underlay, netlink_errors,
                                            pod_mtu, underlay_problems)

from . import flows as fl
from .config import OvsConfig
from . import switch as sw
from .guard import HostPortGuard

LOG = logging.getLogger(__name__)

# Preference when several backends are usable and the node pins none: the
# kernel datapath of OVS beats the kernel backend (flows, offload-capable
# NICs); the userspace datapath does not (measured here: < 1 Gbit/s against
# 10+ Gbit/s for kernel VXLAN).
SCORE = {"system": 20, "netdev": 5}


def host_ifname(network: str, container_id: str, ifname: str) -> str:
    """The node-side port name of an attachment: 'vo' + 11 hex digits."""
    return podif.port_name("vo", network, container_id, ifname)


def vswitchd_pid(run_dir: Path) -> Optional[int]:
    """The pid of the running ovs-vswitchd whose pid file is in `run_dir`, else None."""
    try:
        pid = int((run_dir / "ovs-vswitchd.pid").read_text().strip())
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except (OSError, ValueError):
        return None
    return pid if comm.startswith("ovs-vswitchd") else None


class OvsBackend(Backend):
    name = "ovs"
    config_model = OvsConfig

    def __init__(self, node: NodeConfig):
        super().__init__(node)
        self.ipr = ThreadRtnl()
        self._underlays = UnderlayCache()
        self._switch: Optional[sw.Switch] = None
        self._guard = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}
        self.host_ports = HostPortGuard()
        self._offload_checked = False
        # Routed subnets: each VPC's router, reaching its L3VNI through a veth into br-int.
        self.routers = Routers(node, self.ipr, l3="veth")

    @property
    def switch(self) -> sw.Switch:
        # Connected on first use and kept: the agent is long-lived, one OVSDB session serves all.
        with self._guard:
            if self._switch is None:
                self._switch = sw.Switch(self.settings)
            return self._switch

    def close(self) -> None:
        if self._switch is not None:
            self._switch.close()
            self._switch = None
        self.routers.close()
        self.ipr.close()

    @contextmanager
    def _lock(self, scope: str) -> Iterator[None]:
        """Serialise flow convergence of one scope, across threads and processes
        (standalone plugins and the agent may share a node)."""
        with self._guard:
            lock = self._locks.setdefault(scope, threading.Lock())
        directory = Path(self.node.stateDir) / "ovs-locks"
        directory.mkdir(parents=True, exist_ok=True)
        with lock, open(directory / f"{scope}.lock", "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield

    # ------------------------------------------------------------ probe

    @classmethod
    def probe(cls, node: NodeConfig) -> Probe:
        cfg = node.section(cls.name, OvsConfig)
        sock = cfg.db_socket
        facts = {"ovsdb": str(sock), "bridge": cfg.bridge, "datapath_type": cfg.datapathType}

        def no(reason: str) -> Probe:
            return Probe(name=cls.name, available=False, facts=facts, reason=reason)

        try:
            # The backend cannot work without it; an optional extra of vpcni (a
            # kernel-only node does without it).
            importlib.import_module("ovsdbapp.schema.open_vswitch")
        except ImportError as exc:
            return no(f"ovsdbapp (the ovs backend's OVSDB client) is not installed: "
                      f"install vpcni[ovs] ({exc})")
        try:
            load_binding()
        except BackendError as exc:
            return no(str(exc))
        if not sock.exists():
            return no(f"no OVSDB socket at {sock} (ovs.ovsdbSocket/ovs.runDir in {node.source}): "
                      "is ovsdb-server running?")
        query = ["Open_vSwitch", {"op": "select", "table": "Open_vSwitch", "where": [],
                                  "columns": ["iface_types", "datapath_types", "ovs_version"]}]
        try:
            rows = sw.jsonrpc(sock, "transact", query)[0].get("rows", [])
        except (OSError, ConnectionError, ValueError, LookupError) as exc:
            return no(f"OVSDB at {sock} does not answer: {describe(exc)}")
        if not rows:
            return no(f"OVSDB at {sock} has no Open_vSwitch record (run `ovs-vsctl init`)")
        row = rows[0]
        version = sw.ovsdb_set(row.get("ovs_version"))
        facts["ovs_version"] = version[0] if version else None
        pid = vswitchd_pid(cfg.runDir)
        if pid is None:
            return no(f"ovs-vswitchd is not running (no live pid in "
                      f"{cfg.runDir / 'ovs-vswitchd.pid'})")
        iface_types = sw.ovsdb_set(row.get("iface_types"))
        datapath_types = sw.ovsdb_set(row.get("datapath_types"))
        if "vxlan" not in iface_types:
            return no(f"ovs-vswitchd offers no vxlan interfaces (iface_types: "
                      f"{', '.join(iface_types) or 'none'})")
        if cfg.datapathType not in datapath_types:
            return no(f"datapath type {cfg.datapathType!r} (ovs.datapathType) is not offered by "
                      f"ovs-vswitchd (datapath_types: {', '.join(datapath_types) or 'none'})")
        if cfg.datapathType == "system" and not Path("/sys/module/openvswitch").is_dir():
            return no("datapath type 'system' needs the openvswitch kernel module, which is not "
                      "loaded; set ovs.datapathType to 'netdev' for the userspace datapath")
        try:
            ipr = Rtnl()
        except OSError as exc:
            return no(f"cannot open a netlink socket: {describe(exc)}")
        try:
            underlay = find_underlay(ipr, node)
        except BackendError as exc:
            return no(str(exc))
        finally:
            ipr.close()
        facts.update(vtep=str(underlay.address), underlay=underlay.ifname,
                     underlay_mtu=underlay.mtu, pod_mtu=underlay.pod_mtu)
        return Probe(name=cls.name, available=True, score=SCORE[cfg.datapathType], facts=facts,
                     reason=f"ovs-vswitchd (pid {pid}) with vxlan, datapath "
                            f"{cfg.datapathType}, VTEP {underlay.address} on {underlay.ifname} "
                            f"(mtu {underlay.mtu})")

    # ------------------------------------------------------------ per VNI

    def _underlay(self) -> Underlay:
        with netlink_errors("cannot read the underlay"):
            return self._underlays.get(self.ipr, self.node)

    def ensure_network(self, net: VpcNetwork) -> Optional[bool]:
        underlay = self._underlay()
        mtu = pod_mtu(net, underlay)
        self.routers.note_port(net.port)
        self.host_ports.ensure(check=False)
        self._ensure_hw_offload()
        self.switch.ensure_network(net.vni, str(underlay.address), net.port)
        with self._lock("base"):
            self.switch.converge(fl.cookie(fl.BASE), fl.base_flows(self.switch.tunnels().values()))
        if net.subnet is None:
            return None
        return self._ensure_router(net, underlay, mtu) or None

    def _ensure_router(self, net: VpcNetwork, underlay: Underlay, mtu: int) -> bool:
        """The subnet's VPC router and gateway (Routers), their veths' node ends as ports
        of br-int and their flows; whether something had to be built."""
        l3vni = net.subnet.router.l3vni
        # Subnets of one VPC share the router and its L3 port: their ADDs (and the
        # release of the VPC's last subnet) take turns here.
        with self._lock(f"router-{l3vni}"):
            gateway, built = self.routers.ensure(net, underlay, mtu)
            self.switch.mark_l3vni(l3vni, net.port)
            for name, ext in ((gateway, {sw.EXT_GATEWAY: str(net.vni), **self._fib_ids(net)}),
                              (l3_name(l3vni), {sw.EXT_ROUTER: str(l3vni)})):
                link = get_link(self.ipr, name)
                if link is None:
                    raise BackendError(f"router port {name} of VNI {net.vni} disappeared")
                # The netdev's ifindex too: ovs-vswitchd keeps a port whose netdev was
                # re-created (same ofport) but goes on reading the old one's packet
                # socket, so a new netdev must be a new port.
                _, added = self.switch.ensure_router_port(
                    name, {**ext, sw.EXT_IFINDEX: str(link["index"])})
                built = built or added
            if built:
                self._prepare_router_links(net.vni, l3vni)
                self._converge_local(net.vni)
            self._converge_router(l3vni)
        return built

    @staticmethod
    def _fib_ids(net: VpcNetwork) -> dict[str, str]:
        """What the VPC's FIB needs of a routed subnet, kept on its gateway port (so that
        every convergence, the reconcile's too, derives the FIB from the switch alone):
        its L3VNI, gateway/prefix length and the VPC's static routes through it."""
        subnet = net.subnet
        statics = sorted({r.dst for r in subnet.router.routes
                          if r.via in subnet.prefix and r.dst.version == 4})
        return {sw.EXT_GW_L3VNI: str(subnet.router.l3vni),
                sw.EXT_GW_ADDRESS: f"{subnet.gateway}/{subnet.prefix.prefixlen}",
                sw.EXT_GW_STATICS: ",".join(str(d) for d in statics)}

    def _prepare_router_links(self, vni: int, l3vni: int) -> None:
        """On the userspace datapath, tx checksum offload off on the router's ends, as on
        a pod's: ovs-vswitchd reads what they send raw from a packet socket."""
        if self.settings.datapathType != "netdev":
            return
        path = str(netns_path(self.routers.netns_name(l3vni)))
        for ifname in (gateway_names(vni)[1], l3_name(l3vni)):
            try:
                podif.disable_tx_checksum(path, ifname)
            except (OSError, BackendError) as exc:
                LOG.warning("could not turn tx checksum offload off on %s in %s: %s",
                            ifname, path, describe(exc))

    def _ensure_hw_offload(self) -> None:
        """other_config:hw-offload as the config says, or on when a switchdev NIC is here:
        its VF representors are ports of br-int, and their flows go to the NIC."""
        if self._offload_checked:
            return
        wanted = self.settings.hwOffload
        if wanted is None:
            ports = switchdev_ports(self.settings.sysfsRoot)
            wanted = bool(ports) or None
        if wanted is not None:
            have = self.switch.hw_offload()
            if have != ("true" if wanted else "false"):
                self.switch.set_hw_offload(wanted)
                LOG.warning("set other_config:hw-offload=%s on Open vSwitch; ovs-vswitchd "
                            "applies it when it restarts", "true" if wanted else "false")
        self._offload_checked = True

    def release_network(self, vni: int) -> None:
        bridge = self.switch.bridge_exists()
        if bridge:
            gateway = self._gateway(vni)
            with self._lock(f"vni-{vni}"):
                # Its flows (local, gateway among them, and remote), in one bundle; the
                # flows of an L3VNI of that number (another scope) stay.
                self.switch.delete_scopes([fl.cookie(fl.LOCAL, vni), fl.cookie(fl.REMOTE, vni)])
                for row in self.switch.router_rows():
                    if row["external_ids"].get(sw.EXT_GATEWAY) == str(vni):
                        self.switch.del_port(row["name"])
                self.switch.release_vni(vni)
            if gateway is not None and gateway.l3vni is not None:
                self._converge_fib(gateway.l3vni)  # the subnet leaves the VPC's FIB
        # The gateway, and the router with the VPC's last subnet on this node.
        l3vni = self.routers.release(vni)
        if l3vni is not None and bridge:
            self._release_router(l3vni)

    def _release_router(self, l3vni: int) -> None:
        with self._lock(f"router-{l3vni}"), self._lock(f"l3vni-{l3vni}"), \
                self._lock(f"fib-{l3vni}"):
            if l3vni in self.routers.l3vnis():
                return  # built again meanwhile, for another subnet of the VPC
            self.switch.delete_scopes([fl.cookie(fl.ROUTER, l3vni), fl.cookie(fl.ROUTED, l3vni),
                                       fl.cookie(fl.FIB_LOCAL, l3vni)])
            for row in self.switch.router_rows():
                if row["external_ids"].get(sw.EXT_ROUTER) == str(l3vni):
                    self.switch.del_port(row["name"])
            self.switch.release_l3vni(l3vni)

    # ------------------------------------------------------------ flows of a VNI

    def _local_ports(self, vni: int, rows: Optional[list[dict]] = None) -> list[fl.LocalPort]:
        ports = []
        for row in self.switch.attachment_rows() if rows is None else rows:
            ext = row["external_ids"]
            ofport = sw.ofport_of(row)
            if ext.get(sw.EXT_VNI) != str(vni) or not ofport or not ext.get(sw.EXT_MAC):
                continue
            ips = tuple(ipaddress.ip_address(a) for a in ext.get(sw.EXT_IPS, "").split(",") if a)
            ports.append(fl.LocalPort(row["name"], ofport, ext[sw.EXT_MAC], ips))
        return ports

    def _tunnel_ofport(self, vni: int) -> Optional[int]:
        udp_port = self.switch.vnis().get(vni)
        return None if udp_port is None else self.switch.tunnels().get(udp_port)

    def _router_port(self, key: str, value: int) -> Optional[int]:
        """The ofport of the router port whose external_ids have key=value (a working one)."""
        for row in self.switch.router_rows():
            if row["external_ids"].get(key) == str(value):
                return sw.ofport_of(row)
        return None

    @staticmethod
    def _gateway_of(row: dict) -> Optional[fl.Gateway]:
        """A gateway port's row as the flows need it (None while it has no ofport)."""
        ofport = sw.ofport_of(row)
        if not ofport:
            return None
        ext = row["external_ids"]
        try:
            l3vni = int(ext[sw.EXT_GW_L3VNI])
            address = ipaddress.IPv4Interface(ext[sw.EXT_GW_ADDRESS])
            statics = tuple(ipaddress.IPv4Network(d)
                            for d in ext.get(sw.EXT_GW_STATICS, "").split(",") if d)
        except (KeyError, ValueError):
            return fl.Gateway(ofport)  # recorded without its subnet: the slow path only
        return fl.Gateway(ofport, l3vni, address, statics)

    def _gateway(self, vni: int) -> Optional[fl.Gateway]:
        for row in self.switch.router_rows():
            if row["external_ids"].get(sw.EXT_GATEWAY) == str(vni):
                return self._gateway_of(row)
        return None

    def _converge_local(self, vni: int) -> None:
        if not self.switch.bridge_exists():
            return  # nothing was ever built here (e.g. a DEL before any ADD)
        with self._lock(f"vni-{vni}"):
            tunnel = self._tunnel_ofport(vni)
            ports = self._local_ports(vni) if tunnel else []
            gateway = self._gateway(vni) if tunnel else None
            self.switch.converge(fl.cookie(fl.LOCAL, vni),
                                 fl.local_flows(vni, ports, tunnel, gateway))
        if gateway is not None and gateway.l3vni is not None:
            # The VNI's pods are in its VPC's FIB.
            self._converge_fib(gateway.l3vni)

    def _fib_local(self, l3vni: int) -> set[fl.Flow]:
        """The VPC's FIB for what is on this node: the local pods of each of its routed
        subnets here (by their gateway ports), the router's subnets and static routes."""
        if l3vni not in self.switch.l3vnis():
            return set()  # the router is not on this node
        gateways: dict[int, fl.Gateway] = {}
        for row in self.switch.router_rows():
            vni = row["external_ids"].get(sw.EXT_GATEWAY, "")
            gateway = self._gateway_of(row)
            if vni.isdigit() and gateway is not None and gateway.l3vni == l3vni:
                gateways[int(vni)] = gateway
        rows = self.switch.attachment_rows()
        pods = [port for vni in sorted(gateways) for port in self._local_ports(vni, rows)]
        return fl.fib_local_flows(l3vni, router_mac(self._underlay().address),
                                  self._router_port(sw.EXT_ROUTER, l3vni),
                                  gateways.values(), pods)

    def _converge_fib(self, l3vni: int) -> None:
        """The local part of the VPC's FIB (kind fib of the L3VNI): after a change of
        the local ports of any of its subnets, of its gateways or of its L3 port."""
        with self._lock(f"fib-{l3vni}"):
            self.switch.converge(fl.cookie(fl.FIB_LOCAL, l3vni), self._fib_local(l3vni))

    def _converge_router(self, l3vni: int) -> None:
        """The flows of the router's L3 port (none while it has no working port)."""
        with self._lock(f"l3vni-{l3vni}"):
            port = self._router_port(sw.EXT_ROUTER, l3vni)
            desired = fl.router_flows(l3vni, port, router_mac(self._underlay().address)) \
                if port else set()
            self.switch.converge(fl.cookie(fl.ROUTER, l3vni), desired)

    def reconcile(self, records, full: bool = True, locked=None) -> list[str]:
        """Re-install the host-port rules when they are not intact; on a full pass also
        re-derive every local VNI's port flows (anti-spoofing among them) from the
        switch's ports, so flows someone removed or changed come back."""
        corrected = ["(nftables host-port rules)"] if self.host_ports.ensure() else []
        if full and self.switch.bridge_exists():
            for vni in sorted(self.switch.vnis()):
                self._converge_local(vni)
            for l3vni in sorted(self.switch.l3vnis()):
                self._converge_router(l3vni)
                self._converge_fib(l3vni)
        if full:
            self.routers.converge_probe_routes(records())
            if self.routers.reconcile(records):
                corrected.append("(nftables routing rules)")
        return corrected

    def apply_remote(self, vni: int, remote: RemoteState) -> None:
        tunnel = self._tunnel_ofport(vni)
        if tunnel is None:
            return  # the VNI is not on this node (no ensure_network, or released)
        # A route reflected back to us would make the VTEP send to itself.
        local = self._underlay().address
        endpoints = [ep for ep in remote.endpoints if ep.vtep != local]
        flood = [vtep for vtep in remote.flood if vtep != local]
        with self._lock(f"vni-{vni}"):
            self.switch.converge(fl.cookie(fl.REMOTE, vni),
                                 fl.remote_flows(vni, endpoints, flood, tunnel))

    def apply_routed(self, l3vni: int, state: RoutedState) -> None:
        local = self._underlay().address
        # What a router may install of it, for the namespace and the flows alike.
        state = usable(state, local)
        # The router's routes and neighbours (remote hosts and prefixes via VTEP, the
        # VTEP at its router MAC); br-int carries frames to those MACs to the VTEPs.
        nexthops = self.routers.apply(l3vni, state)
        udp_port = self.switch.l3vnis().get(l3vni) if self.switch.bridge_exists() else None
        tunnel = None if udp_port is None else self.switch.tunnels().get(udp_port)
        if tunnel is None:
            return  # the router is not on this node (no ensure_network, or released)
        nexthops = {mac: vtep for mac, vtep in nexthops.items() if vtep != local}
        # And the VPC's FIB in flows routes pods' traffic to remote hosts and prefixes
        # straight to their VTEPs' routers (the router's routes stay: the slow path).
        with self._lock(f"l3vni-{l3vni}"):
            self.switch.converge(fl.cookie(fl.ROUTED, l3vni),
                                 fl.routed_flows(l3vni, nexthops, tunnel)
                                 | fl.fib_remote_flows(l3vni, state, local, tunnel))

    # ------------------------------------------------------------ per pod

    @staticmethod
    def _external_ids(att: Attachment, mac: str) -> dict[str, str]:
        return {sw.EXT_NETWORK: att.network, sw.EXT_CONTAINER: att.container_id,
                sw.EXT_IFNAME: att.ifname, sw.EXT_VNI: str(att.vni),
                sw.EXT_UDP_PORT: str(att.port), sw.EXT_MAC: mac.lower(),
                sw.EXT_IPS: ",".join(str(ip.address.ip) for ip in att.ips)}

    @staticmethod
    def _is_of(row: dict, att: Attachment) -> bool:
        ext = row["external_ids"]
        return (ext.get(sw.EXT_NETWORK), ext.get(sw.EXT_CONTAINER), ext.get(sw.EXT_IFNAME)) == \
            att.key

    def describe(self) -> Capabilities:
        netdev = self.settings.datapathType == "netdev"
        return Capabilities(ports=["veth", "representor"], offload=not netdev,
                            pod_tx_checksum_off=netdev, port_prefix="vo", routing=True)

    def port_name(self, att: Attachment) -> str:
        return host_ifname(att.network, att.container_id, att.ifname)

    def pod_mtu(self, net: VpcNetwork) -> int:
        return pod_mtu(net, self._underlay())

    def add_port(self, net: VpcNetwork, att: Attachment) -> None:
        host = att.host_ifname
        if self._tunnel_ofport(net.vni) is None:
            raise BackendError(f"VNI {net.vni} is not set up on {self.settings.bridge}: "
                               "ensure_network must come before add_port")
        link = get_link(self.ipr, host)
        if link is None or link.get("IFLA_IFALIAS") != podif.attachment_alias(*att.key):
            raise BackendError(f"port {host} of attachment {'/'.join(att.key)} is missing or "
                               "not marked as its own")
        row = self.switch.row("Interface", host)
        if row is not None and not self._is_of(row, att):
            raise BackendError(f"OVS port {host} exists and is not this attachment's "
                               f"(external_ids {row['external_ids']})")
        with ExitStack() as undo:
            self.switch.add_port(host, self._external_ids(att, att.mac))
            undo.callback(self._undo_port, host, att.vni)
            with netlink_errors(f"could not set {host} up"):
                self.ipr.link("set", index=link["index"], state="up")
            self._converge_local(att.vni)
            undo.pop_all()
        self.routers.port_changed(att, added=True)
        if att.interface != "vfio" and att.netns:
            podif.announce(att.netns, att.ifname, att.mac, att.ips)

    def _undo_port(self, host: str, vni: int) -> None:
        try:
            self.switch.del_port(host)
            self._converge_local(vni)
        except BackendError as exc:
            LOG.error("rollback: could not remove OVS port %s: %s", host, exc)

    def remove_port(self, att: Attachment) -> None:
        host = att.host_ifname or host_ifname(att.network, att.container_id, att.ifname)
        row = self.switch.row("Interface", host)
        if row is not None:
            if self._is_of(row, att):
                self.switch.del_port(host)
            else:
                LOG.warning("remove_port %s: OVS port %s is not this attachment's: left alone",
                            att.key, host)
        self._converge_local(att.vni)
        self.routers.port_changed(att, added=False)

    def check_port(self, net: VpcNetwork, att: Attachment) -> list[str]:
        problems = self._check_node(net, att)
        if net.subnet is not None:
            problems += self.routers.problems(net) + self._check_router(net)
        return problems

    def _check_router(self, net: VpcNetwork) -> list[str]:
        """The routed subnet's ports in br-int and their flows."""
        if not self.switch.bridge_exists():
            return []  # said by _check_node
        l3vni = net.subnet.router.l3vni
        problems = []
        rows = {row["name"]: row for row in self.switch.router_rows()}
        for name, key, value in ((gateway_names(net.vni)[0], sw.EXT_GATEWAY, net.vni),
                                 (l3_name(l3vni), sw.EXT_ROUTER, l3vni)):
            row = rows.get(name)
            if row is None or row["external_ids"].get(key) != str(value):
                problems.append(f"router port {name} missing on {self.settings.bridge}")
            elif not sw.ofport_of(row):
                problems.append(f"router port {name} is not working "
                                f"({sw.first_value(row.get('error')) or 'no ofport'})")
        gateway = self._gateway(net.vni)
        tunnel = self._tunnel_ofport(net.vni)
        if gateway and tunnel:
            installed = self.switch.dump(fl.cookie(fl.LOCAL, net.vni))
            missing = [f for f in fl.gateway_flows(net.vni, gateway, tunnel)
                       if f not in installed]
            if missing:
                problems.append(f"gateway port {gateway_names(net.vni)[0]} lacks flow(s): "
                                + "; ".join(sorted(str(f) for f in missing)))
        port = self._router_port(sw.EXT_ROUTER, l3vni)
        if port:
            installed = self.switch.dump(fl.cookie(fl.ROUTER, l3vni))
            missing = [f for f in fl.router_flows(l3vni, port,
                                                  router_mac(self._underlay().address))
                       if f not in installed]
            if missing:
                problems.append(f"router port {l3_name(l3vni)} lacks flow(s): "
                                + "; ".join(sorted(str(f) for f in missing)))
        installed = self.switch.dump(fl.cookie(fl.FIB_LOCAL, l3vni))
        missing = [f for f in self._fib_local(l3vni) if f not in installed]
        if missing:
            problems.append(f"the FIB of L3VNI {l3vni} lacks flow(s): "
                            + "; ".join(sorted(str(f) for f in missing)))
        return problems

    def _check_node(self, net: VpcNetwork, att: Attachment) -> list[str]:
        bridge = self.settings.bridge
        if not self.switch.bridge_exists():
            return [f"OVS bridge {bridge} missing"]
        problems = []
        tunnel = self._tunnel_ofport(net.vni)
        if tunnel is None:
            problems.append(f"VNI {net.vni} or its VXLAN port {sw.tunnel_name(net.port)} "
                            f"missing on {bridge}")
        host = att.host_ifname or host_ifname(att.network, att.container_id, att.ifname)
        link = get_link(self.ipr, host)
        what = "host veth" if att.interface == "veth" else "representor"
        if link is None:
            problems.append(f"{what} {host} missing")
        elif att.mtu and link.get("IFLA_MTU") != att.mtu:
            # The OVS port is the netdev itself (vpcni sets no mtu_request).
            problems.append(f"{what} {host} MTU {link.get('IFLA_MTU')} differs from "
                            f"recorded {att.mtu}")
        row = self.switch.row("Interface", host)
        if row is None or not self._is_of(row, att):
            return problems + [f"OVS port {host} missing on {bridge}"]
        ofport = sw.ofport_of(row)
        if not ofport:
            return problems + [f"OVS port {host} is not working "
                               f"({sw.first_value(row.get('error')) or 'no ofport'})"]
        ext = row["external_ids"]
        port = fl.LocalPort(host, ofport, ext.get(sw.EXT_MAC, ""),
                            tuple(ip.address.ip for ip in att.ips))
        installed = self.switch.dump(fl.cookie(fl.LOCAL, net.vni))
        missing = [f for f in fl.port_flows(net.vni, port) if f not in installed]
        if tunnel is not None:
            floods = [f for f in installed if f.table == fl.FLOOD_LOCAL]
            if not floods or any(f"output:{ofport}" not in f.actions.split(",") for f in floods):
                missing.append(f"flood to port {ofport} in table {fl.FLOOD_LOCAL}")
        if missing:
            problems.append(f"OVS port {host} lacks flow(s): "
                            + "; ".join(sorted(str(f) for f in missing)))
        return problems

    # ------------------------------------------------------------ inventory

    def health(self) -> list[str]:
        return underlay_problems(self.ipr, self.node)

    def owned(self) -> Owned:
        attachments = {}
        for row in self.switch.attachment_rows():
            ext = row["external_ids"]
            key = (ext.get(sw.EXT_NETWORK), ext.get(sw.EXT_CONTAINER), ext.get(sw.EXT_IFNAME))
            if all(key):
                attachments[row["name"]] = key
        return Owned(vnis=set(self.switch.vnis()), attachments=attachments)
