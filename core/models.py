"""Typed models: the contract between the CNI layer, the core and the backends.

Everything here is data, validated once at the edge; no I/O. Backends get
these objects, never raw dicts.
"""

from __future__ import annotations

import ipaddress
from typing import Annotated, Any, Literal, Optional

from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, IPvAnyAddress, IPvAnyInterface,
                      IPvAnyNetwork, field_validator)

_IP_OBJECTS = (ipaddress.IPv4Address, ipaddress.IPv6Address, ipaddress.IPv4Network,
               ipaddress.IPv6Network)


def _ip_text(v: Any) -> Any:
    """Addresses and networks are strings (or ipaddress objects, from vpcni's own
    code): ipaddress would also read a number, a boolean or a list ([addr, prefix]),
    which no config means."""
    if isinstance(v, (str, *_IP_OBJECTS)):
        return v
    raise ValueError(f"must be a string, not {type(v).__name__}")


# pydantic's IPvAny* types give ipaddress objects and one clear error per field.
IPAddress = Annotated[IPvAnyAddress, BeforeValidator(_ip_text)]
IPInterface = Annotated[IPvAnyInterface, BeforeValidator(_ip_text)]
IPNetwork = Annotated[IPvAnyNetwork, BeforeValidator(_ip_text)]

NAME_PATTERN = r"^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$"
MAC_PATTERN = r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$"
VNI_MAX = 16777215
VXLAN_OVERHEAD_V4 = 50
VXLAN_OVERHEAD_V6 = 70

Mac = Annotated[str, Field(pattern=MAC_PATTERN)]

# The anycast gateway's MAC: the same on every node and in every routed subnet
# (a pod or VM that moves keeps a valid gateway entry).
GATEWAY_MAC = "02:76:70:63:67:77"


def router_mac(vtep: Any) -> str:
    """A node's router MAC (symmetric IRB's RMAC): locally administered, from its
    IPv4 VTEP address, so that every node derives every other node's without asking."""
    addr = ipaddress.ip_address(vtep)
    if addr.version != 4:
        raise ValueError(f"router MAC of VTEP {addr}: IPv4 VTEPs only")
    return "02:76:" + ":".join(f"{b:02x}" for b in addr.packed)


def vxlan_overhead(vtep: IPAddress) -> int:
    """Bytes VXLAN adds to each frame: outer IP + UDP + VXLAN + inner Ethernet."""
    return VXLAN_OVERHEAD_V6 if vtep.version == 6 else VXLAN_OVERHEAD_V4


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


# ---------------------------------------------------------------- results


class Interface(_Model):
    """An interface in a CNI result (the 1.1.0 superset of fields)."""

    model_config = ConfigDict(extra="ignore")
    name: str
    mac: Optional[str] = None
    mtu: Optional[int] = None
    sandbox: Optional[str] = None
    socketPath: Optional[str] = None
    pciID: Optional[str] = None


class IPConfig(_Model):
    model_config = ConfigDict(extra="ignore")
    address: IPInterface
    gateway: Optional[IPAddress] = None
    interface: Optional[int] = None


class Route(_Model):
    model_config = ConfigDict(extra="ignore")
    dst: IPNetwork
    gw: Optional[IPAddress] = None
    mtu: Optional[int] = None
    advmss: Optional[int] = None
    priority: Optional[int] = None
    table: Optional[int] = None
    scope: Optional[int] = None

    @field_validator("dst", mode="before")
    @classmethod
    def _strict_false(cls, v: Any) -> Any:
        return ipaddress.ip_network(v, strict=False) if isinstance(v, str) else v


class DNS(_Model):
    model_config = ConfigDict(extra="ignore")
    nameservers: list[str] = []
    domain: Optional[str] = None
    search: list[str] = []
    options: list[str] = []

    def is_empty(self) -> bool:
        return not (self.nameservers or self.domain or self.search or self.options)


class Result(_Model):
    """A CNI result in vpcni's internal (1.1.0) shape; cni/ converts it down."""

    model_config = ConfigDict(extra="ignore")
    cniVersion: str = "1.1.0"
    interfaces: list[Interface] = []
    ips: list[IPConfig] = []
    routes: list[Route] = []
    dns: DNS = DNS()


# ---------------------------------------------------------------- dataplane


class StaticRoute(_Model):
    """A VPC route to an appliance: `dst` through `via`, an address inside the VPC."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    dst: IPNetwork
    via: IPAddress

    @field_validator("dst", mode="before")
    @classmethod
    def _strict_false(cls, v: Any) -> Any:
        return ipaddress.ip_network(v, strict=False) if isinstance(v, str) else v


class Router(_Model):
    """A VPC's router on a node: its L3VNI (symmetric IRB) and its way out."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    vpc: str
    l3vni: int = Field(ge=1, le=VNI_MAX)
    # SNAT on the node for destinations outside the VPC (and the cluster's services).
    egress: bool = True
    routes: tuple[StaticRoute, ...] = ()


class Subnet(_Model):
    """A routed subnet: the L2 VNI's prefix and its anycast gateway on every node."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    prefix: IPNetwork
    gateway: IPAddress
    router: Router
    # The pod's default route points at the gateway (unless IPAM gave one).
    default_route: bool = True


class VpcNetwork(_Model):
    """One VPC as the backends see it: a VNI and how to reach it; `subnet` when the
    VNI is a routed subnet of its VPC (it has an anycast gateway and an L3VNI)."""

    name: str
    vni: int = Field(ge=1, le=VNI_MAX)
    port: int = Field(default=4789, ge=1, le=65535)
    mtu: Optional[int] = None
    vteps: list[IPAddress] = []
    subnet: Optional[Subnet] = None


InterfaceKind = Literal["veth", "vf", "vfio", "host-vf"]
PCI_PATTERN = r"^[0-9a-fA-F]{4}:[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7]$"


class Attachment(_Model):
    """One pod interface in one VPC: the record kept per (network, container, ifname).

    `backend` is the node's switch that holds its port; `provider` built the pod
    side, of kind `interface`: a veth, a VF netdev moved into the pod, a VF left
    on vfio-pci for a VM (`pci_id`, nothing in the pod's namespace), or, on a
    DPU, a host's VF (`host-vf`: only its representor is here).
    """

    network: str
    vni: int
    container_id: str
    ifname: str
    netns: Optional[str] = None
    backend: str
    provider: str = "veth"
    interface: InterfaceKind = "veth"
    # The PCI address of the VF (requested as deviceID, or taken from the pool).
    pci_id: Optional[str] = None
    # Where the device-info file was written (runtimeConfig.CNIDeviceInfoFile).
    device_info_file: Optional[str] = None
    # The provider's own bookkeeping (a VF's original settings and representor name).
    provider_state: dict[str, Any] = {}
    state: Literal["adding", "ready"] = "adding"
    # The node-side port: the veth's host end, or the VF's representor (renamed).
    host_ifname: Optional[str] = None
    mac: Optional[str] = None
    mtu: Optional[int] = None
    # The network config set `mtu` (True: the attachment keeps it), or the MTU follows
    # the node's underlay (False: the agent's reconcile brings it to the underlay's MTU
    # less VXLAN's overhead when that changes). None: recorded before vpcni kept this;
    # such an attachment is lowered with the underlay, never raised.
    mtu_pinned: Optional[bool] = None
    ips: list[IPConfig] = []
    routes: list[Route] = []
    dns: DNS = DNS()
    ipam_type: Optional[str] = None
    # Who asked (CNI_ARGS K8S_POD_NAMESPACE / K8S_POD_NAME) and the VPC tenancy found
    # the VNI bound to (None: tenancy off on this node, or not a Kubernetes call).
    pod_namespace: Optional[str] = None
    pod_name: Optional[str] = None
    vpc: Optional[str] = None
    vteps: list[IPAddress] = []
    port: int = 4789
    # The routed subnet the attachment is in (its VNI's gateway and its VPC's L3VNI).
    subnet: Optional[Subnet] = None
    created: float = 0.0

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.network, self.container_id, self.ifname)


class RemoteEndpoint(_Model):
    """An endpoint of a VNI that lives behind another VTEP."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    mac: Mac
    ip: Optional[IPAddress] = None
    vtep: IPAddress


class RemoteState(_Model):
    """The whole desired remote state of one VNI: endpoints and flood list."""

    endpoints: list[RemoteEndpoint] = []
    flood: list[IPAddress] = []


class RoutedHost(_Model):
    """A remote address of a VPC, reached over its L3VNI (a type-2 route's second label)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    ip: IPAddress
    vtep: IPAddress
    rmac: Mac


class RoutedPrefix(_Model):
    """A prefix of a VPC another node announces (type-5): a subnet it serves."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    prefix: IPNetwork
    vtep: IPAddress
    rmac: Mac


class RoutedState(_Model):
    """The whole desired remote routing state of one L3VNI."""

    hosts: list[RoutedHost] = []
    prefixes: list[RoutedPrefix] = []


class Probe(_Model):
    """A backend's verdict on this node."""

    name: str
    available: bool
    score: int = 0
    reason: str
    facts: dict[str, Any] = {}


class Capabilities(_Model):
    """What a switch backend can serve (Backend.describe)."""

    # Port kinds it can put into its switch: "veth" host ends, VF "representor"s;
    # "remote-representor": the switch is on a DPU, which takes the VF's
    # representor there (the host only hands the VF to the pod).
    ports: list[str] = ["veth"]
    # Its switch is offloaded to the NIC where the NIC allows (representors).
    offload: bool = False
    # Pods behind it need tx checksum offload off (a packet-socket datapath).
    pod_tx_checksum_off: bool = False
    # Prefix of its port names (the guard's rules match it).
    port_prefix: str = "vp"
    # It can serve routed subnets (a VPC router with an anycast gateway and an L3VNI).
    routing: bool = False


class Owned(_Model):
    """What a backend finds in the dataplane that it created."""

    vnis: set[int] = set()
    # host-side interface name -> (network, container_id, ifname)
    attachments: dict[str, tuple[str, str, str]] = {}
