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

from vpcni.core.config import StaticRouteConfig, first_error
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
    # A routed subnet's own VNI (pinned); allocated when absent. Only with spec.routing.
    vni: Optional[int] = Field(default=None, ge=1, le=VNI_MAX, strict=True)

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


    def gateway_address(self):
        """The gateway vpcni-ipam keeps out of its range and a routed subnet's anycast
        gateway: given, else the first host (both default to it)."""
        return self.gateway or self.cidr.network_address + 1


class Routing(_Strict):
    """`spec.routing`: every subnet is a routed subnet of the VPC (docs/routing.md): its own
    VNI, an anycast gateway on every node, the subnets routed over the VPC's L3VNI."""

    l3vni: Optional[int] = Field(default=None, ge=1, le=VNI_MAX, strict=True)
    egress: bool = Field(default=True, strict=True)
    defaultRoute: bool = Field(default=True, strict=True)
    routes: list[StaticRouteConfig] = Field(default=[], max_length=256)


class VpcSpec(_Strict):
    """`spec` of a Vpc (docs/vpc-api.md)."""

    vni: Optional[int] = Field(default=None, ge=1, le=VNI_MAX, strict=True)
    subnets: list[Subnet] = Field(min_length=1)
    routing: Optional[Routing] = None
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
        spec = VpcSpec.model_validate(raw)
    except ValidationError as exc:
        raise SpecError(_first_error(exc)) from None
    _check_routing(spec)
    return spec


def _check_routing(spec: VpcSpec) -> None:
    """What spec.routing changes: per-subnet VNIs only with it, spec.vni only without it,
    IPv4 subnets of /8../30 (the VPC router's), pinned VNIs all different, next hops
    inside the VPC. SpecError naming the field."""
    if spec.routing is None:
        for i, s in enumerate(spec.subnets):
            if s.vni is not None:
                raise SpecError(f"spec.subnets[{i}].vni = {s.vni}: a subnet's own VNI needs "
                                "spec.routing (without it the VPC is one L2 segment, "
                                "spec.vni)")
        return
    if spec.vni is not None:
        raise SpecError(f"spec.vni = {spec.vni}: not with spec.routing (each subnet has its own "
                        "VNI, spec.subnets[].vni, and the VPC an L3VNI, spec.routing.l3vni)")
    for i, s in enumerate(spec.subnets):
        if s.cidr.version != 4:
            raise SpecError(f"spec.subnets[{i}].cidr = {s.cidr}: a routed Vpc (spec.routing) "
                            "takes IPv4 subnets only")
        if not 8 <= s.cidr.prefixlen <= 30:
            raise SpecError(f"spec.subnets[{i}].cidr = {s.cidr}: a routed subnet's prefix "
                            "length is 8 to 30")
    pinned: dict[int, str] = {}
    if spec.routing.l3vni is not None:
        pinned[spec.routing.l3vni] = "spec.routing.l3vni"
    for i, s in enumerate(spec.subnets):
        if s.vni is None:
            continue
        if s.vni in pinned:
            raise SpecError(f"spec.subnets[{i}].vni = {s.vni}: also {pinned[s.vni]}; the "
                            "subnets and the L3VNI each need a VNI of their own")
        pinned[s.vni] = f"spec.subnets[{i}].vni"
    for i, r in enumerate(spec.routing.routes):
        where = next((s for s in spec.subnets if r.via in s.cidr), None)
        if where is None:
            raise SpecError(f"spec.routing.routes[{i}].via = {r.via}: not in any subnet of the "
                            "Vpc (a next hop is the address of a pod in the VPC)")
        if r.via == where.gateway_address():
            raise SpecError(f"spec.routing.routes[{i}].via = {r.via}: the gateway of subnet "
                            f"{where.name!r}, not a pod")


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

# What a VNI of a Vpc is for (a VniClaim's spec.role): the one VNI of a Vpc without
# spec.routing, the L3VNI of a routed Vpc, or one routed subnet's VNI.
ROLE_VPC, ROLE_L3 = "vpc", "l3"


def subnet_role(subnet_name: str) -> str:
    return f"subnet/{subnet_name}"


@dataclass(frozen=True)
class Need:
    """One VNI a Vpc needs: its role, the pinned VNI (None: allocated), the spec field."""

    role: str
    pinned: Optional[int]
    field: str


def vni_needs(spec: VpcSpec) -> list[Need]:
    """The VNIs the spec needs: one (spec.vni), or, routed, the L3VNI and one per subnet."""
    if spec.routing is None:
        return [Need(ROLE_VPC, spec.vni, "spec.vni")]
    return [Need(ROLE_L3, spec.routing.l3vni, "spec.routing.l3vni")] + [
        Need(subnet_role(s.name), s.vni, f"spec.subnets[{i}].vni")
        for i, s in enumerate(spec.subnets)]


def claim_name(vni: int) -> str:
    return f"vni-{vni}"


def owner_reference(vpc: dict) -> dict:
    return {"apiVersion": API_VERSION, "kind": "Vpc", "name": name_of(vpc), "uid": uid_of(vpc),
            "controller": True}


def claim_object(vni: int, vpc: dict, role: str = ROLE_VPC) -> dict:
    return {"apiVersion": API_VERSION, "kind": "VniClaim",
            "metadata": {"name": claim_name(vni),
                         "labels": {LABEL_MANAGED_BY: MANAGER, LABEL_VPC: name_of(vpc)},
                         "ownerReferences": [owner_reference(vpc)]},
            "spec": {"vni": vni, "vpc": name_of(vpc), "role": role}}


def claim_role(claim: dict) -> str:
    """What the claim was made for; a claim without a role predates routed Vpcs: the
    Vpc's one VNI."""
    role = claim.get("spec", {}).get("role")
    return role if isinstance(role, str) and role else ROLE_VPC


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
    return sorted(held_claims(vpc, claims))


def held_claims(vpc: dict, claims: Iterable[dict]) -> dict[int, str]:
    """VNI -> role of every claim the Vpc holds."""
    return {v: claim_role(c) for c in claims
            if holds(vpc, c) and (v := claim_vni(c)) is not None}


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


def conflict_message(vpc_name: str, vni: int, holder: str, field: str = "spec.vni") -> str:
    return (f"VNI {vni} pinned by Vpc {vpc_name!r} ({field}) is held by Vpc {holder!r} "
            f"(VniClaim {claim_name(vni)}); pin another VNI or remove {field}")


# ------------------------------------------------------------------ the VNIs in status

def status_vnis(status: Optional[dict]) -> dict[str, int]:
    """role -> VNI as status says (the decision last committed): status.vni, or
    status.l3vni and status.subnets[].vni."""
    status = status or {}
    out: dict[str, int] = {}
    if isinstance(status.get("vni"), int):
        out[ROLE_VPC] = status["vni"]
    if isinstance(status.get("l3vni"), int):
        out[ROLE_L3] = status["l3vni"]
    for entry in status.get("subnets") or []:
        if isinstance(entry, dict) and isinstance(entry.get("name"), str) \
                and isinstance(entry.get("vni"), int):
            out.setdefault(subnet_role(entry["name"]), entry["vni"])
    return out


def status_with_vnis(status: Optional[dict], spec: VpcSpec, vnis: dict[str, int]) -> dict:
    """`status` with the VNIs decided (`vnis`, role -> VNI) and no other VNI field:
    `vni` without routing; `l3vni` and `subnets` (in the spec's order) with it."""
    out = {k: v for k, v in (status or {}).items() if k not in ("vni", "l3vni", "subnets")}
    if spec.routing is None:
        out["vni"] = vnis[ROLE_VPC]
    else:
        out["l3vni"] = vnis[ROLE_L3]
        out["subnets"] = [{"name": s.name, "vni": vnis[subnet_role(s.name)]}
                          for s in spec.subnets]
    return out


# ------------------------------------------------------------------ NetworkAttachmentDefinitions

def nad_name(vpc_name: str, subnet_name: Optional[str] = None) -> str:
    """`vpc-<name>`, a routed subnet's `vpc-<name>-<subnet>`: the NAD's name and the CNI
    network name, which is vpcni-ipam's pool (cluster-wide)."""
    return f"vpc-{vpc_name}" if subnet_name is None else f"vpc-{vpc_name}-{subnet_name}"


def network_names(vpc_name: str, spec: VpcSpec) -> list[str]:
    """The networks (NAD names, vpcni-ipam pools) the spec renders."""
    if spec.routing is None:
        return [nad_name(vpc_name)]
    return [nad_name(vpc_name, s.name) for s in spec.subnets]


def pool_of(vpc_name: str, spec: VpcSpec, subnet: Subnet) -> str:
    """The vpcni-ipam pool that hands out `subnet`'s addresses."""
    return nad_name(vpc_name, subnet.name if spec.routing is not None else None)


def ipam_section(subnets: "VpcSpec | list[Subnet]", store: EtcdStoreConfig) -> dict:
    """vpcni-ipam's config: `subnets` when that says it all (no gateway, one subnet per
    family), else `ranges` with one range set per family (one address of each family)."""
    if isinstance(subnets, VpcSpec):
        subnets = subnets.subnets
    by_family: dict[int, list[Subnet]] = {}
    for s in subnets:
        by_family.setdefault(s.cidr.version, []).append(s)
    out: dict[str, Any] = {"type": "vpcni-ipam"}
    if all(s.gateway is None for s in subnets) and all(len(v) == 1
                                                       for v in by_family.values()):
        out["subnets"] = [str(s.cidr) for s in subnets]
    else:
        out["ranges"] = [[{"subnet": str(s.cidr), **({"gateway": str(s.gateway)}
                                                     if s.gateway else {})}
                          for s in by_family[v]] for v in sorted(by_family)]
    exclude = [e for s in subnets for e in s.exclude]
    if exclude:
        out["exclude"] = exclude
    out["store"] = store.model_dump(mode="json")
    return out


def _config_head(name: str, spec: VpcSpec, vni: int, cfg: ControllerConfig) -> dict:
    conf: dict[str, Any] = {"cniVersion": cfg.cniVersion, "name": name, "type": "vpcni",
                            "vni": vni}
    if spec.mtu is not None:
        conf["mtu"] = spec.mtu
    if spec.backend is not None:
        conf["backend"] = spec.backend
    if spec.interfaceKind == "sriov":
        conf["interface"] = "vf"
    conf["capabilities"] = {"ips": True, "mac": True}
    return conf


def network_config(vpc_name: str, spec: VpcSpec, vni: int, cfg: ControllerConfig) -> dict:
    """The CNI config of the NADs of a Vpc without routing (vpcni's NetworkConfig parses it)."""
    conf = _config_head(nad_name(vpc_name), spec, vni, cfg)
    conf["ipam"] = ipam_section(spec.subnets, cfg.ipamStore)
    return conf


def subnet_network_config(vpc_name: str, spec: VpcSpec, subnet: Subnet, vni: int, l3vni: int,
                          cfg: ControllerConfig) -> dict:
    """The CNI config of a routed subnet's NADs: its VNI, `routing` (the VPC, its L3VNI,
    the subnet and gateway, egress, the VPC's routes: the same in every subnet) and
    vpcni-ipam on that one subnet. The gateway is given to both or to neither, so
    vpcni-ipam never hands out the anycast gateway (both default to the first host)."""
    assert spec.routing is not None
    conf = _config_head(nad_name(vpc_name, subnet.name), spec, vni, cfg)
    routing: dict[str, Any] = {"vpc": vpc_name, "l3vni": l3vni, "subnet": str(subnet.cidr)}
    if subnet.gateway is not None:
        routing["gateway"] = str(subnet.gateway)
    routing["egress"] = spec.routing.egress
    routing["defaultRoute"] = spec.routing.defaultRoute
    routing["routes"] = [{"dst": str(r.dst), "via": str(r.via)} for r in spec.routing.routes]
    conf["routing"] = routing
    conf["ipam"] = ipam_section([subnet], cfg.ipamStore)
    return conf


def network_configs(vpc_name: str, spec: VpcSpec, vnis: dict[str, int],
                    cfg: ControllerConfig) -> dict[str, dict]:
    """NAD name -> CNI config, for the VNIs decided (role -> VNI, as allocate_vni keeps)."""
    if spec.routing is None:
        return {nad_name(vpc_name): network_config(vpc_name, spec, vnis[ROLE_VPC], cfg)}
    return {nad_name(vpc_name, s.name): subnet_network_config(
        vpc_name, spec, s, vnis[subnet_role(s.name)], vnis[ROLE_L3], cfg) for s in spec.subnets}


def nad_object(vpc: dict, namespace: str, config: dict) -> dict:
    return {"apiVersion": NAD_API_VERSION, "kind": NAD_KIND,
            "metadata": {"name": config["name"], "namespace": namespace,
                         "labels": {LABEL_MANAGED_BY: MANAGER, LABEL_VPC: name_of(vpc)},
                         "ownerReferences": [owner_reference(vpc)]},
            "spec": {"config": json.dumps(config)}}


def desired_nads(vpc: dict, spec: VpcSpec, vnis: dict[str, int], cfg: ControllerConfig
                 ) -> dict[tuple[str, str], dict]:
    """(namespace, name) -> the NAD the Vpc needs there: in each bound namespace, one
    (`vpc-<name>`), or one per routed subnet (`vpc-<name>-<subnet>`)."""
    configs = network_configs(name_of(vpc), spec, vnis, cfg)
    return {(ns, name): nad_object(vpc, ns, conf)
            for ns in spec.namespaces for name, conf in configs.items()}


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


def stale_nads(vpc_name: str, desired: Iterable[tuple[str, str]], existing: Iterable[dict]
               ) -> list[tuple[str, str]]:
    """(namespace, name) of this Vpc's NADs not desired: in namespaces no longer bound, of
    subnets removed, of the other form after spec.routing was added or removed."""
    wanted = set(desired)
    out = []
    for nad in existing:
        meta = nad.get("metadata", {})
        if not managed(nad) or (meta.get("labels") or {}).get(LABEL_VPC) != vpc_name:
            continue
        if (meta.get("namespace"), meta.get("name")) not in wanted:
            out.append((meta.get("namespace"), meta.get("name")))
    return sorted(out)


def networks_in_force(vpc: dict) -> dict[int, str]:
    """VNI -> network (NAD name) of what the Vpc's status says it serves. The L3VNI is
    not among them: no attachment uses it."""
    name, status = name_of(vpc), vpc.get("status") or {}
    out: dict[int, str] = {}
    if isinstance(status.get("vni"), int):
        out[status["vni"]] = nad_name(name)
    for entry in status.get("subnets") or []:
        if isinstance(entry, dict) and isinstance(entry.get("vni"), int) \
                and isinstance(entry.get("name"), str) and re.fullmatch(DNS_LABEL, entry["name"]):
            out.setdefault(entry["vni"], nad_name(name, entry["name"]))
    return out


def _age(vpc: dict) -> tuple[str, str]:
    return vpc.get("metadata", {}).get("creationTimestamp") or "", name_of(vpc)


def network_name_conflict(vpc: dict, spec: VpcSpec, vpcs: Iterable[dict]) -> Optional[str]:
    """Why the Vpc may not render its networks, or None. Names are not unique by
    construction (Vpc `a-b` and Vpc `a`'s routed subnet `b` are both `vpc-a-b`), and a
    name is a cluster-wide vpcni-ipam pool: of the Vpcs wanting a name, the one serving
    it (its status) keeps it, else the oldest (creationTimestamp, then name)."""
    name = name_of(vpc)
    mine = set(network_names(name, spec))
    serving = set(networks_in_force(vpc).values())
    for other in sorted(vpcs, key=_age):
        if name_of(other) == name or not any(
                n == nad_name(name_of(other)) or n.startswith(nad_name(name_of(other)) + "-")
                for n in mine):
            continue  # none of its names can be one of this Vpc's (and no spec is parsed)
        theirs_serving = set(networks_in_force(other).values())
        theirs = set(theirs_serving)
        if not other.get("metadata", {}).get("deletionTimestamp"):
            try:
                theirs |= set(network_names(name_of(other), parse_spec(other.get("spec"))))
            except SpecError:
                pass
        for net in sorted(mine & theirs):
            if (net in serving, net in theirs_serving) == (True, False):
                continue  # this Vpc serves it, the other only wants it
            if (net in serving) == (net in theirs_serving) and _age(vpc) < _age(other):
                continue  # neither (or both) serve it: the older keeps it
            return (f"network {net} (a NAD name and vpcni-ipam's pool) is also Vpc "
                    f"{name_of(other)!r}'s, which keeps it; rename the subnet or the Vpc")
    return None


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
    """{"version": 1, "vnis": {"300": {"vpc": "blue", "network": "vpc-blue", "namespaces":
    [...]}}} (a routed subnet's with "l3vni" too): every VNI in force that an attachment uses (a Vpc's status.vni, or a routed
    Vpc's status.subnets[].vni with its subnet's network; never an L3VNI) that the Vpc's
    VniClaim backs. One claim per VNI (an object name), so no VNI is ever bound to two
    VPCs."""
    by_name = {name_of(v): v for v in vpcs}
    vnis = {}
    for claim in claims:
        vpc = by_name.get(claim_holder(claim))
        vni = claim_vni(claim)
        if vpc is None or vni is None or not holds(vpc, claim):
            continue
        network = networks_in_force(vpc).get(vni)
        if network is None:
            continue
        vnis[vni] = {"vpc": name_of(vpc), "network": network,
                     "namespaces": bound_namespaces(vpc)}
        l3vni = (vpc.get("status") or {}).get("l3vni")
        if isinstance(l3vni, int) and vni != l3vni and network != nad_name(name_of(vpc)):
            # A routed subnet: the node refuses a `routing` naming another L3VNI or VPC.
            vnis[vni]["l3vni"] = l3vni
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
    pools (its NADs' names: `vpc-<name>`, or one per routed subnet): the nodes named by
    its allocations, one endpoint per (container, ifname), addresses used/free per subnet
    (counted in the subnet's own pool) and in all."""
    pools = {s.name: pool_of(vpc_name, spec, s) for s in spec.subnets}
    mine = [a for a in allocations if a.network in set(pools.values())]
    exclude = [e for s in spec.subnets for e in s.exclude]
    per_subnet, used_total, free_total = [], 0, 0
    for s in spec.subnets:
        used = len([a for a in mine if a.network == pools[s.name] and _in(a.ip, s.cidr)])
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
