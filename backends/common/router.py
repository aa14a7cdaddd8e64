"""A VPC's router on a node: a network namespace per VPC (the OpenStack DVR pattern),
shared by the kernel and ovs backends. See docs/routing.md.

    node netns                                   router netns <prefix><L3VNI>
    VNI switch ── vgw<VNI>  ═══ veth ═══  gw<VNI>   gateway address, GATEWAY_MAC (anycast)
    (kernel) vl3<L3VNI>: VXLAN device, created here, moved ──▶ vl3<L3VNI>  MAC = router MAC
    (ovs)    vl3<L3VNI>  ═══ veth ═══  vl3<L3VNI>          (br-int carries the L3VNI)
    vrt<L3VNI> ═══ veth ═══ up0    default route, SNAT: the VPC's way out through the node

This kernel has no VRF: a namespace is the routing table of one VPC. The L3VNI's
VXLAN device keeps its UDP socket in the node's namespace (a device keeps the
namespace it was created in for its socket), so routed traffic between nodes is
VXLAN on the underlay with the L3VNI and the receiving node's router MAC
(symmetric IRB). Remote hosts (type-2 with the L3VNI) and prefixes (type-5)
become routes `via <VTEP> dev vl3<L3VNI> onlink`, a permanent neighbour
VTEP -> router MAC and, for the VXLAN device, an FDB entry router MAC -> VTEP.

Egress: the router masquerades to its transit address (169.254.64.0/18: one per
VPC on the node), the node masquerades that to its own address. Each router
namespace has its own connection tracking, so VPCs with the same CIDRs never
mix connections. The node's nftables table `inet vpcni_route` keeps VPCs
apart on the node: nothing from one transit link to another, no VXLAN from a
VPC, nothing into a VPC that it did not open, nothing to the node itself but
replies and (DNATed) services.

Rare steps (a router, a gateway) run `ip` and `nft` (the router's own rules through
nsenter: a libnftables context belongs to the namespace it was made in); routes,
neighbours and FDB entries (every EVPN change) go through a netlink socket in the
router's namespace, and the node's rules through libnftables.

Router namespaces are named (`ip netns add`) so that they outlive the agent and
the node's tools see them; the agent refuses to create one where /run/netns
does not propagate to the node (a slave mount: a process started by `ip netns
exec`), where it would vanish with the process.
"""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import logging
import os
import socket
import subprocess
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from pyroute2.netlink.exceptions import NetlinkError

from vpcni.core.config import NodeConfig, not_a_vpc
from vpcni.core.errors import BackendError, InvalidConfig, NotAvailable
from vpcni.core.models import (GATEWAY_MAC, RoutedState, Router, VpcNetwork, router_mac)

from . import podif
from .rtnl import Rtnl, socket_in
from .underlay import Underlay

LOG = logging.getLogger(__name__)

NETNS_DIR = Path("/run/netns")
ROUTER_ALIAS = "vpcni:router:"
PROTO = 196                  # rtm_protocol of the routes we install in a router from EVPN
STATIC_PROTO = 197           # ... of the VPC's static routes, and of the node's probe routes
PREFIX_METRIC = 1000         # type-5 routes lose to a connected subnet of the same prefix
TRANSIT = ipaddress.ip_network("169.254.64.0/18")
TRANSIT_NODE = TRANSIT.network_address + 1
UPLINK = "up0"
RTNH_F_ONLINK = 4
NUD_PERMANENT = 0x80
NTF_SELF = 0x02

NODE_RULES = """
add table inet vpcni_route
add set inet vpcni_route vxlan_ports { type inet_service; }
add set inet vpcni_route underlay { type ipv4_addr; flags interval; }
add chain inet vpcni_route input { type filter hook input priority filter - 2; policy accept; }
add chain inet vpcni_route forward { type filter hook forward priority filter - 2; policy accept; }
add chain inet vpcni_route postrouting { type nat hook postrouting priority srcnat; policy accept; }
flush chain inet vpcni_route input
flush chain inet vpcni_route forward
flush chain inet vpcni_route postrouting
add rule inet vpcni_route input iifname "vrt*" ct state established,related accept
add rule inet vpcni_route input iifname "vrt*" ct status dnat accept
add rule inet vpcni_route input iifname "vrt*" counter drop comment "vpc-to-node"
add rule inet vpcni_route forward iifname "vrt*" oifname "vrt*" counter drop comment "vpc-to-vpc"
add rule inet vpcni_route forward iifname "vrt*" udp dport @vxlan_ports counter drop comment "vxlan-from-vpc"
add rule inet vpcni_route forward iifname "vrt*" tcp dport 179 counter drop comment "bgp-from-vpc"
add rule inet vpcni_route forward iifname "vrt*" ct status != dnat ip daddr @underlay counter drop comment "vpc-to-underlay"
add rule inet vpcni_route forward oifname "vrt*" ct state established,related accept
add rule inet vpcni_route forward oifname "vrt*" counter drop comment "into-vpc"
add rule inet vpcni_route postrouting iifname "vrt*" oifname != "vrt*" masquerade
"""
# (chain, rules) the node's table must have: what `reconcile` checks.
NODE_EXPECTED = {}
for _line in NODE_RULES.splitlines():
    if _line.startswith("add rule "):
        NODE_EXPECTED[_line.split()[4]] = NODE_EXPECTED.get(_line.split()[4], 0) + 1
# VXLAN ports a pod may never send to through the node, whatever the VNIs here use.
VXLAN_PORTS = frozenset({4789, 4790, 8472})

ROUTER_RULES = f"""
add table inet vpcni_router
add chain inet vpcni_router forward {{ type filter hook forward priority filter; policy accept; }}
add chain inet vpcni_router postrouting {{ type nat hook postrouting priority srcnat; policy accept; }}
flush chain inet vpcni_router forward
flush chain inet vpcni_router postrouting
add rule inet vpcni_router forward iifname "{UPLINK}" ct state established,related accept
add rule inet vpcni_router forward iifname "{UPLINK}" ip saddr {TRANSIT_NODE} accept comment "node-probes"
add rule inet vpcni_router forward iifname "{UPLINK}" counter drop comment "outside-to-vpc"
add rule inet vpcni_router postrouting oifname "{UPLINK}" masquerade
"""


def gateway_names(vni: int) -> tuple[str, str]:
    """(node end, router end) of a subnet's gateway veth."""
    return f"vgw{vni}", f"gw{vni}"


def l3_name(l3vni: int) -> str:
    return f"vl3{l3vni}"


def transit_name(l3vni: int) -> str:
    return f"vrt{l3vni}"


def _run(cmd: list[str], what: str, stdin: Optional[str] = None) -> str:
    try:
        proc = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        raise BackendError(f"could not {what}: {exc}") from exc
    if proc.returncode != 0:
        raise BackendError(f"could not {what}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


def _sysctl(name: str, value: str) -> None:
    """A network sysctl of this process's namespace (the node's)."""
    path = Path("/proc/sys/net") / name
    try:
        if path.read_text().strip() != value:
            path.write_text(value)
    except FileNotFoundError:
        pass  # IPv6 off on the node: nothing to turn off
    except OSError as exc:
        raise BackendError(f"could not set net.{name.replace('/', '.')} = {value}: "
                           f"{podif.describe(exc)}") from exc


def netns_path(name: str) -> Path:
    return NETNS_DIR / name


def _netns_dir_shared() -> Optional[str]:
    """Why a namespace created here would not be the node's (None: it would be): a
    router namespace is a bind mount under /run/netns, which must propagate to the
    node's mount namespace (a process started by `ip netns exec` has a private copy
    of it; a DaemonSet mounts /run/netns with mountPropagation Bidirectional)."""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if len(fields) > 6 and fields[4] == str(NETNS_DIR):
            tags = fields[6:fields.index("-")] if "-" in fields else []
            if any(t.startswith("master:") for t in tags) and \
                    not any(t.startswith("shared:") for t in tags):
                return (f"{NETNS_DIR} is a slave mount in this process's mount namespace "
                        "(started by `ip netns exec`?): a router namespace made here would "
                        "vanish with it; run the agent in the node's mount namespace "
                        "(the DaemonSet mounts /run/netns Bidirectional)")
    return None


class RouterNs:
    """One router namespace: a netlink socket in it (calls serialised)."""

    def __init__(self, name: str):
        self.name = name
        self.path = netns_path(name)
        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        # A namespace of the same name made again later is another one.
        self.inode = os.fstat(fd).st_ino
        try:
            sock = socket_in(fd, socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, 0)
        finally:
            os.close(fd)
        self.ipr = Rtnl(sock=sock, strict_check=True)
        self.lock = threading.RLock()

    def run(self, *cmd: str, what: str, stdin: Optional[str] = None) -> str:
        return _run(["nsenter", f"--net={self.path}", "--", *cmd], what, stdin)

    def link(self, name: str):
        return podif.get_link(self.ipr, name)

    def close(self) -> None:
        self.ipr.close()


class Routers:
    """The VPC routers of this node. `l3` is how a router reaches its L3VNI: "vxlan"
    (a kernel VXLAN device of its own) or "veth" (a veth whose node end the ovs
    backend puts into br-int, which does the VXLAN)."""

    def __init__(self, node: NodeConfig, ipr, l3: str):
        self.node = node
        self.ipr = ipr  # the node namespace's (a ThreadRtnl)
        self.l3 = l3
        self.prefix = node.routerNamespacePrefix
        self._open: dict[int, RouterNs] = {}
        self._guard = threading.Lock()
        self._locks: dict[int, threading.Lock] = {}
        self._node_rules: Optional[tuple[frozenset, frozenset]] = None  # (ports, underlay)
        self._ports: set[int] = set()
        self._nft_ctx = None
        self._nft_lock = threading.Lock()
        self._lock_dir = Path(node.stateDir) / "locks"

    # ------------------------------------------------------------ names and locks

    def netns_name(self, l3vni: int) -> str:
        return f"{self.prefix}{l3vni}"

    @contextmanager
    def _locked(self, l3vni: int) -> Iterator[None]:
        """This router's lock in this process and, for other processes (standalone
        plugins), a file lock; L3VNI 0 (no VNI is 0): the node's transit addresses."""
        with self._guard:
            lock = self._locks.setdefault(l3vni, threading.Lock())
        with lock:
            self._lock_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self._lock_dir / f"router.{l3vni}", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                         0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)

    def _ns(self, l3vni: int) -> Optional[RouterNs]:
        """The router's namespace, opened (None: there is none)."""
        with self._guard:
            ns = self._open.get(l3vni)
            if ns is not None:
                try:
                    same = os.stat(ns.path).st_ino == ns.inode
                except OSError:
                    same = False
                if same:
                    return ns
                with ns.lock:
                    ns.close()
                del self._open[l3vni]
            name = self.netns_name(l3vni)
            if not netns_path(name).exists():
                return None
            try:
                ns = RouterNs(name)
            except OSError:
                return None  # a file left by a namespace that is gone
            self._open[l3vni] = ns
            return ns

    def l3vnis(self) -> set[int]:
        """The L3VNIs of the routers on this node."""
        out = set()
        try:
            names = os.listdir(netns_path(""))
        except OSError:
            return out
        for name in names:
            rest = name[len(self.prefix):] if name.startswith(self.prefix) else ""
            if rest.isdigit():
                out.add(int(rest))
        return out

    # ------------------------------------------------------------ build

    def ensure(self, net: VpcNetwork, underlay: Underlay, mtu: int) -> tuple[str, bool]:
        """The router of the subnet's VPC and the subnet's gateway; (the node-side
        gateway port, whether something had to be built)."""
        subnet = net.subnet
        assert subnet is not None
        router = subnet.router
        node_end, router_end = gateway_names(net.vni)
        ns = self._ns(router.l3vni)
        if ns is not None and self._complete(ns, router, net, mtu):
            return node_end, False
        self.check_subnet(net, underlay)
        with self._locked(router.l3vni):
            ns = self._ns(router.l3vni)
            if ns is None:
                ns = self._create(router.l3vni)
            with ns.lock:
                self._ensure_router(ns, router, net.port, underlay, mtu)
                self._ensure_gateway(ns, net, mtu)
        return node_end, True

    def _complete(self, ns: RouterNs, router: Router, net: VpcNetwork, mtu: int) -> bool:
        """Whether the router and the subnet's gateway are in place (a quick look)."""
        with ns.lock:
            gw = ns.link(gateway_names(net.vni)[1])
            l3 = ns.link(l3_name(router.l3vni))
            if gw is not None and self._static_missing(ns, net):
                return False
        node_gw = podif.get_link(self.ipr, gateway_names(net.vni)[0])
        return (gw is not None and l3 is not None and node_gw is not None
                and gw.get("IFLA_MTU") == mtu and podif.IFF_UP & gw["flags"]
                and podif.IFF_UP & node_gw["flags"]
                and (not router.egress or podif.get_link(self.ipr, transit_name(router.l3vni))
                     is not None))

    def _create(self, l3vni: int) -> RouterNs:
        name = self.netns_name(l3vni)
        why = _netns_dir_shared()
        if why:
            raise NotAvailable(f"cannot create router namespace {name}: {why}")
        _run(["ip", "netns", "add", name], f"create router namespace {name}")
        try:
            ns = RouterNs(name)
        except OSError as exc:
            raise BackendError(f"router namespace {name} cannot be opened: {exc}") from exc
        with self._guard:
            self._open[l3vni] = ns
        LOG.info("router of L3VNI %d: namespace %s created", l3vni, name)
        return ns

    def _ensure_router(self, ns: RouterNs, router: Router, port: int, underlay: Underlay,
                       mtu: int) -> None:
        # Every time the router is not complete (a crash after `ip netns add` leaves a
        # namespace without them): /proc/sys/net is the namespace of whoever opens it.
        ns.run("sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward && "
               "echo 0 > /proc/sys/net/ipv4/conf/all/rp_filter && "
               "echo 0 > /proc/sys/net/ipv4/conf/default/rp_filter && "
               "ip link set lo up", what=f"configure router namespace {ns.name}")
        ns.run("nft", "-f", "-", what=f"load the router's rules in {ns.name}", stdin=ROUTER_RULES)
        name = l3_name(router.l3vni)
        rmac = router_mac(underlay.address)
        alias = f"{ROUTER_ALIAS}{router.l3vni}"
        if ns.link(name) is None:
            if podif.get_link(self.ipr, name) is None:
                if self.l3 == "vxlan":
                    _run(["ip", "link", "add", name, "type", "vxlan", "id", str(router.l3vni),
                          "local", str(underlay.address), "dstport", str(port), "nolearning"],
                         f"create the L3VNI device {name}")
                else:
                    _run(["ip", "link", "add", name, "type", "veth", "peer", "name", name,
                          "netns", str(ns.path)], f"create the L3VNI link {name}")
            if self.l3 == "vxlan":
                _run(["ip", "link", "set", name, "alias", alias, "address", rmac, "mtu",
                      str(mtu), "netns", str(ns.path)], f"move {name} into {ns.name}")
        if self.l3 == "veth":
            # No IPv6 link-local on the node end: the node has no business in the VPC.
            _sysctl(f"ipv6/conf/{name}/disable_ipv6", "1")
            _run(["ip", "link", "set", name, "alias", alias, "mtu", str(mtu), "up"],
                 f"configure {name}")
        ns.run("ip", "link", "set", name, "address", rmac, "mtu", str(mtu), "up",
               what=f"configure {name} in {ns.name}")
        if router.egress:
            self._ensure_transit(ns, router.l3vni)
        self._ports.add(port)
        self._ensure_node_rules(underlay)

    def _ensure_transit(self, ns: RouterNs, l3vni: int) -> None:
        node_end = transit_name(l3vni)
        if self._transit_hop(l3vni) is not None and ns.link(UPLINK) is not None and any(
                msg.get("dst_len") == 0 for msg in ns.ipr.route("dump", family=socket.AF_INET)):
            return
        # One address per router: chosen and taken (its route) under the node's lock.
        with self._locked(0):
            address = self._transit_address(l3vni)
            if podif.get_link(self.ipr, node_end) is None:
                _run(["ip", "link", "add", node_end, "type", "veth", "peer", "name", UPLINK,
                      "netns", str(ns.path)], f"create the transit link {node_end}")
            _run(["sh", "-c", f"ip link set {node_end} alias {ROUTER_ALIAS}{l3vni} up && "
                  f"ip addr replace {TRANSIT_NODE}/32 dev {node_end} && "
                  f"ip route replace {address}/32 dev {node_end}"], f"configure {node_end}")
        # The node forwards between the VPC and the underlay (as every Kubernetes node).
        _sysctl("ipv4/ip_forward", "1")
        ns.run("sh", "-c", f"ip addr replace {address}/32 dev {UPLINK} && "
               f"ip link set {UPLINK} up && "
               f"ip route replace {TRANSIT_NODE}/32 dev {UPLINK} && "
               f"ip route replace default via {TRANSIT_NODE} dev {UPLINK}",
               what=f"configure {UPLINK} in {ns.name}")

    def _transit_address(self, l3vni: int) -> ipaddress.IPv4Address:
        """The router side's transit address: one per VPC on this node, from the
        L3VNI, the next free one when another VPC's router has it."""
        taken = {}
        for msg in self.ipr.route("dump", family=2):
            dst, oif = msg.get("RTA_DST"), msg.get("RTA_OIF")
            if dst and msg["dst_len"] == 32 and ipaddress.ip_address(dst) in TRANSIT:
                taken[ipaddress.ip_address(dst)] = oif
        size = TRANSIT.num_addresses - 3
        mine = podif.get_link(self.ipr, transit_name(l3vni))
        for step in range(size):
            address = TRANSIT.network_address + 2 + (l3vni + step) % size
            owner = taken.get(address)
            if owner is None or (mine is not None and owner == mine["index"]):
                return address
        raise BackendError(f"no free transit address in {TRANSIT} for L3VNI {l3vni}")

    def reconcile(self, records=None) -> bool:
        """The node's routing rules back when someone flushed or changed them (a firewall
        reload), while routers exist; with `records` (the attachment records, read after
        the routers were listed) also remove routers no record needs any more (a crash
        or a failed ADD left them). True when the rules had to be re-installed."""
        routers = self.l3vnis()
        if records is not None and routers:
            needed = {a.subnet.router.l3vni for a in records() if a.subnet is not None}
            for l3vni in sorted(routers - needed):
                with self._locked(l3vni):
                    self._ns(l3vni)  # opened, so that _remove finds its gateways
                    LOG.warning("router of L3VNI %d: no attachment needs it: removed", l3vni)
                    self._remove(l3vni)
            routers = self.l3vnis()
        if not routers:
            return False
        if self._node_rules_intact():
            return False
        LOG.warning("the node's routing rules (table inet vpcni_route) were flushed or "
                    "changed: re-installed")
        self._node_rules = None
        self._ensure_node_rules()
        return True

    def _node_rules_intact(self) -> bool:
        with self._nft_lock:
            for chain, count in NODE_EXPECTED.items():
                try:
                    items = self._nft().list_json(f"chain inet vpcni_route {chain}")
                except BackendError:
                    return False
                if sum(1 for item in items if "rule" in item) != count:
                    return False
        return True

    def note_port(self, port: int) -> None:
        """A VXLAN port this node uses (any network's): no pod sends to it through the
        node (installed once a router exists here)."""
        if port not in self._ports:
            self._ports.add(port)
            if self._node_rules is not None:
                self._ensure_node_rules()

    def _nft(self):
        if self._nft_ctx is None:
            from .nft import Nft

            self._nft_ctx = Nft()
        return self._nft_ctx

    def _ensure_node_rules(self, underlay: Optional[Underlay] = None) -> None:
        """The node's table (once per process, and again when the underlay's prefixes
        or the VXLAN ports changed), in one transaction."""
        nets = self._underlay_nets(underlay) if underlay is not None else \
            (self._node_rules or (frozenset(), frozenset()))[1]
        ports = frozenset(self._ports | VXLAN_PORTS)
        if self._node_rules == (ports, nets):
            return
        text = NODE_RULES + "flush set inet vpcni_route vxlan_ports\n" + \
            f"add element inet vpcni_route vxlan_ports {{ {', '.join(map(str, sorted(ports)))} }}\n" + \
            "flush set inet vpcni_route underlay\n" + \
            (f"add element inet vpcni_route underlay {{ {', '.join(sorted(map(str, nets)))} }}\n"
             if nets else "")
        with self._nft_lock:
            self._nft().run(text, "load the node's routing rules (table inet vpcni_route)")
        self._node_rules = (ports, nets)

    def _underlay_nets(self, underlay: Underlay) -> frozenset:
        """The underlay's IPv4 prefixes (those of the VTEP's interface, and the VTEP): a
        VPC's way out never reaches the nodes, the reflectors or anything else there."""
        nets = {ipaddress.ip_network(f"{underlay.address}/32")} \
            if underlay.address.version == 4 else set()
        link = podif.get_link(self.ipr, underlay.ifname)
        for msg in self.ipr.addr("dump", family=socket.AF_INET):
            if link is not None and msg["index"] == link["index"] and msg.get("IFA_ADDRESS"):
                nets.add(ipaddress.ip_network(f"{msg.get('IFA_ADDRESS')}/{msg['prefixlen']}",
                                              strict=False))
        # An interval set takes no overlapping elements (the VTEP is in its prefix).
        return frozenset(ipaddress.collapse_addresses(nets))

    def check_subnet(self, net: VpcNetwork, underlay: Underlay) -> None:
        """A routed subnet may not overlap the node's underlay (its probe routes and its
        router would take the node's own traffic)."""
        prefix = net.subnet.prefix
        for other in self._underlay_nets(underlay):
            if prefix.overlaps(other):
                raise InvalidConfig(f"routing.subnet {prefix} of network {net.name!r} overlaps "
                                    f"the node's underlay {other}: a VPC's subnet must not")

    def _ensure_gateway(self, ns: RouterNs, net: VpcNetwork, mtu: int) -> None:
        subnet = net.subnet
        node_end, router_end = gateway_names(net.vni)
        alias = f"{ROUTER_ALIAS}{subnet.router.l3vni}:gw:{net.vni}"
        if ns.link(router_end) is None:
            stale = podif.get_link(self.ipr, node_end)
            if stale is not None:
                if (stale.get("IFLA_IFALIAS") or alias) != alias:
                    raise BackendError(f"{node_end} is the gateway of another router "
                                       f"({stale.get('IFLA_IFALIAS')}): VNI {net.vni} cannot "
                                       f"be a subnet of L3VNI {subnet.router.l3vni} too")
                _run(["ip", "link", "del", node_end], f"remove a stale {node_end}")
            _run(["ip", "link", "add", node_end, "type", "veth", "peer", "name", router_end,
                  "netns", str(ns.path)], f"create the gateway link {node_end}")
        # No IPv6 link-local on the node end: the node has no business in the VPC.
        _sysctl(f"ipv6/conf/{node_end}/disable_ipv6", "1")
        _run(["ip", "link", "set", node_end, "alias", alias, "mtu", str(mtu), "up"],
             f"configure {node_end}")
        ns.run("sh", "-c", f"ip link set {router_end} address {GATEWAY_MAC} mtu {mtu} && "
               f"ip addr replace {subnet.gateway}/{subnet.prefix.prefixlen} dev {router_end} && "
               f"ip link set {router_end} up", what=f"configure the gateway {router_end}")
        self._static_routes(ns, net)

    @staticmethod
    def _static_wanted(net: VpcNetwork) -> dict:
        """The VPC's static routes whose next hop is in this subnet: dst -> via."""
        return {r.dst: r.via for r in net.subnet.router.routes if r.via in net.subnet.prefix}

    def _static_routes(self, ns: RouterNs, net: VpcNetwork) -> None:
        """The VPC's static routes through a next hop in this subnet, on its gateway (the
        node that has the next hop announces the destination as a type-5 route too)."""
        router_end = gateway_names(net.vni)[1]
        for dst, via in self._static_wanted(net).items():
            ns.run("ip", "route", "replace", str(dst), "via", str(via), "dev", router_end,
                   "proto", str(STATIC_PROTO),
                   what=f"add the VPC's static route {dst} via {via}")

    def _static_missing(self, ns: RouterNs, net: VpcNetwork) -> bool:
        wanted = self._static_wanted(net)
        if not wanted:
            return False
        have = {ipaddress.ip_network(f"{m.get('RTA_DST')}/{m['dst_len']}")
                for m in ns.ipr.route("dump", family=socket.AF_INET)
                if m["proto"] == STATIC_PROTO and m.get("RTA_DST")}
        return bool(wanted.keys() - have)

    # ------------------------------------------------------------ release

    def release(self, vni: int) -> Optional[int]:
        """Remove VNI `vni`'s gateway from whichever router has it, and the router when
        it was its last subnet; the router's L3VNI when it went too."""
        gateway = gateway_names(vni)[1]
        for l3vni in sorted(self.l3vnis()):
            ns = self._ns(l3vni)
            if ns is None:
                continue
            with ns.lock:
                if ns.link(gateway) is None:
                    continue
            with self._locked(l3vni):
                with ns.lock:
                    if ns.link(gateway) is not None:
                        ns.run("ip", "link", "del", gateway,
                               what=f"remove the gateway of VNI {vni}")
                    left = self._gateways(ns)
                if not left:
                    self._remove(l3vni)
                    return l3vni
            return None
        node_end = gateway_names(vni)[0]
        if podif.get_link(self.ipr, node_end) is not None:
            _run(["ip", "link", "del", node_end], f"remove {node_end}")
        return None

    @staticmethod
    def _gateways(ns: RouterNs) -> list[str]:
        """The router ends of the router's gateways (`gw<VNI>`); the caller holds ns.lock."""
        return [name for name in (link.get("IFLA_IFNAME") for link in ns.ipr.link("dump"))
                if name and name.startswith("gw")]

    def _remove(self, l3vni: int) -> None:
        """The router, all of it: its gateways (each veth's node end goes with it: at
        once, not when the namespace is torn down, asynchronously), its L3 and transit
        links and its namespace. The caller holds the router's lock."""
        with self._guard:
            ns = self._open.pop(l3vni, None)
        if ns is not None:
            with ns.lock:
                for gateway in self._gateways(ns):
                    ns.run("ip", "link", "del", gateway, what=f"remove {gateway}")
                ns.close()
        for name in (transit_name(l3vni), l3_name(l3vni)):
            if podif.get_link(self.ipr, name) is not None:
                _run(["ip", "link", "del", name], f"remove {name}")
        _run(["ip", "netns", "del", self.netns_name(l3vni)],
             f"remove router namespace {self.netns_name(l3vni)}")
        LOG.info("router of L3VNI %d removed (no subnet of its VPC left here)", l3vni)

    # ------------------------------------------------------------ routes

    def apply(self, l3vni: int, state: RoutedState) -> dict[str, object]:
        """Converge the router's remote hosts and prefixes to `state` (what `usable`
        left of the control plane's); the remote router MACs and their VTEPs it uses
        (rmac -> vtep), for a switch that carries the L3VNI itself."""
        ns = self._ns(l3vni)
        if ns is None:
            return {}
        hosts = {h.ip: h for h in state.hosts}
        prefixes: dict = {}
        for p in state.prefixes:
            prefixes.setdefault(p.prefix, []).append(p)
        nexthops = {h.vtep: h.rmac.lower() for h in hosts.values()}
        for plist in prefixes.values():
            for p in plist:
                nexthops.setdefault(p.vtep, p.rmac.lower())
        with ns.lock:
            dev = ns.link(l3_name(l3vni))
            if dev is None:
                return {}
            index = dev["index"]
            try:
                self._converge_neighbours(ns, index, nexthops)
                if self.l3 == "vxlan":
                    self._converge_fdb(ns, index, nexthops)
                self._converge_routes(ns, index, hosts, prefixes)
            except NetlinkError as exc:
                raise BackendError(f"router of L3VNI {l3vni}: could not converge its routes: "
                                   f"{podif.describe(exc)}") from exc
        return {mac: vtep for vtep, mac in nexthops.items()}

    @staticmethod
    def _converge_neighbours(ns: RouterNs, index: int, want: dict) -> None:
        have = {}
        for msg in ns.ipr.neigh("dump", NDA_IFINDEX=index, dump_filter=None):
            if msg["ifindex"] == index and msg["state"] & NUD_PERMANENT and msg.get("NDA_DST"):
                have[ipaddress.ip_address(msg.get("NDA_DST"))] = (msg.get("NDA_LLADDR") or "").lower()
        for vtep, mac in want.items():
            if have.get(vtep) != mac:
                ns.ipr.neigh("replace", ifindex=index, dst=str(vtep), lladdr=mac,
                             state=NUD_PERMANENT)
        for vtep in have.keys() - want.keys():
            with _gone_ok():
                ns.ipr.neigh("del", ifindex=index, dst=str(vtep))

    @staticmethod
    def _converge_fdb(ns: RouterNs, index: int, want: dict) -> None:
        have = set()
        for msg in ns.ipr.fdb("dump", ifindex=index, dump_filter=None):
            if msg["ifindex"] == index and msg.get("NDA_DST"):
                have.add(((msg.get("NDA_LLADDR") or "").lower(),
                          ipaddress.ip_address(msg.get("NDA_DST"))))
        desired = {(mac, vtep) for vtep, mac in want.items()}
        for mac, vtep in desired - have:
            ns.ipr.fdb("append", ifindex=index, lladdr=mac, dst=str(vtep))
        for mac, vtep in have - desired:
            with _gone_ok():
                ns.ipr.fdb("del", ifindex=index, lladdr=mac, dst=str(vtep))

    @staticmethod
    def _converge_routes(ns: RouterNs, index: int, hosts: dict, prefixes: dict) -> None:
        desired: dict = {}
        for ip, host in hosts.items():
            desired[ipaddress.ip_network(ip)] = (0, (host.vtep,))
        for prefix, plist in prefixes.items():
            desired.setdefault(prefix, (PREFIX_METRIC, tuple(sorted({p.vtep for p in plist}))))
        have: dict = {}
        for msg in ns.ipr.route("dump", family=2):
            if msg["proto"] != PROTO:
                continue
            dst = ipaddress.ip_network(f"{msg.get('RTA_DST')}/{msg['dst_len']}")
            metric = msg.get("RTA_PRIORITY") or 0
            gws = []
            if msg.get("RTA_GATEWAY"):
                gws.append(ipaddress.ip_address(msg.get("RTA_GATEWAY")))
            for hop in msg.get("RTA_MULTIPATH") or ():
                if hop.get("RTA_GATEWAY"):
                    gws.append(ipaddress.ip_address(hop.get("RTA_GATEWAY")))
            have[(dst, metric)] = tuple(sorted(gws))
        for dst, (metric, vteps) in desired.items():
            if have.get((dst, metric)) == vteps:
                continue
            spec = {"dst": str(dst), "proto": PROTO, "priority": metric}
            if len(vteps) == 1:
                spec.update(gateway=str(vteps[0]), oif=index, flags=RTNH_F_ONLINK)
            else:
                spec["multipath"] = [{"gateway": str(v), "oif": index, "flags": RTNH_F_ONLINK}
                                     for v in vteps]
            try:
                ns.ipr.route("replace", **spec)
            except NetlinkError as exc:
                # One route the kernel refuses does not keep the others from the VPC.
                LOG.warning("router: route %s via %s not installed: %s", dst,
                            ", ".join(map(str, vteps)), podif.describe(exc))
        for (dst, metric) in have.keys() - {(d, m) for d, (m, _) in desired.items()}:
            with _gone_ok():
                ns.ipr.route("del", dst=str(dst), priority=metric, proto=PROTO)

    # ------------------------------------------------------------ the node's probes

    def port_changed(self, att, added: bool) -> None:
        """An attachment of a routed subnet was added or removed: its probe routes."""
        if att.subnet is not None:
            self.probe_route(att.subnet.router.l3vni, [ip.address.ip for ip in att.ips], added)

    def probe_route(self, l3vni: int, ips, add: bool) -> None:
        """Let the node reach a pod of a routed subnet (kubelet probes): a route to each
        IPv4 address through the VPC's transit link. Two VPCs' pods on this node with
        the same address make it ambiguous: an `unreachable` route then, so that a
        probe never reaches the other VPC's pod (the reconcile settles it again)."""
        hop = self._transit_hop(l3vni)
        if hop is None:
            return  # no transit (egress off): the node does not reach this VPC
        have = self._probe_routes()
        for ip in ips:
            if ip.version != 4:
                continue
            current = have.get(ip)
            try:
                if add and current is None:
                    self._probe_route_set(ip, hop, ours=False)
                elif add and current != hop[0]:
                    LOG.warning("pod address %s is in two VPCs on this node: the node's "
                                "probes reach neither", ip)
                    self._probe_route_set(ip, None, ours=True)
                elif not add and current == hop[0]:
                    with _gone_ok():
                        self.ipr.route("del", dst=f"{ip}/32", proto=STATIC_PROTO)
            except NetlinkError as exc:
                LOG.warning("probe route to %s: %s", ip, podif.describe(exc))

    def _transit_hop(self, l3vni: int) -> Optional[tuple[int, ipaddress.IPv4Address]]:
        """(ifindex of the node's transit link to the router, the router's address on it)."""
        link = podif.get_link(self.ipr, transit_name(l3vni))
        if link is None:
            return None
        for msg in self.ipr.route("dump", family=socket.AF_INET):
            dst = msg.get("RTA_DST")
            if (dst and msg["dst_len"] == 32 and msg.get("RTA_OIF") == link["index"]
                    and msg["proto"] != STATIC_PROTO and ipaddress.ip_address(dst) in TRANSIT):
                return link["index"], ipaddress.ip_address(dst)
        return None

    def _probe_route_set(self, ip, hop, ours: bool = True) -> None:
        """A probe route to `ip` through `hop`, or an unreachable one (None). `ours`: a
        probe route is there already and is replaced; else a new one is only added,
        never over a route of the node's own (EEXIST: left alone, logged)."""
        verb = "replace" if ours else "add"
        try:
            if hop is None:
                self.ipr.route(verb, dst=f"{ip}/32", type="unreachable", proto=STATIC_PROTO)
            else:
                self.ipr.route(verb, dst=f"{ip}/32", oif=hop[0], gateway=str(hop[1]),
                               proto=STATIC_PROTO)
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise
            LOG.warning("pod address %s: the node has a route of its own to it: no probe "
                        "route (the node's probes do not reach that pod)", ip)

    def _probe_routes(self) -> dict:
        """The node's probe routes: address -> transit ifindex (0: unreachable)."""
        out = {}
        for msg in self.ipr.route("dump", family=socket.AF_INET):
            if msg["proto"] == STATIC_PROTO and msg["dst_len"] == 32 and msg.get("RTA_DST"):
                out[ipaddress.ip_address(msg.get("RTA_DST"))] = msg.get("RTA_OIF") or 0
        return out

    def converge_probe_routes(self, attachments) -> None:
        """The node's probe routes from the attachment records (full reconcile)."""
        owners: dict = {}
        for att in attachments:
            if att.subnet is None or att.state != "ready":
                continue
            for ip in att.ips:
                if ip.address.version == 4:
                    owners.setdefault(ip.address.ip, set()).add(att.subnet.router.l3vni)
        hops = {}
        for l3vni in {v for vs in owners.values() for v in vs}:
            hop = self._transit_hop(l3vni)
            if hop is not None:
                hops[l3vni] = hop
        # address -> the hop to its pod; None: ambiguous (unreachable); no transit: absent.
        want = {ip: (hops.get(next(iter(vs))) if len(vs) == 1 else None)
                for ip, vs in owners.items() if len(vs) > 1 or next(iter(vs)) in hops}
        have = self._probe_routes()
        for ip, hop in want.items():
            if have.get(ip) == (hop[0] if hop else 0):
                continue
            try:
                self._probe_route_set(ip, hop, ours=ip in have)
            except NetlinkError as exc:
                LOG.warning("probe route to %s: %s", ip, podif.describe(exc))
        for ip in have.keys() - want.keys():
            with _gone_ok():
                self.ipr.route("del", dst=f"{ip}/32", proto=STATIC_PROTO)

    # ------------------------------------------------------------ inventory

    def problems(self, net: VpcNetwork) -> list[str]:
        """What differs between the subnet's router and what it should be (CHECK)."""
        subnet = net.subnet
        ns = self._ns(subnet.router.l3vni)
        if ns is None:
            return [f"router namespace {self.netns_name(subnet.router.l3vni)} missing"]
        out = []
        with ns.lock:
            for name in (gateway_names(net.vni)[1], l3_name(subnet.router.l3vni)):
                if ns.link(name) is None:
                    out.append(f"{name} missing in router namespace {ns.name}")
        if podif.get_link(self.ipr, gateway_names(net.vni)[0]) is None:
            out.append(f"gateway port {gateway_names(net.vni)[0]} missing")
        return out

    def close(self) -> None:
        for ns in self._open.values():
            ns.close()
        self._open.clear()


def _unicast_vtep(vtep) -> bool:
    return vtep.version == 4 and not (vtep.is_multicast or vtep.is_loopback or
                                      vtep.is_link_local or vtep.is_unspecified or
                                      vtep.is_reserved)


def usable(state: RoutedState, local_vtep) -> RoutedState:
    """The part of a VPC's routed state a router installs: IPv4 (the router is IPv4),
    from other VTEPs that are IPv4 unicast addresses, never to a reserved range
    (core.config.NOT_A_VPC: link-local, loopback, multicast, ...) or
    a default route (egress is the router's own), so that one bad route from the
    control plane can neither stop a VPC's convergence nor take the router's own
    addresses. Both switches install exactly this."""
    def ok(net, vtep) -> bool:
        return (vtep != local_vtep and _unicast_vtep(vtep) and net.version == 4
                and net.prefixlen > 0 and not_a_vpc(net) is None)
    return RoutedState(
        hosts=[h for h in state.hosts if ok(ipaddress.ip_network(h.ip), h.vtep)],
        prefixes=[p for p in state.prefixes if ok(p.prefix, p.vtep)])


@contextmanager
def _gone_ok() -> Iterator[None]:
    try:
        yield
    except NetlinkError as exc:
        if exc.code not in (errno.ENOENT, errno.ESRCH, errno.ENODEV):
            raise
