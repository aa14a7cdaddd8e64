"""deploy/ renders, validates offline and agrees with the code.

Every kustomization (deploy/ and deploy/overlays/*) is rendered with `kubectl kustomize`
(kubectl must be installed: its absence fails these tests, it does not skip them). Every
rendered object is checked against Kubernetes' own JSON schemas (kubernetes-validate,
KUBERNETES below, strict: unknown fields fail), custom resources against their CRD's
openAPIV3Schema (jsonschema), the ServiceMonitor against the structural subset below. The
scripts the pods run are run here, with fake daemons where they would start one, on the
environment the manifests give them. There is no API server here: admission, CEL rules,
defaulting and scheduling are not exercised (deploy/README.md lists what is not).
"""

from __future__ import annotations

import copy
import functools
import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from vpcni.core.config import DEFAULT_NODE_CONFIG, NetworkConfig, NodeConfig
from vpcni.ctl.main import build_parser
from vpcni.ipam.config import EtcdStoreConfig, IpamSettings, parse_span
from vpcni.lab.cluster import installed_executable

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KUBERNETES = "1.32"  # the schemas objects are validated against (kubernetes-validate ships them)
IMAGE = "localhost/vpcni:0.1.0"
CONTROLLER_IMAGE = "localhost/vpcni-controller:0.1.0"
FRR_IMAGE = "quay.io/frrouting/frr:9.1.0"
ETCD_IMAGE = "registry.k8s.io/etcd:3.5.16-0"
NAMESPACE = "vpcni-system"
SCRIPTS = "/opt/vpcni-deploy"
WORKLOADS = ("DaemonSet", "Deployment", "StatefulSet")
# What the downward API gives the pods here.
FIELDS = {"status.hostIP": "198.51.100.201", "spec.nodeName": "node-a",
          "metadata.namespace": NAMESPACE}

KUSTOMIZATIONS = [".", *sorted(f"overlays/{p.name}" for p in (DEPLOY / "overlays").iterdir()
                              if (p / "kustomization.yaml").exists())]
BASE = {
    ("Namespace", "vpcni-system"),
    ("CustomResourceDefinition", "vpcs.vpcni.io"),
    ("CustomResourceDefinition", "vniclaims.vpcni.io"),
    ("ServiceAccount", "vpcni-agent"), ("ServiceAccount", "vpcni-controller"),
    ("Role", "vpcni-controller"), ("RoleBinding", "vpcni-controller"),
    ("ClusterRole", "vpcni-controller"), ("ClusterRoleBinding", "vpcni-controller"),
    ("ConfigMap", "vpcni-fabric"), ("ConfigMap", "vpcni-tenancy"),
    ("ConfigMap", "vpcni-controller"), ("ConfigMap", "vpcni-agent-scripts"),
    ("DaemonSet", "vpcni-agent"), ("Service", "vpcni-agent-metrics"),
    ("Deployment", "vpcni-controller"),
}
REFLECTORS = {
    ("StatefulSet", "vpcni-route-reflector"), ("Service", "vpcni-route-reflector"),
    ("PodDisruptionBudget", "vpcni-route-reflector"),
    ("ServiceAccount", "vpcni-route-reflector"), ("ConfigMap", "vpcni-route-reflector-scripts"),
}
ETCD = {
    ("StatefulSet", "vpcni-etcd"), ("Service", "vpcni-etcd"), ("Service", "vpcni-etcd-peers"),
    ("PodDisruptionBudget", "vpcni-etcd"),
}
MONITORING = {("ServiceMonitor", "vpcni-agent")}
EXPECTED = {
    ".": BASE,
    "overlays/frr-reflectors": BASE | REFLECTORS,
    "overlays/gobgpd-reflectors": BASE | REFLECTORS,
    "overlays/etcd-ipam": BASE | ETCD,
    "overlays/monitoring": BASE | MONITORING,
    "overlays/full": BASE | REFLECTORS | ETCD | MONITORING,
    "overlays/routing": BASE,
}
# Where the agent container is privileged (components/routing: a Bidirectional /run/netns).
PRIVILEGED_AGENT = {"overlays/routing"}


# ---------------------------------------------------------------- rendering

def kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        pytest.fail("kubectl is not installed (it renders deploy/ with its kustomize): install "
                    "it (tested: kubectl 1.32, kustomize 5.5) to check the manifests",
                    pytrace=False)
    return path


@functools.cache
def _rendered() -> dict[str, list[dict]]:
    exe = kubectl()

    def render(target: str) -> subprocess.CompletedProcess:
        return subprocess.run([exe, "kustomize", str(DEPLOY / target)], capture_output=True,
                              text=True, timeout=120)

    with ThreadPoolExecutor(len(KUSTOMIZATIONS)) as pool:
        outs = dict(zip(KUSTOMIZATIONS, pool.map(render, KUSTOMIZATIONS)))
    failed = {t: o.stderr.strip() for t, o in outs.items() if o.returncode != 0}
    if failed:
        pytest.fail(f"kubectl kustomize failed: {failed}", pytrace=False)
    return {t: [d for d in yaml.safe_load_all(o.stdout) if d] for t, o in outs.items()}


def rendered(target: str) -> list[dict]:
    return copy.deepcopy(_rendered()[target])


def base_name(obj: dict) -> str:
    """The name without the content hash kustomize gives generated ConfigMaps."""
    return re.sub(r"-scripts-[a-z0-9]{10}$", "-scripts", obj["metadata"]["name"])


def get(objs: list[dict], kind: str, name: str) -> dict:
    found = [o for o in objs if o["kind"] == kind and base_name(o) == name]
    assert len(found) == 1, f"{kind} {name}: {len(found)} rendered"
    return found[0]


def workloads(objs: list[dict]):
    for o in objs:
        if o["kind"] in WORKLOADS:
            yield o, o["spec"]["template"]["spec"]


def all_containers(pod: dict) -> list[dict]:
    return pod.get("initContainers", []) + pod["containers"]


def container(pod: dict, name: str) -> dict:
    return next(c for c in all_containers(pod) if c["name"] == name)


def configmap_data(objs: list[dict], name: str) -> dict:
    return next(o for o in objs if o["kind"] == "ConfigMap"
                and o["metadata"]["name"] == name).get("data", {})


def mounted_configmap(objs: list[dict], pod: dict, c: dict, path: str) -> dict:
    """The data of the ConfigMap mounted at `path` in container `c`."""
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == path)
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    return configmap_data(objs, volume["configMap"]["name"])


def kube_expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' expansion of an env value: $(VAR) of a variable defined before it, $$ is $."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                  lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)),
                  value)


def container_env(objs: list[dict], c: dict, **fields: str) -> dict[str, str]:
    """The environment Kubernetes gives container `c` (downward API from FIELDS + fields)."""
    values = {**FIELDS, **fields}
    env = {}
    for ref in c.get("envFrom", []):
        env.update(configmap_data(objs, ref["configMapRef"]["name"]))
    for var in c.get("env", []):
        if "value" in var:
            env[var["name"]] = kube_expand(var["value"], env)
        else:
            env[var["name"]] = values[var["valueFrom"]["fieldRef"]["fieldPath"]]
    return env


def script_path(c: dict) -> str:
    command = c["command"]
    assert command[0] == "/bin/sh" and command[1].startswith(SCRIPTS + "/"), command
    return command[1].rsplit("/", 1)[1]


@pytest.fixture(scope="module")
def base() -> list[dict]:
    return rendered(".")


@pytest.fixture(scope="module")
def full() -> list[dict]:
    return rendered("overlays/full")


# ---------------------------------------------------------------- what renders

def test_every_overlay_is_checked():
    assert set(KUSTOMIZATIONS) == set(EXPECTED)


@pytest.mark.parametrize("target", KUSTOMIZATIONS)
def test_kustomization_renders_what_it_should(target):
    objs = rendered(target)
    keys = [(o["kind"], base_name(o)) for o in objs]
    assert len(keys) == len(set(keys)), f"duplicates in {target}"
    assert set(keys) == EXPECTED[target]


@pytest.mark.parametrize("target", KUSTOMIZATIONS)
def test_namespaced_objects_are_in_vpcni_system(target):
    cluster_scoped = {"Namespace", "CustomResourceDefinition", "ClusterRole",
                      "ClusterRoleBinding"}
    for o in rendered(target):
        if o["kind"] in cluster_scoped:
            assert "namespace" not in o["metadata"], o["metadata"]["name"]
        else:
            assert o["metadata"].get("namespace") == NAMESPACE, (o["kind"], o["metadata"])


@pytest.mark.parametrize("target", KUSTOMIZATIONS)
def test_every_container_runs_vpcnis_image_but_bgpd_and_etcd(target):
    for _, pod in workloads(rendered(target)):
        for c in all_containers(pod):
            expected = {"frr": FRR_IMAGE, "etcd": ETCD_IMAGE,
                        "controller": CONTROLLER_IMAGE}.get(c["name"], IMAGE)
            assert c["image"] == expected, c["name"]


def test_images_are_named_in_one_place():
    for image in (IMAGE, CONTROLLER_IMAGE, FRR_IMAGE, ETCD_IMAGE):
        repository = image.rsplit(":", 1)[0]
        named = [p.relative_to(DEPLOY) for p in DEPLOY.rglob("*.yaml")
                 if repository in p.read_text()]
        assert named == [Path("components/image/kustomization.yaml")], image
    for p in DEPLOY.rglob("*.yaml"):
        if p.parent.name != "examples":
            for image in re.findall(r"^\s*image:\s*(\S+)", p.read_text(), re.M):
                assert image in ("vpcni", "vpcni-controller", "frr", "etcd"), (p, image)


# ---------------------------------------------------------------- Kubernetes schemas

_validated: set[str] = set()


@pytest.mark.parametrize("target", KUSTOMIZATIONS)
def test_objects_match_the_kubernetes_schemas(target):
    for o in rendered(target):
        if o["apiVersion"].split("/")[0] in ("vpcni.io", "monitoring.coreos.com"):
            continue  # custom resources: below
        digest = json.dumps(o, sort_keys=True)
        if digest in _validated:
            continue
        try:
            kubernetes_validate.validate(o, KUBERNETES, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{target}: {o['kind']} {o['metadata']['name']}: {exc.message} at "
                        f"{'/'.join(map(str, exc.path))}", pytrace=False)
        _validated.add(digest)


def test_schema_validation_is_strict_and_pinned():
    assert KUBERNETES in {kubernetes_validate.utils.major_minor(v)
                          for v in kubernetes_validate.utils.all_versions()}
    ds = copy.deepcopy(get(rendered("."), "DaemonSet", "vpcni-agent"))
    ds["spec"]["template"]["spec"]["hostPid"] = True  # a typo of hostPID
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(ds, KUBERNETES, strict=True)


# ---------------------------------------------------------------- CRDs and examples

def crd_schema(objs: list[dict], kind: str) -> dict:
    crd = next(o for o in objs if o["kind"] == "CustomResourceDefinition"
               and o["spec"]["names"]["kind"] == kind)
    (version,) = crd["spec"]["versions"]
    return version["schema"]["openAPIV3Schema"]


def _ip_format(version: int):
    def check(value) -> bool:
        return not isinstance(value, str) or ipaddress.ip_address(value).version == version
    return check


FORMATS = jsonschema.FormatChecker()
FORMATS.checks("cidr", raises=ValueError)(
    lambda v: not isinstance(v, str) or bool(ipaddress.ip_network(v, strict=False)))
FORMATS.checks("ipv4", raises=ValueError)(_ip_format(4))
FORMATS.checks("ipv6", raises=ValueError)(_ip_format(6))
FORMATS.checks("int64")(lambda v: not isinstance(v, int) or -2**63 <= v < 2**63)


def list_map_errors(schema: dict, value, where: str = "") -> list[str]:
    """x-kubernetes-list-type map/set: what the API server checks and jsonschema does not."""
    errors = []
    if isinstance(value, list) and "items" in schema:
        kind = schema.get("x-kubernetes-list-type")
        if kind == "map":
            keys = [tuple(v.get(k) for k in schema["x-kubernetes-list-map-keys"]) for v in value]
            if len(keys) != len(set(keys)):
                errors.append(f"{where}: duplicate keys {keys}")
        elif kind == "set" and len(value) != len({json.dumps(v) for v in value}):
            errors.append(f"{where}: duplicate items")
        for i, item in enumerate(value):
            errors += list_map_errors(schema["items"], item, f"{where}[{i}]")
    elif isinstance(value, dict):
        for key, sub in schema.get("properties", {}).items():
            if key in value:
                errors += list_map_errors(sub, value[key], f"{where}.{key}")
    return errors


def unknown_fields(schema: dict, value, where: str = "") -> list[str]:
    """Fields the schema does not have: kubectl's strict field validation refuses them."""
    errors = []
    if isinstance(value, dict) and "properties" in schema and where != ".metadata":
        for key, sub in value.items():
            if key not in schema["properties"]:
                errors.append(f"{where}.{key}: unknown field")
            else:
                errors += unknown_fields(schema["properties"][key], sub, f"{where}.{key}")
    elif isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            errors += unknown_fields(schema["items"], item, f"{where}[{i}]")
    return errors


def crd_errors(objs: list[dict], instance: dict) -> list[str]:
    """What the API server would refuse of `instance`, CEL rules aside (name_errors)."""
    schema = crd_schema(objs, instance["kind"])
    validator = jsonschema.Draft7Validator(schema, format_checker=FORMATS)
    errors = [f"{'.'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(instance)]
    return errors + list_map_errors(schema, instance) + unknown_fields(schema, instance)


def name_errors(instance: dict) -> list[str]:
    """The CRDs' CEL rules on names (no API server evaluates them here), in Python."""
    name = instance["metadata"]["name"]
    if instance["kind"] == "Vpc":
        ok = len(name) <= 50 and re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name)
    else:
        ok = name == f"vni-{instance['spec']['vni']}"
    return [] if ok else [f"name {name!r}"]


def test_cel_rules_are_the_ones_mirrored_here(base):
    assert crd_schema(base, "Vpc")["x-kubernetes-validations"][0]["rule"] == (
        "size(self.metadata.name) <= 50 && "
        "self.metadata.name.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')")
    claim = crd_schema(base, "VniClaim")
    assert claim["x-kubernetes-validations"][0]["rule"] == (
        "self.metadata.name == 'vni-' + string(self.spec.vni)")
    assert claim["properties"]["spec"]["x-kubernetes-validations"][0]["rule"] == "self == oldSelf"


def doc_examples() -> list[dict]:
    text = (ROOT / "docs" / "vpc-api.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", text, re.S)
    return [yaml.safe_load(b) for b in blocks]


def examples() -> list[tuple[str, dict]]:
    out = [(f"examples/{p.name}", d) for p in sorted((DEPLOY / "examples").glob("*.yaml"))
           for d in yaml.safe_load_all(p.read_text())
           if d and d["apiVersion"] == "vpcni.io/v1alpha1"]
    return out + [("docs/vpc-api.md", d) for d in doc_examples()]


def test_examples_cover_both_kinds():
    kinds = [(where, d["kind"]) for where, d in examples()]
    for where in ("examples/vpcs.yaml", "examples/vniclaim.yaml", "docs/vpc-api.md"):
        assert any(w == where for w, _ in kinds), where
    assert {k for _, k in kinds} == {"Vpc", "VniClaim"}


@pytest.mark.parametrize("where,instance", examples(),
                         ids=[f"{w}:{d['metadata']['name']}" for w, d in examples()])
def test_examples_match_their_crd(base, where, instance):
    assert crd_errors(base, instance) + name_errors(instance) == []


@pytest.mark.parametrize("where,instance", [e for e in examples() if e[1]["kind"] == "Vpc"],
                         ids=[f"{w}:{d['metadata']['name']}" for w, d in examples()
                              if d["kind"] == "Vpc"])
def test_example_subnets_are_what_vpcni_ipam_takes(where, instance):
    subnets = instance["spec"]["subnets"]
    exclude = [span for s in subnets for span in s.get("exclude", [])]
    IpamSettings(type="vpcni-ipam", subnets=[s["cidr"] for s in subnets], exclude=exclude)
    for s in subnets:
        net = ipaddress.ip_network(s["cidr"], strict=False)
        if "gateway" in s:
            assert ipaddress.ip_address(s["gateway"]) in net
        for span in s.get("exclude", []):
            version, first, last = parse_span(span)
            assert version == net.version and int(net[0]) <= first <= last <= int(net[-1])


def _vpc(**spec) -> dict:
    vpc = {"apiVersion": "vpcni.io/v1alpha1", "kind": "Vpc", "metadata": {"name": "blue"},
           "spec": {"subnets": [{"name": "default", "cidr": "172.16.32.0/24"}],
                    "namespaces": ["team-a"]}}
    vpc["spec"].update(spec)
    return vpc


BAD_VPCS = {
    "vni 0": _vpc(vni=0),
    "vni 2^24": _vpc(vni=16777216),
    "vni a string": _vpc(vni="300"),
    "mtu 575": _vpc(mtu=575),
    "mtu 9001": _vpc(mtu=9001),
    "backend": _vpc(backend="linux"),
    "interfaceKind": _vpc(interfaceKind="vf"),
    "no subnet": _vpc(subnets=[]),
    "cidr prefix": _vpc(subnets=[{"name": "a", "cidr": "172.16.32.0/33"}]),
    "cidr octet": _vpc(subnets=[{"name": "a", "cidr": "172.16.320.0/24"}]),
    "cidr text": _vpc(subnets=[{"name": "a", "cidr": "blue"}]),
    "cidr without length": _vpc(subnets=[{"name": "a", "cidr": "172.16.32.0"}]),
    "subnet name": _vpc(subnets=[{"name": "Default", "cidr": "172.16.32.0/24"}]),
    "subnet names repeat": _vpc(subnets=[{"name": "a", "cidr": "172.16.32.0/24"},
                                         {"name": "a", "cidr": "172.16.33.0/24"}]),
    "gateway": _vpc(subnets=[{"name": "a", "cidr": "172.16.32.0/24", "gateway": "gw"}]),
    "exclude": _vpc(subnets=[{"name": "a", "cidr": "172.16.32.0/24", "exclude": ["a-b-c"]}]),
    "namespace": _vpc(namespaces=["Team_A"]),
    "namespaces repeat": _vpc(namespaces=["a", "a"]),
    "unknown field": _vpc(vlan=3),
    "phase": {**_vpc(), "status": {"phase": "Done"}},
    "long name": {**_vpc(), "metadata": {"name": "b" * 51}},
}


@pytest.mark.parametrize("case", sorted(BAD_VPCS))
def test_invalid_vpcs_are_refused(base, case):
    bad = BAD_VPCS[case]
    assert crd_errors(base, bad) + name_errors(bad), case
    assert crd_errors(base, _vpc()) + name_errors(_vpc()) == []


def test_a_vpc_without_namespaces_is_refused(base):
    vpc = _vpc()
    del vpc["spec"]["namespaces"]
    assert crd_errors(base, vpc)


def structural_errors(schema: dict, where: str = "") -> list[str]:
    """What makes an apiextensions/v1 schema non-structural, for the constructs used here."""
    errors = []
    if "type" not in schema and not schema.get("x-kubernetes-int-or-string"):
        errors.append(f"{where}: no type")
    for junctor in ("anyOf", "allOf", "oneOf"):
        for sub in schema.get(junctor, []):
            banned = {"type", "description", "default", "additionalProperties", "nullable"}
            errors += [f"{where}.{junctor}: {k}" for k in banned & set(sub)]
    if schema.get("type") == "object" and where != ".metadata":
        if "properties" not in schema and "additionalProperties" not in schema \
                and not schema.get("x-kubernetes-preserve-unknown-fields"):
            errors.append(f"{where}: object without properties")
    for key, sub in schema.get("properties", {}).items():
        errors += structural_errors(sub, f"{where}.{key}")
    if "items" in schema:
        errors += structural_errors(schema["items"], f"{where}[]")
    if where == ".metadata" and set(schema) != {"type"}:
        errors.append(".metadata: only its type may be given")
    return errors


def schema_at(schema: dict, json_path: str) -> dict:
    for part in json_path.strip(".").split("."):
        schema = schema["properties"][part]
        if part == "metadata":
            break  # the API server's ObjectMeta
    return schema


def test_crds_are_structural_with_status_and_columns(base):
    crds = {o["spec"]["names"]["kind"]: o for o in base if o["kind"] == "CustomResourceDefinition"}
    assert set(crds) == {"Vpc", "VniClaim"}
    for kind, crd in crds.items():
        spec = crd["spec"]
        assert crd["metadata"]["name"] == f"{spec['names']['plural']}.{spec['group']}"
        assert (spec["group"], spec["scope"]) == ("vpcni.io", "Cluster")
        (version,) = spec["versions"]
        assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)
        schema = version["schema"]["openAPIV3Schema"]
        assert structural_errors(schema) == [], kind
        columns = {c["name"]: c for c in version["additionalPrinterColumns"]}
        assert {"VNI", "Age"} <= set(columns)
        for column in columns.values():
            target = schema_at(schema, column["jsonPath"])
            if column["type"] != "date":
                assert target["type"] == column["type"], column
    vpc = crds["Vpc"]["spec"]["versions"][0]
    assert vpc["subresources"] == {"status": {}}
    assert [c["name"] for c in vpc["additionalPrinterColumns"]
            if c.get("priority", 0) == 0] == ["VNI", "Phase", "Age"]
    props = vpc["schema"]["openAPIV3Schema"]["properties"]
    vni = props["spec"]["properties"]["vni"]
    assert (vni["type"], vni["minimum"], vni["maximum"]) == ("integer", 1, 16777215)
    assert set(props["status"]["properties"]["phase"]["enum"]) == {
        "Pending", "Ready", "Conflict", "Invalid"}
    # VniClaim has no status in docs/vpc-api.md: nothing but spec is written to it.
    claim = crds["VniClaim"]["spec"]["versions"][0]
    assert "subresources" not in claim
    assert set(claim["schema"]["openAPIV3Schema"]["properties"]) == {
        "apiVersion", "kind", "metadata", "spec"}


def test_crd_fields_are_the_documented_ones(base):
    """Every field of docs/vpc-api.md's examples is in the schema, and nothing else."""
    def fields(value, prefix=""):
        if isinstance(value, dict):
            for k, v in value.items():
                yield f"{prefix}.{k}"
                yield from fields(v, f"{prefix}.{k}")
        elif isinstance(value, list):
            for v in value:
                yield from fields(v, f"{prefix}[]")

    def schema_fields(schema, prefix=""):
        for k, v in schema.get("properties", {}).items():
            yield f"{prefix}.{k}"
            yield from schema_fields(v, f"{prefix}.{k}")
        if "items" in schema:
            yield from schema_fields(schema["items"], f"{prefix}[]")

    documented = {}
    for d in doc_examples():
        documented.setdefault(d["kind"], set()).update(
            f for f in fields({k: d[k] for k in ("spec", "status") if k in d}))
    for kind, names in documented.items():
        schema = crd_schema(base, kind)
        in_schema = {f for f in schema_fields(schema) if f.startswith((".spec", ".status"))}
        conditions = {f for f in in_schema if f.startswith(".status.conditions[]")}
        assert names == in_schema - conditions, kind


# ---------------------------------------------------------------- ServiceMonitor

LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
DURATION = (r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?"
            r"(([0-9]+)ms)?)$")
LABEL_NAME = r"^[a-zA-Z_][a-zA-Z0-9_]*$"
# The fields of monitoring.coreos.com/v1 ServiceMonitor this project uses, with their types
# as prometheus-operator's CRD defines them (its full CRD is not vendored here); anything
# else is refused so that a typo cannot pass.
SERVICEMONITOR = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {"type": "object", "required": ["name", "namespace"],
                     "additionalProperties": False,
                     "properties": {"name": {"type": "string"}, "namespace": {"type": "string"},
                                    "labels": LABELS}},
        "spec": {
            "type": "object", "required": ["selector", "endpoints"], "additionalProperties": False,
            "properties": {
                "selector": {"type": "object", "additionalProperties": False,
                             "properties": {"matchLabels": LABELS}},
                "namespaceSelector": {
                    "type": "object", "additionalProperties": False,
                    "properties": {"any": {"type": "boolean"},
                                   "matchNames": {"type": "array", "items": {"type": "string"}}}},
                "endpoints": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "required": ["port"], "additionalProperties": False,
                    "properties": {
                        "port": {"type": "string"},
                        "path": {"type": "string", "pattern": "^/"},
                        "scheme": {"enum": ["http", "https"]},
                        "interval": {"type": "string", "pattern": DURATION},
                        "scrapeTimeout": {"type": "string", "pattern": DURATION},
                        "relabelings": {"type": "array", "items": {
                            "type": "object", "additionalProperties": False,
                            "properties": {
                                "sourceLabels": {"type": "array",
                                                 "items": {"type": "string",
                                                           "pattern": LABEL_NAME}},
                                "targetLabel": {"type": "string"},
                                "action": {"enum": ["replace", "keep", "drop", "labelmap",
                                                    "labeldrop", "labelkeep"]},
                                "regex": {"type": "string"},
                                "replacement": {"type": "string"}}}}}}}}},
    },
}


def test_servicemonitor_scrapes_the_agents_metrics_port(full):
    monitor = get(full, "ServiceMonitor", "vpcni-agent")
    jsonschema.Draft7Validator(SERVICEMONITOR).validate(monitor)
    service = get(full, "Service", "vpcni-agent-metrics")
    assert service["spec"]["clusterIP"] == "None"
    labels = service["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert monitor["spec"]["namespaceSelector"]["matchNames"] == [NAMESPACE]
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"


# ---------------------------------------------------------------- references and security

def _selects(selector: dict, labels: dict) -> bool:
    return selector.items() <= labels.items()


@pytest.mark.parametrize("target", KUSTOMIZATIONS)
def test_references_resolve(target):
    objs = rendered(target)
    names = {(o["kind"], o["metadata"]["name"]) for o in objs}
    for w, pod in workloads(objs):
        labels = w["spec"]["template"]["metadata"]["labels"]
        assert _selects(w["spec"]["selector"]["matchLabels"], labels)
        if "serviceAccountName" in pod:
            assert ("ServiceAccount", pod["serviceAccountName"]) in names
        for v in pod.get("volumes", []):
            if "configMap" in v:
                assert ("ConfigMap", v["configMap"]["name"]) in names, v
        volumes = {v["name"] for v in pod.get("volumes", [])}
        for c in all_containers(pod):
            for ref in c.get("envFrom", []):
                assert ("ConfigMap", ref["configMapRef"]["name"]) in names
            for m in c.get("volumeMounts", []):
                assert m["name"] in volumes | {t["metadata"]["name"] for t in
                                               w["spec"].get("volumeClaimTemplates", [])}
            ports = {p["name"] for p in c.get("ports", [])}
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                handler = c.get(probe, {})
                port = (handler.get("httpGet") or handler.get("tcpSocket") or {}).get("port")
                if isinstance(port, str):
                    assert port in ports, (c["name"], probe)
            # Kubernetes expands $(VAR) and $$ in commands: none here, scripts do the shell work.
            assert "$" not in json.dumps(c.get("command", []) + c.get("args", [])), c["name"]
            if c["command"][0] == "/bin/sh":
                data = mounted_configmap(objs, pod, c, SCRIPTS)
                assert script_path(c) in data, c["name"]
        if w["kind"] == "StatefulSet":
            service = get(objs, "Service", w["spec"]["serviceName"])
            assert service["spec"]["clusterIP"] == "None"
            assert _selects(service["spec"]["selector"], labels)
    for o in objs:
        if o["kind"] == "Service":
            pods = [pod for w, pod in workloads(objs)
                    if _selects(o["spec"]["selector"], w["spec"]["template"]["metadata"]["labels"])]
            assert pods, f"Service {o['metadata']['name']} selects no pod"
            for port in o["spec"]["ports"]:
                assert any(port["targetPort"] in {p.get("name") for c in pod["containers"]
                                                  for p in c.get("ports", [])} for pod in pods)
        if o["kind"] == "PodDisruptionBudget":
            (w,) = [w for w, _ in workloads(objs)
                    if _selects(o["spec"]["selector"]["matchLabels"],
                                w["spec"]["template"]["metadata"]["labels"])]
            assert o["spec"]["minAvailable"] < w["spec"]["replicas"]


@pytest.mark.parametrize("target", KUSTOMIZATIONS)
def test_pods_are_confined(target):
    for w, pod in workloads(rendered(target)):
        assert pod["nodeSelector"]["kubernetes.io/os"] == "linux", w["metadata"]["name"]
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for c in all_containers(pod):
            ctx = c.get("securityContext", {})
            allowed = target in PRIVILEGED_AGENT and w["metadata"]["name"] == "vpcni-agent" \
                and c["name"] == "agent"
            assert bool(ctx.get("privileged")) == allowed, (target, c["name"])
            assert ctx["capabilities"]["drop"] == ["ALL"], c["name"]
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][kind]), (c["name"], kind)


def caps(c: dict) -> set[str]:
    return set(c["securityContext"]["capabilities"].get("add", []))


def test_agent_pod(base):
    ds = get(base, "DaemonSet", "vpcni-agent")
    pod = ds["spec"]["template"]["spec"]
    assert pod["hostNetwork"] and pod["hostPID"]
    assert pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert pod["priorityClassName"] == "system-node-critical"
    assert caps(container(pod, "agent")) == {"NET_ADMIN", "SYS_ADMIN", "NET_RAW", "SYS_PTRACE"}
    assert caps(container(pod, "gobgpd")) == set() == caps(container(pod, "install"))
    hostpaths = {v["hostPath"]["path"]: v["name"] for v in pod["volumes"] if "hostPath" in v}
    mounts = {m["mountPath"]: m for m in container(pod, "agent")["volumeMounts"]}
    for path in ("/var/lib/cni", "/etc/cni/net.d", "/run/netns", "/opt/cni/bin"):
        assert mounts[path]["name"] == hostpaths[path], path
    assert mounts["/run/netns"]["mountPropagation"] == "HostToContainer"
    assert not mounts["/var/lib/cni"].get("readOnly")


def test_routing_makes_the_agent_privileged_for_a_bidirectional_netns_mount():
    ds = get(rendered("overlays/routing"), "DaemonSet", "vpcni-agent")
    agent = container(ds["spec"]["template"]["spec"], "agent")
    mounts = {m["mountPath"]: m for m in agent["volumeMounts"]}
    assert mounts["/run/netns"]["mountPropagation"] == "Bidirectional"
    assert agent["securityContext"]["privileged"] is True
    # Everything else of the agent's confinement stays.
    assert agent["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert agent["securityContext"]["readOnlyRootFilesystem"] is True


def test_reflector_pods(full):
    # The full overlay picks gobgpd reflectors (graceful restart helpers).
    gobgpd = get(full, "StatefulSet", "vpcni-route-reflector")
    frr = get(rendered("overlays/frr-reflectors"), "StatefulSet", "vpcni-route-reflector")
    for sts in (frr, gobgpd):
        assert sts["spec"]["replicas"] == 2
        pod = sts["spec"]["template"]["spec"]
        assert pod["hostNetwork"] and pod["nodeSelector"]["vpcni.io/route-reflector"] == "true"
        assert pod["automountServiceAccountToken"] is False
        assert "hostPath" not in json.dumps(pod["volumes"])
    assert get(full, "PodDisruptionBudget", "vpcni-route-reflector")["spec"]["minAvailable"] == 1
    assert caps(gobgpd["spec"]["template"]["spec"]["containers"][0]) == {"NET_BIND_SERVICE"}
    assert caps(frr["spec"]["template"]["spec"]["containers"][0]) == {
        "NET_BIND_SERVICE", "NET_ADMIN", "NET_RAW", "SYS_ADMIN", "SETUID", "SETGID", "KILL",
        "DAC_OVERRIDE"}  # each one tried: see components/frr-reflectors/statefulset.yaml


def test_controller_deployment_runs_what_vpcni_controller_takes(base):
    from vpcni.controller import logic

    deploy = get(base, "Deployment", "vpcni-controller")
    assert deploy["spec"]["replicas"] == 1
    assert deploy["spec"]["strategy"] == {"type": "Recreate"}
    pod = deploy["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["command"][0] == "/opt/vpcni/venv/bin/vpcnictl"
    args = build_parser().parse_args(c["command"][1:])
    assert args.command == "controller" and args.standalone  # no peering, no leader election
    port = next(p for p in c["ports"] if p["name"] == c["livenessProbe"]["httpGet"]["port"])
    assert args.liveness == f"http://0.0.0.0:{port['containerPort']}" \
        f"{c['livenessProbe']['httpGet']['path']}"
    assert pod["serviceAccountName"] == "vpcni-controller"
    assert pod["securityContext"]["runAsNonRoot"] is True
    # Its config file: where $VPCNI_CONTROLLER_CONFIG says, valid for the controller.
    env = container_env(base, c)
    directory, name = env["VPCNI_CONTROLLER_CONFIG"].rsplit("/", 1)
    assert mounted_configmap(base, pod, c, directory) == configmap_data(base, "vpcni-controller")
    for target in (".", "overlays/etcd-ipam"):
        objs = rendered(target)
        cfg = logic.ControllerConfig.model_validate_json(
            configmap_data(objs, "vpcni-controller")[name])
    # The bindings it writes are the ConfigMap and key the agents mount.
    assert (cfg.bindingsNamespace, cfg.bindingsConfigMap) == (NAMESPACE, "vpcni-tenancy")
    assert logic.BINDINGS_KEY == "bindings.json"


def test_crds_take_what_the_controller_writes_and_reads(base):
    from vpcni.controller import logic

    vpcs = [d for _, d in examples() if d["kind"] == "Vpc"]
    for vpc in vpcs:
        logic.parse_vpc(vpc)  # every Vpc the CRD admits, the controller takes
    blue = {**vpcs[0], "metadata": {"name": "blue", "uid": "6f1c1d0e-8d7a-4c53-9d38-3f7f2d1e9a10"}}
    claim = logic.claim_object(300, blue)
    assert crd_errors(base, claim) + name_errors(claim) == []


def rules(objs: list[dict], kind: str, name: str) -> set[tuple]:
    out = set()
    for r in get(objs, kind, name)["rules"]:
        for group in r["apiGroups"]:
            for resource in r["resources"]:
                for verb in r["verbs"]:
                    out.add((group, resource, verb, tuple(r.get("resourceNames", ()))))
    return out


def test_rbac_is_least_privilege(base):
    for o in base:
        if o["kind"] in ("Role", "ClusterRole"):
            assert "*" not in json.dumps(o["rules"]), o["metadata"]["name"]
    # The agent calls no API: no role, no token in its pods.
    assert not [o for o in base if o["kind"] in ("Role", "ClusterRole", "RoleBinding",
                                                 "ClusterRoleBinding")
                and o["metadata"]["name"] == "vpcni-agent"]
    assert get(base, "ServiceAccount", "vpcni-agent")["automountServiceAccountToken"] is False
    assert rules(base, "ClusterRole", "vpcni-controller") == {
        *{("vpcni.io", "vpcs", v, ()) for v in ("get", "list", "watch", "patch")},
        ("vpcni.io", "vpcs/status", "update", ()),
        *{("vpcni.io", "vniclaims", v, ()) for v in ("create", "get", "list", "delete")},
        *{("k8s.cni.cncf.io", "network-attachment-definitions", v, ())
          for v in ("create", "get", "list", "update", "delete")},
        ("", "events", "create", ()),
        *{("apiextensions.k8s.io", "customresourcedefinitions", v, ()) for v in ("list", "watch")},
    }
    assert rules(base, "Role", "vpcni-controller") == {
        ("", "configmaps", v, ("vpcni-tenancy",)) for v in ("get", "update")}
    for kind in ("RoleBinding", "ClusterRoleBinding"):
        for name in ("vpcni-controller",):
            binding = get(base, kind, name)
            assert binding["roleRef"]["name"] == name
            assert binding["roleRef"]["kind"] == kind.replace("Binding", "")
            assert binding["subjects"] == [{"kind": "ServiceAccount", "name": name,
                                            "namespace": NAMESPACE}]
    accounts = {pod["serviceAccountName"] for _, pod in workloads(base)}
    assert accounts == {"vpcni-agent", "vpcni-controller"}


# ---------------------------------------------------------------- the scripts, run

def write_scripts(data: dict, directory: Path, subs: dict[str, str]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in data.items():
        for old, new in subs.items():
            text = text.replace(old, new)
        (directory / name).write_text(text)
    return directory


def fake(bin_dir: Path, name: str, body: str = "") -> Path:
    """An executable `name` that records its arguments in <bin_dir>/<name>.args."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    path = bin_dir / name
    path.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" >> "{bin_dir}/{name}.args"\n{body}\n')
    path.chmod(0o755)
    return path


def run(script: Path, env: dict, bin_dir: Path | None = None, timeout: float = 60):
    path = f"{bin_dir}:{os.environ['PATH']}" if bin_dir else os.environ["PATH"]
    return subprocess.run(["/bin/sh", str(script)], env={**env, "PATH": path},
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("target", KUSTOMIZATIONS)
def test_scripts_parse(target, tmp_path):
    for o in rendered(target):
        if o["kind"] == "ConfigMap" and o["metadata"]["name"].count("-scripts-"):
            for name, text in o["data"].items():
                if name.endswith(".py"):
                    compile(text, name, "exec")
                else:
                    assert text.startswith("#!/bin/sh\n") or name == "require-listed.sh", name
                    out = subprocess.run(["/bin/sh", "-n"], input=text, capture_output=True,
                                         text=True)
                    assert out.returncode == 0, (name, out.stderr)


def agent_parts(objs: list[dict]):
    ds = get(objs, "DaemonSet", "vpcni-agent")
    pod = ds["spec"]["template"]["spec"]
    return pod, mounted_configmap(objs, pod, container(pod, "install"), SCRIPTS)


def write_node_config(objs: list[dict], tmp_path: Path, **fields):
    pod, data = agent_parts(objs)
    scripts = write_scripts(data, tmp_path / "scripts", {'"/etc/vpcni"': repr(str(tmp_path))})
    env = container_env(objs, container(pod, "install"), **fields)
    return subprocess.run([sys.executable, str(scripts / "write-node-config.py")],
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=60)


def test_node_config_is_what_the_agent_and_the_shim_read(base, tmp_path):
    out = write_node_config(base, tmp_path)
    assert out.returncode == 0, out.stderr
    node = NodeConfig.load(str(tmp_path / "node.json"))
    pod, data = agent_parts(base)
    agent, gobgpd = container(pod, "agent"), container(pod, "gobgpd")
    # The agent serves with the file the host's shim reads by default.
    assert f"--node-config {DEFAULT_NODE_CONFIG}" in data[script_path(agent)]
    hostpaths = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    install_mounts = {m["mountPath"]: m["name"] for m in container(pod, "install")["volumeMounts"]}
    assert hostpaths[install_mounts[str(Path(DEFAULT_NODE_CONFIG).parent)]] == "/etc/vpcni"

    def host_dir(c: dict, path: Path) -> str:
        """The host directory behind `path` in container `c` (the longest mount holding it)."""
        mounts = [m for m in c["volumeMounts"] if str(path).startswith(m["mountPath"] + "/")]
        m = max(mounts, key=lambda m: len(m["mountPath"]))
        return hostpaths[m["name"]] + str(path)[len(m["mountPath"]):]

    # Sockets, state and log on the host: the shim (a host process) connects to the agent.
    assert host_dir(agent, node.agentSocket) == str(node.agentSocket)
    for path in (node.stateDir / "x", node.logFile):
        assert host_dir(agent, path) == str(path)
    assert host_dir(gobgpd, node.evpn.gobgpdSocket) == host_dir(agent, node.evpn.gobgpdSocket)
    target = f"unix://{node.evpn.gobgpdSocket}"
    assert f"--api-hosts {target}" in data[script_path(gobgpd)]
    for probe in ("livenessProbe", "readinessProbe"):
        assert gobgpd[probe]["exec"]["command"] == ["gobgp", "--target", target, "global"]
    # Health and metrics on the node's IP, the port the probes and the Service use.
    env = container_env(base, container(pod, "install"))
    host, port = node.healthAddress.rsplit(":", 1)
    assert host == env["NODE_IP"] == str(node.vtepAddress)
    (metrics,) = agent["ports"]
    assert metrics["containerPort"] == int(port)
    for probe, path in (("startupProbe", "/healthz"), ("livenessProbe", "/healthz"),
                        ("readinessProbe", "/readyz")):
        assert agent[probe]["httpGet"] == {"path": path, "port": metrics["name"]}
    assert node.evpn.asn == int(env["ASN"])


@pytest.mark.parametrize("node_ip,message", [("192.0.2.7", "is not in VTEP_PREFIX"),
                                             ("2001:db8::7", "is not IPv4")])
def test_node_config_refuses_a_node_outside_the_fabric(base, tmp_path, node_ip, message):
    out = write_node_config(base, tmp_path, **{"status.hostIP": node_ip})
    assert out.returncode != 0 and message in out.stderr
    assert not (tmp_path / "node.json").exists()


def test_tenancy_bindings_the_controller_writes_are_what_the_agent_reads(base, tmp_path):
    from vpcni.controller import logic

    tenancy = get(base, "ConfigMap", "vpcni-tenancy")
    assert "data" not in tenancy  # the controller's to write: apply never resets it
    pod, _ = agent_parts(base)
    volume = next(v for v in pod["volumes"]
                  if v.get("configMap", {}).get("name") == "vpcni-tenancy")
    (mount,) = [m for m in container(pod, "agent")["volumeMounts"] if m["name"] == volume["name"]]
    assert "subPath" not in mount  # the kubelet updates it in place
    assert write_node_config(base, tmp_path).returncode == 0
    node = NodeConfig.load(str(tmp_path / "node.json"))
    assert node.tenancy.enforce is True
    assert str(node.tenancy.bindingsFile) == f"{mount['mountPath']}/{logic.BINDINGS_KEY}"


def test_install_script_installs_both_executables_and_the_node_config(base, tmp_path):
    pod, data = agent_parts(base)
    bin_dir, cni_bin = tmp_path / "fakes", tmp_path / "cni-bin"
    # As install-cni does: the shim under both names.
    vpcnictl = fake(bin_dir, "vpcnictl", 'touch "$3/vpcni"; chmod 0755 "$3/vpcni"; '
                                         'ln -f "$3/vpcni" "$3/vpcni-ipam"')
    scripts = write_scripts(data, tmp_path / "scripts", {
        "/opt/vpcni/venv/bin/vpcnictl": str(vpcnictl),
        "/opt/vpcni/venv/bin/python": sys.executable,
        "/host/opt/cni/bin": str(cni_bin),
        '"/etc/vpcni"': repr(str(tmp_path)),
        "/etc/vpcni/tenancy": str(tmp_path / "tenancy"),
    })
    cni_bin.mkdir()
    install = container(pod, "install")
    out = run(scripts / script_path(install), {**os.environ, **container_env(base, install)})
    assert out.returncode == 0, out.stderr
    args = (bin_dir / "vpcnictl.args").read_text().split()
    assert args == ["install-cni", "--dest", str(cni_bin)]
    build_parser().parse_args(args)  # what vpcnictl takes
    for name in ("vpcni", "vpcni-ipam"):
        assert os.access(cni_bin / name, os.X_OK), name
    assert sorted(p.name for p in cni_bin.iterdir()) == ["vpcni", "vpcni-ipam"]
    NodeConfig.load(str(tmp_path / "node.json"))
    assert (tmp_path / "tenancy").is_dir()


def test_gobgpd_sidecar_renders_from_the_fabric_and_restarts_without_r(base, tmp_path):
    pod, data = agent_parts(base)
    gobgpd = container(pod, "gobgpd")
    bin_dir = tmp_path / "fakes"
    fake(bin_dir, "gobgpd")
    run_dir, vpcni_run = tmp_path / "run-gobgpd", tmp_path / "run-vpcni"
    run_dir.mkdir(), (vpcni_run / "gobgpd").mkdir(parents=True)
    scripts = write_scripts(data, tmp_path / "scripts", {
        "/opt/vpcni/venv/bin/vpcnictl": installed_executable("vpcnictl"),
        "/run/gobgpd": str(run_dir), "/run/vpcni": str(vpcni_run)})
    env = container_env(base, gobgpd)
    for _ in range(2):
        out = run(scripts / script_path(gobgpd), env, bin_dir)
        assert out.returncode == 0, out.stderr
    config = tomllib.loads((run_dir / "gobgpd.toml").read_text())
    assert config["global"]["config"] == {"as": int(env["ASN"]), "router-id": env["NODE_IP"],
                                          "port": -1}
    neighbors = [n["config"]["neighbor-address"] for n in config["neighbors"]]
    assert neighbors == env["REFLECTORS"].split()
    runs = (bin_dir / "gobgpd.args").read_text().split("-f\n")[1:]
    assert "--api-hosts" in runs[0] and f"unix://{vpcni_run}/gobgpd/gobgpd.sock" in runs[0]
    # Never -r: gobgpd 3.10 would hold its routes until every reflector sent End-of-RIB
    # (the reflectors keep ours through graceful restart without it: test_lab.py).
    assert all("-r" not in run.split() for run in runs) and len(runs) == 2


def reflector_run(objs: list[dict], tmp_path: Path, node_ip: str) -> tuple[dict, Path]:
    """The reflector pod's containers run in order (init containers first), as on node
    `node_ip`, with fake daemons; {container name: (container, env, result)}."""
    pod = get(objs, "StatefulSet", "vpcni-route-reflector")["spec"]["template"]["spec"]
    bin_dir = tmp_path / "fakes"
    # bgpd: fails once (frr-run.sh starts it again), then stops the script as kubelet would.
    fake(bin_dir, "bgpd", f'if [ -e "{bin_dir}/failed" ]; then kill -TERM $PPID; exit 0; fi\n'
                          f'touch "{bin_dir}/failed"; exit 3')
    fake(bin_dir, "gobgpd")
    subs = {"/opt/vpcni/venv/bin/vpcnictl": installed_executable("vpcnictl"),
            "/usr/lib/frr/bgpd": str(bin_dir / "bgpd"),
            "/etc/frr": str(tmp_path / "etc-frr"), "/run/gobgpd": str(tmp_path / "run-gobgpd")}
    for directory in ("etc-frr", "run-gobgpd"):
        (tmp_path / directory).mkdir()
    results = {}
    for c in all_containers(pod):
        scripts = write_scripts(mounted_configmap(objs, pod, c, SCRIPTS),
                                tmp_path / f"scripts-{c['name']}", subs)
        env = container_env(objs, c, **{"metadata.name": "vpcni-route-reflector-0",
                                        "status.hostIP": node_ip})
        out = run(scripts / script_path(c), env, bin_dir)
        results[c["name"]] = (c, env, out)
        if out.returncode != 0:
            break
    return results, tmp_path


@pytest.fixture(params=["frr-reflectors", "gobgpd-reflectors"])
def reflector_overlay(request):
    return request.param, rendered(f"overlays/{request.param}")


def test_reflector_runs_the_fabrics_config(reflector_overlay, tmp_path):
    name, objs = reflector_overlay
    fabric = configmap_data(objs, "vpcni-fabric")
    node_ip = fabric["REFLECTORS"].split()[0]
    # Not the node IP: the node's own gobgpd, on the same node, has that one.
    router_id = fabric["REFLECTOR_ROUTER_IDS"].split()[0]
    assert router_id != node_ip
    results, tmp = reflector_run(objs, tmp_path, node_ip)
    for c, env, out in results.values():
        assert out.returncode == 0, (c["name"], out.stderr)
    if name == "frr-reflectors":
        assert list(results) == ["render", "frr"]
        conf = (tmp / "etc-frr" / "bgpd.conf").read_text()
        assert f"router bgp {fabric['ASN']}\n" in conf
        assert f" bgp router-id {router_id}\n" in conf
        assert f" bgp listen range {fabric['VTEP_PREFIX']} peer-group VTEP\n" in conf
        calls = (tmp / "fakes" / "bgpd.args").read_text().split("-Z\n")
        assert len(calls) == 3 and f"-f\n{tmp}/etc-frr/bgpd.conf" in calls[1]  # started twice
        assert "starting it again in 1s" in results["frr"][2].stderr
    else:
        ((c, env, out),) = results.values()
        assert c["name"] == "gobgpd"
        config = tomllib.loads((tmp / "run-gobgpd" / "gobgpd.toml").read_text())
        assert config["global"]["config"]["router-id"] == router_id
        assert config["dynamic-neighbors"][0]["config"]["prefix"] == fabric["VTEP_PREFIX"]
        args = (tmp / "fakes" / "gobgpd.args").read_text().split()
        assert args[args.index("--api-hosts") + 1] == f"unix://{tmp}/run-gobgpd/gobgpd.sock"
        for probe in ("livenessProbe", "readinessProbe"):
            assert c[probe]["exec"]["command"] == [
                "gobgp", "--target", "unix:///run/gobgpd/gobgpd.sock", "global"]


def test_reflector_not_in_the_fabric_refuses_to_run(reflector_overlay, tmp_path):
    _, objs = reflector_overlay
    results, _ = reflector_run(objs, tmp_path, "198.51.100.99")
    ((_, _, out),) = results.values()  # the first container refuses; nothing runs after it
    assert out.returncode == 1 and "not in REFLECTORS of ConfigMap vpcni-fabric" in out.stderr


def controller_config(objs: list[dict]) -> dict:
    return json.loads(configmap_data(objs, "vpcni-controller")["controller.json"])


def test_etcd_overlay_is_one_cluster_the_controller_points_at():
    objs = rendered("overlays/etcd-ipam")
    sts = get(objs, "StatefulSet", "vpcni-etcd")
    (c,) = sts["spec"]["template"]["spec"]["containers"]
    peers = get(objs, "Service", sts["spec"]["serviceName"])
    assert peers["spec"]["publishNotReadyAddresses"] is True
    assert sts["spec"]["podManagementPolicy"] == "Parallel"
    env = container_env(objs, c, **{"metadata.name": "vpcni-etcd-1"})
    etcd = {k: v for k, v in env.items() if k.startswith("ETCD_")}
    assert "$(" not in json.dumps(etcd)  # every reference resolved
    # Every setting is a flag of etcd (ETCD_<FLAG> is --<flag>): Debian's etcd here.
    flags = set(re.findall(r"--([a-z0-9-]+)", subprocess.run(
        ["etcd", "--help"], capture_output=True, text=True, timeout=30).stdout))
    assert {k[5:].lower().replace("_", "-") for k in etcd} <= flags
    domain = f"{peers['metadata']['name']}.{NAMESPACE}.svc"
    replicas = sts["spec"]["replicas"]
    assert replicas == 3
    assert etcd["ETCD_INITIAL_CLUSTER"] == ",".join(
        f"vpcni-etcd-{i}=http://vpcni-etcd-{i}.{domain}:2380" for i in range(replicas))
    assert etcd["ETCD_NAME"] == "vpcni-etcd-1"
    assert etcd["ETCD_INITIAL_ADVERTISE_PEER_URLS"] == f"http://vpcni-etcd-1.{domain}:2380"
    (data,) = [m for m in c["volumeMounts"]
               if m["name"] in {t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]}]
    assert etcd["ETCD_DATA_DIR"].startswith(data["mountPath"] + "/")
    # The controller renders NADs whose store is this etcd's client Service.
    store = EtcdStoreConfig.model_validate(controller_config(objs)["ipamStore"])
    (endpoint,) = store.endpoints
    client = get(objs, "Service", "vpcni-etcd")
    assert endpoint == (f"http://{client['metadata']['name']}.{NAMESPACE}.svc:"
                        f"{client['spec']['ports'][0]['port']}")
    # ... and the rest of its config is the base's.
    base_config = controller_config(rendered("."))
    EtcdStoreConfig.model_validate(base_config.pop("ipamStore"))
    assert {k: v for k, v in controller_config(objs).items() if k != "ipamStore"} == base_config


def test_seed_nads_are_valid_vpcni_configs():
    docs = [d for d in yaml.safe_load_all((DEPLOY / "examples" / "seed-pods.yaml").read_text())
            if d]
    nads = [d for d in docs if d["kind"] == "NetworkAttachmentDefinition"]
    assert {n["metadata"]["name"] for n in nads} == {"pod-a", "pod-b"}
    for nad in nads:
        cfg = NetworkConfig.parse(json.loads(nad["spec"]["config"]))
        assert cfg.type == "vpcni" and cfg.vni == 300
    for pod in (d for d in docs if d["kind"] == "Pod"):
        kubernetes_validate.validate(pod, KUBERNETES, strict=True)
