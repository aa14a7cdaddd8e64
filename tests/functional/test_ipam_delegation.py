"""Delegated IPAM: vpcni with `ipam.type` host-local or static from CNI_PATH.

The reference IPAM plugins 1.1.1 speak CNI <= 1.0.0, so these configs say
1.0.0. host-local keeps its reservations in a dataDir inside the sandbox:
one file per reserved address, named after it.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from tests.functional.leftovers import assert_no_leftovers, links
from tests.functional.netstate import assigned_addresses, pod_interface, routes
from tests.spec_shapes import check_result
from vpcni.lab.cluster import CniResult, Pod, seed_network

pytestmark = pytest.mark.functional

SUBNET = "172.16.40.0/24"
GATEWAY = "172.16.40.1"
EXTRA_ROUTE = "172.16.41.0/24"


def host_local(data_dir: Path, subnet: str = SUBNET, **range_extra) -> dict:
    return {"type": "host-local", "dataDir": str(data_dir),
            "ranges": [[{"subnet": subnet, **range_extra}]],
            "routes": [{"dst": EXTRA_ROUTE}]}


def reservations(data_dir: Path, network: str) -> dict[str, str]:
    """host-local's reservations: address -> the container ID recorded in its file."""
    out = {}
    for path in (data_dir / network).glob("*"):
        try:
            ipaddress.ip_address(path.name)
        except ValueError:
            continue  # lock, last_reserved_ip.N
        out[path.name] = path.read_text().split()[0]
    return out


def add(pod: Pod, config: dict, ifname: str = "eth1") -> CniResult:
    return pod.node.cni("ADD", config, pod.container_id, pod.netns, ifname)


def delete(pod: Pod, config: dict, ifname: str = "eth1") -> None:
    res = pod.node.cni("DEL", config, pod.container_id, pod.netns, ifname)
    assert res.ok, res.stdout or res.stderr


def check(pod: Pod, config: dict, result: dict) -> CniResult:
    """CHECK as a runtime sends it: with the ADD result as prevResult."""
    return pod.node.cni("CHECK", config | {"prevResult": result}, pod.container_id, pod.netns)


def assert_attached(pod: Pod, res: CniResult) -> str:
    """The ADD worked and the pod has exactly the result's address; that address."""
    assert res.ok, res.stdout or res.stderr
    check_result(res.json, res.json["cniVersion"])
    idx, itf = pod_interface(res.json, pod.netns)
    assert links(pod.ns.name)["eth1"]["address"] == itf["mac"]
    [ip] = res.json["ips"]
    assert ip["interface"] == idx
    assert assigned_addresses(pod.ns, "eth1") == {ip["address"]}
    return ip["address"]


def test_host_local_add_routes_del_and_add_again(cluster, node, backend):
    pod = cluster.add_pod(node, "a")
    data_dir = cluster.sandbox.dir("host-local")
    name = f"{cluster.sandbox.prefix}-hl"
    config = seed_network(name, 340, version="1.0.0",
                          ipam=host_local(data_dir, rangeStart="172.16.40.10",
                                          rangeEnd="172.16.40.20", gateway=GATEWAY))

    res = add(pod, config)
    first = assert_attached(pod, res)
    assert first == "172.16.40.10/24"
    assert res.json["ips"][0]["gateway"] == GATEWAY
    # As the reference plugins read it: a route without gw goes via the IP's gateway.
    assert res.json["routes"] == [{"dst": EXTRA_ROUTE, "gw": GATEWAY}]
    assert routes(pod.ns, "eth1")[EXTRA_ROUTE] == GATEWAY
    assert reservations(data_dir, name) == {"172.16.40.10": pod.container_id}
    assert check(pod, config, res.json).ok

    delete(pod, config)
    assert reservations(data_dir, name) == {}
    assert_no_leftovers(node, backend, pods=[pod])

    second = assert_attached(pod, add(pod, config))
    assert ipaddress.ip_interface(second) in ipaddress.ip_network(SUBNET)
    assert reservations(data_dir, name) == {second.split("/")[0]: pod.container_id}
    delete(pod, config)
    assert reservations(data_dir, name) == {}
    assert_no_leftovers(node, backend, pods=[pod])


def test_static_ipam_addresses_and_routes(cluster, node, backend):
    pod = cluster.add_pod(node, "a")
    config = seed_network(f"{cluster.sandbox.prefix}-st", 340, version="1.0.0", ipam={
        "type": "static", "addresses": [{"address": "172.16.40.5/24", "gateway": GATEWAY}],
        "routes": [{"dst": EXTRA_ROUTE}]})

    res = add(pod, config)
    assert assert_attached(pod, res) == "172.16.40.5/24"
    assert routes(pod.ns, "eth1")[EXTRA_ROUTE] == GATEWAY
    assert check(pod, config, res.json).ok

    delete(pod, config)
    assert_no_leftovers(node, backend, pods=[pod])


def test_failed_add_after_ipam_releases_the_reservation(cluster, node, backend):
    """eth1 already exists in the pod: ADD fails after host-local reserved an address."""
    pod = cluster.add_pod(node, "a")
    pod.ns.ip("link", "add", "eth1", "type", "veth", "peer", "name", "x1")
    foreign = links(pod.ns.name)["eth1"]
    data_dir = cluster.sandbox.dir("host-local")
    name = f"{cluster.sandbox.prefix}-hl"
    config = seed_network(name, 340, version="1.0.0", ipam=host_local(data_dir))

    res = add(pod, config)
    assert not res.ok
    assert res.json["code"] and "eth1" in res.json["msg"], res.json
    assert reservations(data_dir, name) == {}
    assert_no_leftovers(node, backend)
    # The foreign interface is left alone.
    assert set(links(pod.ns.name)) == {"lo", "eth1", "x1"}
    assert links(pod.ns.name)["eth1"]["address"] == foreign["address"]
    assert assigned_addresses(pod.ns, "eth1") == set()


def test_exhausted_host_local_range_error_surfaces(cluster, node, backend):
    first, second = cluster.add_pod(node, "a"), cluster.add_pod(node, "b")
    data_dir = cluster.sandbox.dir("host-local")
    name = f"{cluster.sandbox.prefix}-hl"
    # A /30 with its gateway .1 leaves one address for pods: .2.
    config = seed_network(name, 340, version="1.0.0",
                          ipam=host_local(data_dir, subnet="172.16.40.0/30"))
    assert assert_attached(first, add(first, config)) == "172.16.40.2/30"

    # What host-local itself says when asked directly for the second pod.
    direct = node.cni("ADD", config, second.container_id, second.netns, plugin="host-local")
    assert not direct.ok
    res = add(second, config)
    assert not res.ok
    assert res.json["code"] == direct.json["code"]
    assert res.json["msg"].startswith("ipam host-local")
    assert direct.json["msg"] in res.json["msg"]
    assert reservations(data_dir, name) == {"172.16.40.2": first.container_id}
    assert_no_leftovers(node, backend, keep=[(name, first.container_id, "eth1")],
                        pods=[second])

    delete(first, config)
    assert reservations(data_dir, name) == {}
    assert_no_leftovers(node, backend, pods=[first])


def test_ipam_plugin_refusing_the_config_version_surfaces(cluster, node, backend):
    """host-local 1.1.1 speaks up to CNI 1.0.0; a 1.1.0 config gets its code 1 back."""
    pod = cluster.add_pod(node, "a")
    data_dir = cluster.sandbox.dir("host-local")
    name = f"{cluster.sandbox.prefix}-hl"
    config = seed_network(name, 340, version="1.1.0", ipam=host_local(data_dir))

    res = add(pod, config)
    assert not res.ok
    assert res.json["code"] == 1
    assert res.json["msg"].startswith("ipam host-local")
    assert reservations(data_dir, name) == {}
    assert_no_leftovers(node, backend, pods=[pod])


def test_ipam_type_missing_from_cni_path(cluster, node, backend):
    pod = cluster.add_pod(node, "a")
    config = seed_network(f"{cluster.sandbox.prefix}-no", 340, version="1.0.0",
                          ipam={"type": "no-such-ipam"})

    res = add(pod, config)
    assert not res.ok
    assert res.json["code"] == 7
    assert "ipam.type" in res.json["msg"] and "no-such-ipam" in res.json["msg"]
    assert_no_leftovers(node, backend, pods=[pod])


@pytest.mark.parametrize("source", ["addr", "ipam-static"])
def test_ips_capability(cluster, node, backend, source):
    """runtimeConfig.ips wins over the config's address: vpcni's addr, and the
    static IPAM plugin, which replaces its `addresses` with runtimeConfig.ips."""
    pod = cluster.add_pod(node, "a")
    if source == "addr":
        ip_source = {"addr": "172.16.40.5/24"}
    else:
        ip_source = {"ipam": {"type": "static", "addresses": [{"address": "172.16.40.5/24"}]}}
    config = seed_network(f"{cluster.sandbox.prefix}-ips", 340, version="1.0.0",
                          capabilities={"ips": True},
                          runtimeConfig={"ips": ["172.16.40.77/24"]}, **ip_source)

    res = add(pod, config)
    assert assert_attached(pod, res) == "172.16.40.77/24"
    assert check(pod, config, res.json).ok

    delete(pod, config)
    assert_no_leftovers(node, backend, pods=[pod])
