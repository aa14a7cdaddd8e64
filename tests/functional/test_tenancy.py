"""Tenancy enforced on the node: an ADD joins a VPC only from a namespace bound to it.

The bindings are the file the VPC controller renders (docs/vpc-api.md); the
node reads it on every ADD that follows a change, without a restart. Both
modes (agent, standalone) go through the same handler; both are run.
"""

from __future__ import annotations

import json

import pytest

from tests.functional.leftovers import assert_no_leftovers
from tests.functional.outcome import failed, ok
from vpcni.lab.cluster import Cluster, seed_network
from vpcni.lab.netns import Sandbox

pytestmark = pytest.mark.functional

VNI, OTHER_VNI = 4400, 4401


@pytest.fixture(scope="module", params=["agent", "standalone"])
def world(request):
    box = Sandbox()
    try:
        cluster = Cluster(box)
        bindings = box.dir("shared") / "bindings.json"
        node = cluster.add_node("n1", "198.51.100.1", agent=request.param == "agent",
                                tenancy={"bindingsFile": str(bindings)})
        yield cluster, node, bindings
    finally:
        box.cleanup()


def bind(path, vnis: dict) -> None:
    doc = {"version": 1, "vnis": {str(vni): {"vpc": vpc, "namespaces": namespaces}
                                  for vni, (vpc, namespaces) in vnis.items()}}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc))
    tmp.replace(path)  # as kubelet swaps a ConfigMap volume: a new file


def add(node, pod, vni, namespace, addr="172.16.44.2/24", name="tenant"):
    args = f"K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={pod.name}" if namespace else ""
    return node.cni("ADD", seed_network(name, vni, addr), pod.container_id, pod.netns,
                    args=args)


def delete(node, pod, vni, namespace="", name="tenant"):
    args = f"K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={pod.name}" if namespace else ""
    return node.cni("DEL", seed_network(name, vni), pod.container_id, pod.netns, args=args)


def test_unknown_bindings_fail_closed(world):
    cluster, node, bindings = world
    bindings.unlink(missing_ok=True)
    pod = cluster.add_pod(node, "nofile")
    body = failed(add(node, pod, VNI, "team-a"), code=11)
    assert str(bindings) in body["msg"] and "fails closed" in body["msg"]
    bindings.write_text('{"version": 1, "vnis": {"4400": {"vpc": "Blue!"}}}')
    body = failed(add(node, pod, VNI, "team-a"), code=7)
    assert str(bindings) in body["msg"] and "vnis.4400.vpc" in body["msg"]
    assert_no_leftovers(node, "kernel", pods=[pod])


def test_bound_namespace_attaches_and_is_recorded(world):
    cluster, node, bindings = world
    bind(bindings, {VNI: ("blue", ["team-a"])})
    pod = cluster.add_pod(node, "bound")
    ok(add(node, pod, VNI, "team-a"))
    record = node.state_dir / "attachments" / "tenant" / pod.container_id / "eth1.json"
    att = json.loads(record.read_text())
    assert (att["pod_namespace"], att["pod_name"], att["vpc"]) == ("team-a", "bound", "blue")
    log = (node.dir / "vpcni.log").read_text()
    assert "(VPC blue)" in log and "pod team-a/bound" in log
    ok(delete(node, pod, VNI, "team-a"))


def test_other_namespace_no_namespace_and_unbound_vni_are_refused(world):
    cluster, node, bindings = world
    bind(bindings, {VNI: ("blue", ["team-a"]), OTHER_VNI: ("red", [])})
    pod = cluster.add_pod(node, "intruder")
    body = failed(add(node, pod, VNI, "team-b"), code=101)
    assert "team-b" in body["msg"] and "VPC blue" in body["msg"], body
    body = failed(add(node, pod, VNI, None), code=101)
    assert "K8S_POD_NAMESPACE" in body["msg"]
    body = failed(add(node, pod, 4499, "team-a"), code=101)
    assert "VNI 4499" in body["msg"] and "no VPC" in body["msg"]
    body = failed(add(node, pod, OTHER_VNI, "team-a"), code=101)
    assert "VPC red" in body["msg"] and "bound: none" in body["msg"]
    assert_no_leftovers(node, "kernel", pods=[pod])


def test_a_binding_change_takes_effect_at_once_and_del_always_works(world):
    cluster, node, bindings = world
    bind(bindings, {VNI: ("blue", ["team-a"])})
    pod = cluster.add_pod(node, "mover")
    failed(add(node, pod, VNI, "team-c"), code=101)
    bind(bindings, {VNI: ("blue", ["team-a", "team-c"])})
    ok(add(node, pod, VNI, "team-c"))
    # Unbound again, and even with the bindings gone, its DEL cleans up.
    bind(bindings, {VNI: ("blue", ["team-a"])})
    bindings.unlink()
    ok(delete(node, pod, VNI, "team-c"))
    assert_no_leftovers(node, "kernel", pods=[pod])


def test_status_says_who_holds_the_attachments(world):
    cluster, node, bindings = world
    if node.node_config.get("mode") != "agent":
        pytest.skip("status is the agent's")
    bind(bindings, {VNI: ("blue", ["team-a"])})
    pod = cluster.add_pod(node, "counted")
    ok(add(node, pod, VNI, "team-a"))
    try:
        tenancy = node.agent_status()["tenancy"]
        assert tenancy["enforced"] is True and tenancy["bindingsFile"] == str(bindings)
        assert tenancy["attachmentsPerNamespace"].get("team-a") == 1
    finally:
        ok(delete(node, pod, VNI, "team-a"))
