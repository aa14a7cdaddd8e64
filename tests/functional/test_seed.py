"""The seed's test: two nodes, two pods, one VNI, static flood list; and two VPCs, one CIDR."""

import pytest

from vpcni.lab.cluster import seed_network
from vpcni.lab.traffic import start_ident_server, tcp_ident, wait_ping

pytestmark = pytest.mark.functional


def test_seed_two_nodes_ping_and_tcp_both_ways(two_nodes):
    cluster, n1, n2 = two_nodes
    pod_a = cluster.add_pod(n1, "pod-a")
    pod_b = cluster.add_pod(n2, "pod-b")
    cluster.attach(pod_a, seed_network("pod-a", 300, "172.16.32.1/24", vteps=[n2.address]))
    cluster.attach(pod_b, seed_network("pod-b", 300, "172.16.32.2/24", vteps=[n1.address]))

    wait_ping(pod_a.ns, "172.16.32.2")
    assert pod_b.ns.ping("172.16.32.1")

    start_ident_server(pod_a.ns, "pod-a")
    start_ident_server(pod_b.ns, "pod-b")
    assert tcp_ident(pod_a.ns, "172.16.32.2") == "pod-b"
    assert tcp_ident(pod_b.ns, "172.16.32.1") == "pod-a"


def test_two_vpcs_same_cidr_stay_isolated(two_nodes):
    """VNI 300 and 301 use the same addresses on the same nodes; traffic never crosses."""
    cluster, n1, n2 = two_nodes
    vpcs = {300: "blue", 301: "red"}
    pods = {}
    for vni, color in vpcs.items():
        for node, host in ((n1, 1), (n2, 2)):
            pod = cluster.add_pod(node, f"{color}{host}")
            net = seed_network(f"vpc-{color}", vni, f"172.16.32.{host}/24",
                               vteps=[n.address for n in (n1, n2) if n is not node])
            cluster.attach(pod, net)
            start_ident_server(pod.ns, pod.name)
            pods[(color, host)] = pod
    # Only VPC blue has a third pod, at an address that VPC red does not use.
    blue3 = cluster.add_pod(n2, "blue3")
    cluster.attach(blue3, seed_network("vpc-blue", 300, "172.16.32.3/24", vteps=[n1.address]))
    start_ident_server(blue3.ns, "blue3")

    for color in vpcs.values():
        wait_ping(pods[(color, 1)].ns, "172.16.32.2")
        # The same address answers with the pod of the caller's own VPC, both ways.
        assert tcp_ident(pods[(color, 1)].ns, "172.16.32.2") == f"{color}2"
        assert tcp_ident(pods[(color, 2)].ns, "172.16.32.1") == f"{color}1"
    assert tcp_ident(pods[("blue", 1)].ns, "172.16.32.3") == "blue3"
    # From VPC red, the blue-only address is unreachable by ICMP and by TCP.
    assert not pods[("red", 1)].ns.ping("172.16.32.3", count=2, timeout=0.5)
    assert tcp_ident(pods[("red", 1)].ns, "172.16.32.3", timeout=1.0) is None
    assert not pods[("red", 2)].ns.ping("172.16.32.3", count=2, timeout=0.5)
