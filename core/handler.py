"""The one request handler: what ADD, DEL, CHECK, STATUS and GC do.

The CNI layer parses and validates the request and calls these methods; it
never touches a backend itself. The agent (later) calls the same handler.

ADD is a list of steps, each with its undo pushed on an ExitStack that is
cancelled on success: record the intent, IPAM, per-VNI plumbing, the pod
interface, the final record. A crash between steps leaves an "adding" record
that the next ADD, DEL or GC of that attachment cleans.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import threading
import re
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional

from . import backend as backends
from .config import NetworkConfig, NodeConfig
from .faults import fault
from .errors import CheckFailed, InvalidConfig, NotAvailable, UnknownContainer, VpcniError
from .ipam import DelegatedIpam, Ipam, in_process, routes_via_gateways, static_ips
from .models import (MAC_PATTERN, Attachment, DNS, Interface, IPConfig, RemoteState, Result,
                     Route, RoutedState, VpcNetwork)
from .store import AttachmentStore
from .tenancy import Tenancy

LOG = logging.getLogger(__name__)
PROBE_TTL = 10.0


@dataclass(frozen=True)
class Change:
    """What a call changed in the records, for the handler's listeners."""

    added: tuple[Attachment, ...] = ()
    removed: tuple[Attachment, ...] = ()
    everything: bool = False  # not itemised: read the store again


@dataclass
class Request:
    """A validated CNI request (the CNI layer builds it)."""

    command: str
    config: NetworkConfig
    container_id: str = ""
    ifname: str = ""
    netns: Optional[str] = None
    cni_path: str = ""
    args: dict[str, str] = field(default_factory=dict)
    env: Mapping[str, str] = field(default_factory=dict)
    stdin: bytes = b""

    def ipam(self) -> Ipam:
        """The IPAM of this request: one registered in-process (vpcni-ipam), else the
        plugin of that type in CNI_PATH."""
        factory = in_process(self.config.ipam.type)
        if factory is not None:
            return factory(self)
        return DelegatedIpam(self.config.ipam.type, self.env, self.stdin)


class Handler:
    def __init__(self, node: NodeConfig, cached_store: bool = False):
        """`cached_store`: keep the records in memory too (for a long-lived process
        that is the store's only writer: the agent)."""
        self.node = node
        self.store = AttachmentStore(node.stateDir, node.lockTimeout, cached=cached_store)
        self.tenancy = Tenancy(str(node.tenancy.bindingsFile), node.tenancy.enforce)
        self._backends: dict[str, backends.Guarded] = {}
        self._choices: dict[Optional[str], tuple[str, float]] = {}  # backend pin -> choice
        # Set by the agent: the control plane's remote state of a VNI, merged
        # with the static flood lists; and who to tell when attachments change.
        self.remote_source: Optional[Callable[[int], RemoteState]] = None
        # ... and the routed state (remote hosts and prefixes) of an L3VNI.
        self.routed_source: Optional[Callable[[int], RoutedState]] = None
        self.listeners: list[Callable[[Change], None]] = []
        # One converge at a time per VNI ("vni", n) and per VPC router ("l3vni", n).
        self._remote_locks: dict[tuple[str, int], threading.Lock] = {}
        self._remote_locks_guard = threading.Lock()
        # VNI -> (backend, the remote state last applied there): an ADD or DEL that
        # changes neither the plumbing nor the remote state does not re-apply it.
        self._applied: dict[int, tuple[str, RemoteState]] = {}
        # Pod MTU following the underlay (reconcile): VNI -> (backend, the MTU its
        # attachments and plumbing were last brought to); the attachments left at
        # another MTU, and why (status); what was logged already, so once per change.
        self._mtu_lock = threading.Lock()
        self._vni_mtu: dict[int, tuple[str, int]] = {}
        self._mtu_differ: dict[tuple[str, str, str], dict] = {}
        self._mtu_logged: dict[tuple[str, str, str], tuple] = {}

    # ------------------------------------------------------------ backends

    def backend_named(self, name: str) -> backends.Guarded:
        if name not in self._backends:
            self._backends[name] = backends.load(name, self.node)
        return self._backends[name]

    def provider_named(self, name: str) -> backends.Guarded:
        key = f"interface:{name}"
        if key not in self._backends:
            self._backends[key] = backends.load(name, self.node, backends.INTERFACES)
        return self._backends[key]

    def provider_for(self, cfg: NetworkConfig, device_id: Optional[str]) -> backends.Guarded:
        """The interface provider of an attachment: a deviceID or a network that
        requires a VF selects `sriov`, anything else gets a veth. One that cannot
        serve here is NotAvailable (code 50) saying why."""
        name = "sriov" if device_id or cfg.interface in ("vf", "host-vf") else "veth"
        cached = self._choices.get(f"interface:{name}")
        now = time.monotonic()
        if cached is None or now - cached[1] > PROBE_TTL:
            probe = backends.probe_one(self.node, name)
            if not probe.available:
                if name == "veth":
                    raise NotAvailable(f"the veth interface provider cannot serve here: "
                                       f"{probe.reason}")
                why = (f"deviceID {device_id} asks for an SR-IOV VF" if device_id else
                       f"network {cfg.name} requires an SR-IOV VF (interface: vf)")
                raise NotAvailable(f"{why}, but this node cannot give one: {probe.reason}")
            self._choices[f"interface:{name}"] = (name, now)
        return self.provider_named(name)

    @staticmethod
    def provider_names() -> list[str]:
        """Every installed interface provider (their entry points, without loading them)."""
        from importlib.metadata import entry_points

        return sorted({ep.name for ep in entry_points(group=backends.INTERFACES)})

    def _unplug_leftovers(self, name: str, bare: Attachment) -> None:
        """Let provider `name` remove what it may have left of `bare` (no record)."""
        if backends.probe_one(self.node, name).available:
            self.provider_named(name).unplug(bare.model_copy(update={"provider": name}))

    def backend_for(self, cfg: NetworkConfig) -> backends.Guarded:
        """The backend serving `cfg` on this node.

        The choice is remembered for PROBE_TTL seconds: probing every backend
        on every ADD costs a few ms, and what it looks at (kernel modules,
        the VTEP address, daemons) changes rarely; a backend that stopped
        working meanwhile fails the ADD with its own clear error.
        """
        now = time.monotonic()
        cached = self._choices.get(cfg.backend)
        if cached is None or now - cached[1] > PROBE_TTL:
            probe, _ = backends.choose(self.node, cfg.backend)
            cached = self._choices[cfg.backend] = (probe.name, now)
        return self.backend_named(cached[0])

    def close(self) -> None:
        for b in self._backends.values():
            with contextlib.suppress(Exception):
                b.close()
        self._backends.clear()

    # ------------------------------------------------------------ ADD

    def add(self, req: Request) -> Result:
        cfg = req.config
        net = cfg.network()
        backend = self.backend_for(cfg)
        key = (cfg.name, req.container_id, req.ifname)
        # Every input is validated before anything is torn down: a repeated ADD
        # with a bad MAC, address or device must fail with the working attachment intact.
        mac = self._requested_mac(req)
        static = None if cfg.ipam else static_ips(self._static_addresses(req))
        device_id = cfg.device_id()
        provider = self.provider_for(cfg, device_id)
        interface = "host-vf" if cfg.interface == "host-vf" else "veth"
        provider_state = {"host_vf": cfg.hostVF} if cfg.hostVF else {}
        if cfg.vf is not None:
            provider_state["vf"] = cfg.vf
        pod_namespace, pod_name = req.args.get("K8S_POD_NAMESPACE"), req.args.get("K8S_POD_NAME")
        subnet = net.subnet
        vpc = self.tenancy.check(cfg.vni, pod_namespace, pod_name, cfg.name,
                                 (subnet.router.vpc, subnet.router.l3vni) if subnet else None
                                 ) or None
        if subnet is not None:
            self._check_routing(cfg, net, req.container_id, req.ifname)
            if static:
                self._check_subnet_addresses(static, net)
        caps = backend.describe()
        if net.subnet is not None and not caps.routing:
            raise NotAvailable(f"network {cfg.name!r} is a routed subnet ('routing') and backend "
                               f"{backend.name!r} cannot route: use kernel or ovs")
        provider.preflight(Attachment(network=cfg.name, vni=cfg.vni,
                                      container_id=req.container_id, ifname=req.ifname,
                                      backend=backend.name, provider=provider.name,
                                      pci_id=device_id, interface=interface,
                                      provider_state=provider_state), caps)
        with self.store.attachment_lock(*key):
            old = self.store.get(*key)
            if old is not None:
                LOG.info("ADD %s: cleaning an earlier attachment (state %s)", key, old.state)
                # An IPAM keyed by the attachment (vpcni-ipam) keeps its reservation:
                # a repeated ADD gets the same address back.
                keep = cfg.ipam is not None and old.ipam_type == cfg.ipam.type \
                    and getattr(in_process(cfg.ipam.type), "keyed_by_attachment", False)
                self._teardown(old, req, release_ipam=not keep)
                self._changed(Change(removed=(old,)))
            att = Attachment(network=cfg.name, vni=cfg.vni, container_id=req.container_id,
                             ifname=req.ifname, netns=req.netns, backend=backend.name,
                             provider=provider.name, pci_id=device_id,
                             interface=interface, provider_state=dict(provider_state),
                             device_info_file=cfg.runtimeConfig.CNIDeviceInfoFile,
                             mac=mac, vteps=net.vteps, port=net.port,
                             mtu_pinned=cfg.mtu is not None,
                             pod_namespace=pod_namespace, pod_name=pod_name, vpc=vpc,
                             ipam_type=cfg.ipam.type if cfg.ipam else None,
                             subnet=net.subnet, created=time.time())
            att.host_ifname = backend.port_name(att)
            # The intent is recorded before anything is built, so a crash at any
            # later step leaves a record that DEL, GC or the next ADD cleans up.
            self.store.put(att)
            fault("add.recorded")
            kept: list[str] = []
            with contextlib.ExitStack() as undo:
                # The record goes last, and only if every other undo step worked: a VF or
                # port that could not be given back stays on record for DEL or GC.
                undo.callback(lambda: kept or self._quietly(self._forget, att))
                dns = cfg.dns or DNS()
                if cfg.ipam:
                    ipam = req.ipam()
                    undo.callback(self._quietly, ipam.delete)
                    res = ipam.add()
                    att.ips = [ip.model_copy(update={"interface": None}) for ip in res.ips]
                    att.routes = routes_via_gateways(res.routes, res.ips)
                    if not res.dns.is_empty():
                        dns = res.dns
                else:
                    att.ips = static
                att.dns = dns
                if net.subnet is not None:
                    self._route_via_gateway(att, net)
                with self.store.vni_lock(net.vni, exclusive=False):
                    built = backend.ensure_network(net)
                    self.apply_remote(backend, net.vni, att, unchanged_plumbing=built is False)
                    if net.subnet is not None and built is not False:
                        self.apply_routed(backend, net.subnet.router.l3vni)
                    fault("add.network")
                    att, leftovers = provider.plug(net, att, backend.pod_mtu(net), caps)
                    fault("veth.plugged")
                    undo.callback(self._undo, kept, provider.unplug, att)
                    if att.host_ifname:
                        if leftovers:
                            # A crashed earlier ADD may have left filters of other addresses.
                            backend.remove_port(att.model_copy(update={"mac": None}))
                        undo.callback(self._undo, kept, backend.remove_port, att)
                        backend.add_port(net, att)
                        fault("add.port")
                    att.state = "ready"
                    self.store.put(att)
                undo.pop_all()
        LOG.info("ADD %s: %s %s in VNI %d%s via %s, ips %s%s", key, att.interface,
                 att.host_ifname or att.pci_id, att.vni, f" (VPC {vpc})" if vpc else "",
                 att.backend, [str(i.address) for i in att.ips],
                 f", pod {pod_namespace}/{pod_name}" if pod_namespace else "")
        self._changed(Change(added=(att,)))
        return self._result(att, cfg)

    def _check_routing(self, cfg: NetworkConfig, net: VpcNetwork, container_id: str,
                       ifname: str) -> None:
        """A routed subnet's config against the node's other attachments (before anything
        is torn down): one VNI is one subnet of one VPC, an L3VNI is no subnet's VNI and
        one VPC's router has one set of settings (egress, static routes)."""
        subnet, key = net.subnet, (cfg.name, container_id, ifname)
        l3vni = subnet.router.l3vni
        for att in self.store.all():
            if att.key == key:
                continue
            if att.vni == l3vni:
                raise InvalidConfig(f"routing.l3vni {l3vni} of network {cfg.name!r} is the VNI "
                                    f"of network {att.network!r} on this node: an L3VNI is "
                                    "no subnet's VNI")
            if att.subnet is None:
                continue
            if att.subnet.router.l3vni == cfg.vni:
                raise InvalidConfig(f"vni {cfg.vni} of network {cfg.name!r} is the L3VNI of "
                                    f"VPC {att.subnet.router.vpc!r} on this node")
            if att.vni == cfg.vni and att.subnet != subnet:
                raise InvalidConfig(
                    f"network {cfg.name!r}: VNI {cfg.vni} is subnet {att.subnet.prefix} of VPC "
                    f"{att.subnet.router.vpc!r} (L3VNI {att.subnet.router.l3vni}, gateway "
                    f"{att.subnet.gateway}) on this node (network {att.network!r}); its "
                    "'routing' must say the same")
            if att.subnet.router.l3vni == l3vni and att.subnet.router != subnet.router:
                raise InvalidConfig(
                    f"network {cfg.name!r}: routing (vpc, egress, routes) differs from that of "
                    f"network {att.network!r}, another subnet of L3VNI {l3vni} on this node: "
                    "the subnets of one VPC share its router")

    @staticmethod
    def _check_subnet_addresses(ips: list, net) -> None:
        """A routed subnet's pod addresses: IPv4 ones inside the subnet, with its prefix
        length, neither the gateway nor the subnet's network or broadcast address."""
        subnet = net.subnet
        for ip in ips:
            if ip.address.version != 4:
                continue
            if ip.address.ip not in subnet.prefix or \
                    ip.address.network.prefixlen != subnet.prefix.prefixlen:
                raise InvalidConfig(f"address {ip.address} is outside routing.subnet "
                                    f"{subnet.prefix} of network {net.name!r}: the IPAM "
                                    "range or the static address must be inside it, with "
                                    "its prefix length")
            if ip.address.ip == subnet.gateway:
                raise InvalidConfig(f"address {ip.address} is routing.gateway of network "
                                    f"{net.name!r}: exclude it from the IPAM range")
            if ip.address.ip in (subnet.prefix.network_address,
                                 subnet.prefix.broadcast_address):
                raise InvalidConfig(f"address {ip.address} is the network or broadcast "
                                    f"address of routing.subnet {subnet.prefix}")

    @classmethod
    def _route_via_gateway(cls, att: Attachment, net) -> None:
        """A routed subnet's pod: its IPv4 addresses must fit the subnet (they get the
        anycast gateway) and, unless IPAM gave one, its default route points at the
        gateway."""
        subnet = net.subnet
        cls._check_subnet_addresses(att.ips, net)
        att.ips = [ip.model_copy(update={"gateway": subnet.gateway})
                   if ip.address.version == 4 and ip.gateway is None else ip for ip in att.ips]
        default = ipaddress.ip_network("0.0.0.0/0")
        if subnet.default_route and att.ips and not any(r.dst == default for r in att.routes):
            att.routes = [*att.routes, Route(dst=default, gw=subnet.gateway)]

    @staticmethod
    def _requested_mac(req: Request) -> Optional[str]:
        """runtimeConfig.mac > CNI_ARGS MAC > args.cni.mac."""
        cni_args = req.config.args.cni if req.config.args else None
        for where, mac in (("runtimeConfig.mac", req.config.runtimeConfig.mac),
                           ("CNI_ARGS MAC", req.args.get("MAC")),
                           ("args.cni.mac", cni_args.mac if cni_args else None)):
            if not mac:
                continue
            if not isinstance(mac, str) or not re.fullmatch(MAC_PATTERN, mac):
                raise InvalidConfig(f"{where} {mac!r} is not a MAC address "
                                    "(six hex pairs like 02:00:00:00:00:01)")
            if int(mac[:2], 16) & 1:
                raise InvalidConfig(f"{where} {mac!r} is a multicast address; an interface "
                                    "needs a unicast MAC (first octet even)")
            return mac.lower()
        return None

    @staticmethod
    def _static_addresses(req: Request) -> list:
        """`ips` capability > CNI_ARGS IP > args.cni.ips > the config's addr."""
        from .config import RuntimeConfig  # the same validation as runtimeConfig.ips

        if req.config.runtimeConfig.ips:
            return list(req.config.runtimeConfig.ips)
        if req.args.get("IP"):
            raw = req.args["IP"].split(",")
            try:
                return list(RuntimeConfig(ips=raw).ips)
            except ValueError as exc:
                raise InvalidConfig(f"ips from args {raw!r}: {exc.errors()[0]['msg']}") from None
        cni_args = req.config.args.cni if req.config.args else None
        if cni_args and cni_args.ips:
            return list(cni_args.ips)  # validated with the config, as runtimeConfig.ips
        return [req.config.addr] if req.config.addr else []

    def desired_remote(self, vni: int, extra: Optional[Attachment] = None) -> RemoteState:
        """The VNI's remote state: the union of its configs' static `vteps`, plus
        what the control plane (if any) knows."""
        vteps: dict = {}
        for a in self.store.for_vni(vni) + ([extra] if extra else []):
            for v in a.vteps:
                vteps[v] = None
        endpoints = []
        if self.remote_source is not None:
            learned = self.remote_source(vni)
            endpoints = list(learned.endpoints)
            for v in learned.flood:
                vteps[v] = None
        return RemoteState(endpoints=endpoints, flood=list(vteps))

    def apply_remote(self, backend: backends.Guarded, vni: int,
                     extra: Optional[Attachment] = None, unchanged_plumbing: bool = False) -> None:
        """Converge the VNI's remote entries; one converge per VNI at a time in this process.

        With `unchanged_plumbing` (the backend said the VNI's plumbing was all in
        place), a desired state equal to the one last applied is not applied again.
        """
        with self._converge_lock("vni", vni):
            desired = self.desired_remote(vni, extra)
            if unchanged_plumbing and self._applied.get(vni) == (backend.name, desired):
                return
            self._applied.pop(vni, None)
            backend.apply_remote(vni, desired)
            self._applied[vni] = (backend.name, desired)

    def _converge_lock(self, kind: str, number: int) -> threading.Lock:
        with self._remote_locks_guard:
            return self._remote_locks.setdefault((kind, number), threading.Lock())

    def local_l3vnis(self) -> dict[int, str]:
        """The L3VNIs of the routed subnets on this node, and the backend of each."""
        return {att.subnet.router.l3vni: att.backend for att in self.store.all()
                if att.subnet is not None}

    def apply_routed(self, backend: backends.Guarded, l3vni: int) -> None:
        """Converge the VPC router's remote hosts and prefixes (from the control plane;
        none without one: a routed subnet then routes on this node only)."""
        with self._converge_lock("l3vni", l3vni):
            state = self.routed_source(l3vni) if self.routed_source else RoutedState()
            backend.apply_routed(l3vni, state)

    def forget_applied(self, vni: Optional[int] = None) -> None:
        """Make the next apply_remote of `vni` (of every VNI: None) apply in any case."""
        if vni is None:
            self._applied.clear()
        else:
            self._applied.pop(vni, None)

    def reconcile(self, full: bool = True) -> list[str]:
        """Let every backend in use converge its per-attachment state to the records
        (Backend.reconcile); what they corrected."""
        corrected: list[str] = []
        names = {n for n in self._backends if not n.startswith("interface:")}
        if full:
            self.forget_applied()
            # Records may name a backend this process has not loaded yet; a quick pass
            # only checks the ones in use here, without reading every record.
            names |= {a.backend for a in self.store.all()}
        try:
            for name in sorted(names):
                corrected += self.backend_named(name).reconcile(
                    lambda n=name: [a for a in self.store.all() if a.backend == n], full,
                    self._locked_record)
        finally:
            # Also when a backend's reconcile failed: the pods' MTU does not wait for it.
            self._quietly(self.follow_mtu, full)
        return corrected

    # ------------------------------------------------------------ MTU

    def _unpinned_mtu(self, backend: str, vni: int, port: int = 4789) -> Optional[int]:
        """The pod MTU a VPC that pins none has on this node now (None: cannot tell,
        e.g. the underlay is gone: readiness reports that)."""
        try:
            return self.backend_named(backend).pod_mtu(
                VpcNetwork(name=f"vni-{vni}", vni=vni, port=port))
        except VpcniError as exc:
            LOG.debug("pod MTU of VNI %d unknown: %s", vni, exc)
            return None

    @staticmethod
    def _mtu_target(att: Attachment, mtu: int) -> Optional[int]:
        """The MTU `att` is to be brought to now that VPCs that pin none get `mtu`
        (None: it keeps its own)."""
        if att.state != "ready" or att.mtu is None or att.mtu == mtu or att.mtu_pinned:
            return None
        if att.mtu_pinned is None and att.mtu < mtu:
            return None  # recorded before vpcni kept whether it was pinned: never raised
        return mtu

    def follow_mtu(self, full: bool = True) -> int:
        """Bring the attachments whose MTU follows the underlay, and their VNIs'
        plumbing, to the pod MTU the underlay allows now; the number changed.

        A quick pass (`full` false) compares, per VNI, the backend's pod MTU with
        the one last applied (an underlay lookup the backend caches; no record is
        read) and works only on VNIs where it changed. A full pass also looks at
        every record, so an attachment that could not follow is tried again and one
        added while the underlay changed is caught. Each attachment is changed under
        its lock, on a fresh read of its record, which then gets the new MTU.
        """
        with self._mtu_lock:
            if full:
                groups: dict[int, list[Attachment]] = {}
                for att in self.store.all():
                    groups.setdefault(att.vni, []).append(att)
                vnis = set(groups)
                live = {a.key for atts in groups.values() for a in atts}
                for key in [k for k in self._mtu_logged if k not in live]:
                    del self._mtu_logged[key]
            else:
                vnis = set(self.store.vni_counts())
                groups = {}
            for vni in [v for v in self._vni_mtu if v not in vnis]:
                del self._vni_mtu[vni]
            for key in [k for k, e in self._mtu_differ.items() if e["vni"] not in vnis]:
                del self._mtu_differ[key]
            total = 0
            # (MTU before, when it changed; MTU now) -> [VNIs, changed, left]: one line each
            news: dict[tuple[Optional[int], int], list] = {}
            for vni in sorted(vnis):
                seen = self._vni_mtu.get(vni)
                if not (seen is None or full or self._unpinned_mtu(seen[0], vni) != seen[1]):
                    continue
                atts = groups[vni] if full else self.store.for_vni(vni)
                if not atts:
                    continue
                name = atts[0].backend
                mtu = self._unpinned_mtu(name, vni, atts[0].port)
                if mtu is None:
                    continue
                before = seen[1] if seen is not None and seen[0] == name else None
                changed, differ = self._follow_vni(name, vni, mtu, before,
                                                   [a for a in atts if a.backend == name])
                self._vni_mtu[vni] = (name, mtu)
                total += changed
                moved = before is not None and before != mtu
                if moved or changed or (before is None and differ):
                    item = news.setdefault((before if moved else None, mtu), [[], 0, 0])
                    item[0].append(vni)
                    item[1] += changed
                    item[2] += len(differ)
            for (before, mtu), (which, changed, left) in sorted(news.items(), key=str):
                LOG.log(logging.WARNING if left else logging.INFO,
                        "pod MTU %d (%s) in VNI %s: %d attachment(s) brought to it%s", mtu,
                        f"was {before}: the underlay's MTU changed" if before is not None
                        else "the underlay's MTU less VXLAN's overhead",
                        ", ".join(map(str, which)), changed,
                        f"; {left} left at another MTU (vpcnictl status lists them)"
                        if left else "")
            return total

    def _follow_vni(self, name: str, vni: int, mtu: int, before: Optional[int],
                    atts: list[Attachment]) -> tuple[int, list[dict]]:
        """One VNI: its plumbing and attachments to `mtu` (the plumbing before the
        attachments when raising, after them when lowering); (attachments changed,
        what is left at another MTU)."""
        backend = self.backend_named(name)
        if before is None:  # first look since the start: the records say what it was
            before = max((a.mtu for a in atts if a.mtu), default=mtu)
        if mtu > before:
            self._quietly(backend.set_network_mtu, vni, mtu)
        changed = 0
        for key in [k for k, e in self._mtu_differ.items() if e["vni"] == vni]:
            del self._mtu_differ[key]
        for att in atts:
            current: Optional[Attachment] = att
            if self._mtu_target(att, mtu) is not None:
                current, done = self._follow_one(att, mtu)
                changed += done
            entry = self._mtu_difference(current, mtu) if current is not None else None
            if entry is not None:
                self._mtu_differ[att.key] = entry
        if mtu < before:
            self._quietly(backend.set_network_mtu, vni, mtu)
        return changed, [e for e in self._mtu_differ.values() if e["vni"] == vni]

    def _follow_one(self, att: Attachment, mtu: int) -> tuple[Optional[Attachment], bool]:
        """One attachment to `mtu`, under its lock, on a fresh read; (its record now,
        None when it is gone, and whether it changed)."""
        key = att.key
        why = None
        fresh: Optional[Attachment] = att
        try:
            with self.store.attachment_lock(*key):
                fresh = self.store.get(*key)
                if fresh is None or self._mtu_target(fresh, mtu) is None:
                    return fresh, False
                if self.provider_named(fresh.provider).set_mtu(fresh, mtu):
                    old, fresh.mtu = fresh.mtu, mtu
                    self.store.put(fresh)
                    self._mtu_logged.pop(key, None)
                    LOG.debug("attachment %s: MTU %s -> %d", "/".join(key), old, mtu)
                    return fresh, True
                why = (f"a {fresh.interface} interface does not follow the underlay (its "
                       "MTU is set inside the VM, or on another node)")
        except VpcniError as exc:
            why = f"could not change its MTU: {exc.msg}"
        if self._mtu_logged.get(key) != (mtu, why):
            self._mtu_logged[key] = (mtu, why)
            LOG.warning("attachment %s keeps MTU %s, not the underlay's %d: %s",
                        "/".join(key), fresh.mtu, mtu, why)
        return fresh, False

    def _mtu_difference(self, att: Attachment, mtu: int) -> Optional[dict]:
        """What the status says of an attachment whose MTU is not `mtu` (None: it is,
        or it need not be: a network that pins a smaller one)."""
        if att.state != "ready" or att.mtu is None or att.mtu == mtu:
            return None
        if att.mtu_pinned:
            if att.mtu < mtu:
                return None
            why = "pinned by the network config above what the underlay carries now"
        elif att.mtu_pinned is None and att.mtu < mtu:
            why = ("recorded before vpcni kept whether its MTU is pinned: lowered with the "
                   "underlay, never raised")
        else:
            logged = self._mtu_logged.get(att.key)
            why = logged[1] if logged else "not brought to it yet"
        return {"attachment": "/".join(att.key), "vni": att.vni, "interface": att.interface,
                "port": att.host_ifname, "mtu": att.mtu, "expected": mtu, "why": why}

    def mtu_status(self) -> dict:
        """For the agent's status: the pod MTU per VNI as last applied, and the
        attachments left at another MTU (from the last reconcile; no netlink). Reads
        copies, without waiting for a reconcile under way."""
        differ = []
        for key, entry in sorted(dict(self._mtu_differ).items()):
            att = self.store.get(*key)
            if att is not None and att.mtu == entry["mtu"]:
                differ.append(entry)
        return {"podMtu": {str(vni): mtu for vni, (_, mtu) in sorted(dict(self._vni_mtu).items())},
                "differ": len(differ), "attachments": differ[:100]}

    @contextlib.contextmanager
    def _locked_record(self, key: tuple[str, str, str]):
        """The attachment's lock held, and its record as it is now (None: gone)."""
        with self.store.attachment_lock(*key):
            yield self.store.get(*key)

    def local_vnis(self) -> set[int]:
        return set(self.store.vni_counts())

    def _changed(self, change: Change) -> None:
        for fn in self.listeners:
            self._quietly(fn, change)

    # ------------------------------------------------------------ DEL

    def delete(self, req: Request) -> None:
        cfg = req.config
        key = (cfg.name, req.container_id, req.ifname)
        with self.store.attachment_lock(*key):
            att = self.store.get(*key)
            if att is not None:
                self._teardown(att, req)
                LOG.info("DEL %s: removed", key)
                self._changed(Change(removed=(att,)))
                return
            # Nothing recorded: still release what a crashed ADD could have left.
            LOG.info("DEL %s: no record; releasing IPAM and leftovers only", key)
            if cfg.ipam:
                req.ipam().delete()
            backend = self.backend_for(cfg)
            bare = Attachment(network=cfg.name, vni=cfg.vni, container_id=req.container_id,
                              ifname=req.ifname, netns=req.netns, backend=backend.name)
            bare.host_ifname = backend.port_name(bare)
            self._quietly(backend.remove_port, bare)
            for name in self.provider_names():
                self._quietly(self._unplug_leftovers, name, bare)

    def _teardown(self, att: Attachment, req: Request, release_ipam: bool = True) -> None:
        """Remove one attachment completely; the caller holds its lock."""
        backend = self.backend_named(att.backend)
        backend.remove_port(att)
        fault("del.port")
        self.provider_named(att.provider).unplug(att)
        fault("del.unplugged")
        if att.ipam_type and release_ipam:
            cfg = req.config
            if cfg.ipam is None or cfg.ipam.type != att.ipam_type:
                LOG.warning("attachment %s was made with ipam %s but the config now says %s; "
                            "releasing with the config given", att.key, att.ipam_type,
                            cfg.ipam.type if cfg.ipam else None)
            if cfg.ipam is not None:
                req.ipam().delete(att.container_id, att.ifname)
        self._forget(att)

    def _forget(self, att: Attachment) -> None:
        """Drop the record; release the VNI's plumbing if it was its last attachment."""
        self.store.delete(*att.key)
        backend = self.backend_named(att.backend)
        if self.store.for_vni(att.vni):
            # Others remain (each DEL drops its record before looking, so the last
            # one to leave sees none): no need to exclude ADDs on the VNI.
            self.apply_remote(backend, att.vni, unchanged_plumbing=True)
            return
        with self.store.vni_lock(att.vni, exclusive=True):
            if not self.store.for_vni(att.vni):
                self.forget_applied(att.vni)
                backend.release_network(att.vni)
            else:
                self.apply_remote(backend, att.vni)

    def _undo(self, kept: list[str], fn, *args) -> None:
        """An undo step of ADD; when it fails, the record is kept (see add)."""
        if not self._quietly(fn, *args):
            kept.append(getattr(fn, "__name__", str(fn)))

    @staticmethod
    def _quietly(fn, *args) -> bool:
        try:
            fn(*args)
            return True
        except Exception as exc:
            # A warning, not a traceback: the caller gets the original error.
            LOG.warning("step %s failed: %s", getattr(fn, "__qualname__", fn), exc)
            LOG.debug("step %s failed", getattr(fn, "__qualname__", fn), exc_info=True)
            return False

    # ------------------------------------------------------------ CHECK

    def check(self, req: Request) -> None:
        cfg = req.config
        key = (cfg.name, req.container_id, req.ifname)
        with self.store.attachment_lock(*key):
            att = self.store.get(*key)
            if att is None:
                raise UnknownContainer(f"no attachment of container {req.container_id!r} "
                                       f"interface {req.ifname!r} in network {cfg.name!r}")
            if att.state != "ready":
                raise CheckFailed(f"attachment {'/'.join(key)} is incomplete (ADD did not finish)")
            if att.vni != cfg.vni:
                raise CheckFailed(f"config says vni {cfg.vni} but the attachment is in VNI "
                                  f"{att.vni}")
            if req.netns and att.netns and req.netns != att.netns:
                raise CheckFailed(f"CNI_NETNS {req.netns} differs from the recorded {att.netns}")
            backend = self.backend_named(att.backend)
            problems = self.provider_named(att.provider).check(att) + \
                backend.check_port(cfg.network(), att) + self._mtu_problems(backend, cfg, att)
            if problems:
                raise CheckFailed(f"attachment {'/'.join(att.key)}: " + "; ".join(problems))
            if cfg.ipam:
                req.ipam().check()
            if cfg.prevResult is not None:
                self._check_prev_result(att, cfg)

    @staticmethod
    def _mtu_problems(backend: backends.Guarded, cfg: NetworkConfig,
                      att: Attachment) -> list[str]:
        """The attachment's MTU against what it should have now: the network's `mtu`,
        else the underlay's MTU less VXLAN's overhead (which the agent's reconcile
        follows; in standalone mode only GC does)."""
        if att.mtu is None:
            return []
        net = cfg.network()
        try:
            underlay = backend.pod_mtu(net.model_copy(update={"mtu": None}))
        except VpcniError as exc:
            return [f"the pod MTU here is unknown: {exc.msg}"]
        what = f"{att.ifname}" + (f" (port {att.host_ifname})" if att.host_ifname else "")
        if cfg.mtu is not None and cfg.mtu > underlay:
            return [f"{what} has MTU {att.mtu}; the network's mtu {cfg.mtu} exceeds {underlay}, "
                    "the most the node's underlay carries now after VXLAN's overhead"]
        expected = cfg.mtu if cfg.mtu is not None else underlay
        if att.mtu == expected:
            return []
        why = "the network's mtu" if cfg.mtu is not None else \
            "the node's underlay MTU less VXLAN's overhead"
        return [f"{what} has MTU {att.mtu}, expected {expected} ({why})"]

    @staticmethod
    def _check_prev_result(att: Attachment, cfg: NetworkConfig) -> None:
        prev = cfg.prevResult
        idx = [i for i, itf in enumerate(prev.interfaces)
               if itf.name == att.ifname and itf.sandbox]
        if not idx:
            raise CheckFailed(f"prevResult has no interface {att.ifname!r} with a sandbox")
        itf = prev.interfaces[idx[0]]
        if itf.mac and att.mac and itf.mac.lower() != att.mac.lower():
            raise CheckFailed(f"prevResult says {att.ifname} has MAC {itf.mac}, "
                              f"recorded {att.mac}")
        have = {str(i.address) for i in att.ips}
        for ip in prev.ips:
            if ip.interface in (None, idx[0]) and str(ip.address) not in have:
                raise CheckFailed(f"prevResult address {ip.address} is not on {att.ifname}")

    # ------------------------------------------------------------ STATUS / GC

    def status(self, req: Request) -> None:
        backends.choose(self.node, req.config.backend)
        if req.config.ipam:
            req.ipam().status()

    def gc(self, req: Request) -> list[VpcniError]:
        """Remove this network's attachments not in the valid list; return all errors."""
        cfg = req.config
        valid = {(v.containerID, v.ifname) for v in cfg.gc_valid() or []}
        errors: list[VpcniError] = []
        with self.store.network_lock(cfg.name):
            for att in list(self.store.all(cfg.name)):
                if (att.container_id, att.ifname) in valid:
                    continue
                try:
                    with self.store.attachment_lock(*att.key):
                        current = self.store.get(*att.key)
                        if current is not None:
                            self._teardown(current, req)
                            LOG.info("GC %s: removed", att.key)
                except VpcniError as exc:
                    errors.append(exc)
                except Exception as exc:
                    errors.append(VpcniError(f"GC of {'/'.join(att.key)}: {exc}"))
            errors += self._gc_orphans(cfg, valid)
            try:
                self.reconcile()
            except VpcniError as exc:
                errors.append(exc)
            if cfg.ipam:
                try:
                    req.ipam().gc()
                except VpcniError as exc:
                    errors.append(exc)
        self._changed(Change(everything=True))
        return errors

    def _gc_orphans(self, cfg: NetworkConfig, valid: set) -> list[VpcniError]:
        """Dataplane objects of this network that no record explains."""
        errors: list[VpcniError] = []
        try:
            backend = self.backend_for(cfg)
            owned = backend.owned()
        except VpcniError as exc:
            return [exc]
        # Node-side ports no record explains, and which provider marked them.
        providers = [n for n in self.provider_names()
                     if n in ("veth",) or backends.probe_one(self.node, n).available]
        orphans: dict[str, tuple[str, str, str]] = dict(owned.attachments)
        made_by: dict[str, str] = {}
        for name in providers:
            try:
                for port, key in self.provider_named(name).owned().items():
                    orphans[port] = key
                    made_by[port] = name
            except VpcniError as exc:
                errors.append(exc)
        for name in providers:
            try:
                reaped = self.provider_named(name).reap_unclaimed(
                    lambda: {a.host_ifname for a in self.store.all() if a.host_ifname})
                if reaped:
                    LOG.info("GC: removed %s, created by %s and never marked (a crash)",
                             ", ".join(reaped), name)
            except VpcniError as exc:
                errors.append(exc)
        for host_ifname, (network, cid, ifname) in orphans.items():
            if network != cfg.name or (cid, ifname) in valid:
                continue
            try:
                with self.store.attachment_lock(network, cid, ifname):
                    if self.store.get(network, cid, ifname) is None:
                        bare = Attachment(network=network, vni=cfg.vni, container_id=cid,
                                          ifname=ifname, backend=backend.name,
                                          host_ifname=host_ifname)
                        backend.remove_port(bare)
                        if host_ifname in made_by:
                            self.provider_named(made_by[host_ifname]).unplug(bare)
                        LOG.info("GC: removed orphan interface %s", host_ifname)
            except VpcniError as exc:
                errors.append(exc)
        if cfg.vni in owned.vnis:
            with self.store.vni_lock(cfg.vni, exclusive=True):
                if not self.store.for_vni(cfg.vni):
                    try:
                        self.forget_applied(cfg.vni)
                        backend.release_network(cfg.vni)
                    except VpcniError as exc:
                        errors.append(exc)
        return errors

    # ------------------------------------------------------------ results

    @staticmethod
    def _result(att: Attachment, cfg: NetworkConfig) -> Result:
        interfaces: list[Interface] = []
        ips: list[IPConfig] = []
        routes = list(att.routes)
        dns = att.dns
        if cfg.prevResult:
            prev = cfg.prevResult
            interfaces, ips = list(prev.interfaces), list(prev.ips)
            routes = list(prev.routes) + routes
            if dns.is_empty():
                dns = prev.dns
        if att.host_ifname:
            interfaces.append(Interface(name=att.host_ifname))
        if att.interface == "vfio":
            # Nothing in the pod's namespace: the VM gets the PCI device.
            interfaces.append(Interface(name=att.ifname, mac=att.mac, sandbox=att.netns or "",
                                        pciID=att.pci_id))
        else:
            interfaces.append(Interface(name=att.ifname, mac=att.mac, mtu=att.mtu,
                                        sandbox=att.netns or "", pciID=att.pci_id))
        idx = len(interfaces) - 1
        ips += [ip.model_copy(update={"interface": idx}) for ip in att.ips]
        return Result(interfaces=interfaces, ips=ips, routes=routes, dns=dns)
