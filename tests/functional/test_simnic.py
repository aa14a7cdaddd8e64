"""The simulated SR-IOV NIC in a node namespace: sysfs discovery against the real links,
the PF drivers (simulated and netlink) against the kernel, and the NIC of a DPU whose
switch side lives in a namespace of its own.

Everything lives in namespaces of the `sandbox` fixture and in its directory;
what discovery reports is checked against `ip -j link` inside the node.
"""

from __future__ import annotations

import json

import pytest
from pyroute2 import IPRoute

from tests.functional.netstate import inside
from vpcni.backends.sriov.pfdriver import NetlinkPfDriver, VfState
from vpcni.backends.sriov.sysfs import PortName, discover, host_vf_representor, vf_by_pci
from vpcni.core.errors import BackendError
from vpcni.lab.netns import Netns
from vpcni.lab.simnic import SimNic

pytestmark = [pytest.mark.functional]



def links(ns: Netns) -> dict[str, dict]:
    return {link["ifname"]: link for link in json.loads(ns.ip("-j", "link", "show").stdout)}


def is_up(link: dict) -> bool:
    return "UP" in link["flags"]


@pytest.fixture
def node(sandbox) -> Netns:
    return sandbox.netns("node")


@pytest.fixture
def sysfs(sandbox):
    return sandbox.dir("node") / "sys"


def test_discovery_matches_the_links_in_the_namespace(node, sysfs):
    nics = [
        SimNic(sysfs, node, vfs=3, vf_driver={2: "vfio-pci"}),
        SimNic(sysfs, node, pf="enp1s0f1", pf_pci="0000:01:00.1", vfs=2),  # same NIC, port 1
        SimNic(sysfs, node, pf="enp2s0f0", pf_pci="0000:02:00.0", vfs=2, mode="legacy"),
    ]
    for nic in nics:
        nic.build()
    present = links(node)
    pfs = {pf.name: pf for pf in discover(sysfs)}
    assert sorted(pfs) == ["enp1s0f0", "enp1s0f1", "enp2s0f0"]

    named, hidden = set(), {"lo"}
    for nic in nics:
        pf = pfs[nic.pf]
        assert (pf.pci, pf.num_vfs, pf.eswitch_mode) == (nic.pf_pci, nic.vfs, nic.mode)
        assert is_up(present[pf.name])
        named.add(pf.name)
        hidden.add(nic.wire)
        for i, vf in enumerate(pf.vfs):
            assert (vf.index, vf.pci, vf.pf_pci) == (i, nic.vf_pci(i), nic.pf_pci)
            # The VF's veth end exists in every case; sysfs lists it only for a netdev driver.
            assert present[nic.vf_netdev(i)]["link"] == nic.peer(i)
            assert not is_up(present[nic.vf_netdev(i)])
            if vf.driver == "vfio-pci":
                assert vf.netdev is None
                hidden.add(nic.vf_netdev(i))
            else:
                assert vf.netdev == nic.vf_netdev(i)
                named.add(vf.netdev)
            if nic.mode == "switchdev":
                assert vf.representor == nic.representor(i)
                assert is_up(present[vf.representor])
                named.add(vf.representor)
            else:
                assert vf.representor is None
                assert not is_up(present[nic.peer(i)])  # the NIC-internal end, never used
                hidden.add(nic.peer(i))
    # Nothing discovered that is not there, nothing there that is neither discovered
    # nor one of the simulation's documented hidden ends.
    assert named <= set(present)
    assert set(present) == named | hidden

    p0, p1, legacy = pfs["enp1s0f0"], pfs["enp1s0f1"], pfs["enp2s0f0"]
    assert p0.switch_id == p1.switch_id and (p0.number, p1.number) == (0, 1)
    assert (p0.uplink, p1.uplink, legacy.uplink, legacy.switch_id) == (
        "enp1s0f0", "enp1s0f1", None, None)
    assert p0.vpc_offload.possible and p1.vpc_offload.possible
    assert not legacy.vpc_offload.possible and "legacy mode" in legacy.vpc_offload.reason
    assert vf_by_pci(sysfs, nics[0].vf_pci(1)) == p0.vfs[1]
    assert vf_by_pci(sysfs, nics[0].vf_pci(2)).driver == "vfio-pci"

    nics[2].remove()
    assert sorted(pf.name for pf in discover(sysfs)) == ["enp1s0f0", "enp1s0f1"]
    assert not {"enp2s0f0", "enp2s0f0w", "enp2s0f0v0", "enp2s0f0i1"} & set(links(node))
    assert not (sysfs / "bus" / "pci" / "devices" / "0000:02:00.0").exists()
    with pytest.raises(BackendError, match="simulated PF enp2s0f0: not in"):
        nics[2].pf_driver().get_vf("enp2s0f0", 0)


def test_pf_without_devlink_compat_has_unknown_mode(node, sysfs):
    SimNic(sysfs, node, vfs=1, devlink_compat=False).build()
    [pf] = discover(sysfs)
    assert pf.eswitch_mode is None
    assert pf.vpc_offload.possible and "every VF has a representor" in pf.vpc_offload.reason


def vf_mac(ns: Netns, ifname: str) -> str:
    return links(ns)[ifname]["address"]


def test_simulated_driver_sets_the_vf_mac_inside_the_namespace(sandbox, node, sysfs):
    nic = SimNic(sysfs, node, vfs=2).build()
    driver = nic.pf_driver()
    original = driver.get_vf(nic.pf, 0)
    assert original == VfState()

    with inside(node):
        driver.set_vf(nic.pf, 0, mac="02:00:5e:00:00:10", vlan=10)
    assert vf_mac(node, nic.vf_netdev(0)) == "02:00:5e:00:00:10"
    assert (driver.get_vf(nic.pf, 0).mac, driver.get_vf(nic.pf, 0).vlan) == (
        "02:00:5e:00:00:10", 10)

    # Called from outside the NIC's namespace (this thread, in the root namespace):
    # recorded only; no netdev anywhere is touched.
    before = vf_mac(node, nic.vf_netdev(1))
    driver.set_vf(nic.pf, 1, mac="02:00:5e:00:00:11")
    assert vf_mac(node, nic.vf_netdev(1)) == before
    assert driver.get_vf(nic.pf, 1).mac == "02:00:5e:00:00:11"

    # The VF netdev moved into a pod, as the CNI does: recorded only, no error.
    pod = sandbox.netns("pod")
    node.ip("link", "set", nic.vf_netdev(0), "netns", pod.name)
    with inside(node):
        driver.set_vf(nic.pf, 0, mac="02:00:5e:00:00:12")
        driver.restore_vf(nic.pf, 0, original)  # a zero MAC changes no netdev
    assert vf_mac(pod, nic.vf_netdev(0)) == "02:00:5e:00:00:10"
    assert driver.get_vf(nic.pf, 0) == original

    nic.remove()  # also with a VF end in another namespace
    assert set(links(pod)) == {"lo"}
    assert set(links(node)) == {"lo"}


def test_netlink_driver_requests_reach_the_pf_driver(node, sysfs):
    """The sim's PF is a veth, which has no VF operations: the kernel accepts the request
    (attribute policy passed) and answers EOPNOTSUPP from the missing driver op."""
    nic = SimNic(sysfs, node, vfs=1).build()
    with IPRoute(netns=node.path, flags=0) as ipr:
        driver = NetlinkPfDriver(ipr)
        with pytest.raises(BackendError, match=r"PF enp1s0f0 reports no VF 0 \(it has 0\)"):
            driver.get_vf(nic.pf, 0)
        with pytest.raises(BackendError, match=r"could not set mac, spoofchk, trust, link_state "
                                               r"of VF 0 on PF enp1s0f0: Operation not supp"):
            driver.set_vf(nic.pf, 0, mac="02:00:5e:00:00:20", spoofchk=False, trust=True,
                          link_state="enable")
        with pytest.raises(BackendError, match="PF enp1s0f9: no such network device"):
            driver.set_vf("enp1s0f9", 0, trust=True)


# ---------------------------------------------------------------- DPU mode


@pytest.fixture
def dpu(sandbox) -> Netns:
    return sandbox.netns("dpu")


@pytest.fixture
def dpu_sysfs(sandbox):
    return sandbox.dir("dpu") / "sys"


def addresses_of(ns: Netns, ifname: str) -> list[str]:
    [info] = json.loads(ns.ip("-j", "-4", "addr", "show", "dev", ifname).stdout)
    return [a["local"] for a in info["addr_info"]]


def test_dpu_mode_keeps_the_switch_out_of_the_host(sandbox, node, sysfs, dpu, dpu_sysfs):
    nics = [
        SimNic(sysfs, node, vfs=3, vf_driver={2: "vfio-pci"}, dpu_netns=dpu,
               dpu_sysfs_root=dpu_sysfs),
        SimNic(sysfs, node, pf="enp1s0f1", pf_pci="0000:01:00.1", vfs=1, dpu_netns=dpu,
               dpu_sysfs_root=dpu_sysfs),  # the NIC's second port, on the same DPU
    ]
    for nic in nics:
        nic.build()
    n0, n1 = nics
    assert (n0.dpu_uplink, n0.wire, n0.host_pf_representor, n0.representor(1)) == (
        "p0", "p0w", "pf0hpf", "pf0vf1")
    assert (n1.dpu_uplink, n1.representor(0), n1.switch_netns) == ("p1", "pf1vf0", dpu)

    # Links: the host has its PFs and the VF ends, nothing else; the DPU has the switch.
    host, arm = links(node), links(dpu)
    assert set(host) == {"lo", "enp1s0f0", "enp1s0f0v0", "enp1s0f0v1", "enp1s0f0v2",
                         "enp1s0f1", "enp1s0f1v0"}
    assert set(arm) == {"lo", "p0", "p0w", "pf0hpf", "pf0vf0", "pf0vf1", "pf0vf2",
                        "p1", "p1w", "pf1hpf", "pf1vf0"}
    for nic in nics:
        assert is_up(host[nic.pf]) and is_up(arm[nic.dpu_uplink])
        assert not is_up(arm[nic.wire]) and arm[nic.wire]["link"] == nic.dpu_uplink
        assert is_up(arm[nic.host_pf_representor])
        for i in range(nic.vfs):
            assert not is_up(host[nic.vf_netdev(i)]) and is_up(arm[nic.representor(i)])
            # Each pair spans the two namespaces: its peer is in the other one.
            assert "link_netnsid" in host[nic.vf_netdev(i)]
            assert "link_netnsid" in arm[nic.representor(i)]

    # The host's tree: PFs and VFs, no eswitch (no representors, switch id, port name, mode).
    pfs = {pf.name: pf for pf in discover(sysfs)}
    assert sorted(pfs) == ["enp1s0f0", "enp1s0f1"]
    for nic in nics:
        pf = pfs[nic.pf]
        assert (pf.pci, pf.num_vfs, pf.number) == (nic.pf_pci, nic.vfs, nic.pf_number)
        assert (pf.eswitch_mode, pf.switch_id, pf.uplink, pf.external_representors) == (
            None, None, None, [])
        assert [(vf.index, vf.pci, vf.representor) for vf in pf.vfs] == [
            (i, nic.vf_pci(i), None) for i in range(nic.vfs)]
        assert not pf.vpc_offload.possible
    assert [vf.netdev for vf in pfs["enp1s0f0"].vfs] == ["enp1s0f0v0", "enp1s0f0v1", None]
    assert vf_by_pci(sysfs, n0.vf_pci(1)) == pfs["enp1s0f0"].vfs[1]
    host_net = sysfs / "class" / "net"
    assert not list(host_net.glob("*/phys_switch_id")) and not list(host_net.glob("*/compat"))

    # The DPU's tree: p0 and p1, each with the host's functions of its PF number as
    # external representors; no VFs of its own.
    dpu_pfs = {pf.name: pf for pf in discover(dpu_sysfs)}
    assert sorted(dpu_pfs) == ["p0", "p1"]
    for nic in nics:
        pf, n = dpu_pfs[nic.dpu_uplink], nic.pf_number
        assert (pf.pci, pf.eswitch_mode, pf.switch_id, pf.uplink, pf.number, pf.vfs) == (
            nic.dpu_pci, "switchdev", nic.switch_id, nic.dpu_uplink, n, [])
        assert {(r.netdev, r.port) for r in pf.external_representors} == (
            {(nic.host_pf_representor, PortName("pf", n, None, 1))}
            | {(nic.representor(i), PortName("vf", n, i, 1)) for i in range(nic.vfs)})
        for i in range(nic.vfs):
            assert host_vf_representor(dpu_sysfs, n, i) == nic.representor(i)
    assert dpu_pfs["p0"].switch_id == dpu_pfs["p1"].switch_id  # one NIC, one eswitch
    with pytest.raises(BackendError, match="c1pf0vf3 .*is VF 3 enabled on the host"):
        host_vf_representor(dpu_sysfs, 0, 3)
    with pytest.raises(BackendError, match=r"no eswitch port \(netdev with a phys_switch_id"):
        host_vf_representor(sysfs, 0, 0)  # the host does not see the switch

    # A frame path: VF end in the host, representor on the DPU, one wire between them.
    vf, rep = n0.vf_netdev(0), n0.representor(0)
    node.ip("addr", "add", "192.0.2.1/30", "dev", vf)
    node.ip("link", "set", vf, "up")
    dpu.ip("addr", "add", "192.0.2.2/30", "dev", rep)
    assert node.ping("192.0.2.2", count=3) and dpu.ping("192.0.2.1", count=3)
    assert addresses_of(node, vf) == ["192.0.2.1"] and addresses_of(dpu, rep) == ["192.0.2.2"]

    # The PF driver is the host's: registered with the host namespace, applied there.
    driver = n0.pf_driver()
    assert json.loads(n0.state_file.read_text())["pfs"][n0.pf]["netns"]["path"] == node.path
    with inside(node):
        driver.set_vf(n0.pf, 1, mac="02:00:5e:00:00:31")
    assert links(node)[n0.vf_netdev(1)]["address"] == "02:00:5e:00:00:31"
    assert driver.get_vf(n0.pf, 1).mac == "02:00:5e:00:00:31"

    # remove() undoes both sides, one port at a time; the other port stays whole.
    pod = sandbox.netns("pod")
    node.ip("link", "set", n0.vf_netdev(1), "netns", pod.name)  # a VF in a pod
    n0.remove()
    assert set(links(node)) == {"lo", "enp1s0f1", "enp1s0f1v0"}
    assert set(links(dpu)) == {"lo", "p1", "p1w", "pf1hpf", "pf1vf0"}
    assert set(links(pod)) == {"lo"}
    assert [pf.name for pf in discover(sysfs)] == ["enp1s0f1"]
    assert [pf.name for pf in discover(dpu_sysfs)] == ["p1"]
    assert sorted(p.name for p in (dpu_sysfs / "class" / "net").iterdir()) == [
        "p1", "pf1hpf", "pf1vf0"]
    with pytest.raises(BackendError, match="simulated PF enp1s0f0: not in"):
        driver.get_vf(n0.pf, 0)
    n1.remove()
    assert set(links(node)) == set(links(dpu)) == {"lo"}
    assert discover(sysfs) == discover(dpu_sysfs) == []


def test_dpu_mode_without_devlink_compat_has_no_mode_file(node, sysfs, dpu, dpu_sysfs):
    nic = SimNic(sysfs, node, vfs=1, devlink_compat=False, dpu_netns=dpu,
                 dpu_sysfs_root=dpu_sysfs).build()
    [pf] = discover(dpu_sysfs)
    assert (pf.eswitch_mode, pf.switch_id) == (None, nic.switch_id)
    assert host_vf_representor(dpu_sysfs, 0, 0) == "pf0vf0"


def test_dpu_mode_arguments(node, sysfs, dpu, dpu_sysfs):
    with pytest.raises(ValueError, match="both dpu_netns and dpu_sysfs_root"):
        SimNic(sysfs, node, dpu_netns=dpu)
    with pytest.raises(ValueError, match="both dpu_netns and dpu_sysfs_root"):
        SimNic(sysfs, node, dpu_sysfs_root=dpu_sysfs)
    with pytest.raises(ValueError, match="a DPU's eswitch is in switchdev mode, not legacy"):
        SimNic(sysfs, node, mode="legacy", dpu_netns=dpu, dpu_sysfs_root=dpu_sysfs)
    with pytest.raises(ValueError, match="a namespace of its own"):
        SimNic(sysfs, node, dpu_netns=node, dpu_sysfs_root=dpu_sysfs)
    with pytest.raises(ValueError, match="a sysfs tree of its own"):
        SimNic(sysfs, node, dpu_netns=dpu, dpu_sysfs_root=sysfs)
    assert set(links(node)) == set(links(dpu)) == {"lo"}
