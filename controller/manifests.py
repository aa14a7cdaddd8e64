"""What the controller needs installed in a cluster: the two CRDs and its RBAC
(`vpcnictl controller --print-manifests`). Data only; checked for structure by
the unit tests, never applied to an API server here."""

from __future__ import annotations

from .logic import GROUP, VERSION

SERVICE_ACCOUNT = "vpcni-controller"
NAMESPACE = "vpcni-system"

_LABEL = {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63}

VPC_SPEC_SCHEMA = {
    "type": "object",
    "required": ["subnets"],
    "properties": {
        "vni": {"type": "integer", "minimum": 1, "maximum": 16777215},
        "subnets": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["name", "cidr"],
            "properties": {"name": _LABEL, "cidr": {"type": "string"},
                           "gateway": {"type": "string"},
                           "exclude": {"type": "array", "items": {"type": "string"}}}}},
        "mtu": {"type": "integer", "minimum": 576, "maximum": 9000},
        "backend": {"type": "string", "enum": ["kernel", "ovs"]},
        "interfaceKind": {"type": "string", "enum": ["veth", "sriov"]},
        "namespaces": {"type": "array", "items": _LABEL},
    },
}


def _crd(kind: str, plural: str, spec_schema: dict, status: bool, columns: list[dict]) -> dict:
    version = {"name": VERSION, "served": True, "storage": True,
               "schema": {"openAPIV3Schema": {"type": "object", "properties": {
                   "spec": spec_schema,
                   "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}}}},
               "additionalPrinterColumns": columns}
    if status:
        version["subresources"] = {"status": {}}
    return {"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
            "metadata": {"name": f"{plural}.{GROUP}"},
            "spec": {"group": GROUP, "scope": "Cluster",
                     "names": {"kind": kind, "plural": plural, "singular": kind.lower(),
                               "listKind": f"{kind}List"},
                     "versions": [version]}}


def crds() -> list[dict]:
    age = {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}
    vpc = _crd("Vpc", "vpcs", VPC_SPEC_SCHEMA, True, [
        {"name": "VNI", "type": "integer", "jsonPath": ".status.vni"},
        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
        {"name": "Endpoints", "type": "integer", "jsonPath": ".status.endpoints"}, age])
    claim = _crd("VniClaim", "vniclaims", {
        "type": "object", "required": ["vni", "vpc"],
        "properties": {"vni": {"type": "integer", "minimum": 1, "maximum": 16777215},
                       "vpc": {"type": "string"}}}, False, [
        {"name": "VNI", "type": "integer", "jsonPath": ".spec.vni"},
        {"name": "Vpc", "type": "string", "jsonPath": ".spec.vpc"}, age])
    return [vpc, claim]


def rbac() -> list[dict]:
    def rule(groups, resources, verbs):
        return {"apiGroups": groups, "resources": resources, "verbs": verbs}

    cluster_rules = [
        rule([GROUP], ["vpcs"], ["get", "list", "watch", "patch", "update"]),
        rule([GROUP], ["vpcs/status"], ["get", "update", "patch"]),
        rule([GROUP], ["vniclaims"], ["get", "list", "watch", "create", "delete"]),
        rule(["k8s.cni.cncf.io"], ["network-attachment-definitions"],
             ["get", "list", "watch", "create", "update", "delete"]),
        # kopf: events about the Vpcs, CRD discovery, peering between controller replicas.
        rule([""], ["events"], ["create"]),
        rule(["events.k8s.io"], ["events"], ["create"]),
        rule(["apiextensions.k8s.io"], ["customresourcedefinitions"], ["list", "watch"]),
        rule(["kopf.dev"], ["clusterkopfpeerings"], ["list", "watch", "patch", "get"]),
    ]
    subject = [{"kind": "ServiceAccount", "name": SERVICE_ACCOUNT, "namespace": NAMESPACE}]
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount",
         "metadata": {"name": SERVICE_ACCOUNT, "namespace": NAMESPACE}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
         "metadata": {"name": SERVICE_ACCOUNT}, "rules": cluster_rules},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": {"name": SERVICE_ACCOUNT},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                     "name": SERVICE_ACCOUNT}, "subjects": subject},
        # The tenancy bindings ConfigMap lives in vpcni-system: write access there only.
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
         "metadata": {"name": SERVICE_ACCOUNT, "namespace": NAMESPACE},
         "rules": [rule([""], ["configmaps"], ["get", "list", "create", "update"])]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
         "metadata": {"name": SERVICE_ACCOUNT, "namespace": NAMESPACE},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                     "name": SERVICE_ACCOUNT}, "subjects": subject},
    ]


def manifests() -> dict:
    """One kubectl-appliable List (JSON): CRDs first, then RBAC."""
    return {"apiVersion": "v1", "kind": "List", "items": crds() + rbac()}
