"""The backend contract: switch backends, pod interface providers, and how a node picks them.

An attachment is composed by the core from two parts:

- a **pod interface provider** (entry point group `vpcni.interfaces`) builds
  what the pod or VM gets: a veth pair (`veth`), an SR-IOV VF netdev moved
  into the pod, or a VF left on vfio-pci for a VM (`sriov`). It names the
  netdev that stands for the pod on the node (the veth's host end, or the
  VF's representor), or none when the node's switch never sees the
  interface;
- a **switch backend** (group `vpcni.backends`) puts that port into the
  node's VPC switch: the kernel VNI bridge or OVS br-int with its OpenFlow
  pipeline. A port is a netdev; the switch does not care whether a veth or
  a representor.

The node's switch is chosen per node from the probes (the best available one
unless the node config or the network pins one); the interface provider per
attachment (a `deviceID`, or a network that requires a VF, selects `sriov`).
The core never imports a backend module; backends never import each other.
"""

from __future__ import annotations

import abc
import logging
from typing import Callable, ClassVar, ContextManager, Optional

from pydantic import BaseModel

from .config import NodeConfig
from .errors import BackendError, InvalidConfig, NotAvailable, VpcniError
from .models import Attachment, Capabilities, Owned, Probe, RemoteState, RoutedState, VpcNetwork

LOG = logging.getLogger(__name__)
NAMESPACE = "vpcni.backends"
INTERFACES = "vpcni.interfaces"


class _Configurable:
    """A backend or provider may own a section of the node config, named after its entry
    point (`ovs`, `sriov`): `config_model` validates it; `settings` holds it parsed."""

    name: ClassVar[str]
    config_model: ClassVar[Optional[type[BaseModel]]] = None

    def __init__(self, node: NodeConfig):
        self.node = node
        self.settings = node.section(self.name, self.config_model)


class Backend(_Configurable, abc.ABC):
    """A node's VPC switch (kernel VNI bridges, OVS br-int).

    Contract: ensure_network/add_port/apply_remote are idempotent;
    remove_port and release_network never fail on what is already gone.
    Errors are VpcniError subclasses (the core wraps anything else).
    """

    @classmethod
    @abc.abstractmethod
    def probe(cls, node: NodeConfig) -> Probe:
        """Can this switch serve ADD on this node, and why (not)?"""

    def describe(self) -> Capabilities:
        """What this switch can serve, like os-vif's describe()."""
        return Capabilities(ports=["veth"])

    @abc.abstractmethod
    def port_name(self, att: Attachment) -> str:
        """The node-side name the attachment's port gets (IFNAMSIZ, deterministic)."""

    @abc.abstractmethod
    def pod_mtu(self, net: VpcNetwork) -> int:
        """The MTU of the VPC's pod interfaces on this node (underlay minus VXLAN).

        With `net.mtu` None: the MTU a VPC that pins none has here now. The core asks
        for it (per VNI) on every reconcile pass and brings existing attachments and
        the VNI's plumbing to it when it changed (set_network_mtu,
        InterfaceProvider.set_mtu): keep it cheap (a cached underlay)."""

    def set_network_mtu(self, vni: int, mtu: int) -> bool:
        """Bring the VNI's own devices (not the ports: those are the interface
        provider's) to `mtu`, the pod MTU of a VPC that pins none; True when something
        changed. Called by reconcile after pod_mtu changed, before the attachments
        are raised and after they are lowered. The default has nothing per VNI."""
        return False

    @abc.abstractmethod
    def ensure_network(self, net: VpcNetwork) -> Optional[bool]:
        """Create the per-VNI plumbing on this node if missing; for a routed subnet
        (`net.subnet`) also its VPC's router and the subnet's anycast gateway. True when it built or
        repaired something, False when all was in place (the core then skips
        re-applying a remote state it already applied), None when it cannot tell."""

    @abc.abstractmethod
    def release_network(self, vni: int) -> None:
        """Remove the per-VNI plumbing; called when the VNI's last attachment leaves
        (a routed subnet's gateway too, and its VPC's router with its last subnet)."""

    @abc.abstractmethod
    def add_port(self, net: VpcNetwork, att: Attachment) -> None:
        """Put `att.host_ifname` (a netdev on the node, marked as the attachment's) into
        the VNI's switch, with the filters of `att.mac` and `att.ips`."""

    @abc.abstractmethod
    def remove_port(self, att: Attachment) -> None:
        """Take the attachment's port out of the switch and forget its filters; without
        `att.mac`, whatever filters the port has."""

    @abc.abstractmethod
    def check_port(self, net: VpcNetwork, att: Attachment) -> list[str]:
        """What differs between the switch and the record (empty: nothing)."""

    @abc.abstractmethod
    def apply_remote(self, vni: int, remote: RemoteState) -> None:
        """Converge the VNI's remote entries (per-MAC and flood) to exactly `remote`."""

    def apply_routed(self, l3vni: int, state: RoutedState) -> None:
        """Converge the router of the VPC with this L3VNI (built by ensure_network of
        one of its routed subnets, `net.subnet`) to exactly `state`: the VPC's hosts
        behind other nodes and the prefixes other nodes serve. A switch that cannot
        route (describe().routing false) refuses routed subnets in ensure_network."""

    def reconcile(self, records: Callable[[], list[Attachment]], full: bool = True,
                  locked: Optional[Callable[[tuple[str, str, str]],
                                            ContextManager[Optional[Attachment]]]] = None
                  ) -> list[str]:
        """Converge what the switch keeps per attachment (filters, flows) to the records;
        return what it had to correct (non-empty: the caller converges every VNI's
        remote state too).

        `records()` gives this node's attachment records. The backend reads its
        own dataplane state first and calls it after, so that an attachment
        being added meanwhile (recorded before anything is built) is never taken
        for a leftover. What it finds wrong it corrects inside `locked(key)`: a
        context that holds the attachment's lock (no ADD, DEL or CHECK of it runs)
        and gives its record as it is then (None: gone), so that a decision made
        on a read from before an ADD or DEL is never applied after it. `full`
        false asks for a quick pass (the agent runs one every few seconds): only
        check that node-wide state is intact. The default has nothing to converge.
        """
        return []

    def health(self) -> list[str]:
        """What keeps this switch from serving the node now (an underlay that is down,
        a VTEP address that went away, a daemon it needs gone): the agent's readiness
        reports it. The default knows of nothing."""
        return []

    @abc.abstractmethod
    def owned(self) -> Owned:
        """What this switch created in the dataplane (for GC and reconcile)."""

    def close(self) -> None:
        """Release sockets and connections."""


class InterfaceProvider(_Configurable, abc.ABC):
    """What a pod (or VM) gets: a netdev in its namespace, or a PCI device it keeps."""

    # The interface kinds this provider builds ("veth", "vf", "vfio").
    kinds: ClassVar[tuple[str, ...]] = ()

    @classmethod
    @abc.abstractmethod
    def probe(cls, node: NodeConfig) -> Probe:
        """Can this provider build interfaces on this node, and why (not)?"""

    def preflight(self, att: Attachment, switch: Capabilities) -> None:
        """Refuse what plug would refuse (a device that is unknown or in use, a switch
        that cannot take this interface) before an earlier attachment is torn down.
        The default has nothing to check early."""

    @abc.abstractmethod
    def plug(self, net: VpcNetwork, att: Attachment, mtu: int,
             switch: Capabilities) -> tuple[Attachment, bool]:
        """Build the pod side of `att` and its port named `att.host_ifname` on the node
        (marked as the attachment's), configure `att.ips`/`att.routes` in the pod when
        it is a netdev there, and undo all of it when something fails. Returns the
        attachment with mac, mtu, interface kind and PCI address filled in, and True
        when leftovers of an earlier, crashed plug were removed first."""

    @abc.abstractmethod
    def unplug(self, att: Attachment) -> None:
        """Undo plug; tolerate a missing netns, link or device."""

    @abc.abstractmethod
    def check(self, att: Attachment) -> list[str]:
        """What differs between the pod side and the record (empty: nothing)."""

    def set_mtu(self, att: Attachment, mtu: int) -> bool:
        """Bring the attachment's interface, its pod end and its node-side port, to
        `mtu` (the underlay's changed; the caller holds the attachment's lock and
        records the new MTU). False when this kind of interface cannot follow (a VF
        a VM holds): the record keeps its MTU, and CHECK and the agent's status
        report the difference. The default cannot."""
        return False

    def owned(self) -> dict[str, tuple[str, str, str]]:
        """Node-side netdevs this provider marked, by name -> attachment key (for GC)."""
        return {}

    def reap_unclaimed(self, in_use: Callable[[], set[str]]) -> list[str]:
        """Remove what this provider created and never got to mark as an attachment's
        (a crash between the two requests), unless `in_use()` (the node-side names the
        records hold, read after this provider looked) names it; what it removed."""
        return []

    def close(self) -> None:
        """Release sockets and connections."""


def _manager(group: str = NAMESPACE):
    from stevedore import ExtensionManager

    errors: dict[str, str] = {}

    def on_fail(_mgr, ep, exc):
        errors[ep.name] = f"cannot load: {exc}"

    mgr = ExtensionManager(group, invoke_on_load=False, on_load_failure_callback=on_fail)
    return mgr, errors


def probe_all(node: NodeConfig, group: str = NAMESPACE) -> list[Probe]:
    """Every installed backend's (or provider's) verdict, best first."""
    mgr, errors = _manager(group)
    probes = [Probe(name=n, available=False, reason=r) for n, r in errors.items()]
    for ext in mgr:
        try:
            probes.append(ext.plugin.probe(node))
        except Exception as exc:  # a probe must never take the plugin down
            probes.append(Probe(name=ext.name, available=False, reason=f"probe failed: {exc}"))
    probes.sort(key=lambda p: (not p.available, -p.score, p.name))
    return probes


def choose(node: NodeConfig, required: Optional[str] = None) -> tuple[Probe, list[Probe]]:
    """The probe of the backend this node uses, and all probes.

    `required` (a network's pin) wins over the node's pin, which wins over
    the best score. A pinned backend that is not usable is an error saying why.
    """
    probes = probe_all(node)
    pin = required or node.backend
    if pin:
        for p in probes:
            if p.name == pin:
                if not p.available:
                    what = "network" if required else f"node config {node.source}"
                    raise NotAvailable(f"backend {pin!r} pinned by the {what} is not usable "
                                       f"here: {p.reason}")
                return p, probes
        installed = ", ".join(sorted(p.name for p in probes)) or "none"
        raise NotAvailable(f"backend {pin!r} is not installed (installed: {installed})")
    for p in probes:
        if p.available:
            return p, probes
    reasons = "; ".join(f"{p.name}: {p.reason}" for p in probes) or "no backend installed"
    raise NotAvailable(f"no usable backend on this node ({reasons})")


def probe_one(node: NodeConfig, name: str, group: str = INTERFACES) -> Probe:
    """One entry point's verdict (the interface provider an attachment needs)."""
    mgr, errors = _manager(group)
    if name in errors:
        return Probe(name=name, available=False, reason=errors[name])
    for ext in mgr:
        if ext.name == name:
            try:
                return ext.plugin.probe(node)
            except InvalidConfig:
                raise  # its node config section is wrong: code 7 naming the field, not 50
            except Exception as exc:
                return Probe(name=name, available=False, reason=f"probe failed: {exc}")
    installed = ", ".join(sorted(e.name for e in mgr)) or "none"
    return Probe(name=name, available=False, reason=f"not installed (installed: {installed})")


def _subject(args: tuple) -> str:
    """What a backend call was about, for its error message."""
    for arg in args:
        if isinstance(arg, Attachment):
            return f"attachment {'/'.join(arg.key)} (VNI {arg.vni})"
    for arg in args:
        if isinstance(arg, VpcNetwork):
            return f"VNI {arg.vni} ({arg.name})"
        if isinstance(arg, int) and not isinstance(arg, bool):
            return f"VNI {arg}"
    return "the node"


class Guarded:
    """A backend as the core calls it: every error leaves as a VpcniError.

    Backends raise typed errors (VpcniError subclasses) for what they expect;
    anything else (an OSError, a netlink or OVSDB exception, a bug) becomes a
    BackendError naming the backend, the operation and its object, instead of
    escaping as a bare internal error.
    """

    def __init__(self, backend: Backend):
        self._backend = backend
        self.name = backend.name

    @property
    def wrapped(self) -> Backend:
        return self._backend

    def __getattr__(self, attr: str):
        value = getattr(self._backend, attr)
        if not callable(value) or attr.startswith("_"):
            return value

        def call(*args, **kwargs):
            try:
                return value(*args, **kwargs)
            except VpcniError:
                raise
            except Exception as exc:
                detail = str(exc) or type(exc).__name__
                raise BackendError(f"backend {self.name}: {attr} of {_subject(args)} failed: "
                                   f"{detail}") from exc
        call.__name__ = attr
        return call


def load(name: str, node: NodeConfig, group: str = NAMESPACE) -> Guarded:
    from stevedore import DriverManager

    try:
        mgr = DriverManager(group, name, invoke_on_load=True, invoke_args=(node,))
    except Exception as exc:
        cause = exc.__cause__ if isinstance(exc.__cause__, VpcniError) else exc
        if isinstance(cause, VpcniError):
            raise type(cause)(f"cannot load backend {name!r}: {cause}") from exc
        raise BackendError(f"cannot load backend {name!r}: {exc}") from exc
    return Guarded(mgr.driver)
