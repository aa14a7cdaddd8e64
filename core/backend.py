"""The backend contract and how a node picks its backend.

A backend is a stevedore entry point in group `vpcni.backends`. The core never
imports a backend module: it loads the entry points, asks each one's probe,
and uses the best available one unless the node config (or the network)
pins one.
"""

from __future__ import annotations

import abc
import logging
from typing import Callable, ClassVar, Optional

from .config import NodeConfig
from .errors import BackendError, NotAvailable, VpcniError
from .models import Attachment, Owned, Probe, RemoteState, VpcNetwork

LOG = logging.getLogger(__name__)
NAMESPACE = "vpcni.backends"


class Backend(abc.ABC):
    """A dataplane for VPC attachments on one node.

    Contract: ensure_network/attach/apply_remote are idempotent; detach and
    release_network never fail on what is already gone; attach cleans
    leftovers of a crashed earlier attach of the same attachment. Errors are
    VpcniError subclasses.
    """

    name: ClassVar[str]

    def __init__(self, node: NodeConfig):
        self.node = node

    @classmethod
    @abc.abstractmethod
    def probe(cls, node: NodeConfig) -> Probe:
        """Can this backend serve ADD on this node, and why (not)?"""

    @abc.abstractmethod
    def ensure_network(self, net: VpcNetwork) -> None:
        """Create the per-VNI plumbing on this node if missing."""

    @abc.abstractmethod
    def release_network(self, vni: int) -> None:
        """Remove the per-VNI plumbing; called when the VNI's last attachment leaves."""

    @abc.abstractmethod
    def attach(self, net: VpcNetwork, att: Attachment) -> Attachment:
        """Plumb the pod interface, configure att.ips/att.routes in it.

        Returns the attachment with host_ifname, mac and mtu filled in.
        """

    @abc.abstractmethod
    def detach(self, att: Attachment) -> None:
        """Remove the pod interface; tolerate a missing netns or link."""

    @abc.abstractmethod
    def check(self, net: VpcNetwork, att: Attachment) -> None:
        """Raise CheckFailed naming what differs from the record."""

    @abc.abstractmethod
    def apply_remote(self, vni: int, remote: RemoteState) -> None:
        """Converge the VNI's remote entries (per-MAC and flood) to exactly `remote`."""

    def reconcile(self, records: Callable[[], list[Attachment]], full: bool = True) -> list[str]:
        """Converge what the backend keeps per attachment beside the interfaces
        (filters, flows) to the records; return what it had to correct (non-empty:
        the caller converges every VNI's remote state too).

        `records()` gives this node's attachment records. The backend reads its
        own dataplane state first and calls it after, so that an attachment
        being added meanwhile (recorded before anything is built) is never taken
        for a leftover. `full` false asks for a quick pass (the agent runs one
        every few seconds): only check that node-wide state is intact. The
        default has nothing to converge.
        """
        return []

    @abc.abstractmethod
    def owned(self) -> Owned:
        """What this backend created in the dataplane (for GC and reconcile)."""

    def close(self) -> None:
        """Release sockets and connections."""


def _manager():
    from stevedore import ExtensionManager

    errors: dict[str, str] = {}

    def on_fail(_mgr, ep, exc):
        errors[ep.name] = f"cannot load: {exc}"

    mgr = ExtensionManager(NAMESPACE, invoke_on_load=False, on_load_failure_callback=on_fail)
    return mgr, errors


def probe_all(node: NodeConfig) -> list[Probe]:
    """Every installed backend's verdict, best first."""
    mgr, errors = _manager()
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


def load(name: str, node: NodeConfig) -> Guarded:
    from stevedore import DriverManager

    try:
        mgr = DriverManager(NAMESPACE, name, invoke_on_load=True, invoke_args=(node,))
    except Exception as exc:
        cause = exc.__cause__ if isinstance(exc.__cause__, VpcniError) else exc
        if isinstance(cause, VpcniError):
            raise type(cause)(f"cannot load backend {name!r}: {cause}") from exc
        raise BackendError(f"cannot load backend {name!r}: {exc}") from exc
    return Guarded(mgr.driver)
