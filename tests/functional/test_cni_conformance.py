"""CNI conformance of the installed `vpcni`, executed in a node namespace as a runtime does.

Every test runs once per spec version vpcni supports and once per backend
(conftest.BACKENDS): ADD (shape, sandbox, ips[].interface, the interface
really in the pod with the returned MAC and address), CHECK (passes, then
fails naming what was broken), DEL (nothing left), VERSION, and for 1.1.0
STATUS and GC.
"""

from __future__ import annotations

import json

import pytest

from tests.functional.leftovers import addresses, assert_no_leftovers, links, vp_links
from tests.functional.netstate import pod_interface
from tests.functional.outcome import failed, ok
from tests.spec_shapes import check_result, check_version_output
from vpcni.cni import versions
from vpcni.lab.cluster import seed_network

pytestmark = pytest.mark.functional

VERSIONS = versions.SUPPORTED
CHECK_SINCE = "0.4.0"
NET = "vpc-conf"
VNI = 4100


def network(version: str, addr: str = "172.16.41.2/24", **extra) -> dict:
    return seed_network(NET, VNI, addr, version=version, **extra)


def add(node, pod, version: str, addr: str = "172.16.41.2/24") -> dict:
    res = ok(node.cni("ADD", network(version, addr), pod.container_id, pod.netns))
    result = json.loads(res.stdout)
    check_result(result, version)
    return result


@pytest.mark.parametrize("version", VERSIONS)
def test_add_del(cluster, node, backend, version):
    pod = cluster.add_pod(node, "a")
    result = add(node, pod, version)
    idx, itf = pod_interface(result, pod.netns)
    assert result["ips"], result
    assert [ip["interface"] for ip in result["ips"]] == [idx] * len(result["ips"])
    assert [ip["address"] for ip in result["ips"]] == ["172.16.41.2/24"]

    in_pod = links(pod.ns.name)["eth1"]
    assert in_pod["address"] == itf["mac"].lower()
    assert "UP" in in_pod["flags"]
    assert "172.16.41.2/24" in addresses(pod.ns.name, "eth1")
    if "mtu" in itf:
        assert in_pod["mtu"] == itf["mtu"]
    for host in (i for i in result["interfaces"] if "sandbox" not in i):
        assert host["name"] in vp_links(node), f"host interface {host} not in the node"

    res = ok(node.cni("DEL", network(version), pod.container_id, pod.netns))
    assert res.stdout == ""
    assert_no_leftovers(node, backend, pods=[pod], macs=[itf["mac"]])


@pytest.mark.parametrize("version", VERSIONS)
def test_check_then_break(cluster, node, backend, version):
    pod = cluster.add_pod(node, "a")
    result = add(node, pod, version)
    _, itf = pod_interface(result, pod.netns)
    cfg = network(version, prevResult=result)
    if not versions.at_least(version, CHECK_SINCE):
        body = failed(node.cni("CHECK", cfg, pod.container_id, pod.netns), version, 1)
        assert "CHECK" in body["msg"] and CHECK_SINCE in body["msg"]
    else:
        res = ok(node.cni("CHECK", cfg, pod.container_id, pod.netns))
        assert res.stdout == ""
        pod.ns.ip("link", "del", "eth1")
        body = failed(node.cni("CHECK", cfg, pod.container_id, pod.netns), version)
        assert "eth1" in body["msg"] and "missing" in body["msg"], body
    ok(node.cni("DEL", network(version), pod.container_id, pod.netns))
    assert_no_leftovers(node, backend, pods=[pod], macs=[itf["mac"]])


BREAKAGES = [
    # (id, `ip` arguments run in the pod, words the CHECK error must contain)
    ("mtu", ("link", "set", "eth1", "mtu", "1300"), ("eth1", "MTU", "1300")),
    ("address", ("addr", "del", "172.16.41.2/24", "dev", "eth1"), ("eth1", "172.16.41.2/24")),
    ("down", ("link", "set", "eth1", "down"), ("eth1", "down")),
    ("mac", ("link", "set", "eth1", "address", "02:42:42:42:42:42"),
     ("eth1", "MAC", "02:42:42:42:42:42")),
]


@pytest.mark.parametrize("breakage,words", [b[1:] for b in BREAKAGES],
                         ids=[b[0] for b in BREAKAGES])
def test_check_names_what_differs(cluster, node, backend, breakage, words):
    version = versions.CURRENT
    pod = cluster.add_pod(node, "a")
    result = add(node, pod, version)
    cfg = network(version, prevResult=result)
    pod.ns.ip(*breakage)  # test_check_then_break has seen CHECK pass before any breakage
    body = failed(node.cni("CHECK", cfg, pod.container_id, pod.netns), version)
    for word in words:
        assert word.lower() in body["msg"].lower(), body


def test_check_node_side(cluster, node, backend):
    """CHECK also looks at the node end: a host interface removed behind vpcni's back."""
    version = versions.CURRENT
    pod = cluster.add_pod(node, "a")
    result = add(node, pod, version)
    [host] = [i["name"] for i in result["interfaces"] if "sandbox" not in i]
    node.ns.ip("link", "del", host)
    body = failed(node.cni("CHECK", network(version, prevResult=result), pod.container_id,
                          pod.netns), version)
    assert host in body["msg"], body
    ok(node.cni("DEL", network(version), pod.container_id, pod.netns))
    assert_no_leftovers(node, backend, pods=[pod])


def test_check_unknown_container(cluster, node):
    pod = cluster.add_pod(node, "a")
    body = failed(node.cni("CHECK", network(versions.CURRENT), pod.container_id, pod.netns),
                  versions.CURRENT, 3)
    assert pod.container_id in body["msg"]


@pytest.mark.parametrize("version", VERSIONS)
def test_version(node, version):
    res = ok(node.cni("VERSION", {"cniVersion": version}))
    body = json.loads(res.stdout)
    check_version_output(body, VERSIONS)
    assert body["cniVersion"] == version


def test_version_empty_stdin(node):
    res = ok(node.cni("VERSION", ""))
    check_version_output(json.loads(res.stdout), VERSIONS)


def test_status(node):
    res = ok(node.cni("STATUS", network("1.1.0")))
    assert res.stdout == ""


def test_status_vtep_address_absent(cluster, backend):
    """A node whose VTEP address is not in its namespace cannot serve ADD: code 50."""
    node = cluster.add_node("n1", "198.51.100.1", backend=backend, vtepAddress="198.51.100.99")
    body = failed(node.cni("STATUS", network("1.1.0")), "1.1.0", 50)
    assert "198.51.100.99" in body["msg"], body
    pod = cluster.add_pod(node, "a")
    body = failed(node.cni("ADD", network("1.1.0"), pod.container_id, pod.netns), "1.1.0")
    assert "198.51.100.99" in body["msg"], body
    assert_no_leftovers(node, backend, pods=[pod])


def test_gc(cluster, node, backend):
    """GC keeps what cni.dev/valid-attachments lists (or the older cni.dev/attachments)."""
    version = "1.1.0"
    keep, drop = cluster.add_pod(node, "keep"), cluster.add_pod(node, "drop")
    kept = add(node, keep, version, "172.16.41.2/24")
    dropped = add(node, drop, version, "172.16.41.3/24")
    _, drop_itf = pod_interface(dropped, drop.netns)
    valid = [{"containerID": keep.container_id, "ifname": "eth1"}]
    res = ok(node.cni("GC", network(version, **{"cni.dev/valid-attachments": valid})))
    assert res.stdout == ""
    assert_no_leftovers(node, backend, keep=[(NET, keep.container_id, "eth1")], pods=[drop],
                        macs=[drop_itf["mac"]])
    ok(node.cni("CHECK", network(version, prevResult=kept), keep.container_id, keep.netns))
    # Nothing valid any more: the last attachment goes, and the VNI with it.
    ok(node.cni("GC", network(version, **{"cni.dev/attachments": []})))
    assert_no_leftovers(node, backend, pods=[keep, drop])
