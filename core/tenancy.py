"""Tenancy on the node: which Kubernetes namespaces may attach to which VPC.

The bindings are one JSON file (docs/vpc-api.md): in a cluster the VPC
controller renders it into the ConfigMap `vpcni-tenancy`, which the agent's
pod mounts; in the lab and standalone mode it is written by the lab or by
hand. Every ADD names the pod's namespace (CNI_ARGS K8S_POD_NAMESPACE, which
kubelet and Multus send); an ADD to a VNI whose VPC does not bind that
namespace is refused, naming both. Unknown bindings (no file, a bad one)
refuse every ADD: tenancy fails closed unless the node config turns it off
(`tenancy.enforce: false`). DEL, CHECK and GC are never refused: cleaning up
must always work.

The file is read again only when it changed (a stat per ADD): kubelet
updates a ConfigMap volume by swapping a symlink, so the identity changes.
"""

from __future__ import annotations

import json
import os
import threading
from typing import Annotated, NamedTuple, Optional

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from .config import raise_validation
from .errors import InvalidConfig, TenancyRefused, TryAgainLater
from .models import NAME_PATTERN

K8S_NAME = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"
MAX_FILE = 16 * 1024 * 1024


Namespace = Annotated[str, StringConstraints(pattern=K8S_NAME)]


class Binding(BaseModel):
    model_config = ConfigDict(extra="forbid")
    vpc: str = Field(pattern=K8S_NAME)
    # The network name (the NAD's config `name`) the VPC's attachments must carry:
    # vpcni-ipam keys its pools by it, so a tenant may not borrow another VPC's.
    network: Optional[str] = Field(default=None, pattern=NAME_PATTERN)
    namespaces: list[Namespace] = []
    # A routed subnet of the VPC: the VPC's L3VNI. A network config's `routing` must
    # name this VPC and this L3VNI (or the VNI's pods could be routed into another VPC).
    l3vni: Optional[int] = Field(default=None, ge=1, le=16777215)


class BindingsDoc(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: int = Field(ge=1, le=1)
    vnis: dict[int, Binding] = {}


def parse_bindings(text: str, source: str) -> dict[int, "Bound"]:
    """VNI -> Bound from the file's text; InvalidConfig naming the field."""
    try:
        raw = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise InvalidConfig(f"tenancy bindings {source}: not JSON: {exc}") from None
    try:
        doc = BindingsDoc.model_validate(raw)
    except ValidationError as exc:
        raise_validation(exc, f"tenancy bindings {source}", unsupported=InvalidConfig)
    for vni in doc.vnis:
        if not 1 <= vni <= 16777215:
            raise InvalidConfig(f"tenancy bindings {source}: vnis.{vni}: not a VNI "
                                "(1..16777215)")
    return {vni: Bound(b.vpc, frozenset(b.namespaces), b.network, b.l3vni)
            for vni, b in doc.vnis.items()}


class Bound(NamedTuple):
    vpc: str
    namespaces: frozenset[str]
    network: Optional[str] = None
    l3vni: Optional[int] = None


class Tenancy:
    """The node's tenancy check (one per handler; thread-safe)."""

    def __init__(self, bindings_file: str, enforce: bool = True):
        self.path = bindings_file
        self.enforce = enforce
        self._lock = threading.Lock()
        self._identity: Optional[tuple] = None
        self._bindings: dict[int, Bound] = {}

    def bindings(self) -> dict[int, Bound]:
        """The current bindings, read again when the file changed; TryAgainLater
        when there is no file (yet), InvalidConfig when it is not valid."""
        try:
            st = os.stat(self.path)
        except OSError as exc:
            raise TryAgainLater(
                f"tenancy bindings {self.path} cannot be read ({exc.strerror}): every ADD "
                "is refused until they are known (tenancy fails closed; the VPC controller "
                "writes them, or set tenancy.enforce to false in the node config)") from None
        identity = (st.st_ino, st.st_dev, st.st_mtime_ns, st.st_size)
        with self._lock:
            if identity != self._identity:
                if st.st_size > MAX_FILE:
                    raise InvalidConfig(f"tenancy bindings {self.path}: over {MAX_FILE} bytes")
                try:
                    with open(self.path, encoding="utf-8") as f:
                        text = f.read(MAX_FILE + 1)
                except (OSError, UnicodeDecodeError) as exc:
                    raise TryAgainLater(f"tenancy bindings {self.path} cannot be read: "
                                        f"{exc}") from None
                self._bindings = parse_bindings(text, self.path)
                self._identity = identity
            return self._bindings

    def check(self, vni: int, namespace: Optional[str], pod: Optional[str] = None,
              network: Optional[str] = None, routing: Optional[tuple[str, int]] = None) -> str:
        """The VPC the pod may join on `vni` through network `network` (routed: as a
        subnet of VPC `routing[0]` with L3VNI `routing[1]`); TenancyRefused naming the
        namespace and the VPC when it may not. Does nothing (returns "") when tenancy
        is off."""
        if not self.enforce:
            return ""
        bindings = self.bindings()
        if not namespace:
            raise TenancyRefused(
                "tenancy is enforced on this node and the request names no pod namespace: "
                "CNI_ARGS must carry K8S_POD_NAMESPACE (kubelet and Multus send it)")
        who = f"pod {namespace}/{pod}" if pod else f"namespace {namespace}"
        bound = bindings.get(vni)
        if bound is None:
            raise TenancyRefused(f"{who} may not attach to VNI {vni}: no VPC has that VNI "
                                 f"(tenancy bindings {self.path})")
        vpc, namespaces, bound_network, bound_l3vni = bound
        if namespace not in namespaces:
            raise TenancyRefused(
                f"{who} may not attach to VPC {vpc} (VNI {vni}): namespace {namespace} is "
                f"not bound to it (bound: {', '.join(sorted(namespaces)) or 'none'})")
        if bound_network and network is not None and network != bound_network:
            raise TenancyRefused(
                f"{who}: network {network!r} may not use VNI {vni}: it is VPC {vpc}'s, "
                f"whose network is {bound_network!r}")
        if routing is not None and (routing[0] != vpc or routing[1] != bound_l3vni):
            bound_as = (f"a routed subnet of VPC {vpc} with L3VNI {bound_l3vni}"
                        if bound_l3vni else f"VPC {vpc}'s, not a routed subnet")
            raise TenancyRefused(
                f"{who}: routing.vpc {routing[0]!r} with routing.l3vni {routing[1]} may not "
                f"route VNI {vni}: it is {bound_as}")
        return vpc
