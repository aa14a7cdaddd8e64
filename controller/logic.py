"""The VPC controller's decisions, as plain functions: no I/O, no API server.

Everything here takes objects as the API server returns them (plain dicts)
and returns dicts to write: a Vpc's validated spec, its VniClaim, the
NetworkAttachmentDefinitions it needs and those to delete, the tenancy
bindings document, its status from vpcni-ipam's allocations, and the order
in which VNIs are tried. `vpcni.controller.api` does the reads and writes.
"""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass
from typing import Annotated, Any, Iterable, Iterator, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from vpcni.core.config import first_error
from vpcni.core.models import VNI_MAX, IPAddress, IPNetwork
from vpcni.ipam.config import EtcdStoreConfig, Range, parse_span

GROUP = "vpcni.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
NAD_API_VERSION = "k8s.cni.cncf.io/v1"
NAD_KIND = "NetworkAttachmentDefinition"

# Labels on what the controller makes: it lists (and deletes) only those.
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGER = "vpcni-controller"
LABEL_VPC = "vpcni.io/vpc"
BINDINGS_KEY = "bindings.json"

DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
VPC_NAME_MAX = 50
DEFAULT_VNI_RANGE = "4096-16777215"

PENDING, READY, CONFLICT, INVALID = "Pending", "Ready", "Conflict", "Invalid"
# Free addresses of an IPv6 /64 exceed what a JSON client reads exactly; status says at most this.
FREE_CAP = 2 ** 53 - 1

Label = Annotated[str, Field(pattern=DNS_LABEL, max_length=63)]


class SpecError(ValueError):
    """A Vpc that cannot be served as written; the message names the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ------------------------------------------------------------------ the Vpc spec

class Subnet(_Strict):
    name: Label
    cidr: IPNetwork
    gateway: Optional[IPAddress] = None
    exclude: list[str] = []

    @field_validator("cidr", mode="before")
    @classmethod
    def _no_host_bits(cls, v: Any) -> Any:
        if isinstance(v, str):
            try:
                ipaddress.ip_network(v)
            except ValueError:
                try:
                    exact = ipaddress.ip_network(v, strict=False)
                except ValueError:
                    return v  # the type's own error says what is wrong
                raise ValueError(f"has host bits set (the network is {exact})") from None
        return v

    @field_validator("cidr")
    @classmethod
    def _big_enough(cls, v: Any) -> Any:
        if v.version == 4 and v.num_addresses < 4:
            raise ValueError("is too small (at least a /30)")
        return v

    @field_validator("gateway")
    @classmethod
    def _gateway_inside(cls, v: Any, info) -> Any:
        cidr = info.data.get("cidr")
        if v is None or cidr is None:
            return v
        if v.version != cidr.version or v not in cidr:
            raise ValueError(f"{v} is outside cidr {cidr}")
        if v == cidr.network_address or (cidr.version == 4 and v == cidr.broadcast_address):
            raise ValueError(f"{v} is the network or broadcast address of {cidr}")
        return v

    @field_validator("exclude")
    @classmethod
    def _spans(cls, v: list[str], info) -> list[str]:
        cidr = info.data.get("cidr")
        for item in v:
            version, first, last = parse_span(item)
            if cidr is not None and (version != cidr.version or last < int(cidr.network_address)
                                     or first > int(cidr.broadcast_address)):
                raise ValueError(f"exclude entry {item!r} is outside cidr {cidr}")
        return v


class VpcSpec(_Strict):
    """`spec` of a Vpc (docs/vpc-api.md)."""

    vni: Optional[int] = Field(default=None, ge=1, le=VNI_MAX, strict=True)
    subnets: list[Subnet] = Field(min_length=1)
    mtu: Optional[int] = Field(default=None, ge=576, le=9000, strict=True)
    backend: Optional[Literal["kernel", "ovs"]] = None
    interfaceKind: Optional[Literal["veth", "sriov"]] = None
    namespaces: list[Label] = []

    @field_validator("subnets")
    @classmethod
    def _distinct(cls, v: list[Subnet]) -> list[Subnet]:
        for i, a in enumerate(v):
            for b in v[i + 1:]:
                if a.name == b.name:
                    raise ValueError(f"two subnets are named {a.name!r}")
                if a.cidr.version == b.cidr.version and a.cidr.overlaps(b.cidr):
                    raise ValueError(f"subnets {a.name!r} ({a.cidr}) and {b.name!r} ({b.cidr}) "
                                     "overlap")
        return v

    @field_validator("namespaces")
    @classmethod
    def _once(cls, v: list[str]) -> list[str]:
        seen = set()
        for ns in v:
            if ns in seen:
                raise ValueError(f"namespace {ns!r} is listed twice")
            seen.add(ns)
        return v


def name_of(obj: dict) -> str:
    return obj["metadata"]["name"]


def uid_of(obj: dict) -> Optional[str]:
    return obj.get("metadata", {}).get("uid")


def validate_name(name: str) -> None:
    if len(name) > VPC_NAME_MAX or not re.fullmatch(DNS_LABEL, name):
        raise SpecError(f"metadata.name {name!r}: a Vpc's name is a DNS-1123 label (lower case "
                        f"letters, digits, '-') of at most {VPC_NAME_MAX} characters")


def parse_spec(raw: Any) -> VpcSpec:
    """The validated spec, or SpecError naming the field (`spec.subnets[0].cidr`)."""
    if not isinstance(raw, dict):
        raise SpecError("spec: must be an object")
    try:
        return VpcSpec.model_validate(raw)
    except ValidationError as exc:
        raise SpecError(_first_error(exc)) from None


def _first_error(exc: ValidationError) -> str:
    kind, field, value, msg = first_error(exc, "spec")
    if kind == "missing":
        return f"{field} is required"
    if kind == "extra_forbidden":
        return f"{field}: unsupported field (value {value})"
    return f"{field} = {value}: {msg}"


def parse_vpc(vpc: dict) -> VpcSpec:
    validate_name(name_of(vpc))
    return parse_spec(vpc.get("spec"))


# ------------------------------------------------------------------ the controller's config

class ControllerConfig(_Strict):
    """The controller's own settings (a JSON file, `vpcnictl controller --config`)."""

    vniRange: str = DEFAULT_VNI_RANGE
    # vpcni-ipam's store, which the NADs name and status reads: etcd (a cluster-wide pool).
    ipamStore: EtcdStoreConfig
    cniVersion: str = "1.1.0"
    bindingsNamespace: Label = "vpcni-system"
    bindingsConfigMap: Label = "vpcni-tenancy"
    statusInterval: float = Field(default=30.0, gt=0, allow_inf_nan=False)

    @field_validator("vniRange")
    @classmethod
    def _range(cls, v: str) -> str:
        parse_vni_range(v)
        return v

    def pool(self) -> tuple[int, int]:
        return parse_vni_range(self.vniRange)


def parse_vni_range(text: str) -> tuple[int, int]:
    """'4096-16777215' -> (4096, 16777215)."""
    m = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", text)
    if not m or not 1 <= int(m[1]) <= int(m[2]) <= VNI_MAX:
        raise ValueError(f"vniRange {text!r} must be 'first-last' with 1 <= first <= last <= "
                         f"{VNI_MAX}")
    return int(m[1]), int(m[2])


# ------------------------------------------------------------------ VNI claims

def claim_name(vni: int) -> str:
    return f"vni-{vni}"


def owner_reference(vpc: dict) -> dict:
    return {"apiVersion": API_VERSION, "kind": "Vpc", "name": name_of(vpc), "uid": uid_of(vpc),
            "controller": True}


def claim_object(vni: int, vpc: dict) -> dict:
    return {"apiVersion": API_VERSION, "kind": "VniClaim",
            "metadata": {"name": claim_name(vni),
                         "labels": {LABEL_MANAGED_BY: MANAGER, LABEL_VPC: name_of(vpc)},
                         "ownerReferences": [owner_reference(vpc)]},
            "spec": {"vni": vni, "vpc": name_of(vpc)}}


def claim_vni(claim: dict) -> Optional[int]:
    vni = claim.get("spec", {}).get("vni")
    if isinstance(vni, int) and claim_name(vni) == name_of(claim):
        return vni
    m = re.fullmatch(r"vni-(\d+)", name_of(claim))
    return int(m[1]) if m else None


def claim_holder(claim: dict) -> str:
    return claim.get("spec", {}).get("vpc", "")


def holds(vpc: dict, claim: dict) -> bool:
    """Whether `claim` is this Vpc's: its name, and its uid when the claim has an owner
    (a claim of a deleted Vpc of the same name is not the new one's)."""
    if claim_holder(claim) != name_of(vpc):
        return False
    owners = [o.get("uid") for o in (claim.get("metadata", {}).get("ownerReferences") or [])
              if o.get("kind") == "Vpc"]
    return not owners or uid_of(vpc) in owners


def held_vnis(vpc: dict, claims: Iterable[dict]) -> list[int]:
    return sorted(v for c in claims if holds(vpc, c) and (v := claim_vni(c)) is not None)


def claimed_vnis(claims: Iterable[dict]) -> set[int]:
    return {v for c in claims if (v := claim_vni(c)) is not None}


def vni_candidates(pool: tuple[int, int], claimed: set[int]) -> Iterator[int]:
    """The pool's VNIs not claimed, lowest first. A VNI taken meanwhile is found by the
    atomic create of its claim (AlreadyExists), not by this snapshot."""
    first, last = pool
    for vni in range(first, last + 1):
        if vni not in claimed:
            yield vni


def keep_vni(held: list[int], status_vni: Optional[int]) -> Optional[int]:
    """Of the VNIs a Vpc holds, the one it keeps: the one in force (status.vni), else the
    lowest. Two controllers that raced for one Vpc both pick the same."""
    if status_vni in held:
        return status_vni
    return min(held) if held else None


def exhausted_message(pool: tuple[int, int], claimed: set[int]) -> str:
    first, last = pool
    inside = len([v for v in claimed if first <= v <= last])
    return (f"no free VNI in vniRange {first}-{last} ({inside} of {last - first + 1} claimed); "
            "delete a Vpc or widen the controller's vniRange")


def conflict_message(vpc_name: str, vni: int, holder: str) -> str:
    return (f"VNI {vni} pinned by Vpc {vpc_name!r} is held by Vpc {holder!r} "
            f"(VniClaim {claim_name(vni)}); pin another VNI or remove spec.vni")


# ------------------------------------------------------------------ NetworkAttachmentDefinitions

def nad_name(vpc_name: str) -> str:
    return f"vpc-{vpc_name}"


def ipam_section(spec: VpcSpec, store: EtcdStoreConfig) -> dict:
    """vpcni-ipam's config: `subnets` when that says it all (no gateway, one subnet per
    family), else `ranges` with one range set per family (one address of each family)."""
    by_family: dict[int, list[Subnet]] = {}
    for s in spec.subnets:
        by_family.setdefault(s.cidr.version, []).append(s)
    out: dict[str, Any] = {"type": "vpcni-ipam"}
    if all(s.gateway is None for s in spec.subnets) and all(len(v) == 1
                                                            for v in by_family.values()):
        out["subnets"] = [str(s.cidr) for s in spec.subnets]
    else:
        out["ranges"] = [[{"subnet": str(s.cidr), **({"gateway": str(s.gateway)}
                                                     if s.gateway else {})}
                          for s in by_family[v]] for v in sorted(by_family)]
    exclude = [e for s in spec.subnets for e in s.exclude]
    if exclude:
        out["exclude"] = exclude
    out["store"] = store.model_dump(mode="json")
    return out


def network_config(vpc_name: str, spec: VpcSpec, vni: int, cfg: ControllerConfig) -> dict:
    """The CNI config of the Vpc's NADs (vpcni's NetworkConfig parses it)."""
    conf: dict[str, Any] = {"cniVersion": cfg.cniVersion, "name": nad_name(vpc_name),
                            "type": "vpcni", "vni": vni}
    if spec.mtu is not None:
        conf["mtu"] = spec.mtu
    if spec.backend is not None:
        conf["backend"] = spec.backend
    if spec.interfaceKind == "sriov":
        conf["interface"] = "vf"
    conf["capabilities"] = {"ips": True, "mac": True}
    conf["ipam"] = ipam_section(spec, cfg.ipamStore)
    return conf


def nad_object(vpc: dict, namespace: str, config: dict) -> dict:
    return {"apiVersion": NAD_API_VERSION, "kind": NAD_KIND,
            "metadata": {"name": nad_name(name_of(vpc)), "namespace": namespace,
                         "labels": {LABEL_MANAGED_BY: MANAGER, LABEL_VPC: name_of(vpc)},
                         "ownerReferences": [owner_reference(vpc)]},
            "spec": {"config": json.dumps(config)}}


def desired_nads(vpc: dict, spec: VpcSpec, vni: int, cfg: ControllerConfig) -> dict[str, dict]:
    """namespace -> the NAD the Vpc needs there (one per bound namespace)."""
    config = network_config(name_of(vpc), spec, vni, cfg)
    return {ns: nad_object(vpc, ns, config) for ns in spec.namespaces}


def managed(obj: dict) -> bool:
    return (obj.get("metadata", {}).get("labels") or {}).get(LABEL_MANAGED_BY) == MANAGER


def nad_up_to_date(existing: dict, desired: dict) -> bool:
    try:
        same_config = (json.loads(existing.get("spec", {}).get("config", "")) ==
                       json.loads(desired["spec"]["config"]))
    except ValueError:
        return False
    meta, want = existing.get("metadata", {}), desired["metadata"]
    labels = meta.get("labels") or {}
    return (same_config and all(labels.get(k) == v for k, v in want["labels"].items())
            and (meta.get("ownerReferences") or []) == want["ownerReferences"])


def updated_nad(existing: dict, desired: dict) -> dict:
    """`existing` with the desired config, labels and owner (its other metadata kept)."""
    meta = dict(existing.get("metadata", {}))
    meta["labels"] = {**(meta.get("labels") or {}), **desired["metadata"]["labels"]}
    meta["ownerReferences"] = desired["metadata"]["ownerReferences"]
    return {**existing, "metadata": meta, "spec": {**existing.get("spec", {}),
                                                   **desired["spec"]}}


def stale_nads(vpc_name: str, namespaces: Iterable[str], existing: Iterable[dict]
               ) -> list[tuple[str, str]]:
    """(namespace, name) of this Vpc's NADs in namespaces no longer bound."""
    bound = set(namespaces)
    out = []
    for nad in existing:
        meta = nad.get("metadata", {})
        if not managed(nad) or (meta.get("labels") or {}).get(LABEL_VPC) != vpc_name:
            continue
        if meta.get("namespace") not in bound or meta.get("name") != nad_name(vpc_name):
            out.append((meta.get("namespace"), meta.get("name")))
    return sorted(out)


# ------------------------------------------------------------------ tenancy bindings

def bound_namespaces(vpc: dict) -> list[str]:
    """The Vpc's namespaces; of a spec that does not validate, those that are labels."""
    try:
        return sorted(parse_spec(vpc.get("spec")).namespaces)
    except SpecError:
        raw = (vpc.get("spec") or {}).get("namespaces")
        return sorted({n for n in raw if isinstance(n, str) and re.fullmatch(DNS_LABEL, n)}) \
            if isinstance(raw, list) else []


def bindings_document(vpcs: Iterable[dict], claims: Iterable[dict]) -> dict:
    """{"version": 1, "vnis": {"300": {"vpc": "blue", "namespaces": [...]}}}: every VNI in
    force, i.e. a Vpc's status.vni that the Vpc's VniClaim backs. One claim per VNI (an
    object name), so no VNI is ever bound to two VPCs."""
    by_name = {name_of(v): v for v in vpcs}
    vnis = {}
    for claim in claims:
        vpc = by_name.get(claim_holder(claim))
        vni = claim_vni(claim)
        if vpc is None or vni is None or not holds(vpc, claim):
            continue
        if (vpc.get("status") or {}).get("vni") != vni:
            continue
        vnis[vni] = {"vpc": name_of(vpc), "network": nad_name(name_of(vpc)),
                     "namespaces": bound_namespaces(vpc)}
    return {"version": 1, "vnis": {str(k): vnis[k] for k in sorted(vnis)}}


def bindings_text(doc: dict) -> str:
    return json.dumps(doc, indent=1, sort_keys=True) + "\n"


def bindings_configmap(doc: dict, cfg: ControllerConfig) -> dict:
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": cfg.bindingsConfigMap, "namespace": cfg.bindingsNamespace,
                         "labels": {LABEL_MANAGED_BY: MANAGER}},
            "data": {BINDINGS_KEY: bindings_text(doc)}}


def updated_configmap(existing: dict, desired: dict) -> dict:
    """The bindings ConfigMap as it is (made by hand or by the controller) with the
    desired document; its other keys and metadata kept."""
    meta = dict(existing.get("metadata", {}))
    meta["labels"] = {**(meta.get("labels") or {}), **desired["metadata"]["labels"]}
    return {**existing, "metadata": meta,
            "data": {**(existing.get("data") or {}), **desired["data"]}}


# ------------------------------------------------------------------ status

@dataclass(frozen=True)
class Held:
    """One address held in vpcni-ipam's store (the fields of ipam.store.Allocation read here)."""

    network: str
    ip: str
    container_id: str
    ifname: str
    node: str = ""


def _merged_size(spans: list[tuple[int, int]]) -> int:
    total, end = 0, None
    for a, b in sorted(spans):
        if end is not None and a <= end:
            if b > end:
                total += b - end
                end = b
            continue
        total += b - a + 1
        end = b
    return total


def capacity(subnet: Subnet, exclude: list[str]) -> int:
    """Addresses vpcni-ipam can hand out in `subnet`: its hosts, less the gateway and every
    exclude span of the VPC (vpcni-ipam applies each to all ranges of its family)."""
    r = Range(subnet=subnet.cidr, gateway=subnet.gateway)
    first, last = r.bounds()
    if last < first:
        return 0
    gw = int(r.gateway_address())
    blocked = [(gw, gw)] if first <= gw <= last else []
    for item in exclude:
        version, a, b = parse_span(item)
        if version == subnet.cidr.version and b >= first and a <= last:
            blocked.append((max(a, first), min(b, last)))
    return last - first + 1 - _merged_size(blocked)


def usage_status(vpc_name: str, spec: VpcSpec, allocations: Iterable[Any]) -> dict:
    """status.nodes, .endpoints, .addresses from vpcni-ipam's allocations of the Vpc's
    network (`vpc-<name>`, the NADs' name): the nodes named by its allocations, one
    endpoint per (container, ifname), addresses used/free per subnet and in all."""
    network = nad_name(vpc_name)
    mine = [a for a in allocations if a.network == network]
    exclude = [e for s in spec.subnets for e in s.exclude]
    per_subnet, used_total, free_total = [], 0, 0
    for s in spec.subnets:
        used = len([a for a in mine if _in(a.ip, s.cidr)])
        free = max(0, capacity(s, exclude) - used)
        per_subnet.append({"name": s.name, "cidr": str(s.cidr), "used": used,
                           "free": min(free, FREE_CAP)})
        used_total += used
        free_total += free
    return {"nodes": sorted({a.node for a in mine if a.node}),
            "endpoints": len({(a.container_id, a.ifname) for a in mine}),
            "addresses": {"used": used_total, "free": min(free_total, FREE_CAP),
                          "subnets": per_subnet}}


def _in(ip: str, net) -> bool:
    try:
        return ipaddress.ip_address(ip) in net
    except ValueError:
        return False


def conditions(phase: str, message: str, generation: Optional[int], previous: list[dict],
               now: str) -> list[dict]:
    """status.conditions: one `Ready` condition (metav1.Condition), its
    lastTransitionTime moved only when its status changes."""
    status = "True" if phase == READY else "False"
    old = next((c for c in previous or [] if c.get("type") == "Ready"), None)
    since = old["lastTransitionTime"] if old and old.get("status") == status and \
        old.get("lastTransitionTime") else now
    cond = {"type": "Ready", "status": status, "reason": phase, "message": message,
            "lastTransitionTime": since}
    if generation is not None:
        cond["observedGeneration"] = generation
    others = [c for c in previous or [] if c.get("type") != "Ready"]
    return others + [cond]
