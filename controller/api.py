"""The controller's reads and writes: a narrow protocol over the API server, one
implementation over the official `kubernetes` client, and the reconcile steps.

The reconcile functions are written against `KubeApi` only. Their safety rests
on two guarantees of the API server, which the protocol names as errors:

- `create` of a name that exists fails with **AlreadyExists** (409): a
  VniClaim `vni-<N>` is how a Vpc owns VNI N, so of two creators exactly one
  gets N. No counter is kept anywhere.
- `replace`/`replace_status` with a `metadata.resourceVersion` that is no
  longer current fails with **Conflict** (409): every write re-reads and
  retries, so no writer overwrites a change it did not see.
"""

from __future__ import annotations

import copy
import json
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Protocol

from . import logic
from .logic import (CONFLICT, INVALID, PENDING, READY, ControllerConfig, SpecError, VpcSpec,
                    name_of)

LOG = logging.getLogger(__name__)

# Re-reads after a Conflict before a write gives up (kopf then retries the handler).
WRITE_ATTEMPTS = 16


class ApiError(Exception):
    """An API server answer the reconcile steps do not handle themselves."""


class NotFound(ApiError):
    """404: the object (or its namespace) does not exist."""


class AlreadyExists(ApiError):
    """409 AlreadyExists: a create of a name that exists."""


class Conflict(ApiError):
    """409 Conflict: a write with a resourceVersion that is no longer current."""


@dataclass(frozen=True)
class Resource:
    api_version: str
    kind: str
    plural: str
    namespaced: bool

    @property
    def group(self) -> str:
        return self.api_version.rpartition("/")[0]

    @property
    def version(self) -> str:
        return self.api_version.rpartition("/")[2]


VPC = Resource(logic.API_VERSION, "Vpc", "vpcs", namespaced=False)
VNICLAIM = Resource(logic.API_VERSION, "VniClaim", "vniclaims", namespaced=False)
NAD = Resource(logic.NAD_API_VERSION, logic.NAD_KIND, "network-attachment-definitions",
               namespaced=True)
CONFIGMAP = Resource("v1", "ConfigMap", "configmaps", namespaced=True)


class KubeApi(Protocol):
    """What the reconcile steps need of the API server. Objects are plain dicts."""

    def get(self, res: Resource, name: str, namespace: Optional[str] = None) -> Optional[dict]:
        """The object, or None when there is none."""

    def list(self, res: Resource, namespace: Optional[str] = None,
             labels: Optional[dict[str, str]] = None) -> list[dict]:
        """Objects with all of `labels`; a namespaced kind in every namespace when
        `namespace` is None."""

    def create(self, res: Resource, body: dict) -> dict:
        """Raises AlreadyExists; NotFound when the namespace does not exist."""

    def replace(self, res: Resource, body: dict) -> dict:
        """PUT with body's metadata.resourceVersion: Conflict when stale, NotFound when gone."""

    def replace_status(self, res: Resource, body: dict) -> dict:
        """PUT of the status subresource, same rules as replace."""

    def delete(self, res: Resource, name: str, namespace: Optional[str] = None,
               resource_version: Optional[str] = None) -> bool:
        """False when there was nothing; Conflict when `resource_version` is not current."""


# ------------------------------------------------------------------ the kubernetes client

class KubernetesApi:
    """KubeApi over the official `kubernetes` client (thin: no logic here). Custom
    resources and NADs through CustomObjectsApi, ConfigMaps through CoreV1Api."""

    def __init__(self, api_client=None):
        from kubernetes import client

        self._client = client
        self.api_client = api_client or client.ApiClient()
        self.custom = client.CustomObjectsApi(self.api_client)
        self.core = client.CoreV1Api(self.api_client)

    @classmethod
    def from_environment(cls) -> "KubernetesApi":
        """In a pod: its service account; else the kubeconfig ($KUBECONFIG, ~/.kube/config)."""
        from kubernetes import config

        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
        return cls()

    def _call(self, fn: Callable, *args, **kwargs) -> Any:
        from kubernetes.client.exceptions import ApiException

        try:
            return fn(*args, **kwargs)
        except ApiException as exc:
            reason = ""
            try:
                reason = json.loads(exc.body or "{}").get("reason", "")
            except (ValueError, AttributeError):
                pass
            text = f"{exc.status} {reason or exc.reason}"
            if exc.status == 404:
                raise NotFound(text) from None
            if exc.status == 409:
                raise (AlreadyExists if reason == "AlreadyExists" else Conflict)(text) from None
            raise ApiError(text) from None

    def _plain(self, obj: Any) -> dict:
        return obj if isinstance(obj, dict) else self.api_client.sanitize_for_serialization(obj)

    @staticmethod
    def _where(res: Resource, body: dict) -> tuple[str, Optional[str]]:
        meta = body["metadata"]
        return meta["name"], meta.get("namespace") if res.namespaced else None

    @staticmethod
    def _selector(labels: Optional[dict[str, str]]) -> Optional[str]:
        return ",".join(f"{k}={v}" for k, v in sorted(labels.items())) if labels else None

    def get(self, res, name, namespace=None):
        try:
            if res is CONFIGMAP:
                return self._plain(self._call(self.core.read_namespaced_config_map, name,
                                              namespace))
            if res.namespaced:
                return self._call(self.custom.get_namespaced_custom_object, res.group,
                                  res.version, namespace, res.plural, name)
            return self._call(self.custom.get_cluster_custom_object, res.group, res.version,
                              res.plural, name)
        except NotFound:
            return None

    def list(self, res, namespace=None, labels=None):
        selector = self._selector(labels)
        if res is CONFIGMAP:
            out = self._call(self.core.list_namespaced_config_map, namespace,
                             label_selector=selector) if namespace else \
                self._call(self.core.list_config_map_for_all_namespaces, label_selector=selector)
            return [self._plain(i) for i in out.items]
        if res.namespaced and namespace is not None:
            out = self._call(self.custom.list_namespaced_custom_object, res.group, res.version,
                             namespace, res.plural, label_selector=selector)
        else:
            out = self._call(self.custom.list_cluster_custom_object, res.group, res.version,
                             res.plural, label_selector=selector)
        return out.get("items", [])

    def create(self, res, body):
        name, namespace = self._where(res, body)
        if res is CONFIGMAP:
            return self._plain(self._call(self.core.create_namespaced_config_map, namespace,
                                          self._client.V1ConfigMap.from_dict(body)))
        if res.namespaced:
            return self._call(self.custom.create_namespaced_custom_object, res.group,
                              res.version, namespace, res.plural, body)
        return self._call(self.custom.create_cluster_custom_object, res.group, res.version,
                          res.plural, body)

    def replace(self, res, body):
        name, namespace = self._where(res, body)
        if res is CONFIGMAP:
            return self._plain(self._call(self.core.replace_namespaced_config_map, name,
                                          namespace, self._client.V1ConfigMap.from_dict(body)))
        if res.namespaced:
            return self._call(self.custom.replace_namespaced_custom_object, res.group,
                              res.version, namespace, res.plural, name, body)
        return self._call(self.custom.replace_cluster_custom_object, res.group, res.version,
                          res.plural, name, body)

    def replace_status(self, res, body):
        name, namespace = self._where(res, body)
        if res.namespaced:
            return self._call(self.custom.replace_namespaced_custom_object_status, res.group,
                              res.version, namespace, res.plural, name, body)
        return self._call(self.custom.replace_cluster_custom_object_status, res.group,
                          res.version, res.plural, name, body)

    def delete(self, res, name, namespace=None, resource_version=None):
        options = self._client.V1DeleteOptions(
            preconditions=self._client.V1Preconditions(resource_version=resource_version)
            if resource_version else None)
        try:
            if res is CONFIGMAP:
                self._call(self.core.delete_namespaced_config_map, name, namespace,
                           body=options)
            elif res.namespaced:
                self._call(self.custom.delete_namespaced_custom_object, res.group, res.version,
                           namespace, res.plural, name, body=options)
            else:
                self._call(self.custom.delete_cluster_custom_object, res.group, res.version,
                           res.plural, name, body=options)
        except NotFound:
            return False
        return True


# ------------------------------------------------------------------ writes with re-reads

def update_status(api: KubeApi, name: str, change: Callable[[dict], dict]) -> Optional[dict]:
    """Set the fields `change(fresh Vpc)` returns in the Vpc's status (None removes one),
    keeping every other field as the API server has it. A Conflict (someone wrote in
    between) means re-read and apply `change` again. None when the Vpc is gone."""
    for _ in range(WRITE_ATTEMPTS):
        obj = api.get(VPC, name)
        if obj is None:
            return None
        status = dict(obj.get("status") or {})
        new = dict(status)
        for key, value in change(obj).items():
            if value is None:
                new.pop(key, None)
            else:
                new[key] = value
        if new == status:
            return obj
        body = copy.deepcopy(obj)
        body["status"] = new
        try:
            return api.replace_status(VPC, body)
        except Conflict:
            continue
        except NotFound:
            return None
    raise Conflict(f"Vpc {name}: status still conflicting after {WRITE_ATTEMPTS} re-reads")


def apply_nad(api: KubeApi, desired: dict) -> Optional[str]:
    """Create the NAD `desired` or bring the existing one (if it is the controller's) to
    it. None when done, else why not (for status.message)."""
    name, ns = desired["metadata"]["name"], desired["metadata"]["namespace"]
    for _ in range(WRITE_ATTEMPTS):
        cur = api.get(NAD, name, ns)
        if cur is None:
            try:
                api.create(NAD, desired)
                return None
            except AlreadyExists:
                continue
            except NotFound:
                return f"namespace {ns} does not exist (its NAD {name} is made when it does)"
        if not logic.managed(cur):
            return f"namespace {ns}: NAD {name} exists and is not the controller's (left alone)"
        owner = (cur.get("metadata", {}).get("labels") or {}).get(logic.LABEL_VPC)
        if owner != desired["metadata"]["labels"][logic.LABEL_VPC]:
            return f"namespace {ns}: NAD {name} is Vpc {owner!r}'s (left alone)"
        if logic.nad_up_to_date(cur, desired):
            return None
        try:
            api.replace(NAD, logic.updated_nad(cur, desired))
            return None
        except (Conflict, NotFound):
            continue
    raise Conflict(f"namespace {ns}: NAD {name}: still conflicting after {WRITE_ATTEMPTS} "
                   "re-reads")


# ------------------------------------------------------------------ VNIs

@dataclass(frozen=True)
class VniOutcome:
    """The VNIs a Vpc holds after allocate_vni, or why it holds none it may use."""

    vnis: dict  # role -> VNI (logic.ROLE_VPC, ROLE_L3, subnet_role(name)); {} when none
    # Ready (VNIs held), Pending (pool exhausted, Vpc gone), Conflict (a pinned VNI taken,
    # a network name another Vpc keeps), Invalid (the spec read does not validate)
    phase: str
    message: str = ""
    vpc: Optional[dict] = None  # the Vpc as read for the decision that was committed

    @property
    def vni(self) -> Optional[int]:
        """The VNI of a Vpc without routing."""
        return self.vnis.get(logic.ROLE_VPC)


def _claim(api: KubeApi, vpc: dict, vni: int, role: str = logic.ROLE_VPC) -> Optional[dict]:
    """Create VniClaim vni-<N> for `vpc`: None when the Vpc holds it now (made here, or
    already its own), else the other Vpc's claim that holds it."""
    for _ in range(WRITE_ATTEMPTS):
        try:
            api.create(VNICLAIM, logic.claim_object(vni, vpc, role))
            return None
        except AlreadyExists:
            existing = api.get(VNICLAIM, logic.claim_name(vni))
            if existing is None:
                continue  # freed between our create and our read: try again
            return None if logic.holds(vpc, existing) else existing
    raise Conflict(f"VniClaim {logic.claim_name(vni)}: created and deleted under us "
                   f"{WRITE_ATTEMPTS} times")


def _release(api: KubeApi, vpc: dict, vni: int) -> None:
    """Delete the Vpc's claim on `vni` (only if it is still the Vpc's)."""
    for _ in range(WRITE_ATTEMPTS):
        claim = api.get(VNICLAIM, logic.claim_name(vni))
        if claim is None or not logic.holds(vpc, claim):
            return
        try:
            api.delete(VNICLAIM, name_of(claim),
                       resource_version=claim["metadata"].get("resourceVersion"))
            LOG.info("Vpc %s: released VNI %d", name_of(vpc), vni)
            return
        except Conflict:
            continue


def _from_pool(api: KubeApi, vpc: dict, pool: tuple[int, int], claims: list[dict],
               taken: set[int], role: str) -> Optional[int]:
    """The lowest VNI of `pool` neither claimed (in `claims`) nor `taken` by another role
    of this decision, owned by creating its claim."""
    claimed = logic.claimed_vnis(claims) | taken
    for vni in logic.vni_candidates(pool, claimed):
        if _claim(api, vpc, vni, role) is None:
            return vni
    return None


def _decide(api: KubeApi, vpc: dict, spec: VpcSpec, pool: tuple[int, int]
            ) -> tuple[Optional[dict], str, str]:
    """role -> VNI for every VNI the spec needs, claims created as needed; or (None,
    phase, message). Pinned VNIs first (a conflict is found before anything is taken from
    the pool), then for each other role: the VNI status gives it if held, else one held
    for that role (the lowest), else status's VNI re-claimed if free, else the pool's
    lowest free. No VNI serves two roles."""
    name = name_of(vpc)
    in_status = logic.status_vnis(vpc.get("status"))
    claims = api.list(VNICLAIM)
    held = logic.held_claims(vpc, claims)
    needs = logic.vni_needs(spec)
    decided: dict[str, int] = {}
    for need in needs:
        if need.pinned is None:
            continue
        if need.pinned not in held:
            other = _claim(api, vpc, need.pinned, need.role)
            if other is not None:
                return None, CONFLICT, logic.conflict_message(
                    name, need.pinned, logic.claim_holder(other), need.field)
        decided[need.role] = need.pinned
    for need in needs:
        if need.pinned is not None:
            continue
        taken = set(decided.values())
        was = in_status.get(need.role)
        mine = sorted(v for v, role in held.items() if role == need.role and v not in taken)
        if was in held and was not in taken:
            vni = was
        elif mine:
            vni = logic.keep_vni(mine, was)
        elif isinstance(was, int) and was not in taken and _claim(api, vpc, was,
                                                                  need.role) is None:
            vni = was
        else:
            vni = _from_pool(api, vpc, pool, claims, taken, need.role)
            if vni is None:
                return None, PENDING, logic.exhausted_message(
                    pool, logic.claimed_vnis(api.list(VNICLAIM)))
        decided[need.role] = vni
    return decided, READY, ""


def allocate_vni(api: KubeApi, vpc: dict, pool: tuple[int, int] = logic.parse_vni_range(
        logic.DEFAULT_VNI_RANGE)) -> VniOutcome:
    """Give the Vpc the VNIs it needs and write them to status: its one VNI
    (status.vni), or, with spec.routing, its L3VNI and one VNI per subnet
    (status.l3vni, status.subnets[].vni).

    For each: pinned, that VNI, unless another Vpc's claim holds it (Conflict; what the
    Vpc held stays). Else the VNI it holds for that role (status's if held, else the
    lowest); else the one in its status if still free (a lost claim does not renumber a
    live VPC); else the lowest free VNI of `pool`. A VNI is owned by creating its
    VniClaim (spec.role says what for): AlreadyExists means someone else got it, so the
    next one is tried.

    The decision is committed by writing status with the resourceVersion of the read it
    was made on: a Conflict (the Vpc changed since: its spec, or another controller
    committed first) means read again and decide again. Only then are the Vpc's other
    claims released, so no claim is released on a stale decision.
    """
    name = name_of(vpc)
    for _ in range(WRITE_ATTEMPTS):
        fresh = api.get(VPC, name)
        if fresh is None or logic.uid_of(fresh) != logic.uid_of(vpc):
            return VniOutcome({}, PENDING, "the Vpc was deleted")
        if fresh.get("metadata", {}).get("deletionTimestamp"):
            return VniOutcome({}, PENDING, "the Vpc is being deleted", fresh)
        try:
            spec = logic.parse_vpc(fresh)
        except SpecError as exc:
            return VniOutcome({}, INVALID, str(exc), fresh)
        clash = logic.network_name_conflict(fresh, spec, api.list(VPC))
        if clash is not None:
            return VniOutcome({}, CONFLICT, clash, fresh)
        decided, phase, message = _decide(api, fresh, spec, pool)
        if decided is None:
            return VniOutcome({}, phase, message, fresh)
        keep = set(decided.values())
        others = [v for v in logic.held_vnis(fresh, api.list(VNICLAIM)) if v not in keep]
        status = fresh.get("status") or {}
        new = logic.status_with_vnis(status, spec, decided)
        if new != status or others:
            body = copy.deepcopy(fresh)
            body["status"] = new
            try:
                fresh = api.replace_status(VPC, body)
            except Conflict:
                continue
            except NotFound:
                return VniOutcome({}, PENDING, "the Vpc was deleted")
        for vni in others:
            _release(api, fresh, vni)
        return VniOutcome(decided, READY, "", fresh)
    raise Conflict(f"Vpc {name}: status VNIs still conflicting after {WRITE_ATTEMPTS} "
                   "decisions")


# ------------------------------------------------------------------ a Vpc

def render_nads(api: KubeApi, vpc: dict, spec: VpcSpec, vnis: dict[str, int],
                cfg: ControllerConfig) -> list[str]:
    """The Vpc's NADs (one, or one per routed subnet) in each bound namespace, and none
    elsewhere; what could not be done."""
    desired = logic.desired_nads(vpc, spec, vnis, cfg)
    problems = [p for key in sorted(desired) if (p := apply_nad(api, desired[key]))]
    existing = api.list(NAD, labels={logic.LABEL_VPC: name_of(vpc)})
    for ns, name in logic.stale_nads(name_of(vpc), desired, existing):
        api.delete(NAD, name, ns)
        LOG.info("Vpc %s: deleted NAD %s/%s (namespace unbound, subnet removed or routing "
                 "changed)", name_of(vpc), ns, name)
    return problems


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def reconcile_vpc(api: KubeApi, vpc: dict, cfg: ControllerConfig, store: Any = None,
                  now: Optional[str] = None) -> Optional[dict]:
    """One Vpc to its desired state: validate, VNI (claim + status.vni), NADs, status
    (phase, message, observedGeneration, conditions; with `store`, vpcni-ipam's usage:
    nodes, endpoints, addresses), then the bindings. Works on the Vpc as the API server
    has it now (`vpc` may be an older copy). Returns the status written."""
    name = name_of(vpc)
    usage: dict = {}
    out = allocate_vni(api, vpc, cfg.pool())
    current = out.vpc
    if current is None or current.get("metadata", {}).get("deletionTimestamp"):
        return None  # gone, or being deleted (finalize_vpc's)
    generation = current.get("metadata", {}).get("generation")
    phase, message = out.phase, out.message
    if out.phase == READY:
        spec = logic.parse_vpc(current)
        problems = render_nads(api, current, spec, out.vnis, cfg)
        if problems:
            phase, message = PENDING, "; ".join(problems)
        if store is not None:
            usage = read_usage(name, spec, store)
    stamp = now or _now()

    def change(obj: dict) -> dict:
        previous = (obj.get("status") or {}).get("conditions", [])
        return {"phase": phase, "message": message, "observedGeneration": generation,
                "conditions": logic.conditions(phase, message, generation, previous, stamp),
                **usage}

    written = update_status(api, name, change)
    reconcile_bindings(api, cfg)
    return None if written is None else written.get("status")


def read_usage(vpc_name: str, spec: VpcSpec, store: Any) -> dict:
    """Status counts from vpcni-ipam's store (`store.list(pool)` of each of the Vpc's
    networks); {} when the store cannot be read now (the counts written before stay)."""
    from vpcni.core.errors import VpcniError

    try:
        allocations = [a for pool in logic.network_names(vpc_name, spec)
                       for a in store.list(pool)]
    except VpcniError as exc:
        LOG.warning("Vpc %s: ipam store not read: %s", vpc_name, exc.msg)
        return {}
    return logic.usage_status(vpc_name, spec, allocations)


def finalize_vpc(api: KubeApi, vpc: dict, cfg: ControllerConfig) -> None:
    """A deleted Vpc: its NADs and its VniClaims go (which frees its VNI), then the
    bindings. Owner references let the garbage collector do the same if this never runs."""
    name = name_of(vpc)
    for nad in api.list(NAD, labels={logic.LABEL_VPC: name}):
        if logic.managed(nad):
            api.delete(NAD, name_of(nad), nad["metadata"].get("namespace"))
    for vni in logic.held_vnis(vpc, api.list(VNICLAIM)):
        _release(api, vpc, vni)
    reconcile_bindings(api, cfg)


# ------------------------------------------------------------------ bindings

# One bindings computation and write at a time in this process: each one reads the
# state after the previous one's write, so an older document never replaces a newer.
_BINDINGS_LOCK = threading.Lock()


def reconcile_bindings(api: KubeApi, cfg: ControllerConfig) -> dict:
    """The tenancy bindings ConfigMap from every Vpc and VniClaim; the document. A
    Conflict means someone wrote meanwhile: the document is computed again."""
    with _BINDINGS_LOCK:
        for _ in range(WRITE_ATTEMPTS):
            doc = logic.bindings_document(api.list(VPC), api.list(VNICLAIM))
            desired = logic.bindings_configmap(doc, cfg)
            cur = api.get(CONFIGMAP, cfg.bindingsConfigMap, cfg.bindingsNamespace)
            try:
                if cur is None:
                    api.create(CONFIGMAP, desired)
                elif (cur.get("data") or {}).get(logic.BINDINGS_KEY) != \
                        desired["data"][logic.BINDINGS_KEY]:
                    api.replace(CONFIGMAP, logic.updated_configmap(cur, desired))
                return doc
            except (AlreadyExists, Conflict):
                continue
            except NotFound:
                raise ApiError(f"tenancy bindings: namespace {cfg.bindingsNamespace} does not "
                               "exist") from None
    raise Conflict(f"tenancy bindings: still conflicting after {WRITE_ATTEMPTS} attempts")
