"""The `ipam` section of vpcni-ipam, validated once; errors name the field (code 7)."""

from __future__ import annotations

import ipaddress
from typing import Any, Iterator, Literal, Optional, Union

from pydantic import (BaseModel, ConfigDict, Field, ValidationError, ValidationInfo,
                      field_validator, model_serializer, model_validator)

from vpcni.core.config import raise_validation
from vpcni.core.errors import InvalidConfig
from vpcni.core.models import DNS, IPAddress, IPNetwork, NAME_PATTERN, Route

Address = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
DEFAULT_PREFIX = "/vpcni/ipam"
# Longest a store may make a call wait, in seconds (beyond any runtime's patience).
MAX_TIMEOUT = 3600


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Range(_Strict):
    """One subnet, optionally narrowed to rangeStart..rangeEnd (host-local's shape)."""

    subnet: IPNetwork
    rangeStart: Optional[IPAddress] = None
    rangeEnd: Optional[IPAddress] = None
    gateway: Optional[IPAddress] = None

    @field_validator("subnet", mode="before")
    @classmethod
    def _lenient(cls, v: Any) -> Any:
        return ipaddress.ip_network(v, strict=False) if isinstance(v, str) else v

    @model_validator(mode="after")
    def _inside(self) -> "Range":
        for name in ("rangeStart", "rangeEnd", "gateway"):
            a = getattr(self, name)
            if a is not None and a not in self.subnet:
                raise ValueError(f"{name} {a} is outside subnet {self.subnet}")
        if self.subnet.num_addresses < 4 and self.subnet.version == 4:
            raise ValueError(f"subnet {self.subnet} is too small (at least a /30)")
        if self.rangeStart and self.rangeEnd and self.rangeStart > self.rangeEnd:
            raise ValueError(f"rangeStart {self.rangeStart} is after rangeEnd {self.rangeEnd}")
        return self

    def gateway_address(self) -> Address:
        """The gateway: given, or the subnet's first host (as host-local does)."""
        return self.gateway or self.subnet.network_address + 1

    def bounds(self) -> tuple[int, int]:
        """First and last allocatable address as integers (network, broadcast excluded)."""
        net = self.subnet
        first, last = int(net.network_address) + 1, int(net.broadcast_address)
        if net.version == 4:
            last -= 1
        if self.rangeStart is not None:
            first = max(first, int(self.rangeStart))
        if self.rangeEnd is not None:
            last = min(last, int(self.rangeEnd))
        return first, last


class SqliteStoreConfig(_Strict):
    type: Literal["sqlite"]
    # A file name: not empty (SQLite's private temporary database), no NUL.
    path: str = Field(default="/var/lib/vpcni/ipam.sqlite", pattern=r"^[^\x00]+$",
                      max_length=4096)
    timeout: float = Field(default=30.0, gt=0, le=MAX_TIMEOUT)


# TLS to etcd, all three optional: PEM files on the node, by absolute path (a CNI
# plugin's working directory is the runtime's). Whether each can be read is the store's
# to say when it opens (code 5 naming the key); the shape is checked here (code 7).
TLS_FIELDS = ("caFile", "certFile", "keyFile")


class EtcdStoreConfig(_Strict):
    type: Literal["etcd"]
    endpoints: list[str] = Field(min_length=1)
    prefix: str = Field(default=DEFAULT_PREFIX, pattern=r"^/.*[^/]$|^/$")
    timeout: float = Field(default=5.0, gt=0, le=MAX_TIMEOUT)
    # TLS (https:// endpoints): the CA bundle that signed etcd's server certificate
    # (default: the bundle of Python's requests, certifi), and the client certificate
    # and its key for an etcd that asks for one (--client-cert-auth). PEM files.
    caFile: Optional[str] = Field(default=None, max_length=4096)
    certFile: Optional[str] = Field(default=None, max_length=4096)
    keyFile: Optional[str] = Field(default=None, max_length=4096, validate_default=True)

    @field_validator("endpoints")
    @classmethod
    def _urls(cls, v: list[str]) -> list[str]:
        for e in v:
            if not e.startswith(("http://", "https://")):
                raise ValueError(f"endpoint {e!r} must be a URL like http://127.0.0.1:2379")
        return [e.rstrip("/") for e in v]

    @field_validator(*TLS_FIELDS)
    @classmethod
    def _over_tls(cls, v: Optional[str], info: ValidationInfo) -> Optional[str]:
        if v is not None and (not v.startswith("/") or v == "/" or "\x00" in v):
            raise ValueError("must be the absolute path of a PEM file on the node")
        plain = [e for e in info.data.get("endpoints") or [] if not e.startswith("https://")]
        if v is not None and plain:
            raise ValueError(f"TLS needs https:// endpoints, and {plain[0]!r} is not")
        if info.field_name == "keyFile" and (v is None) != (info.data.get("certFile") is None):
            raise ValueError("certFile and keyFile go together (the client certificate and "
                             f"its private key): {'keyFile' if v is None else 'certFile'} "
                             "is missing")
        return v

    @model_serializer(mode="wrap")
    def _without_unset_tls(self, handler) -> dict:
        """TLS keys that are not set are left out of dumps (configs rendered from this
        one, e.g. the controller's NADs, say only what is set)."""
        out = handler(self)
        for key in TLS_FIELDS:
            if out.get(key) is None:
                out.pop(key, None)
        return out


class Reservation(_Strict):
    """Addresses kept for one pod, by name (CNI_ARGS K8S_POD_NAME, K8S_POD_NAMESPACE)."""

    pod: str = Field(min_length=1)
    namespace: Optional[str] = None
    ips: list[IPAddress] = Field(min_length=1)

    def matches(self, pod: Optional[str], namespace: Optional[str]) -> bool:
        return pod == self.pod and (self.namespace is None or namespace == self.namespace)


class IpamSettings(BaseModel):
    """`{"type": "vpcni-ipam", ...}`; the pool is `ranges` (range sets) or `subnets`."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["vpcni-ipam"]
    subnets: list[IPNetwork] = []
    ranges: list[list[Range]] = []
    exclude: list[str] = []
    routes: list[Route] = []
    dns: Optional[DNS] = None
    store: Union[SqliteStoreConfig, EtcdStoreConfig] = Field(
        default_factory=lambda: SqliteStoreConfig(type="sqlite"), discriminator="type")
    reservations: list[Reservation] = []
    # Recorded with each allocation so that GC touches this node's only
    # (default: $VPCNI_NODE_NAME, else the host name).
    node: Optional[str] = Field(default=None, pattern=NAME_PATTERN)

    @field_validator("subnets", mode="before")
    @classmethod
    def _lenient(cls, v: Any) -> Any:
        if isinstance(v, list):
            return [ipaddress.ip_network(s, strict=False) if isinstance(s, str) else s for s in v]
        return v

    @field_validator("exclude")
    @classmethod
    def _spans(cls, v: list[str]) -> list[str]:
        for item in v:
            parse_span(item)
        return v

    @model_validator(mode="after")
    def _pool(self) -> "IpamSettings":
        if self.subnets and self.ranges:
            raise ValueError("'subnets' and 'ranges' exclude each other: use one")
        if not self.subnets and not self.ranges:
            raise ValueError("needs 'subnets' (e.g. [\"172.16.32.0/24\"]) or 'ranges'")
        for i, rs in enumerate(self.ranges):
            if not rs:
                raise ValueError(f"ranges[{i}] is empty")
            if len({r.subnet.version for r in rs}) != 1:
                raise ValueError(f"ranges[{i}] mixes IPv4 and IPv6 (one range set per family)")
        subnets = [r.subnet for rs in self.range_sets() for r in rs]
        for i, a in enumerate(subnets):
            for b in subnets[i + 1:]:
                if a.version == b.version and a.overlaps(b):
                    raise ValueError(f"subnets {a} and {b} overlap")
        for res in self.reservations:
            for ip in res.ips:
                if not any(ip in s for s in subnets):
                    raise ValueError(f"reservation of pod {res.pod!r}: {ip} is in no subnet")
        return self

    def range_sets(self) -> list[list[Range]]:
        """One address is handed out per range set; `subnets` is one set per subnet."""
        if self.ranges:
            return self.ranges
        return [[Range(subnet=s)] for s in self.subnets]

    def excluded(self) -> Iterator[tuple[int, int, int]]:
        for item in self.exclude:
            yield parse_span(item)


def parse_span(item: str) -> tuple[int, int, int]:
    """'172.16.32.0/28', '172.16.32.200-172.16.32.210' or one address -> (version, first, last)."""
    try:
        if "-" in item:
            a, b = (ipaddress.ip_address(x.strip()) for x in item.split("-", 1))
            if a.version != b.version or a > b:
                raise ValueError
            return a.version, int(a), int(b)
        net = ipaddress.ip_network(item, strict=False)
        return net.version, int(net.network_address), int(net.broadcast_address)
    except ValueError:
        raise ValueError(f"exclude entry {item!r} is not a CIDR, an address or 'first-last'") \
            from None


def parse_settings(raw: Any, where: str = "ipam") -> IpamSettings:
    if not isinstance(raw, dict):
        raise InvalidConfig(f"network config: {where!r} must be an object")
    try:
        return IpamSettings.model_validate(raw)
    except ValidationError as exc:
        # Name the field from the top of the network config, e.g. ipam.store.endpoints.
        err = exc.errors(include_url=False)[0]
        loc = err["loc"]
        if loc[:1] == ("store",) and loc[1:2] in (("sqlite",), ("etcd",)):
            loc = loc[:1] + loc[2:]  # the union's tag is not a key of the config
        raise_validation(_Relocated(err, (where, *loc)), "network config",
                         unsupported=InvalidConfig)
        raise  # unreachable: raise_validation always raises


class _Relocated:
    """A ValidationError look-alike whose first error's location starts at `ipam`."""

    def __init__(self, err: dict, loc: tuple):
        self._err = dict(err, loc=loc)

    def errors(self, include_url: bool = False) -> list[dict]:
        return [self._err]
