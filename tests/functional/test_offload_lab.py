"""The offload lab (lab/topologies/offload.toml): VF pods of a simulated switchdev NIC, a
veth pod beside them, a kernel node and an OVS node in one VPC; a second VPC on the same
CIDR stays apart (counted by capture, not inferred from pings)."""

from __future__ import annotations

import json
import time

import pytest

from vpcni.lab.frames import BROADCAST, Capture, send_frames, udp_frame
from tests.functional.labs import lab_up
from vpcni.lab.netns import Netns
from vpcni.lab.topology import DEFAULT_TOPOLOGY

pytestmark = [pytest.mark.functional, pytest.mark.slow]
OFFLOAD = DEFAULT_TOPOLOGY.with_name("offload.toml")


@pytest.fixture(scope="module")
def up(tmp_path_factory):
    with lab_up(tmp_path_factory.mktemp("offload"), OFFLOAD.read_text(), "offload") as both:
        yield both


def test_lab_up_says_where_each_interface_came_from(up):
    lab, out = up
    lines = {l.split()[1]: l for l in out.splitlines() if l.strip().startswith("pod ")}
    assert "VF 0000:" in lines["blue-vf"] and "representor as vp" in lines["blue-vf"]
    assert "VF 0000:" in lines["red-vf"]
    for pod in ("blue-veth", "blue-k", "blue-o", "red-k"):
        assert "veth (node end" in lines[pod], lines[pod]


def test_one_vpc_across_vf_veth_kernel_and_ovs_and_the_other_stays_apart(up):
    lab, _ = up
    rows = lab.matrix()
    wrong = [r for r in rows if r[2] != r[3]]
    assert not wrong, wrong
    assert any(r[0] == "blue-vf" and r[1] == "blue-o" and r[3] for r in rows)
    # The VF's representor is the port in VNI 300's bridge on the switchdev node.
    sdev = lab.box.namespaces["sdev"]
    ports = json.loads(sdev.ip("-j", "link", "show", "master", "vpbr300").stdout)
    assert len([p for p in ports if p["ifname"].startswith("vp")
                and not p["ifname"].startswith("vpvx")]) == 2  # blue-vf and blue-veth


def test_red_vf_broadcast_is_seen_by_red_only(up):
    lab, _ = up
    info = lab.pods["red-vf"]
    caps = {p: Capture(Netns(lab.pods[p].netns, lab.box, create=False),
                       "udp dst port 7799").start() for p in lab.pods if p != "red-vf"}
    try:
        send_frames(Netns(info.netns, lab.box, create=False), "eth1",
                    [udp_frame(BROADCAST, info.mac, info.ip, "255.255.255.255", 7799,
                               b"red-only")] * 3)
        time.sleep(0.5)
    finally:
        got = {p: c.stop() for p, c in caps.items()}
    assert got["red-k"], got
    assert not any(got[p] for p in got if p.startswith("blue")), got
