"""Configuration: the CNI network config (one per VPC) and the node config.

Both are parsed once with pydantic; a validation failure becomes a CNI error
that names the field and the value (code 7, or 2 for a field vpcni does not
support).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import InvalidConfig, UnsupportedField, VpcniError
from .models import (DNS, MAC_PATTERN, NAME_PATTERN, VNI_MAX, IPAddress, IPInterface, Result,
                     VpcNetwork)

DEFAULT_NODE_CONFIG = "/etc/vpcni/node.json"
NODE_CONFIG_ENV = "VPCNI_NODE_CONFIG"


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def raise_validation(exc: ValidationError, where: str,
                     unsupported: type[VpcniError] = UnsupportedField) -> None:
    """Turn the first pydantic error into a CNI error naming field and value.

    An unknown key is `unsupported` (code 2 is the spec's for the network
    config only; the node config is plugin-private, so it passes InvalidConfig).
    """
    err = exc.errors(include_url=False)[0]
    field = _loc(err["loc"]) or "(config)"
    value = json.dumps(err.get("input"), default=str)
    if len(value) > 120:
        value = value[:117] + "..."
    if err["type"] == "extra_forbidden":
        raise unsupported(f"{where}: unsupported field {field!r} (value {value})")
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    raise InvalidConfig(f"{where}: invalid {field!r} = {value}: {msg}")


class IpamConfig(BaseModel):
    """Delegated IPAM: only `type` is ours to read, the rest goes to the plugin."""

    model_config = ConfigDict(extra="allow")
    type: str = Field(pattern=NAME_PATTERN)


class RuntimeConfig(BaseModel):
    """Capabilities a runtime may pass; those vpcni does not use are ignored."""

    model_config = ConfigDict(extra="allow")
    mac: Optional[str] = Field(default=None, pattern=MAC_PATTERN)
    ips: list[IPInterface] = []


class ValidAttachment(BaseModel):
    model_config = ConfigDict(extra="allow")
    containerID: str
    ifname: str


class NetworkConfig(BaseModel):
    """The CNI network config of one VPC (what stdin carries)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    cniVersion: str
    name: str = Field(pattern=NAME_PATTERN)
    type: str
    vni: int = Field(ge=1, le=VNI_MAX)
    addr: Optional[IPInterface] = None
    mtu: Optional[int] = Field(default=None, ge=576, le=65535)
    port: int = Field(default=4789, ge=1, le=65535)
    backend: Optional[str] = Field(default=None, pattern=NAME_PATTERN)
    vteps: list[IPAddress] = []
    ipam: Optional[IpamConfig] = None
    # Conventions and runtime-injected keys (CNI SPEC.md and CONVENTIONS.md).
    dns: Optional[DNS] = None
    args: Optional[dict[str, Any]] = None
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
        if isinstance(v, str) and "/" not in v:
            raise ValueError("needs a prefix length, e.g. 172.16.32.1/24")
        return v

    @model_validator(mode="after")
    def _one_ip_source(self) -> "NetworkConfig":
        if self.addr is not None and self.ipam is not None:
            raise ValueError("'addr' and 'ipam' exclude each other: use one")
        return self

    def network(self) -> VpcNetwork:
        return VpcNetwork(name=self.name, vni=self.vni, port=self.port, mtu=self.mtu,
                          vteps=list(dict.fromkeys(self.vteps)))

    def gc_valid(self) -> Optional[list[ValidAttachment]]:
        if self.valid_attachments is not None:
            return self.valid_attachments
        return self.attachments

    @classmethod
    def parse(cls, raw: dict[str, Any]) -> "NetworkConfig":
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            raise_validation(exc, "network config")
            raise  # unreachable


class EvpnConfig(BaseModel):
    """The node's EVPN speaker: a gobgpd beside the agent, driven over gRPC."""

    model_config = ConfigDict(extra="forbid")
    gobgpdSocket: Path = Path("/run/vpcni/gobgp.sock")
    asn: int = Field(default=65000, ge=1, le=4294967295)


class OvsConfig(BaseModel):
    """The node's Open vSwitch, as the ovs backend uses it (docs/backends/ovs.md)."""

    model_config = ConfigDict(extra="forbid")
    # OVS_RUNDIR: ovs-vswitchd's pid file and each bridge's OpenFlow socket
    # (<bridge>.mgmt) are here, and by default the OVSDB socket (db.sock).
    runDir: Path = Path("/run/openvswitch")
    ovsdbSocket: Optional[Path] = None
    # The integration bridge: created if missing, shared with others if it exists
    # (vpcni only touches its own ports and flows).
    bridge: str = Field(default="br-int", pattern=NAME_PATTERN, max_length=15)
    # system: the kernel datapath (production); netdev: the userspace datapath,
    # for nodes without the openvswitch kernel module.
    datapathType: Literal["system", "netdev"] = "system"

    @property
    def db_socket(self) -> Path:
        return self.ovsdbSocket or self.runDir / "db.sock"


class NodeConfig(BaseModel):
    """Settings of one node; a JSON file at $VPCNI_NODE_CONFIG or /etc/vpcni/node.json."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    vtepAddress: Optional[IPAddress] = None
    underlayInterface: Optional[str] = Field(default=None, max_length=15)
    stateDir: Path = Path("/var/lib/vpcni")
    backend: Optional[str] = Field(default=None, pattern=NAME_PATTERN)
    logFile: Optional[Path] = Path("/var/log/vpcni/vpcni.log")
    logLevel: str = Field(default="INFO", pattern=r"^(DEBUG|INFO|WARNING|ERROR)$")
    lockTimeout: float = Field(default=30.0, gt=0)
    # How CNI calls are served: by the node agent over agentSocket, or in the
    # plugin process (standalone: no agent, static flood list only).
    mode: Literal["agent", "standalone"] = "agent"
    agentSocket: Path = Path("/run/vpcni/agent.sock")
    # Agent only: EVPN (absent: static flood lists only), health/metrics
    # HTTP address ("" disables it), full reconcile period in seconds.
    evpn: Optional[EvpnConfig] = None
    healthAddress: str = Field(default="127.0.0.1:9471", pattern=r"^(.*:\d+)?$")
    reconcileInterval: float = Field(default=30.0, gt=0)
    # Open vSwitch of the node (read by the ovs backend only).
    ovs: OvsConfig = OvsConfig()
    # Where the config came from, for messages; not read from the file.
    source: str = Field(default="(defaults)", exclude=True)

    @model_validator(mode="after")
    def _vtep_source(self) -> "NodeConfig":
        if self.vtepAddress is None and self.underlayInterface is None:
            raise ValueError("set 'vtepAddress' (this node's underlay address) "
                             "or 'underlayInterface'")
        return self

    @classmethod
    def load(cls, path: Optional[str] = None) -> "NodeConfig":
        path = path or os.environ.get(NODE_CONFIG_ENV) or DEFAULT_NODE_CONFIG
        where = f"node config {path}"
        try:
            with open(path, "rb") as f:
                raw = json.load(f)
        except FileNotFoundError:
            raise InvalidConfig(f"{where}: file not found (set {NODE_CONFIG_ENV} or create it "
                                "with at least vtepAddress and stateDir)") from None
        except (OSError, ValueError) as exc:
            raise InvalidConfig(f"{where}: cannot read JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise InvalidConfig(f"{where}: must be a JSON object")
        raw.pop("source", None)
        try:
            cfg = cls.model_validate(raw)
        except ValidationError as exc:
            raise_validation(exc, where, unsupported=InvalidConfig)
            raise
        cfg.source = path
        return cfg
