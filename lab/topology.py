"""The lab's topology file (TOML): fabric, route reflectors, nodes, VPCs, pods.

See docs/lab.md for the reference. Validated once with pydantic; errors
name the table and key.
"""

from __future__ import annotations

import ipaddress
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

from pydantic import (BaseModel, ConfigDict, Field, StringConstraints, ValidationError,
                      model_validator)

from vpcni.core.models import NAME_PATTERN, VNI_MAX, IPvAnyAddress, IPvAnyInterface, IPvAnyNetwork
from vpcni.core.tenancy import K8S_NAME

DEFAULT_TOPOLOGY = Path(__file__).with_name("topologies") / "default.toml"
_SHORT = r"^[a-z0-9][a-z0-9-]{0,11}$"  # becomes part of namespace and interface names


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Reflector(_Strict):
    name: str = Field(pattern=_SHORT)
    address: IPvAnyAddress
    daemon: Literal["frr", "gobgpd"] = "frr"


class Nic(_Strict):
    """A simulated SR-IOV NIC (lab.simnic): VFs as veth pairs, a fake sysfs tree.
    With `dpu`, the NIC is a simulated DPU: the node's namespace is the DPU's (switch,
    VTEP, gobgpd, agent), and a host namespace `<node>-host` has the VFs; its pods are
    the host's."""

    vfs: int = Field(default=4, ge=1, le=32)
    mode: Literal["switchdev", "legacy"] = "switchdev"
    dpu: bool = False


class Node(_Strict):
    name: str = Field(pattern=_SHORT)
    address: IPvAnyAddress
    # vpcni: agent + gobgpd; frr: a plain FRR VTEP as the seed deploys it.
    kind: Literal["vpcni", "frr"] = "vpcni"
    backend: Optional[str] = Field(default=None, pattern=NAME_PATTERN)
    nic: Optional[Nic] = None


class Vpc(_Strict):
    """One L2 segment (a VNI): a VPC of its own, or, with `router`, a routed subnet of
    the VPC named so (all its subnets share `l3vni`; docs/routing.md)."""

    name: str = Field(pattern=_SHORT)
    vni: int = Field(ge=1, le=VNI_MAX)
    cidr: IPvAnyNetwork
    router: Optional[str] = Field(default=None, pattern=_SHORT)
    l3vni: Optional[int] = Field(default=None, ge=1, le=VNI_MAX)
    egress: bool = True
    # The router's static routes (the network config's routing.routes): {dst, via}.
    routes: list[dict[str, str]] = []
    # vpcni-ipam keys for the pods that give no address (docs/ipam.md); by
    # default the cidr, its first host as gateway, the lab's shared SQLite file.
    ipam: dict[str, Any] = {}
    # The (Kubernetes) namespaces bound to the VPC: the lab's tenancy bindings. The
    # lab's pods are in namespace "lab".
    namespaces: list[Annotated[str, StringConstraints(pattern=K8S_NAME)]] = Field(
        default=["lab"], max_length=100)


class Pod(_Strict):
    name: str = Field(pattern=_SHORT)
    node: str
    vpc: str
    address: Optional[IPvAnyInterface] = None
    # "vf": an SR-IOV VF from the node's (simulated) NIC instead of a veth.
    interface: Literal["veth", "vf"] = "veth"


class Topology(_Strict):
    name: str = Field(default="lab", pattern=_SHORT)
    asn: int = Field(default=65000, ge=1, le=4294967295)
    underlay: IPvAnyNetwork = ipaddress.ip_network("198.51.100.0/24")
    reflectors: list[Reflector] = Field(min_length=1)
    nodes: list[Node] = Field(min_length=1)
    vpcs: list[Vpc] = []
    pods: list[Pod] = []

    @model_validator(mode="after")
    def _consistent(self) -> "Topology":
        names = [x.name for x in (*self.reflectors, *self.nodes)]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"names used twice among reflectors and nodes: {sorted(dup)}")
        addresses = [x.address for x in (*self.reflectors, *self.nodes)]
        for a in addresses:
            if a not in self.underlay:
                raise ValueError(f"address {a} is outside the underlay {self.underlay}")
        if len(set(addresses)) != len(addresses):
            raise ValueError("underlay addresses must be unique")
        for n in self.nodes:
            if n.nic is not None and n.nic.dpu and (len(n.name) > 7 or n.kind != "vpcni"):
                raise ValueError(f"node {n.name}: a DPU node needs kind vpcni and a name of "
                                 "at most 7 characters (its host is <name>-host)")
        vnis = [v.vni for v in self.vpcs]
        if len(set(vnis)) != len(vnis):
            raise ValueError("two VPCs share a VNI")
        l3vnis: dict[str, int] = {}
        for v in self.vpcs:
            if (v.router is None) != (v.l3vni is None):
                raise ValueError(f"vpc {v.name}: 'router' and 'l3vni' go together")
            if v.router is None:
                continue
            if l3vnis.setdefault(v.router, v.l3vni) != v.l3vni:
                raise ValueError(f"vpc {v.name}: router {v.router} has l3vni "
                                 f"{l3vnis[v.router]} elsewhere")
            if v.l3vni in vnis:
                raise ValueError(f"vpc {v.name}: l3vni {v.l3vni} is a subnet's VNI")
        if len(set(l3vnis.values())) != len(l3vnis):
            raise ValueError("two routers share an l3vni")
        nodes = {n.name: n for n in self.nodes}
        vpcs = {v.name: v for v in self.vpcs}
        seen = set()
        for p in self.pods:
            if p.name in seen:
                raise ValueError(f"pod {p.name} defined twice")
            seen.add(p.name)
            if p.node not in nodes:
                raise ValueError(f"pod {p.name}: no node {p.node!r}")
            if p.vpc not in vpcs:
                raise ValueError(f"pod {p.name}: no vpc {p.vpc!r}")
            if p.interface == "vf" and nodes[p.node].nic is None:
                raise ValueError(f"pod {p.name}: interface 'vf' needs a node with a nic "
                                 f"({p.node} has none)")
            nic = nodes[p.node].nic
            if nic is not None and nic.dpu and p.interface != "vf":
                raise ValueError(f"pod {p.name}: a DPU host's pods get VFs (interface 'vf')")
            if p.address is None:
                if nodes[p.node].kind == "frr":
                    raise ValueError(f"pod {p.name}: 'address' is required on FRR node "
                                     f"{p.node} (vpcni-ipam serves vpcni nodes only)")
                continue
            if p.address.ip not in vpcs[p.vpc].cidr:
                raise ValueError(f"pod {p.name}: {p.address} is outside VPC {p.vpc} "
                                 f"({vpcs[p.vpc].cidr})")
        return self

    def vpc(self, name: str) -> Vpc:
        return next(v for v in self.vpcs if v.name == name)

    def node(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)

    @classmethod
    def load(cls, path: Optional[Path] = None) -> "Topology":
        path = Path(path or DEFAULT_TOPOLOGY)
        try:
            raw = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ValueError(f"topology {path}: {exc}") from None
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            err = exc.errors(include_url=False)[0]
            where = ".".join(str(p) for p in err["loc"]) or "(top level)"
            msg = err["msg"].removeprefix("Value error, ")
            raise ValueError(f"topology {path}: {where}: {msg}") from None
