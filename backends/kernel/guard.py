"""The kernel backend's isolation guard: nftables rules that keep each VPC to itself.

Two tables, both named `vpcni`, in the namespace the backend runs in:

    table bridge vpcni    what a pod may send into its VNI bridge
      prerouting: a frame entering a vpcni bridge from a pod port (any "vp*"
                  port but the VXLAN device "vpvx*") goes through `from_pod`:
                  its source MAC must be the port's, and ARP/IPv4/IPv6 must
                  come from the port's addresses (IPv6 link-local and :: only
                  for ports with an IPv6 address, as on the OVS backend); any
                  other ethertype is dropped unless the port has no address at
                  all (an L2-only attachment: the MAC check is all there is).
                  A port the sets do not name drops everything (fail closed).
      input:      nothing arriving on a vpcni bridge port is delivered to the
                  node itself: a pod cannot reach the node's IP stack, so it
                  cannot make the node's VXLAN socket decapsulate a frame it
                  crafted into another VNI.
      forward:    a routed subnet's anycast gateway (port "vgw*", the same MAC
                  on every node) stays local: its broadcasts and multicasts
                  (ARP requests) never go out over VXLAN, and nothing from VXLAN
                  reaches it (remote pods have a gateway of their own).
    table inet vpcni      what the node accepts from the underlay
      input:      VXLAN (the UDP ports of the local VNIs) only on the underlay
                  interface and only from (VTEP, VNI) pairs the control plane
                  or the static flood list named for that VNI; nothing that
                  came in over a VNI bridge.
      forward:    nothing routed into or out of a VNI bridge. Frames bridged within
                  one bridge pass: with br_netfilter (bridge-nf-call-iptables=1,
                  as on most Kubernetes nodes) they cross this hook with the
                  bridge as both input and output; routing from one VNI bridge
                  to another cannot happen since nothing from a bridge reaches
                  the IP stack (bridge input above).

Per-port state lives in sets keyed by the host veth name (`port_mac`,
`port_ip4`, `port_ip6`, `port_v6`, `port_l2`): adding a pod is one
transaction of a few set elements, flat in the number of pods (~0.1 ms with
1,000 ports, against ~1.5 ms for a chain per port). Remote VTEPs per VNI
live in `vteps4`/`vteps6`, keyed by (source address, VNI from the VXLAN
header). The base rules are re-installed atomically (flush + add in one
transaction) by `ensure_base`, which the agent's reconcile calls, so a
firewall reload that flushed the ruleset heals within one reconcile period.

libnftables is used in-process through the nftables project's own Python
binding (Debian python3-nftables): no fork per ADD.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
from typing import Iterable, Optional

from vpcni.backends.common.nft import Nft
from vpcni.core.errors import BackendError
from vpcni.core.models import IPAddress

LOG = logging.getLogger(__name__)

TABLE = "vpcni"
POD_PORTS = "vp*"          # host veths "vp<hex>" and the VXLAN devices "vpvx<VNI>"
VXLAN_PORTS = "vpvx*"
BRIDGES = "vpbr*"
GATEWAY_PORTS = "vgw*"     # a routed subnet's anycast gateway (backends/common/router.py)
PORT_SETS = ("port_mac", "port_ip4", "port_ip6", "port_v6", "port_l2")

BRIDGE_RULES = f"""
add table bridge {TABLE}
add set bridge {TABLE} port_mac {{ type ifname . ether_addr; }}
add set bridge {TABLE} port_ip4 {{ type ifname . ipv4_addr; }}
add set bridge {TABLE} port_ip6 {{ type ifname . ipv6_addr; }}
add set bridge {TABLE} port_v6 {{ type ifname; }}
add set bridge {TABLE} port_l2 {{ type ifname; }}
add chain bridge {TABLE} prerouting {{ type filter hook prerouting priority filter; policy accept; }}
add chain bridge {TABLE} input {{ type filter hook input priority filter; policy accept; }}
add chain bridge {TABLE} from_pod
add chain bridge {TABLE} forward {{ type filter hook forward priority filter; policy accept; }}
flush chain bridge {TABLE} forward
flush chain bridge {TABLE} prerouting
flush chain bridge {TABLE} input
flush chain bridge {TABLE} from_pod
add rule bridge {TABLE} prerouting iifname "{POD_PORTS}" iifname != "{VXLAN_PORTS}" jump from_pod
add rule bridge {TABLE} input iifname "{POD_PORTS}" counter drop comment "vpc-to-node"
add rule bridge {TABLE} from_pod iifname . ether saddr != @port_mac counter drop comment "spoofed-mac"
add rule bridge {TABLE} from_pod ether type arp iifname . arp saddr ether @port_mac iifname . arp saddr ip @port_ip4 accept
add rule bridge {TABLE} from_pod ether type ip iifname . ip saddr @port_ip4 accept
add rule bridge {TABLE} from_pod ether type ip6 iifname . ip6 saddr @port_ip6 accept
add rule bridge {TABLE} from_pod ether type ip6 iifname @port_v6 ip6 saddr {{ ::, fe80::/10 }} accept
add rule bridge {TABLE} from_pod iifname @port_l2 accept
add rule bridge {TABLE} from_pod counter drop comment "spoofed-ip"
add rule bridge {TABLE} forward iifname "{GATEWAY_PORTS}" oifname "{VXLAN_PORTS}" ether daddr & 01:00:00:00:00:00 == 01:00:00:00:00:00 counter drop comment "gateway-stays-local"
add rule bridge {TABLE} forward iifname "{VXLAN_PORTS}" oifname "{GATEWAY_PORTS}" counter drop comment "gateway-stays-local"
"""

# th,96,24: the VNI, 4 bytes into the VXLAN header that follows the 8-byte UDP header.
# The default VXLAN port is always guarded, so an emptied set fails closed.
INET_RULES = f"""
add table inet {TABLE}
add set inet {TABLE} vxlan_ports {{ type inet_service; elements = {{ 4789 }}; }}
add set inet {TABLE} underlay {{ type ifname; }}
add set inet {TABLE} vteps4 {{ typeof ip saddr . @th,96,24; }}
add set inet {TABLE} vteps6 {{ typeof ip6 saddr . @th,96,24; }}
add chain inet {TABLE} prerouting {{ type filter hook prerouting priority raw - 1; policy accept; }}
add chain inet {TABLE} input {{ type filter hook input priority filter - 1; policy accept; }}
add chain inet {TABLE} forward {{ type filter hook forward priority filter - 1; policy accept; }}
add chain inet {TABLE} vxlan_in
flush chain inet {TABLE} prerouting
flush chain inet {TABLE} input
flush chain inet {TABLE} forward
flush chain inet {TABLE} vxlan_in
add rule inet {TABLE} prerouting iifname "{BRIDGES}" notrack
add rule inet {TABLE} prerouting iifname "{POD_PORTS}" iifname != "{BRIDGES}" counter drop comment "port-to-node"
add rule inet {TABLE} input iifname "{BRIDGES}" counter drop comment "vpc-to-node"
add rule inet {TABLE} input udp dport @vxlan_ports jump vxlan_in
add rule inet {TABLE} forward iifname "{BRIDGES}" oifname != "{BRIDGES}" counter drop comment "vpc-forward"
add rule inet {TABLE} forward oifname "{BRIDGES}" iifname != "{BRIDGES}" counter drop comment "vpc-forward"
add rule inet {TABLE} vxlan_in iifname != @underlay counter drop comment "vxlan-off-underlay"
add rule inet {TABLE} vxlan_in ip saddr . @th,96,24 @vteps4 accept
add rule inet {TABLE} vxlan_in ip6 saddr . @th,96,24 @vteps6 accept
add rule inet {TABLE} vxlan_in counter drop comment "vxlan-unknown-vtep"
"""

ARP_RULES = f"""
add table arp {TABLE}
add chain arp {TABLE} input {{ type filter hook input priority filter; policy accept; }}
flush chain arp {TABLE} input
add rule arp {TABLE} input iifname "{POD_PORTS}" counter drop comment "port-to-node"
"""

RULES = BRIDGE_RULES + INET_RULES + ARP_RULES
# (family, chain) -> how many rules the base installs there: what `intact` checks.
EXPECTED = {}
for _line in RULES.splitlines():
    if _line.startswith("add rule "):
        _family, _chain = _line.split()[2], _line.split()[4]
        EXPECTED[(_family, _chain)] = EXPECTED.get((_family, _chain), 0) + 1
# Replaces whatever tables of ours exist (a table of an older layout) in one transaction.
REPLACE = "".join(f"add table {f} {TABLE}\ndelete table {f} {TABLE}\n"
                  for f in ("bridge", "inet", "arp")) + RULES


def _quote(ifname: str) -> str:
    return '"' + ifname.replace('"', "") + '"'


def port_elements(ifname: str, mac: Optional[str], ips: Iterable[IPAddress]) -> dict[str, set]:
    """The elements of each port set that one pod port needs, as nft text."""
    name = _quote(ifname)
    ips = list(ips)
    out: dict[str, set] = {s: set() for s in PORT_SETS}
    if mac:
        out["port_mac"].add(f"{name} . {mac.lower()}")
    for ip in ips:
        out["port_ip4" if ip.version == 4 else "port_ip6"].add(f"{name} . {ip}")
    if any(ip.version == 6 for ip in ips):
        out["port_v6"].add(name)
    if not ips:
        out["port_l2"].add(name)
    return out


def element_text(value) -> str:
    """An element of `nft -j list set` output back as nft text."""
    if isinstance(value, dict) and "concat" in value:
        return " . ".join(element_text(v) for v in value["concat"])
    if isinstance(value, dict) and "elem" in value:
        return element_text(value["elem"]["val"])
    if isinstance(value, str):
        try:
            ipaddress.ip_address(value)
            return value
        except ValueError:
            pass
        if len(value) == 17 and value.count(":") == 5:
            return value.lower()
        return _quote(value)
    return str(value)


class Guard:
    """The two tables in the backend's namespace. Thread-safe; one libnftables
    context, created (and so bound to its network namespace) with the guard."""

    def __init__(self) -> None:
        self._nft = Nft()
        self._lock = threading.Lock()
        self._port_locks = [threading.Lock() for _ in range(64)]
        self._based = False
        # What this guard believes the kernel holds; dropped whenever the base is
        # (re)installed, since an install after a loss starts from empty sets.
        self._peers: Optional[dict[int, set[IPAddress]]] = None
        self._accepted: set[tuple[str, int]] = set()
        # Set when the base had to be re-installed outside a reconcile: the
        # elements of every port and VNI must be put back (the agent's next check).
        self.lost = False

    # ------------------------------------------------------------ plumbing

    def _run(self, commands: str, what: str) -> str:
        return self._nft.run(commands, what)

    def _list_json(self, family: str, name: str) -> list:
        for item in self._nft.list_json(f"set {family} {TABLE} {name}"):
            if "set" in item:
                return [element_text(e) for e in item["set"].get("elem", [])]
        return []

    def _intact_locked(self) -> bool:
        for (family, chain), count in EXPECTED.items():
            try:
                items = self._nft.list_json(f"chain {family} {TABLE} {chain}")
            except BackendError:
                return False
            if sum(1 for item in items if "rule" in item) != count:
                return False
        return True

    def intact(self) -> bool:
        """Are all base chains there with all their rules? (~1 ms: one listing per chain)"""
        with self._lock:
            return self._intact_locked()

    def _install_locked(self) -> None:
        try:
            self._run(RULES, "install the vpcni tables")
        except BackendError as exc:
            # A table of an older layout (a set of another type): replaced in the
            # same transaction as the new one is built, so no moment without rules.
            LOG.warning("replacing the vpcni nftables tables: %s", exc)
            self._run(REPLACE, "replace the vpcni tables")
        self._peers = None
        self._accepted.clear()
        self._based = True

    def ensure_base(self) -> bool:
        """Install the tables unless they are intact; True when they were (re)installed
        (their rules replaced atomically, set elements kept where they still were)."""
        with self._lock:
            if self._based and self._intact_locked():
                return False
            self._install_locked()
            return True

    def _apply(self, commands: list[str], what: str) -> None:
        """Run `commands` in one transaction. When that fails because the tables are
        gone or damaged (a ruleset flush), re-install them, note the loss and retry."""
        if not commands:
            return
        with self._lock:
            if not self._based:
                self._install_locked()
            try:
                self._run("\n".join(commands), what)
                return
            except BackendError:
                if self._intact_locked():
                    raise
            LOG.warning("the vpcni nftables tables were damaged or flushed: re-installed")
            self._install_locked()
            self.lost = True
            self._run("\n".join(commands), what)

    # ------------------------------------------------------------ per node / VNI

    def set_underlay(self, ifname: str, port: int) -> None:
        """VXLAN on UDP `port` is a vpcni port, accepted on `ifname` only."""
        if (ifname, port) in self._accepted:
            return
        self._apply([f"add element inet {TABLE} underlay {{ {_quote(ifname)} }}",
                     f"add element inet {TABLE} vxlan_ports {{ {int(port)} }}"],
                    f"accept VXLAN on {ifname} port {port}")
        self._accepted.add((ifname, port))

    def _load_peers(self) -> dict[int, set[IPAddress]]:
        peers: dict[int, set[IPAddress]] = {}
        for name in ("vteps4", "vteps6"):
            for text in self._list_json("inet", name):
                addr, _, vni = text.partition(" . ")
                peers.setdefault(int(vni, 0), set()).add(ipaddress.ip_address(addr))
        return peers

    def forget_peers(self) -> None:
        """Re-read the VTEP sets before the next change (after a reconcile)."""
        with self._lock:
            self._peers = None

    def set_peers(self, vni: int, vteps: Iterable[IPAddress]) -> None:
        """Accept VXLAN for `vni` from exactly these VTEPs."""
        want = set(vteps)
        with self._lock:
            if not self._based:
                self._install_locked()
            if self._peers is None:
                self._peers = self._load_peers()
            have = self._peers.get(vni, set())
        commands = []
        for verb, addrs in (("add", want - have), ("delete", have - want)):
            for addr in sorted(addrs, key=lambda a: (a.version, a)):
                name = "vteps4" if addr.version == 4 else "vteps6"
                commands.append(f"{verb} element inet {TABLE} {name} {{ {addr} . {vni} }}")
        if not commands:
            return
        try:
            self._apply(commands, f"set the VTEPs of VNI {vni}")
        except BackendError:
            self.forget_peers()
            raise
        with self._lock:
            if self._peers is not None:
                if want:
                    self._peers[vni] = want
                else:
                    self._peers.pop(vni, None)

    # ------------------------------------------------------------ per port

    def port_lock(self, ifname: str) -> threading.Lock:
        """The lock every change of one port's elements holds (striped by name)."""
        return self._port_locks[hash(ifname) % len(self._port_locks)]

    def add_port(self, ifname: str, mac: Optional[str], ips: Iterable[IPAddress]) -> None:
        """Let `ifname` send from `mac` and `ips` only (any address when there is none)."""
        commands = [f"add element bridge {TABLE} {name} {{ {', '.join(sorted(elems))} }}"
                    for name, elems in port_elements(ifname, mac, ips).items() if elems]
        with self.port_lock(ifname):
            self._apply(commands, f"allow {ifname} its MAC and addresses")

    def remove_port(self, ifname: str, mac: Optional[str] = None,
                    ips: Iterable[IPAddress] = ()) -> None:
        """Forget `ifname`: the exact elements when `mac` is known, else all of its elements."""
        with self.port_lock(ifname):
            if mac:
                commands = [f"delete element bridge {TABLE} {name} "
                            f"{{ {', '.join(sorted(elems))} }}"
                            for name, elems in port_elements(ifname, mac, ips).items() if elems]
                try:
                    self._apply(commands, f"forget port {ifname}")
                    return
                except BackendError:
                    pass  # some element was already gone: remove what is left, by listing
            self.purge_ports({ifname})

    def missing(self, ifname: str, mac: Optional[str], ips: Iterable[IPAddress]) -> list[str]:
        """The elements `ifname` should have and does not (for CNI CHECK)."""
        return [f"{name} {{ {text} }}"
                for name, elems in port_elements(ifname, mac, ips).items() for text in sorted(elems)
                if not self._nft.try_run(f"get element bridge {TABLE} {name} {{ {text} }}")]

    def ports(self) -> dict[str, set[tuple[str, str]]]:
        """ifname -> {(set, element)} of every port the sets name."""
        out: dict[str, set[tuple[str, str]]] = {}
        with self._lock:
            if not self._based:
                self._install_locked()
            for name in PORT_SETS:
                for text in self._list_json("bridge", name):
                    ifname = text.split(" . ", 1)[0].strip('"')
                    out.setdefault(ifname, set()).add((name, text))
        return out

    def purge_ports(self, ifnames: set[str]) -> None:
        current = self.ports()
        commands = [f"delete element bridge {TABLE} {name} {{ {text} }}"
                    for ifname in ifnames for name, text in sorted(current.get(ifname, ()))]
        self._apply(commands, f"forget ports {', '.join(sorted(ifnames))}")

    def set_port(self, ifname: str, want: Optional[tuple[Optional[str], list[IPAddress]]]
                 ) -> bool:
        """Make `ifname`'s elements exactly those of `want` ((mac, ips); None: none),
        reading what it has now; the caller holds what keeps the port's owner from
        changing it meanwhile. True when something changed."""
        wanted = set() if want is None else \
            {(n, t) for n, ts in port_elements(ifname, *want).items() for t in ts}
        have = self.ports().get(ifname, set())
        if wanted == have:
            return False
        commands = [f"add element bridge {TABLE} {n} {{ {t} }}" for n, t in sorted(wanted - have)]
        commands += [f"delete element bridge {TABLE} {n} {{ {t} }}"
                     for n, t in sorted(have - wanted)]
        self._apply(commands, f"converge the port filters of {ifname}")
        return True

