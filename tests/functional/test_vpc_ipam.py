"""vpcni-ipam end to end: the real `vpcni` and `vpcni-ipam` executables, real etcd.

etcd runs in its own namespace on the test fabric (198.51.100.250), so the
simulated nodes reach it as cluster nodes reach an etcd cluster; its keys
live under a prefix unique to the sandbox. Every process is the sandbox's
and is killed by pid.
"""

from __future__ import annotations

import concurrent.futures
import ipaddress
import json

import pytest

from tests.functional.netstate import assigned_addresses
from vpcni.ipam.config import SqliteStoreConfig
from vpcni.ipam.store import SqliteStore
from vpcni.lab.cluster import CniResult, Cluster, Node, installed_executable, seed_network
from vpcni.lab.daemons import Etcd

pytestmark = pytest.mark.functional

ETCD_ADDRESS = "198.51.100.250"
SUBNET = "172.16.48.0/24"


@pytest.fixture
def etcd(cluster: Cluster) -> Etcd:
    ns = cluster.sandbox.netns("etcd")
    cluster.fabric.connect(ns, ETCD_ADDRESS)
    return Etcd(ns, cluster.sandbox.dir("etcd"), ETCD_ADDRESS).start()


def etcd_store(cluster: Cluster, etcd: Etcd) -> dict:
    return {"type": "etcd", "endpoints": [etcd.endpoint],
            "prefix": f"/{cluster.sandbox.prefix}/ipam"}


def sqlite_store(cluster: Cluster) -> dict:
    return {"type": "sqlite", "path": str(cluster.sandbox.dir("ipam") / "ipam.sqlite")}


def ipam_conf(cluster: Cluster, store: dict, subnet: str = SUBNET, **extra) -> dict:
    """A config of some other plugin that delegates to vpcni-ipam."""
    return {"cniVersion": "1.0.0", "name": f"{cluster.sandbox.prefix}-net", "type": "bridge",
            "ipam": {"type": "vpcni-ipam", "subnets": [subnet], "store": store, **extra}}


def ipam_call(node: Node, command: str, conf: dict, cid: str, ifname: str = "eth0",
              **kw) -> CniResult:
    """vpcni-ipam executed in the node's namespace as a delegating plugin calls it."""
    return node.cni(command, conf, cid, node.ns.path, ifname, plugin="vpcni-ipam", **kw)


def show(node: Node, conf: dict) -> list[dict]:
    """`vpcnictl ipam show --json` run on `node` (reaches the store as the node does)."""
    path = node.dir / "ipam-conf.json"
    path.write_text(json.dumps(conf))
    out = node.ns.exec(installed_executable("vpcnictl"), "ipam", "show", "--conf", str(path),
                       "--json").stdout
    return json.loads(out)


def address_of(res: CniResult) -> str:
    assert res.ok, res.stdout or res.stderr
    [ip] = res.json["ips"]
    return ip["address"]


def assert_all_distinct(addresses: list[str], held: list[dict], n: int) -> None:
    net = ipaddress.ip_network(SUBNET)
    assert len(set(addresses)) == n
    assert all(ipaddress.ip_interface(a).ip in net for a in addresses)
    assert str(net.network_address + 1) not in {ipaddress.ip_interface(a).ip for a in addresses}
    assert len(held) == n and len({h["ip"] for h in held}) == n
    assert {h["ip"] for h in held} == {a.split("/")[0] for a in addresses}


@pytest.mark.slow
@pytest.mark.parametrize("store", ["etcd", "sqlite"])
def test_200_parallel_adds_get_200_distinct_addresses(cluster, request, store):
    """etcd: 3 nodes sharing one etcd; sqlite: one node, one file; 200 concurrent ADDs."""
    if store == "etcd":
        backing = etcd_store(cluster, request.getfixturevalue("etcd"))
        nodes = [cluster.add_node(f"n{i}", f"198.51.100.{i}") for i in (1, 2, 3)]
    else:
        backing = sqlite_store(cluster)
        nodes = [cluster.add_node("n1", "198.51.100.1")]
    conf = ipam_conf(cluster, backing)

    def add(i: int) -> str:
        return address_of(ipam_call(nodes[i % len(nodes)], "ADD", conf, f"c{i}"))
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        got = list(pool.map(add, range(200)))
    held = show(nodes[0], conf)
    assert_all_distinct(got, held, 200)
    if store == "etcd":
        assert {h["node"] for h in held} == {"n1", "n2", "n3"}
    # The same attachment asks again, from its node: same address.
    assert address_of(ipam_call(nodes[7 % len(nodes)], "ADD", conf, "c7")) == got[7]


def test_exhaustion_names_vpc_and_subnet_and_keeps_what_is_held(cluster, etcd):
    node = cluster.add_node("n1", "198.51.100.1")
    conf = ipam_conf(cluster, etcd_store(cluster, etcd), subnet="172.16.48.0/29")
    held = [address_of(ipam_call(node, "ADD", conf, f"c{i}")) for i in range(5)]
    res = ipam_call(node, "ADD", conf, "c5")
    assert res.rc == 1
    err = res.json
    assert conf["name"] in err["msg"] and "172.16.48.0/29" in err["msg"], err
    assert sorted(h["ip"] for h in show(node, conf)) == sorted(a.split("/")[0] for a in held)


def test_etcd_stopped_mid_run_is_code_11_then_resumes(cluster, etcd):
    node = cluster.add_node("n1", "198.51.100.1")
    conf = ipam_conf(cluster, etcd_store(cluster, etcd))
    before = [address_of(ipam_call(node, "ADD", conf, f"c{i}")) for i in range(3)]

    etcd.stop()
    for cid in ("c3", "c0"):
        res = ipam_call(node, "ADD", conf, cid)
        assert res.rc == 1 and res.json["code"] == 11, res.stdout
        assert f"{ETCD_ADDRESS}:2379" in res.json["msg"]
    # vpcni with vpcni-ipam in-process says the same.
    pod = cluster.add_pod(node, "p")
    vconf = seed_network(conf["name"] + "-v", 348, ipam=conf["ipam"])
    res = node.cni("ADD", vconf, pod.container_id, pod.netns, "eth1")
    assert res.rc == 1 and res.json["code"] == 11 and ETCD_ADDRESS in res.json["msg"], res.stdout

    etcd.start()
    after = address_of(ipam_call(node, "ADD", conf, "c3"))
    assert after not in before
    assert address_of(ipam_call(node, "ADD", conf, "c0")) == before[0]
    assert_all_distinct(before + [after], show(node, conf), 4)


def test_vpcni_with_vpc_ipam_repeat_del_gc(cluster, node):
    """vpcni's own config says vpcni-ipam: served by the agent / in-process handler."""
    store = sqlite_store(cluster)
    conf = seed_network(f"{cluster.sandbox.prefix}-v", 349,
                        ipam={"type": "vpcni-ipam", "subnets": ["172.16.49.0/24"],
                              "routes": [{"dst": "172.16.0.0/16"}], "store": store})
    pods = [cluster.add_pod(node, name) for name in ("a", "b")]
    added = {p.name: cluster.attach(p, conf,
                                    args=f"K8S_POD_NAMESPACE=default;K8S_POD_NAME={p.name}")
             for p in pods}
    addrs = {n: r["ips"][0]["address"] for n, r in added.items()}
    assert addrs["a"] != addrs["b"]
    for p in pods:
        assert assigned_addresses(p.ns, "eth1") == {addrs[p.name]}
    db = SqliteStore(SqliteStoreConfig(**store))

    def held() -> dict[str, str]:
        return {a.container_id: a.ip for a in db.list(conf["name"])}
    a, b = pods
    assert cluster.attach(a, conf)["ips"][0]["address"] == addrs["a"]  # repeated ADD
    assert held() == {a.container_id: addrs["a"].split("/")[0],
                      b.container_id: addrs["b"].split("/")[0]}
    assert db.held(conf["name"], a.container_id, "eth1")[0].pod == "default/a"

    cluster.detach(a, conf)
    cluster.detach(a, conf)  # DEL twice is fine
    assert held() == {b.container_id: addrs["b"].split("/")[0]}

    # Left behind by a crashed runtime: held in the store, unknown to the runtime.
    orphan = node.cni("ADD", conf | {"type": "vpcni"}, "orphan", a.netns, "eth1")
    assert orphan.ok, orphan.stdout
    assert set(held()) == {b.container_id, "orphan"}
    gc = node.cni("GC", conf | {"cni.dev/valid-attachments": [
        {"containerID": b.container_id, "ifname": "eth1"}]})
    assert gc.ok, gc.stdout
    assert held() == {b.container_id: addrs["b"].split("/")[0]}
    cluster.detach(b, conf)
    assert held() == {}


def test_operator_show_and_release(cluster, etcd):
    nodes = [cluster.add_node(f"n{i}", f"198.51.100.{i}") for i in (1, 2)]
    conf = ipam_conf(cluster, etcd_store(cluster, etcd))
    for i in range(4):
        ipam_call(nodes[i % 2], "ADD", conf, f"c{i}")
    path = nodes[0].dir / "conf.json"
    path.write_text(json.dumps(conf))
    ctl = [installed_executable("vpcnictl"), "ipam"]
    # n2 died: an operator frees its addresses from n1.
    out = nodes[0].ns.exec(*ctl, "release", "--conf", str(path), "--node", "n2").stdout
    assert out.count("released") == 2
    assert sorted(h["container_id"] for h in show(nodes[0], conf)) == ["c0", "c2"]
    c0 = next(h["ip"] for h in show(nodes[0], conf) if h["container_id"] == "c0")
    nodes[0].ns.exec(*ctl, "release", "--conf", str(path), "--ip", c0)
    assert [h["container_id"] for h in show(nodes[0], conf)] == ["c2"]
    text = nodes[0].ns.exec(*ctl, "show", "--conf", str(path)).stdout
    assert "c2" in text and "1 allocation(s)" in text
    # Every network under the prefix (owner keys are not allocations).
    everything = json.loads(nodes[0].ns.exec(
        *ctl, "show", "--etcd", etcd.endpoint, "--prefix", f"/{cluster.sandbox.prefix}/ipam",
        "--json").stdout)
    assert [(a["network"], a["container_id"]) for a in everything] == [(conf["name"], "c2")]


def test_reference_bridge_delegates_to_vpcni_ipam(cluster):
    """The reference bridge plugin with `"ipam": {"type": "vpcni-ipam"}`: two pods talk."""
    node = cluster.add_node("n1", "198.51.100.1")
    assert (cluster.cni_bin / "bridge").exists(), \
        "reference CNI plugins missing: scripts/setup.sh installs containernetworking-plugins"
    conf = ipam_conf(cluster, sqlite_store(cluster), subnet="172.16.47.0/24")
    conf |= {"bridge": "vpbr0", "isGateway": True}
    pods = [cluster.add_pod(node, name) for name in ("a", "b")]
    results = []
    for p in pods:
        res = node.cni("ADD", conf, p.container_id, p.netns, "eth0", plugin="bridge")
        assert res.ok, res.stdout or res.stderr
        results.append(res.json)
    ips = [r["ips"][0]["address"].split("/")[0] for r in results]
    assert ips[0] != ips[1]
    assert all(ipaddress.ip_address(ip) in ipaddress.ip_network("172.16.47.0/24") for ip in ips)
    assert [r["ips"][0]["gateway"] for r in results] == ["172.16.47.1"] * 2
    for p, r in zip(pods, results):
        assert assigned_addresses(p.ns, "eth0") == {r["ips"][0]["address"]}
    assert pods[0].ns.ping(ips[1], count=3)
    assert pods[1].ns.ping(ips[0], count=3)
    for p in pods:
        res = node.cni("DEL", conf, p.container_id, p.netns, "eth0", plugin="bridge")
        assert res.ok, res.stdout or res.stderr
    assert show(node, conf) == []
