"""SR-IOV discovery on fake sysfs trees laid out as the kernel lays out /sys.

As on a real node, `class/net/<name>` and `bus/pci/devices/<bdf>` are links
into `devices/`, and mlx5 representors hang under their PF's PCI device.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Optional

import pytest

from vpcni.backends.sriov.sysfs import (PF, VF, PortName, discover, host_vf_representor,
                                        parse_phys_port_name, vf_by_pci)
from vpcni.core.errors import BackendError, InvalidConfig

SWITCH = "b8cef60300a1b2c3"


class FakeSys:
    """A /sys with PCI devices under devices/pci0000:00 and links as the kernel makes them."""

    def __init__(self, root: Path):
        self.root = root

    def _link(self, path: Path, target: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(target, path.parent), path)

    def _attrs(self, where: Path, **attrs) -> None:
        for name, value in attrs.items():
            path = where / name.replace("__", "/")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(f"{value}\n")

    def pci(self, bdf: str, driver: Optional[str] = None, **attrs) -> Path:
        device = self.root / "devices" / "pci0000:00" / bdf
        device.mkdir(parents=True)
        self._link(self.root / "bus" / "pci" / "devices" / bdf, device)
        if driver:
            drivers = self.root / "bus" / "pci" / "drivers" / driver
            drivers.mkdir(parents=True, exist_ok=True)
            self._link(device / "driver", drivers)
        self._attrs(device, **attrs)
        return device

    def netdev(self, name: str, device: Optional[Path] = None, **attrs) -> Path:
        parent = device if device is not None else self.root / "devices" / "virtual"
        netdev = parent / "net" / name
        netdev.mkdir(parents=True)
        if device is not None:
            self._link(netdev / "device", device)
        self._link(self.root / "class" / "net" / name, netdev)
        self._attrs(netdev, **attrs)
        return netdev

    def pf(self, name: str, bdf: str, vfs: list[tuple[str, str, Optional[str]]],
           total: int = 8, mode: Optional[str] = None, port: Optional[str] = None,
           switch_id: Optional[str] = None) -> Path:
        """A PF netdev with VFs given as (bdf, driver, netdev or None)."""
        device = self.pci(bdf, "mlx5_core", sriov_totalvfs=total, sriov_numvfs=len(vfs))
        attrs = {}
        if mode:
            attrs["compat__devlink__mode"] = mode
        if port:
            attrs["phys_port_name"] = port
        if switch_id:
            attrs["phys_switch_id"] = switch_id
        self.netdev(name, device, **attrs)
        for index, (vf_bdf, driver, netdev) in enumerate(vfs):
            vf_dev = self.pci(vf_bdf, driver)
            self._link(device / f"virtfn{index}", vf_dev)
            self._link(vf_dev / "physfn", device)
            if netdev:
                self.netdev(netdev, vf_dev)
        return device

    def representor(self, name: str, pf_device: Path, port: str,
                    switch_id: str = SWITCH) -> None:
        self.netdev(name, pf_device, phys_port_name=port, phys_switch_id=switch_id)


@pytest.fixture
def fake(tmp_path) -> FakeSys:
    return FakeSys(tmp_path / "sys")


def switchdev_nic(fake: FakeSys) -> None:
    """Both ports of one mlx5 NIC in switchdev mode; VF 2 of port 0 is on vfio-pci."""
    p0 = fake.pf("enp3s0f0np0", "0000:03:00.0", [
        ("0000:03:00.2", "mlx5_core", "enp3s0f0v0"),
        ("0000:03:00.3", "mlx5_core", "enp3s0f0v1"),
        ("0000:03:00.4", "vfio-pci", None)],
        mode="switchdev", port="p0", switch_id=SWITCH)
    for i in range(3):
        fake.representor(f"eth{i}", p0, f"pf0vf{i}")
    p1 = fake.pf("enp3s0f1np1", "0000:03:00.1", [("0000:03:01.2", "mlx5_core", "enp3s0f1v0")],
                 mode="switchdev", port="p1", switch_id=SWITCH)
    fake.representor("eth10", p1, "pf1vf0")
    # Netdevs that are no eswitch ports at all.
    fake.netdev("lo")
    fake.netdev("veth1")


def by_name(pfs: list[PF]) -> dict[str, PF]:
    return {pf.name: pf for pf in pfs}


# ---------------------------------------------------------------- port names


@pytest.mark.parametrize("name, port", [
    ("p0", PortName("uplink", 0)),
    ("p1", PortName("uplink", 1)),
    ("pf0", PortName("pf", 0)),
    ("pf1vf3", PortName("vf", 1, 3)),
    ("c1pf0vf12", PortName("vf", 0, 12, 1)),
    ("c0pf0vf1", PortName("vf", 0, 1, 0)),
    ("c1pf0", PortName("pf", 0, None, 1)),
    ("pf0sf88", PortName("sf", 0, 88)),
    ("", None), (None, None), ("eth0", None), ("p0s1", None), ("pf", None), ("vf0", None),
])
def test_parse_phys_port_name(name, port):
    assert parse_phys_port_name(name) == port


def test_external_means_another_controller():
    assert parse_phys_port_name("c1pf0vf0").external
    assert not parse_phys_port_name("c0pf0vf0").external
    assert not parse_phys_port_name("pf0vf0").external


# ---------------------------------------------------------------- discover


def test_switchdev_pfs_vfs_and_representors(fake):
    switchdev_nic(fake)
    pfs = discover(fake.root)
    # Representors sit under the PF's PCI device (sriov_totalvfs visible) but are no PFs.
    assert [pf.name for pf in pfs] == ["enp3s0f0np0", "enp3s0f1np1"]
    p0, p1 = pfs
    assert (p0.pci, p0.total_vfs, p0.num_vfs, p0.eswitch_mode, p0.switch_id, p0.uplink,
            p0.number) == ("0000:03:00.0", 8, 3, "switchdev", SWITCH, "enp3s0f0np0", 0)
    assert p0.vfs == [
        VF("enp3s0f0np0", "0000:03:00.0", 0, "0000:03:00.2", "mlx5_core", "enp3s0f0v0", "eth0"),
        VF("enp3s0f0np0", "0000:03:00.0", 1, "0000:03:00.3", "mlx5_core", "enp3s0f0v1", "eth1"),
        VF("enp3s0f0np0", "0000:03:00.0", 2, "0000:03:00.4", "vfio-pci", None, "eth2"),
    ]
    # One switch id for both ports: the PF number keeps their representors apart.
    assert (p1.number, p1.uplink) == (1, "enp3s0f1np1")
    assert [(vf.index, vf.pci, vf.representor) for vf in p1.vfs] == [(0, "0000:03:01.2", "eth10")]
    assert p0.vpc_offload.possible and p1.vpc_offload.possible
    assert "switchdev" in p0.vpc_offload.reason


def test_vfio_vf_has_no_netdev_but_a_representor(fake):
    switchdev_nic(fake)
    vf = discover(fake.root)[0].vfs[2]
    assert (vf.driver, vf.netdev, vf.representor, vf.userspace) == ("vfio-pci", None, "eth2",
                                                                     True)
    assert not discover(fake.root)[0].vfs[0].userspace


def test_legacy_pf_has_no_representors_and_cannot_offload(fake):
    fake.pf("ens1f0", "0000:05:00.0", [("0000:05:00.2", "iavf", "ens1f0v0")], mode="legacy",
            port="p0")
    [pf] = discover(fake.root)
    assert (pf.eswitch_mode, pf.switch_id, pf.uplink) == ("legacy", None, None)
    assert pf.vfs[0].netdev == "ens1f0v0" and pf.vfs[0].representor is None
    offload = pf.vpc_offload
    assert not offload.possible
    assert offload.reason == ("ens1f0 is in legacy mode: VFs bypass the host switch: only a "
                              "VLAN mapped to the VNI outside the host could carry a VPC")


def test_unknown_mode_decided_by_representors(fake):
    # No compat/devlink/mode (not mlx5): None, not a guess.
    dev = fake.pf("ens2f0", "0000:06:00.0", [("0000:06:00.2", "ice", "ens2f0v0")],
                  switch_id=SWITCH, port="p0")
    fake.representor("ens2f0r0", dev, "pf0vf0")
    fake.pf("ens3f0", "0000:07:00.1", [("0000:07:00.2", "ice", "ens3f0v0")])
    with_reps, without = discover(fake.root)
    assert with_reps.eswitch_mode is None and with_reps.vpc_offload.possible
    assert "every VF has a representor" in with_reps.vpc_offload.reason
    assert without.eswitch_mode is None and not without.vpc_offload.possible
    assert "unknown" in without.vpc_offload.reason
    assert "devlink dev eswitch show pci/0000:07:00.1" in without.vpc_offload.reason
    assert "treated as legacy" in without.vpc_offload.reason
    # No phys_port_name: the PF number is the PCI function.
    assert without.number == 1


def test_pf_number_from_pci_function_matches_representors(fake):
    dev = fake.pf("ens4f1", "0000:08:00.1", [("0000:08:01.0", "mlx5_core", "ens4f1v0")],
                  mode="switchdev", switch_id=SWITCH)
    fake.representor("rep0", dev, "pf1vf0")
    fake.representor("rep00", dev, "pf0vf0")  # VF 0 of the NIC's other PF
    [pf] = discover(fake.root)
    assert (pf.number, pf.uplink, pf.vfs[0].representor) == (1, None, "rep0")


def test_representor_with_another_switch_id_is_not_ours(fake):
    dev = fake.pf("ens5f0", "0000:09:00.0", [("0000:09:00.2", "mlx5_core", "ens5f0v0")],
                  mode="switchdev", port="p0", switch_id=SWITCH)
    fake.representor("foreign", dev, "pf0vf0", switch_id="0011223344556677")
    [pf] = discover(fake.root)
    assert pf.vfs[0].representor is None
    assert not pf.vpc_offload.possible
    assert "VF 0 has no representor" in pf.vpc_offload.reason


def test_pf_without_vfs(fake):
    fake.pf("ens6f0", "0000:0a:00.0", [], total=16, mode="switchdev", port="p0",
            switch_id=SWITCH)
    fake.pf("eno1", "0000:0b:00.0", [], total=0)
    pfs = by_name(discover(fake.root))
    enabled_none, unable = pfs["ens6f0"], pfs["eno1"]
    assert enabled_none.vfs == [] and enabled_none.num_vfs == 0
    assert enabled_none.vpc_offload == (False, "ens6f0 (0000:0a:00.0) has no VFs enabled "
                                               "(sriov_numvfs is 0 of 16)")
    assert unable.vpc_offload == (False, "eno1 (0000:0b:00.0) supports no VFs "
                                         "(sriov_totalvfs is 0)")


def test_dpu_arm_side_sees_host_functions_as_external(fake):
    # BlueField Arm cores: p0 is the uplink; the host's PF and VFs are c1pf0*, and the
    # Arm's own VF 0 (local controller) has pf0vf0.
    p0 = fake.pf("p0", "0000:03:00.0", [("0000:03:00.2", "mlx5_core", "arm0v0")],
                 mode="switchdev", port="p0", switch_id=SWITCH)
    fake.representor("pf0hpf", p0, "c1pf0")
    fake.representor("pf0vf0", p0, "c1pf0vf0")
    fake.representor("pf0vf1", p0, "c1pf0vf1")
    fake.representor("en3f0pf0sf0", p0, "pf0sf0")
    fake.representor("armrep0", p0, "pf0vf0")
    fake.representor("pf1vf0", p0, "c1pf1vf0")  # the host's second PF: not p0's
    [pf] = discover(fake.root)
    assert pf.uplink == "p0"
    assert pf.vfs[0].representor == "armrep0"  # never the host's VF 0
    assert {(r.netdev, r.port) for r in pf.external_representors} == {
        ("pf0hpf", PortName("pf", 0, None, 1)),
        ("pf0vf0", PortName("vf", 0, 0, 1)),
        ("pf0vf1", PortName("vf", 0, 1, 1)),
    }


# ---------------------------------------------------------------- host_vf_representor


def dpu_arm_side(fake: FakeSys) -> None:
    """A BlueField's Arm side: both ports, the host's PF 0 with 2 VFs and PF 1 with 1."""
    p0 = fake.pf("p0", "0000:03:00.0", [("0000:03:00.2", "mlx5_core", "arm0v0")],
                 mode="switchdev", port="p0", switch_id=SWITCH)
    p1 = fake.pf("p1", "0000:03:00.1", [], mode="switchdev", port="p1", switch_id=SWITCH)
    fake.representor("pf0hpf", p0, "c1pf0")
    fake.representor("pf0vf0", p0, "c1pf0vf0")
    fake.representor("pf0vf1", p0, "c1pf0vf1")
    fake.representor("armrep0", p0, "pf0vf0")  # the Arm's own VF 0, local controller
    fake.representor("pf1hpf", p1, "c1pf1")
    fake.representor("pf1vf0", p1, "c1pf1vf0")
    fake.representor("ext2rep", p0, "c2pf0vf0")  # a second external host
    fake.netdev("lo")


def test_host_vf_representor_resolves_each_host_vf(fake):
    dpu_arm_side(fake)
    assert host_vf_representor(fake.root, 0, 0) == "pf0vf0"
    assert host_vf_representor(fake.root, 0, 1) == "pf0vf1"
    assert host_vf_representor(fake.root, 1, 0) == "pf1vf0"
    assert host_vf_representor(fake.root, 0, 0, controller=2) == "ext2rep"
    # Controller 0 is the DPU's own: `pf0vf0` without a prefix, never the host's VF 0.
    assert host_vf_representor(fake.root, 0, 0, controller=0) == "armrep0"
    # The same answer discovery gives.
    [p0] = [pf for pf in discover(fake.root) if pf.name == "p0"]
    assert {(r.port.pf, r.port.number): r.netdev for r in p0.external_representors
            if r.port.flavour == "vf" and r.port.controller == 1} == {(0, 0): "pf0vf0",
                                                                      (0, 1): "pf0vf1"}


def test_host_vf_representor_accepts_a_string_root(fake):
    dpu_arm_side(fake)
    assert host_vf_representor(str(fake.root), 0, 1) == "pf0vf1"


def test_host_vf_representor_names_the_missing_vf(fake):
    dpu_arm_side(fake)
    with pytest.raises(BackendError, match=r"^no representor of host PF 0 VF 5 \(controller 1\):"
                                           r" no eswitch port with phys_port_name c1pf0vf5 "
                                           r"under .*/class/net \(there are VF 0, 1 of that "
                                           r"PF\); is VF 5 enabled on the host"):
        host_vf_representor(fake.root, 0, 5)


def test_host_vf_representor_names_the_missing_pf(fake):
    dpu_arm_side(fake)
    with pytest.raises(BackendError, match=r"phys_port_name c1pf3vf0 under .*, nor any of that "
                                           r"controller's PF 3; is this a DPU"):
        host_vf_representor(fake.root, 3, 0)
    with pytest.raises(BackendError, match=r"c3pf0vf0 .* nor any of that controller's PF 0"):
        host_vf_representor(fake.root, 0, 0, controller=3)


def test_host_vf_representor_ignores_ports_without_a_switch_id(fake):
    # A host (or a legacy NIC): `pf0vf0` as a name means nothing without phys_switch_id.
    dev = fake.pf("ens1f0", "0000:05:00.0", [("0000:05:00.2", "mlx5_core", "ens1f0v0")],
                  mode="legacy")
    fake.netdev("fake0", dev, phys_port_name="c1pf0vf0")
    with pytest.raises(BackendError, match=r"no eswitch port \(netdev with a phys_switch_id\) "
                                           r"under .*/class/net; is the eswitch in switchdev"):
        host_vf_representor(fake.root, 0, 0)


def test_host_vf_representor_without_a_tree(tmp_path):
    with pytest.raises(BackendError, match=r"no representor of host PF 0 VF 0 \(controller 1\)"
                                           r": .*nothing/class/net does not exist"):
        host_vf_representor(tmp_path / "nothing", 0, 0)


def test_host_vf_representor_refuses_two_eswitches_under_one_root(fake):
    dpu_arm_side(fake)
    other = fake.pf("q0", "0000:04:00.0", [], mode="switchdev", port="p0",
                    switch_id="0011223344556677")
    fake.representor("q0vf0", other, "c1pf0vf0", switch_id="0011223344556677")
    with pytest.raises(BackendError, match=r"several representors with phys_port_name c1pf0vf0"
                                           r" under .*: pf0vf0, q0vf0"):
        host_vf_representor(fake.root, 0, 0)


@pytest.mark.parametrize("args", [(-1, 0), (0, -2), (0, 0, -1), ("0", 0), (0, True)])
def test_host_vf_representor_rejects_what_is_no_number(fake, args):
    with pytest.raises(ValueError, match="host_vf_representor: .* is not a number >= 0"):
        host_vf_representor(fake.root, *args)


def test_missing_tree_means_no_pfs(tmp_path):
    assert discover(tmp_path / "nothing") == []


def test_garbage_in_sriov_numvfs_names_the_file(fake):
    device = fake.pf("ens7f0", "0000:0c:00.0", [])
    (device / "sriov_numvfs").write_text("many\n")
    with pytest.raises(BackendError, match=r"sriov_numvfs: expected an integer, found 'many'"):
        discover(fake.root)


# ---------------------------------------------------------------- vf_by_pci


def test_vf_by_pci_finds_the_vf_and_its_representor(fake):
    switchdev_nic(fake)
    vf = vf_by_pci(fake.root, "0000:03:00.3")
    assert vf == discover(fake.root)[0].vfs[1]
    assert vf_by_pci(fake.root, "0000:03:01.2").representor == "eth10"
    assert vf_by_pci(fake.root, "0000:03:00.4").driver == "vfio-pci"


def test_vf_by_pci_accepts_upper_case(fake):
    fake.pf("ens9f0", "0000:0a:00.0", [("0000:0a:00.2", "mlx5_core", "ens9f0v0")])
    assert vf_by_pci(fake.root, "0000:0A:00.2").pci == "0000:0a:00.2"


@pytest.mark.parametrize("pci", ["03:00.2", "0000:03:00.8", "0000:03:20.0", "zz", "",
                                 "0000:03:00.2/../..", None, 3])
def test_vf_by_pci_rejects_what_is_no_pci_address(fake, pci):
    switchdev_nic(fake)
    with pytest.raises(InvalidConfig, match="deviceID") as err:
        vf_by_pci(fake.root, pci)
    assert err.value.code == 7


def test_vf_by_pci_unknown_device(fake):
    switchdev_nic(fake)
    with pytest.raises(InvalidConfig, match=r"deviceID 0000:03:07.1: no such PCI device \(.*"
                                            r"bus/pci/devices/0000:03:07.1 does not exist"):
        vf_by_pci(fake.root, "0000:03:07.1")


def test_vf_by_pci_of_a_pf_is_refused(fake):
    switchdev_nic(fake)
    with pytest.raises(InvalidConfig, match=r"deviceID 0000:03:00.0 is not an SR-IOV VF"):
        vf_by_pci(fake.root, "0000:03:00.0")


def test_vf_by_pci_names_the_field(fake):
    with pytest.raises(InvalidConfig, match=r"^pciBusID 'x' is not a PCI address"):
        vf_by_pci(fake.root, "x", field_name="pciBusID")


def test_vf_by_pci_pf_without_netdev(fake):
    fake.pf("ens8f0", "0000:0d:00.0", [("0000:0d:00.2", "vfio-pci", None)])
    # What a PF looks like with its driver unbound: no netdev.
    os.unlink(fake.root / "class" / "net" / "ens8f0")
    shutil.rmtree(fake.root / "devices" / "pci0000:00" / "0000:0d:00.0" / "net")
    with pytest.raises(BackendError, match=r"PF 0000:0d:00.0 of VF 0000:0d:00.2 has no netdev"):
        vf_by_pci(fake.root, "0000:0d:00.2")
