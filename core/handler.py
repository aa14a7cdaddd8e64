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
from .models import MAC_PATTERN, Attachment, DNS, Interface, IPConfig, RemoteState, Result
from .store import AttachmentStore

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
        self._backends: dict[str, backends.Guarded] = {}
        self._choices: dict[Optional[str], tuple[str, float]] = {}  # backend pin -> choice
        # Set by the agent: the control plane's remote state of a VNI, merged
        # with the static flood lists; and who to tell when attachments change.
        self.remote_source: Optional[Callable[[int], RemoteState]] = None
        self.listeners: list[Callable[[Change], None]] = []
        self._remote_locks: dict[int, threading.Lock] = {}
        self._remote_locks_guard = threading.Lock()
        # VNI -> (backend, the remote state last applied there): an ADD or DEL that
        # changes neither the plumbing nor the remote state does not re-apply it.
        self._applied: dict[int, tuple[str, RemoteState]] = {}

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
        caps = backend.describe()
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
                             ipam_type=cfg.ipam.type if cfg.ipam else None, created=time.time())
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
                with self.store.vni_lock(net.vni, exclusive=False):
                    built = backend.ensure_network(net)
                    self.apply_remote(backend, net.vni, att, unchanged_plumbing=built is False)
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
        LOG.info("ADD %s: %s %s in VNI %d via %s, ips %s", key, att.interface,
                 att.host_ifname or att.pci_id, att.vni, att.backend,
                 [str(i.address) for i in att.ips])
        self._changed(Change(added=(att,)))
        return self._result(att, cfg)

    @staticmethod
    def _requested_mac(req: Request) -> Optional[str]:
        """runtimeConfig.mac > CNI_ARGS MAC > args.cni.mac."""
        cni_args = (req.config.args or {}).get("cni") or {}
        for where, mac in (("runtimeConfig.mac", req.config.runtimeConfig.mac),
                           ("CNI_ARGS MAC", req.args.get("MAC")),
                           ("args.cni.mac", cni_args.get("mac"))):
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
        raw = None
        if req.args.get("IP"):
            raw = req.args["IP"].split(",")
        elif ((req.config.args or {}).get("cni") or {}).get("ips"):
            raw = req.config.args["cni"]["ips"]
        if raw is not None:
            try:
                return list(RuntimeConfig(ips=raw).ips)
            except ValueError as exc:
                raise InvalidConfig(f"ips from args {raw!r}: {exc.errors()[0]['msg']}") from None
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
        with self._remote_locks_guard:
            lock = self._remote_locks.setdefault(vni, threading.Lock())
        with lock:
            desired = self.desired_remote(vni, extra)
            if unchanged_plumbing and self._applied.get(vni) == (backend.name, desired):
                return
            self._applied.pop(vni, None)
            backend.apply_remote(vni, desired)
            self._applied[vni] = (backend.name, desired)

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
        for name in sorted(names):
            corrected += self.backend_named(name).reconcile(
                lambda n=name: [a for a in self.store.all() if a.backend == n], full,
                self._locked_record)
        return corrected

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
            problems = self.provider_named(att.provider).check(att) + \
                self.backend_named(att.backend).check_port(cfg.network(), att)
            if problems:
                raise CheckFailed(f"attachment {'/'.join(att.key)}: " + "; ".join(problems))
            if cfg.ipam:
                req.ipam().check()
            if cfg.prevResult is not None:
                self._check_prev_result(att, cfg)

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
