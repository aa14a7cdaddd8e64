"""DEL that finds things gone, ADD after a crashed ADD, GC: each leaves exactly what must remain.

After every scenario the node holds only the devices its remaining records
explain (conftest.BACKENDS, leftovers.assert_no_leftovers): no stray host
interface, no FDB entry of a removed pod, no record file, and no per-VNI
device once the VNI's last attachment has gone.
"""

from __future__ import annotations

import json

import pytest

from tests.functional.leftovers import (addresses, assert_no_leftovers, fdb, pod_ifnames,
                                        record_path, records)
from tests.functional.netstate import pod_interface
from tests.functional.outcome import ok
from vpcni.lab.cluster import seed_network

pytestmark = pytest.mark.functional

VERSION = "1.1.0"
NET1, VNI1 = "vpc-idem1", 4201
NET2, VNI2 = "vpc-idem2", 4202


def net1(addr: str = "172.16.21.2/24", **extra) -> dict:
    return seed_network(NET1, VNI1, addr, version=VERSION, **extra)


def net2(addr: str = "172.16.22.2/24", **extra) -> dict:
    return seed_network(NET2, VNI2, addr, version=VERSION, **extra)


def add(pod, cfg: dict) -> dict:
    return json.loads(ok(pod.node.cni("ADD", cfg, pod.container_id, pod.netns)).stdout)


def delete(pod, cfg: dict, netns: str | None = None) -> None:
    res = ok(pod.node.cni("DEL", cfg, pod.container_id, pod.netns if netns is None else netns))
    assert res.stdout == ""


def mac_of(pod, result: dict) -> str:
    return pod_interface(result, pod.netns)[1]["mac"]


def test_del_twice(cluster, node, backend):
    pod = cluster.add_pod(node, "a")
    mac = mac_of(pod, add(pod, net1()))
    delete(pod, net1())
    delete(pod, net1())
    assert_no_leftovers(node, backend, pods=[pod], macs=[mac])


@pytest.mark.parametrize("netns", ["deleted", "unset"])
def test_del_without_the_pod_netns(cluster, node, backend, netns):
    pod = cluster.add_pod(node, "a")
    mac = mac_of(pod, add(pod, net1()))
    if netns == "deleted":
        pod.ns.delete()
        delete(pod, net1())  # CNI_NETNS still names the path, which is gone
    else:
        delete(pod, net1(), netns="")
    assert_no_leftovers(node, backend, pods=[pod], macs=[mac])


def test_del_unknown_container(cluster, node, backend):
    """DEL of what was never added succeeds, whatever CNI_NETNS, and touches no other attachment."""
    other = cluster.add_pod(node, "other")
    kept = add(other, net1())
    stranger = cluster.add_pod(node, "stranger")
    for netns in (stranger.netns, stranger.netns + "-gone", ""):
        delete(stranger, net1(), netns=netns)
    assert_no_leftovers(node, backend, keep=[(NET1, other.container_id, "eth1")],
                        pods=[stranger])
    ok(node.cni("CHECK", net1(prevResult=kept), other.container_id, other.netns))
    delete(other, net1())
    assert_no_leftovers(node, backend, pods=[other, stranger])


def _left_adding(node, pod) -> None:
    path = record_path(node, NET1, pod.container_id, "eth1")
    rec = json.loads(path.read_text())
    rec["state"] = "adding"
    path.write_text(json.dumps(rec))


def _lost_record(node, pod) -> None:
    record_path(node, NET1, pod.container_id, "eth1").unlink()


def _adding_without_interfaces(node, pod) -> None:
    """Crashed right after recording the intent: a record, but no pod interface yet."""
    _left_adding(node, pod)
    pod.ns.ip("link", "del", "eth1")


CRASHES = [("adding-record", _left_adding), ("record-lost", _lost_record),
           ("adding-record-no-interface", _adding_without_interfaces)]


@pytest.mark.parametrize("crash", [c[1] for c in CRASHES], ids=[c[0] for c in CRASHES])
def test_add_after_crashed_add(cluster, node, backend, crash):
    pod = cluster.add_pod(node, "a")
    add(pod, net1())
    crash(node, pod)
    result = add(pod, net1())
    key = (NET1, pod.container_id, "eth1")
    assert_no_leftovers(node, backend, keep=[key])  # exactly one host interface
    assert pod_ifnames(pod) == {"eth1"}
    assert "172.16.21.2/24" in addresses(pod.ns.name, "eth1")
    ok(node.cni("CHECK", net1(prevResult=result), pod.container_id, pod.netns))
    delete(pod, net1())
    assert_no_leftovers(node, backend, pods=[pod], macs=[mac_of(pod, result)])


def test_crashed_add_releases_host_local_reservation(cluster, node, backend):
    """ADD redone after a crash does not hold two addresses; DEL frees the one."""
    data = node.dir / "host-local"
    # host-local (reference plugins 1.1.1) speaks CNI up to 1.0.0.
    cfg = seed_network(NET1, VNI1, version="1.0.0",
                       ipam={"type": "host-local", "subnet": "172.16.29.0/24", "dataDir": str(data)})
    pod = cluster.add_pod(node, "a")
    add(pod, cfg)
    _left_adding(node, pod)
    result = add(pod, cfg)
    [ip] = result["ips"]
    reserved = sorted(p.name for p in (data / NET1).iterdir() if p.name[0].isdigit())
    assert reserved == [ip["address"].split("/")[0]]
    delete(pod, cfg)
    assert [p.name for p in (data / NET1).iterdir() if p.name[0].isdigit()] == []
    assert_no_leftovers(node, backend, pods=[pod], macs=[mac_of(pod, result)])


def test_gc_two_networks(cluster, node, backend):
    a, b, c = (cluster.add_pod(node, n) for n in "abc")
    add(a, net1())
    mac_b = mac_of(b, add(b, net2("172.16.22.2/24")))
    add(c, net2("172.16.22.3/24"))
    key_a, key_c = (NET1, a.container_id, "eth1"), (NET2, c.container_id, "eth1")

    valid_c = [{"containerID": c.container_id, "ifname": "eth1"}]
    ok(node.cni("GC", net2(**{"cni.dev/valid-attachments": valid_c})))
    assert_no_leftovers(node, backend, keep=[key_a, key_c], pods=[b], macs=[mac_b])

    # An empty valid list for NET2 must not touch NET1's attachment.
    ok(node.cni("GC", net2(**{"cni.dev/valid-attachments": []})))
    assert_no_leftovers(node, backend, keep=[key_a], pods=[b, c])

    delete(a, net1())
    assert_no_leftovers(node, backend, pods=[a, b, c])


def test_gc_removes_orphaned_interfaces(cluster, node, backend):
    """Interfaces whose record is gone (a crash between steps) are GC'd from the dataplane."""
    keep, orphan = cluster.add_pod(node, "keep"), cluster.add_pod(node, "orphan")
    add(keep, net1())
    mac = mac_of(orphan, add(orphan, net1("172.16.21.3/24")))
    _lost_record(node, orphan)
    assert len(records(node)) == 1
    valid = [{"containerID": keep.container_id, "ifname": "eth1"}]
    ok(node.cni("GC", net1(**{"cni.dev/valid-attachments": valid})))
    assert_no_leftovers(node, backend, keep=[(NET1, keep.container_id, "eth1")], pods=[orphan],
                        macs=[mac])
    delete(keep, net1())
    assert_no_leftovers(node, backend, pods=[keep, orphan])


def flood_vteps(node, vni: int) -> set[str]:
    return {e["dst"] for e in fdb(node)
            if e.get("ifname") == f"vpvx{vni}" and e["mac"] == "00:00:00:00:00:00"}


def test_del_withdraws_flood_entries_of_the_leaving_config(cluster, node, backend):
    """The VNI floods to the union of its attachments' `vteps`; DEL takes its share away."""
    if backend != "kernel":
        pytest.skip("reads the kernel backend's VXLAN FDB")
    a, b = cluster.add_pod(node, "a"), cluster.add_pod(node, "b")
    add(a, net1(vteps=["198.51.100.2"]))
    add(b, net1("172.16.21.3/24", vteps=["198.51.100.2", "198.51.100.3"]))
    assert flood_vteps(node, VNI1) == {"198.51.100.2", "198.51.100.3"}
    delete(b, net1("172.16.21.3/24", vteps=["198.51.100.2", "198.51.100.3"]))
    assert flood_vteps(node, VNI1) == {"198.51.100.2"}
    assert_no_leftovers(node, backend, keep=[(NET1, a.container_id, "eth1")], pods=[b])
    delete(a, net1(vteps=["198.51.100.2"]))
    assert_no_leftovers(node, backend, pods=[a, b])


@pytest.mark.parametrize("bad", [{"runtimeConfig": {"mac": "01:00:00:00:00:01"}},
                                 {"args": {"cni": {"mac": "not-a-mac"}}}],
                         ids=["multicast-mac", "malformed-mac"])
def test_a_repeated_add_with_bad_input_keeps_the_working_attachment(cluster, node, backend, bad):
    """Input is validated before the earlier attachment is torn down."""
    pod = cluster.add_pod(node, "a")
    good = add(pod, net1())
    cfg = net1() | bad
    res = pod.node.cni("ADD", cfg, pod.container_id, pod.netns)
    assert not res.ok and json.loads(res.stdout)["code"] == 7, res.stdout
    ok(pod.node.cni("CHECK", net1() | {"prevResult": good}, pod.container_id, pod.netns))
    assert pod_ifnames(pod) == {"eth1"}
    delete(pod, net1())
    assert_no_leftovers(node, backend, pods=[pod], macs=[mac_of(pod, good)])


def test_a_repeated_add_with_a_bad_vpcni_ipam_key_keeps_the_working_attachment(cluster, node,
                                                                               backend):
    """vpcni-ipam's keys are checked with the rest of the config: they were read only
    at the IPAM step, after the earlier attachment had been torn down."""
    pod = cluster.add_pod(node, "a")
    ipam = {"type": "vpcni-ipam", "subnets": ["172.16.21.0/24"],
            "store": {"type": "sqlite", "path": str(node.dir / "ipam.sqlite")}}
    cfg = seed_network(NET1, VNI1, version=VERSION, ipam=ipam)
    good = add(pod, cfg)
    res = node.cni("ADD", cfg | {"ipam": ipam | {"exclude": ["nonsense"]}}, pod.container_id,
                   pod.netns)
    body = json.loads(res.stdout)
    assert not res.ok and body["code"] == 7 and "'ipam.exclude'" in body["msg"], res.stdout
    ok(node.cni("CHECK", cfg | {"prevResult": good}, pod.container_id, pod.netns))
    assert pod_ifnames(pod) == {"eth1"}
    delete(pod, cfg)
    assert_no_leftovers(node, backend, pods=[pod], macs=[mac_of(pod, good)])
