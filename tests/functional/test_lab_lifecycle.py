"""`lab up`/`down` leave nothing behind, also after a failed `up`; and interop with a plain FRR VTEP."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from vpcni.lab.lab import Lab, LabError, down_by_name
from vpcni.lab.netns import Netns, wait_for
from vpcni.lab.topology import Topology
from vpcni.lab.traffic import tcp_ident

pytestmark = [pytest.mark.functional, pytest.mark.slow]

SMALL = """
name = "{name}"
[[reflectors]]
name = "rr1"
address = "198.51.100.201"
daemon = "{rr}"
[[nodes]]
name = "node1"
address = "198.51.100.11"
{node1_extra}
[[nodes]]
name = "node2"
address = "198.51.100.12"
kind = "{node2_kind}"
[[vpcs]]
name = "blue"
vni = 300
cidr = "172.16.32.0/24"
[[pods]]
name = "blue-1"
node = "node1"
vpc = "blue"
address = "172.16.32.11/24"
[[pods]]
name = "blue-2"
node = "node2"
vpc = "blue"
address = "172.16.32.12/24"
"""


def topology(tmp_path: Path, rr="gobgpd", node2_kind="vpcni", node1_extra="") -> Topology:
    path = tmp_path / "topo.toml"
    path.write_text(SMALL.format(name=f"t{os.urandom(3).hex()}", rr=rr, node2_kind=node2_kind,
                                 node1_extra=node1_extra))
    return Topology.load(path)


def traces(prefix: str, lab_dir: Path, state_file: Path) -> list[str]:
    """Anything of the lab still on the machine."""
    left = [n for n in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                      text=True).stdout.split() if n.startswith(prefix)]
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if str(lab_dir) in cmd or prefix in cmd:
            left.append(f"process {pid}: {cmd.replace(chr(0), ' ')[:100]}")
    for path in (lab_dir, state_file):
        if path.exists():
            left.append(str(path))
    return left


def test_up_then_down_leaves_nothing(tmp_path):
    lab = Lab(topology(tmp_path))
    lab.up()
    prefix, lab_dir, state = lab.box.prefix, lab.dir, lab.state_file
    try:
        assert lab.check(out=lambda *_: None)
        sockets = list(lab_dir.rglob("*.sock"))
        assert sockets, "agents and gobgpd serve unix sockets under the lab dir"
    finally:
        assert down_by_name(lab.topo.name)
    assert traces(prefix, lab_dir, state) == []


def test_failed_up_cleans_everything(tmp_path):
    topo = topology(tmp_path, node1_extra='backend = "nosuch"')
    lab = Lab(topo)
    with pytest.raises((LabError, TimeoutError)) as info:
        lab.up()
    assert "nosuch" in str(info.value)
    assert lab.box is None and not lab.state_file.exists()
    assert traces(lab.prefix, lab.dir, lab.state_file) == []


@pytest.mark.parametrize("rr", ["frr", "gobgpd"])
def test_plain_frr_vtep_and_vpcni_share_a_vni(tmp_path, rr):
    """node2 runs the seed's deployment (FRR with advertise-all-vni); node1 runs vpcni."""
    lab = Lab(topology(tmp_path, rr=rr, node2_kind="frr"))
    lab.up()
    try:
        b1 = Netns(lab.pods["blue-1"].netns, lab.box, create=False)
        b2 = Netns(lab.pods["blue-2"].netns, lab.box, create=False)
        wait_for(lambda: tcp_ident(b1, "172.16.32.12", timeout=0.5) == "blue-2", timeout=20,
                 interval=0.0, what="vpcni pod reaches the FRR node's pod")
        assert tcp_ident(b2, "172.16.32.11") == "blue-1"
        assert b1.ping("172.16.32.12") and b2.ping("172.16.32.11")
    finally:
        lab.down()
