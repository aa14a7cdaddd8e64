"""The DPU lab (lab/topologies/dpu.toml): a host whose VPC switch runs on a simulated DPU.
EVPN routes program the DPU's switch; the host's VF pod reaches a pod on another node;
nothing of the switch runs in the host's namespace."""

from __future__ import annotations

import json

import pytest

from vpcni.lab.cluster import installed_executable
from tests.functional.labs import lab_up
from vpcni.lab.topology import DEFAULT_TOPOLOGY
from vpcni.lab.traffic import tcp_ident
from vpcni.lab.netns import Netns, wait_for

pytestmark = [pytest.mark.functional, pytest.mark.slow]
DPU = DEFAULT_TOPOLOGY.with_name("dpu.toml")


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    with lab_up(tmp_path_factory.mktemp("dpu"), DPU.read_text(), "dpu") as (up, _):
        yield up


def test_the_host_vf_pod_reaches_the_other_node_and_vpcs_stay_apart(lab):
    rows = lab.matrix()
    wrong = [r for r in rows if r[2] != r[3]]
    assert not wrong, wrong
    src = Netns(lab.pods["blue-h"].netns, lab.box, create=False)
    assert tcp_ident(src, lab.pods["blue-k"].ip) == "blue-k"
    red = Netns(lab.pods["red-h"].netns, lab.box, create=False)
    assert tcp_ident(red, lab.pods["red-k"].ip) == "red-k"


def test_evpn_programs_the_dpus_switch(lab):
    dpu, k2 = lab.box.namespaces["dpu1"], lab.box.namespaces["k2"]
    fdb = dpu.exec("bridge", "fdb", "show", "dev", "vpvx300").stdout
    assert f"{lab.pods['blue-k'].mac} dst 198.51.100.42" in fdb, fdb
    # ... and the DPU announces the host pod (its record of the host's VF).
    wait_for(lambda: f"{lab.pods['blue-h'].mac} dst 198.51.100.41" in k2.exec(
        "bridge", "fdb", "show", "dev", "vpvx300").stdout, timeout=10,
        what="k2 learns blue-h behind the DPU")
    # The VF's representor is the port in the DPU's bridge.
    ports = json.loads(dpu.ip("-j", "-d", "link", "show", "master", "vpbr300").stdout)
    assert any(p.get("ifalias", "").startswith("vpcni:att=vpc-blue/") for p in ports)


def test_nothing_of_the_switch_runs_in_the_host_namespace(lab):
    host = lab.box.namespaces["dpu1-host"]
    links = {l["ifname"] for l in json.loads(host.ip("-j", "link", "show").stdout)}
    assert not any(n.startswith(("vpbr", "vpvx", "br-")) for n in links), links
    assert host.ip("-j", "addr", "show").stdout.count('"scope":"global"') == 0
    tables = host.exec("nft", "list", "tables").stdout
    assert "vpcni" not in tables, tables
    for exe in ("gobgpd", "ovs-vswitchd"):
        assert not lab.box.pids(host.name, exe), exe
    status = json.loads(host.exec(installed_executable("vpcnictl"), "status", "--json",
                                  "--node-config",
                                  str(lab.box.root_dir / "dpu1-host" / "node.json")).stdout)
    assert status["backend"]["backend"] == "dpu"
