"""Configuration: the CNI network config (one per VPC) and the node config.

Both are parsed once with pydantic; a validation failure becomes a CNI error
that names the field and the value (code 7, or 2 for a field vpcni does not
support).
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import InvalidConfig, UnsupportedField, VpcniError
import ipaddress

from .models import (DNS, MAC_PATTERN, NAME_PATTERN, PCI_PATTERN, VNI_MAX, IPAddress, IPInterface,
                     IPNetwork, Result, Router, StaticRoute, Subnet, VpcNetwork)

DEFAULT_NODE_CONFIG = "/etc/vpcni/node.json"
NODE_CONFIG_ENV = "VPCNI_NODE_CONFIG"
MAX_NODE_CONFIG = 1024 * 1024


def not_json(name: str) -> Any:
    """json's parse_constant: NaN and (-)Infinity, which Python reads, are not JSON."""
    raise ValueError(f"{name} is not a JSON value")


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def first_error(exc: ValidationError, root: str = "") -> tuple[str, str, str, str]:
    """The first pydantic error as (type, field path like `root.a[0].b`, the value as
    JSON cut at 120 characters, message): one reading for every error message."""
    err = exc.errors(include_url=False)[0]
    field = _loc(((root,) if root else ()) + tuple(err["loc"]))
    value = json.dumps(err.get("input"), default=str)
    if len(value) > 120:
        value = value[:117] + "..."
    return err["type"], field, value, err["msg"].removeprefix("Value error, ")


def raise_validation(exc: ValidationError, where: str,
                     unsupported: type[VpcniError] = UnsupportedField) -> None:
    """Turn the first pydantic error into a CNI error naming field and value.

    An unknown key is `unsupported` (code 2 is the spec's for the network
    config only; the node config is plugin-private, so it passes InvalidConfig).
    """
    kind, field, value, msg = first_error(exc)
    field = field or "(config)"
    if kind == "extra_forbidden":
        raise unsupported(f"{where}: unsupported field {field!r} (value {value})")
    if kind == "missing":
        # The input of a missing field is the object around it: not worth quoting.
        raise InvalidConfig(f"{where}: {field!r} is required")
    raise InvalidConfig(f"{where}: invalid {field!r} = {value}: {msg}")


class IpamConfig(BaseModel):
    """Delegated IPAM: only `type` is ours to read, the rest goes to the plugin."""

    model_config = ConfigDict(extra="allow")
    type: str = Field(pattern=NAME_PATTERN)


def pod_address_text(v: Any) -> Any:
    """A pod's address as the config gives it: a string with a prefix length."""
    if not isinstance(v, str):
        raise ValueError("must be a string like 172.16.32.1/24")
    if "/" not in v:
        raise ValueError("needs a prefix length, e.g. 172.16.32.1/24")
    return v


def usable_pod_address(v: Any) -> Any:
    """Not an address a pod's interface could hold (and nothing the node routes)."""
    if v is None:
        return v
    ip = v.ip
    if ip.is_unspecified or ip.is_multicast or ip.is_loopback or v.network.prefixlen == 0:
        raise ValueError(f"{v} cannot be a pod's address (unspecified, multicast, loopback "
                         "or a /0 prefix)")
    return v


class _RequestedAddresses(BaseModel):
    """`mac` and `ips` as a runtime asks for them (capabilities or `args.cni`); keys
    vpcni does not read are kept as given."""

    model_config = ConfigDict(extra="allow")
    mac: Optional[str] = Field(default=None, pattern=MAC_PATTERN)
    ips: list[IPInterface] = []

    @field_validator("ips", mode="before")
    @classmethod
    def _ips_have_prefixes(cls, v: Any) -> Any:
        return [pod_address_text(x) for x in v] if isinstance(v, list) else v

    @field_validator("ips")
    @classmethod
    def _ips_usable(cls, v: list) -> list:
        return [usable_pod_address(x) for x in v]


class RuntimeConfig(_RequestedAddresses):
    """Capabilities a runtime may pass; those vpcni does not use are ignored."""

    # Multus / the SR-IOV device plugin: the VF allocated to this pod, and where the
    # device-info file goes (CNI device-info spec 1.1.0).
    deviceID: Optional[str] = Field(default=None, pattern=PCI_PATTERN)
    CNIDeviceInfoFile: Optional[str] = Field(default=None, pattern=r"^/[^\x00]*$",
                                             max_length=4096)


class CniArgs(_RequestedAddresses):
    """`args.cni` (CNI CONVENTIONS.md): the keys vpcni reads are checked here."""


class Args(BaseModel):
    """`args`: anything a runtime passes; only `args.cni` is vpcni's to read."""

    model_config = ConfigDict(extra="allow")
    cni: Optional[CniArgs] = None


# What no VPC subnet, static route or routed prefix may claim: link-local (the VPC
# routers' transit links, a cloud's metadata address), loopback, "this network",
# multicast and reserved space (docs/routing.md).
NOT_A_VPC = tuple(ipaddress.ip_network(n) for n in
                  ("169.254.0.0/16", "127.0.0.0/8", "0.0.0.0/8", "224.0.0.0/4", "240.0.0.0/4"))


def not_a_vpc(net) -> Optional[ipaddress.IPv4Network]:
    """The reserved range `net` overlaps, else None."""
    return next((n for n in NOT_A_VPC if n.version == net.version and net.overlaps(n)), None)


def network_text(v: Any) -> Any:
    """A network as the config gives it: no host bits (10.1.0.0/24, not 10.1.0.1/24)."""
    if isinstance(v, str):
        try:
            return ipaddress.ip_network(v, strict=True)
        except ValueError as exc:
            raise ValueError(f"not a network (host bits set?): {exc}") from None
    return v


class StaticRouteConfig(BaseModel):
    """A VPC route to an appliance inside the VPC (`routing.routes`)."""

    model_config = ConfigDict(extra="forbid")
    dst: IPNetwork
    via: IPAddress

    _dst = field_validator("dst", mode="before")(network_text)

    @model_validator(mode="after")
    def _v4(self) -> "StaticRouteConfig":
        if self.dst.version != 4 or self.via.version != 4:
            raise ValueError("IPv4 routes only (the VPC router is IPv4 here)")
        if self.dst.prefixlen == 0:
            raise ValueError(f"dst {self.dst}: a default route is the VPC's egress, not a "
                             "static route")
        if not_a_vpc(self.dst):
            raise ValueError(f"dst {self.dst} overlaps {not_a_vpc(self.dst)}, which no VPC "
                             "route may take")
        if not self.via.is_private and not self.via.is_global or self.via.is_multicast:
            raise ValueError(f"next hop {self.via} is not a unicast address")
        return self


class RoutingConfig(BaseModel):
    """`routing`: this network is a routed subnet of a VPC (docs/routing.md): every node
    with a pod in it answers for `gateway` (anycast), and the VPC's subnets reach
    each other over its L3VNI (symmetric IRB over EVPN)."""

    model_config = ConfigDict(extra="forbid")
    vpc: str = Field(pattern=NAME_PATTERN, max_length=63)
    l3vni: int = Field(ge=1, le=VNI_MAX, strict=True)
    subnet: IPNetwork
    # Default: the subnet's first address.
    gateway: Optional[IPAddress] = None
    # Pods reach addresses outside the VPC through SNAT on their own node.
    egress: bool = Field(default=True, strict=True)
    # The pod's default route points at the gateway (unless IPAM gave one).
    defaultRoute: bool = Field(default=True, strict=True)
    routes: list[StaticRouteConfig] = Field(default=[], max_length=256)

    _subnet = field_validator("subnet", mode="before")(network_text)

    @model_validator(mode="after")
    def _gateway_inside(self) -> "RoutingConfig":
        net = self.subnet
        if net.version != 4:
            raise ValueError("subnet: IPv4 subnets only (the VPC router is IPv4 here)")
        if not 8 <= net.prefixlen <= 30:
            raise ValueError(f"subnet {net}: the prefix length must be 8 to 30")
        if not_a_vpc(net):
            raise ValueError(f"subnet {net} overlaps {not_a_vpc(net)}, which no VPC subnet "
                             "may use")
        if self.gateway is None:
            self.gateway = net.network_address + 1
        if self.gateway not in net or self.gateway in (net.network_address,
                                                       net.broadcast_address):
            raise ValueError(f"gateway {self.gateway} is not a host address of subnet {net}")
        return self

    def subnet_model(self) -> Subnet:
        return Subnet(prefix=self.subnet, gateway=self.gateway, default_route=self.defaultRoute,
                      router=Router(
            vpc=self.vpc, l3vni=self.l3vni, egress=self.egress,
            routes=tuple(StaticRoute(dst=r.dst, via=r.via) for r in self.routes)))


class ValidAttachment(BaseModel):
    model_config = ConfigDict(extra="allow")
    containerID: str
    ifname: str


class NetworkConfig(BaseModel):
    """The CNI network config of one VPC (what stdin carries)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    cniVersion: str
    name: str = Field(pattern=NAME_PATTERN)
    type: Literal["vpcni"]
    vni: int = Field(ge=1, le=VNI_MAX, strict=True)
    addr: Optional[IPInterface] = None
    mtu: Optional[int] = Field(default=None, ge=576, le=65535, strict=True)
    port: int = Field(default=4789, ge=1, le=65535, strict=True)
    backend: Optional[str] = Field(default=None, pattern=NAME_PATTERN)
    # "vf": every attachment of this network needs an SR-IOV VF (the sriov provider).
    # "host-vf": on a DPU, the attachment is the host's VF `hostVF`, whose
    # representor the DPU puts into its switch (what a host's `dpu` switch sends).
    interface: Literal["veth", "vf", "host-vf"] = "veth"
    hostVF: Optional[str] = Field(default=None, pattern=r"^pf[0-9]{1,3}vf[0-9]{1,4}$")
    # Settings of the attachment's VF, applied through its PF (vlan, qos, vlan_proto,
    # spoofchk, trust, link_state, min_tx_rate, max_tx_rate): the sriov provider's
    # to validate and apply (docs/backends/sriov.md).
    vf: Optional[dict[str, Any]] = None
    # The VF Multus (from the device plugin) puts in the config: top-level deviceID
    # (pciBusID is an older spelling of it), or runtimeConfig.deviceID.
    deviceID: Optional[str] = Field(default=None, pattern=PCI_PATTERN)
    pciBusID: Optional[str] = Field(default=None, pattern=PCI_PATTERN)
    vteps: list[IPAddress] = []
    ipam: Optional[IpamConfig] = None
    # A routed subnet of a VPC (docs/routing.md); absent: the VPC is this one L2 segment.
    routing: Optional[RoutingConfig] = None
    # Conventions and runtime-injected keys (CNI SPEC.md and CONVENTIONS.md).
    dns: Optional[DNS] = None
    args: Optional[Args] = None
    runtimeConfig: RuntimeConfig = RuntimeConfig()
    capabilities: Optional[dict[str, bool]] = None
    # Parsed here so that a malformed one fails before ADD builds anything.
    prevResult: Optional[Result] = None
    valid_attachments: Optional[list[ValidAttachment]] = Field(
        default=None, alias="cni.dev/valid-attachments")
    attachments: Optional[list[ValidAttachment]] = Field(default=None, alias="cni.dev/attachments")

    @field_validator("addr", mode="before")
    @classmethod
    def _addr_has_prefix(cls, v: Any) -> Any:
        return None if v is None else pod_address_text(v)

    @field_validator("addr")
    @classmethod
    def _addr_usable(cls, v: Any) -> Any:
        return usable_pod_address(v)

    @model_validator(mode="after")
    def _one_ip_source(self) -> "NetworkConfig":
        if self.addr is not None and self.ipam is not None:
            raise ValueError("'addr' and 'ipam' exclude each other: use one")
        return self

    @model_validator(mode="after")
    def _one_device(self) -> "NetworkConfig":
        given = {v.lower() for v in (self.deviceID, self.pciBusID, self.runtimeConfig.deviceID)
                 if v}
        if len(given) > 1:
            raise ValueError(f"deviceID, pciBusID and runtimeConfig.deviceID name different "
                             f"devices ({', '.join(sorted(given))}): give one")
        return self

    @model_validator(mode="after")
    def _host_vf(self) -> "NetworkConfig":
        if (self.interface == "host-vf") != (self.hostVF is not None):
            raise ValueError("'interface': 'host-vf' and 'hostVF' go together (the DPU "
                             "side of a host's VF attachment)")
        return self

    def device_id(self) -> Optional[str]:
        """The VF this attachment must use, if the runtime or Multus named one."""
        value = self.runtimeConfig.deviceID or self.deviceID or self.pciBusID
        return value.lower() if value else None

    def network(self) -> VpcNetwork:
        return VpcNetwork(name=self.name, vni=self.vni, port=self.port, mtu=self.mtu,
                          vteps=list(dict.fromkeys(self.vteps)),
                          subnet=self.routing.subnet_model() if self.routing else None)

    def gc_valid(self) -> Optional[list[ValidAttachment]]:
        if self.valid_attachments is not None:
            return self.valid_attachments
        return self.attachments

    @classmethod
    def parse(cls, raw: dict[str, Any]) -> "NetworkConfig":
        try:
            cfg = cls.model_validate(raw)
        except ValidationError as exc:
            raise_validation(exc, "network config")
            raise  # unreachable
        if cfg.routing is not None and cfg.routing.l3vni == cfg.vni:
            raise InvalidConfig(f"network config: invalid 'routing.l3vni' = {cfg.vni}: it is "
                                "the subnet's own 'vni'; a VPC's L3VNI differs from every "
                                "subnet's VNI")
        return cfg


class TenancyConfig(BaseModel):
    """Which namespaces may attach to which VPC (core/tenancy.py): enforced unless
    `enforce` is false; unknown bindings refuse every ADD (fail closed)."""

    model_config = ConfigDict(extra="forbid")
    enforce: bool = True
    bindingsFile: Path = Path("/etc/vpcni/tenancy/bindings.json")


class EvpnConfig(BaseModel):
    """The node's EVPN speaker: a gobgpd beside the agent, driven over gRPC."""

    model_config = ConfigDict(extra="forbid")
    gobgpdSocket: Path = Path("/run/vpcni/gobgp.sock")
    asn: int = Field(default=65000, ge=1, le=4294967295)


def owners() -> set[str]:
    """Names that may own a node config section: installed backends and providers
    (read from the entry point metadata, without importing them)."""
    from importlib.metadata import entry_points

    return {ep.name for group in ("vpcni.backends", "vpcni.interfaces")
            for ep in entry_points(group=group)}


class NodeConfig(BaseModel):
    """Settings of one node; a JSON file at $VPCNI_NODE_CONFIG or /etc/vpcni/node.json."""

    # Sections named after a backend or interface provider (`ovs`, `sriov`) are
    # theirs: kept raw here, checked against the installed entry points at load,
    # validated by their owner's model (Backend.config_model) when it is loaded.
    model_config = ConfigDict(extra="allow", populate_by_name=True)

    vtepAddress: Optional[IPAddress] = None
    underlayInterface: Optional[str] = Field(default=None, max_length=15)
    stateDir: Path = Path("/var/lib/vpcni")
    backend: Optional[str] = Field(default=None, pattern=NAME_PATTERN)
    logFile: Optional[Path] = Path("/var/log/vpcni/vpcni.log")
    logLevel: str = Field(default="INFO", pattern=r"^(DEBUG|INFO|WARNING|ERROR)$")
    # How log lines are written (stderr and logFile): text, or one JSON object a line.
    logFormat: Literal["text", "json"] = "text"
    lockTimeout: float = Field(default=30.0, gt=0, allow_inf_nan=False)
    # How CNI calls are served: by the node agent over agentSocket, or in the
    # plugin process (standalone: no agent, static flood list only).
    mode: Literal["agent", "standalone"] = "agent"
    agentSocket: Path = Path("/run/vpcni/agent.sock")
    # Standalone mode: the Python that has vpcni installed, which the shim execs
    # (default: the one it was built for by `vpcnictl install-cni`).
    standalonePython: Optional[Path] = None
    # Agent only: EVPN (absent: static flood lists only), health/metrics
    # HTTP address ("" disables it), full reconcile period in seconds.
    evpn: Optional[EvpnConfig] = None
    tenancy: TenancyConfig = TenancyConfig()
    healthAddress: str = Field(default="127.0.0.1:9471", pattern=r"^(.*:\d+)?$")
    reconcileInterval: float = Field(default=30.0, gt=0, allow_inf_nan=False)
    # Routed subnets: each VPC's router is a network namespace named this + its L3VNI.
    routerNamespacePrefix: str = Field(default="vpcr-", pattern=r"^[a-zA-Z0-9][a-zA-Z0-9_.\-]{0,40}$")
    # Where the config came from, for messages; not read from the file.
    source: str = Field(default="(defaults)", exclude=True)

    @model_validator(mode="after")
    def _vtep_source(self) -> "NodeConfig":
        if self.vtepAddress is None and self.underlayInterface is None:
            raise ValueError("set 'vtepAddress' (this node's underlay address) "
                             "or 'underlayInterface'")
        return self

    def differences(self, other: "NodeConfig") -> list[tuple[str, Any, Any]]:
        """(key, other's value, this one's value) of every setting the two configs set
        differently (defaults included; where each came from is not a setting)."""
        mine, theirs = self.model_dump(mode="json"), other.model_dump(mode="json")
        return [(key, theirs.get(key), mine.get(key)) for key in sorted(mine.keys() | theirs.keys())
                if mine.get(key) != theirs.get(key)]

    def sections(self) -> dict[str, dict]:
        """The backend- and provider-owned sections, raw."""
        return dict(self.model_extra or {})

    def section(self, name: str, model: Optional[type[BaseModel]] = None):
        """Section `name` validated with `model` (its defaults when absent); errors name
        the node config and the field, as for every other field."""
        raw = (self.model_extra or {}).get(name, {})
        if model is None:
            if raw:
                raise InvalidConfig(f"node config {self.source}: {name!r} takes no settings")
            return None
        try:
            return model.model_validate(raw)
        except ValidationError as exc:
            raise_validation(exc, f"node config {self.source}: {name}",
                             unsupported=InvalidConfig)
            raise

    @classmethod
    def load(cls, path: Optional[str] = None) -> "NodeConfig":
        path = path or os.environ.get(NODE_CONFIG_ENV) or DEFAULT_NODE_CONFIG
        where = f"node config {path}"
        try:
            # Not blocking on a FIFO, nor reading a device without end: the agent reads
            # the file a request names (VPCNI_NODE_CONFIG) too.
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise InvalidConfig(f"{where}: not a regular file")
                with os.fdopen(fd, "rb", closefd=False) as f:
                    data = f.read(MAX_NODE_CONFIG + 1)
            finally:
                os.close(fd)
            if len(data) > MAX_NODE_CONFIG:
                raise InvalidConfig(f"{where}: larger than {MAX_NODE_CONFIG // 1024} KiB")
            raw = json.loads(data, parse_constant=not_json)
        except FileNotFoundError:
            raise InvalidConfig(f"{where}: file not found (set {NODE_CONFIG_ENV} or create it "
                                "with at least vtepAddress and stateDir)") from None
        except (OSError, ValueError) as exc:
            raise InvalidConfig(f"{where}: cannot read JSON: {exc}") from None
        except RecursionError:
            raise InvalidConfig(f"{where}: cannot read JSON: nested too deeply") from None
        if not isinstance(raw, dict):
            raise InvalidConfig(f"{where}: must be a JSON object")
        raw.pop("source", None)
        try:
            cfg = cls.model_validate(raw)
        except ValidationError as exc:
            raise_validation(exc, where, unsupported=InvalidConfig)
            raise
        cfg.source = path
        known = owners()
        for key, value in sorted(cfg.sections().items()):
            shown = json.dumps(value, default=str)
            shown = shown if len(shown) <= 120 else shown[:117] + "..."
            if key not in known:
                raise InvalidConfig(f"{where}: unsupported field {key!r} (value {shown}; not a "
                                    f"setting, nor the section of an installed backend: "
                                    f"{', '.join(sorted(known)) or 'none'})")
            if not isinstance(value, dict):
                raise InvalidConfig(f"{where}: invalid {key!r} = {shown}: the {key} section "
                                    "must be a JSON object")
        return cfg
