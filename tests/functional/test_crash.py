"""kill -9 of the agent at every fault-injection point of ADD and DEL (core/faults.py):
the retried ADD works, DEL leaves nothing, GC finds every vpcni link."""

from __future__ import annotations

import pytest

from vpcni.core.faults import POINTS
from vpcni.lab.cluster import seed_network
from vpcni.lab.netns import wait_for

from .leftovers import assert_no_leftovers, vp_links

pytestmark = [pytest.mark.functional, pytest.mark.slow]


def _crash_agent_at(node, point: str) -> None:
    node.stop_agent()
    node.start_agent(env={"VPCNI_FAULT": point})
    node.wait_agent_ready()


def _agent_gone(node) -> bool:
    return not node.ns.sandbox.pids(node.ns.name, "vpcnictl")


@pytest.mark.parametrize("point", POINTS)
def test_kill_9_at_a_fault_point_then_retry_and_del_leave_nothing(cluster, point):
    node = cluster.add_node("n1", "198.51.100.1", agent=True, backend="kernel")
    pod, bystander = cluster.add_pod(node, "a"), cluster.add_pod(node, "b")
    cfg = seed_network("vpc-crash", 980, "172.16.98.1/24")
    keep_cfg = seed_network("vpc-crash", 980, "172.16.98.2/24")
    cluster.attach(bystander, keep_cfg)
    if point.startswith("del."):
        cluster.attach(pod, cfg)
    _crash_agent_at(node, point)
    command = "DEL" if point.startswith("del.") else "ADD"
    node.cni(command, cfg, pod.container_id, pod.netns)
    wait_for(lambda: _agent_gone(node), timeout=10, what=f"the agent killed at {point}")
    node.start_agent()
    node.wait_agent_ready()
    if command == "ADD":
        result = cluster.attach(pod, cfg)  # the runtime's retry
        assert result["ips"][0]["address"] == "172.16.98.1/24"
        assert pod.ns.ping("172.16.98.2"), "the retried ADD's pod cannot reach its neighbour"
    cluster.detach(pod, cfg)
    assert_no_leftovers(node, "kernel", keep={("vpc-crash", bystander.container_id, "eth1")},
                        pods=[pod])


def test_gc_removes_a_veth_created_and_never_marked(cluster):
    """A crash between creating the veth and marking it leaves a link with vpcni's
    group and no alias; with no retry and no DEL, GC removes it."""
    node = cluster.add_node("n1", "198.51.100.1", agent=True, backend="kernel")
    pod, bystander = cluster.add_pod(node, "a"), cluster.add_pod(node, "b")
    cfg = seed_network("vpc-crash", 981, "172.16.98.1/24")
    cluster.attach(bystander, seed_network("vpc-crash", 981, "172.16.98.2/24"))
    _crash_agent_at(node, "veth.created")
    node.cni("ADD", cfg, pod.container_id, pod.netns)
    wait_for(lambda: _agent_gone(node), timeout=10, what="the agent killed")
    node.start_agent()
    node.wait_agent_ready()
    unclaimed = [name for name in vp_links(node)
                 if not (node.ns.ip("-d", "link", "show", name).stdout.count("alias"))]
    assert unclaimed, "the crash left no unmarked veth: the fault point did not fire"
    gc = dict(seed_network("vpc-crash", 981), cniVersion="1.1.0",
              **{"cni.dev/valid-attachments": [
                  {"containerID": bystander.container_id, "ifname": "eth1"}]})
    res = node.cni("GC", gc)
    assert res.ok, res.stdout
    # The ADD's intent record is GC'd too (its container is not valid), and with it
    # everything the crash left.
    assert_no_leftovers(node, "kernel", keep={("vpc-crash", bystander.container_id, "eth1")},
                        pods=[pod])
