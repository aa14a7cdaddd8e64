"""A simulated SR-IOV NIC inside a network namespace, for the tests and the lab.

This simulates the NIC below the PF-driver boundary only: a fake sysfs tree
that `vpcni.backends.sriov.sysfs` reads as it reads /sys, veth pairs that
stand in for VFs and their representors, and a state file for
`SimulatedPfDriver`. No hardware, no offload, no wire: the sriov backend
above the boundary runs unchanged, the NIC below it is make-believe.

What it builds:

* sysfs (under `sysfs_root`): the PF's PCI device with `sriov_totalvfs`,
  `sriov_numvfs`, `virtfn<N>` links and its driver; each VF's PCI device
  with `physfn`, a `driver` link to `bus/pci/drivers/<name>` and, for a
  netdev driver, `net/<netdev>`; the PF netdev with `phys_port_name` `p<N>`,
  `compat/devlink/mode` (mlx5 style) and, in switchdev mode,
  `phys_switch_id` on it and on one representor per VF (`pf<N>vf<M>`). As on
  mlx5 the representors' netdevs hang under the PF's PCI device, and
  `class/net/<name>` links to each netdev. Two PFs on the same PCI bus and
  device share a switch id, as the ports of one NIC do.
* links (inside `netns`, never in the root namespace): the PF as one end
  of a veth pair (up) whose other end, `<pf>w`, is the wire behind the
  physical port (down, not in sysfs, for a lab to connect); per VF a veth
  pair. One end is the VF netdev
  `<pf>v<N>` (down, for the CNI to move into a pod). The other end is, in
  switchdev mode, the representor `<pf>r<N>` (up, for the switch); in legacy
  mode the NIC-internal end `<pf>i<N>`: it exists because a veth has two
  ends, is kept down and is not in sysfs; nothing may use it (a legacy VF
  talks to the wire, which is not simulated).
* A VF on a user-space driver (vfio-pci, ...) has no netdev in sysfs, but its
  veth pair is created all the same: the representor needs a peer, and a
  simulated VM can take the VF end.
* VF n of a PF with PCI function f sits at device `d + 1 + 4f + n // 8`,
  function `n % 8` (d: the PF's device), so the PFs of one NIC never share a
  VF address.

DPU mode (`dpu_netns` and `dpu_sysfs_root` given): the NIC is a DPU's
(BlueField style) and its eswitch belongs to the DPU's Arm side, a second
namespace with a sysfs tree of its own. Nothing of the switch is in the host:

* host (`netns`, `sysfs_root`): the PF netdev and the VF netdevs `<pf>v<N>`,
  nothing else. Its sysfs has the PF's PCI device (`sriov_totalvfs`,
  `sriov_numvfs`, `virtfn<N>`, driver) and the VFs (driver, `net/`), but no
  representor, no `phys_switch_id`, no `phys_port_name` and no
  `compat/devlink/mode`: the host does not see the eswitch, so discovery
  reports its eswitch mode as None (unknown; the PF's number is its PCI
  function) and the host alone cannot offload a VPC (`PF.vpc_offload`).
* DPU (`dpu_netns`, `dpu_sysfs_root`), names as on a BlueField's Arm cores,
  N being the host PF's number (its PCI function): the uplink `p<N>` (up),
  one end of a veth whose other end `p<N>w` is the wire (down, not in sysfs);
  per host VF M its representor `pf<N>vf<M>` (up), the other end of the VF's
  veth; the host PF's representor `pf<N>hpf` (up), the other end of the host
  PF's veth. In the DPU's sysfs, `p<N>` is a PF of the Arm's own (PCI
  `0000:03:00.<N>`, as on a BlueField, with `sriov_totalvfs` and
  `sriov_numvfs` 0: the Arm's own VFs are not simulated), `phys_port_name`
  `p<N>`, `phys_switch_id` and `compat/devlink/mode` switchdev (without
  `devlink_compat`: no mode file); the representors hang under its PCI
  device with the same `phys_switch_id` and `phys_port_name` `c1pf<N>vf<M>`
  (`c1pf<N>` for the host PF's), so that `discover(dpu_sysfs_root)` lists
  them in `PF.external_representors` of `p<N>` and `host_vf_representor`
  finds them.
* The pairs that span the two namespaces are born with both ends inside
  them (`ip -n <host> link add ... peer name ... netns <dpu>`).
* The PF driver is the host's: the state file (under the host's
  `sysfs_root` by default) registers the VFs with the host namespace.
* Both ports of one NIC (PCI functions 0 and 1) may share a DPU namespace
  and tree; two NICs with the same function number may not (their names
  would clash): give each its own.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

from vpcni.backends.sriov.pfdriver import SimulatedPfDriver
from vpcni.backends.sriov.sysfs import USERSPACE_DRIVERS, check_pci_address

from .netns import Netns

IFNAMSIZ = 15
MAX_VFS = 32
NETDEV_DRIVER = "mlx5_core"
HOST_CONTROLLER = 1  # the `c1` of a host function's port name, seen from the DPU


class SimNic:
    """One PF of a simulated NIC, its VFs and their representors (on a DPU in DPU mode)."""

    def __init__(self, sysfs_root: Path, netns: Netns, pf: str = "enp1s0f0",
                 pf_pci: str = "0000:01:00.0", vfs: int = 4, mode: str = "switchdev",
                 vf_driver: Union[str, Sequence[str], Mapping[int, str]] = NETDEV_DRIVER,
                 total_vfs: Optional[int] = None, devlink_compat: bool = True,
                 state_file: Optional[Path] = None, dpu_netns: Optional[Netns] = None,
                 dpu_sysfs_root: Optional[Path] = None):
        if mode not in ("legacy", "switchdev"):
            raise ValueError(f"SimNic mode {mode!r}: expected legacy or switchdev")
        if not 0 <= vfs <= MAX_VFS:
            raise ValueError(f"SimNic vfs {vfs}: expected 0 to {MAX_VFS}")
        if (dpu_netns is None) != (dpu_sysfs_root is None):
            raise ValueError("SimNic DPU mode needs both dpu_netns and dpu_sysfs_root")
        self.sysfs_root = Path(sysfs_root)
        self.netns = netns
        self.dpu_netns = dpu_netns
        self.dpu_sysfs_root = Path(dpu_sysfs_root) if dpu_sysfs_root is not None else None
        if self.dpu:
            if mode != "switchdev":
                raise ValueError("SimNic DPU mode: a DPU's eswitch is in switchdev mode, "
                                 f"not {mode}")
            if dpu_netns.name == netns.name:
                raise ValueError("SimNic DPU mode: the DPU needs a namespace of its own")
            if (os.path.abspath(self.dpu_sysfs_root) ==
                    os.path.abspath(self.sysfs_root)):
                raise ValueError("SimNic DPU mode: the DPU needs a sysfs tree of its own")
        self.pf = pf
        self.pf_pci = check_pci_address(pf_pci, "pf_pci")
        self.vfs = vfs
        self.total_vfs = vfs if total_vfs is None else total_vfs
        self.mode = mode
        self.devlink_compat = devlink_compat
        self.state_file = Path(state_file or self.sysfs_root / "simnic" / "pf-driver.json")
        self.drivers = self._drivers(vf_driver)
        domain, bus, devfn = self.pf_pci.split(":")
        self._bus = f"{domain}:{bus}"
        device, function = devfn.split(".")
        self._device, self.function = int(device, 16), int(function)
        self.pf_number = self.function  # the N of its `p<N>` and `pf<N>vf<M>` port names
        names = [pf, self.wire] + [name for i in range(vfs)
                                   for name in (self.vf_netdev(i), self.peer(i))]
        if self.dpu:
            names += [self.dpu_uplink, self.host_pf_representor]
        too_long = [name for name in names if len(name) > IFNAMSIZ]
        if too_long:
            raise ValueError(f"SimNic names longer than {IFNAMSIZ} characters: {too_long}")
        self.switch_id = hashlib.sha1(f"{self._bus}:{self._device:02x}".encode()).hexdigest()[:16]
        if vfs and self._vf_device(vfs - 1) > 0x1F:
            raise ValueError(f"SimNic: {vfs} VFs of PF {self.pf_pci} do not fit on bus "
                             f"{self._bus}")

    def _drivers(self, spec) -> list[str]:
        if isinstance(spec, str):
            return [spec] * self.vfs
        if isinstance(spec, Mapping):
            return [spec.get(i, NETDEV_DRIVER) for i in range(self.vfs)]
        drivers = list(spec)
        if len(drivers) != self.vfs:
            raise ValueError(f"SimNic vf_driver: {len(drivers)} drivers for {self.vfs} VFs")
        return drivers

    # ------------------------------------------------------------ names

    @property
    def dpu(self) -> bool:
        """DPU mode: the eswitch, its representors and the uplink are the DPU's."""
        return self.dpu_netns is not None

    @property
    def switch_netns(self) -> Netns:
        """Where the representors, the uplink and the wire are: the DPU's namespace in
        DPU mode, else the host's."""
        return self.dpu_netns if self.dpu_netns is not None else self.netns

    @property
    def dpu_uplink(self) -> Optional[str]:
        """The DPU's uplink (its PF netdev `p<N>`, phys_port_name `p<N>`); None outside
        DPU mode."""
        return f"p{self.pf_number}" if self.dpu else None

    @property
    def dpu_pci(self) -> Optional[str]:
        """The PCI address of `dpu_uplink`'s function in the DPU's tree."""
        return f"0000:03:00.{self.function}" if self.dpu else None

    @property
    def host_pf_representor(self) -> Optional[str]:
        """In DPU mode, the host PF's representor on the DPU (phys_port_name `c1pf<N>`,
        the other end of the host PF's veth), named as on a BlueField; else None."""
        return f"pf{self.pf_number}hpf" if self.dpu else None

    @property
    def wire(self) -> str:
        """The uplink veth's other end: the network behind the NIC's port (behind the
        DPU's `p<N>` in DPU mode)."""
        return f"{self.dpu_uplink or self.pf}w"

    def vf_netdev(self, index: int) -> str:
        """The VF's end of its veth pair (in sysfs only for a netdev driver)."""
        return f"{self.pf}v{index}"

    def representor(self, index: int) -> Optional[str]:
        """The VF's representor; None in legacy mode. In DPU mode it is the DPU's
        `pf<N>vf<M>` (phys_port_name `c1pf<N>vf<M>`), in `dpu_netns`."""
        if self.dpu:
            return f"pf{self.pf_number}vf{index}"
        return f"{self.pf}r{index}" if self.mode == "switchdev" else None

    def peer(self, index: int) -> str:
        """The other end of the VF's veth: its representor, or the legacy NIC-internal end."""
        return self.representor(index) or f"{self.pf}i{index}"

    def _vf_device(self, index: int) -> int:
        return self._device + 1 + 4 * self.function + index // 8

    def vf_pci(self, index: int) -> str:
        return f"{self._bus}:{self._vf_device(index):02x}.{index % 8}"

    def has_netdev(self, index: int) -> bool:
        return self.drivers[index] not in USERSPACE_DRIVERS

    def pf_driver(self) -> SimulatedPfDriver:
        return SimulatedPfDriver(self.state_file)

    # ------------------------------------------------------------ build

    def build(self) -> "SimNic":
        """Write the sysfs tree(s), create the links in the namespace(s), register the VFs."""
        self._write_sysfs()
        if self.dpu:
            self._build_dpu_links()
        else:
            self.netns.ip("link", "add", self.pf, "type", "veth", "peer", "name", self.wire)
            self.netns.ip("link", "set", self.pf, "up")
            for i in range(self.vfs):
                self.netns.ip("link", "add", self.vf_netdev(i), "type", "veth",
                              "peer", "name", self.peer(i))
                if self.mode == "switchdev":
                    self.netns.ip("link", "set", self.peer(i), "up")
        self.pf_driver().add_pf(self.pf, self.netns.path,
                                {i: self.vf_netdev(i) for i in range(self.vfs)})
        return self

    def _build_dpu_links(self) -> None:
        """Host ends born in the host namespace, switch ends born in the DPU's."""
        host, dpu = self.netns, self.dpu_netns
        dpu.ip("link", "add", self.dpu_uplink, "type", "veth", "peer", "name", self.wire)
        dpu.ip("link", "set", self.dpu_uplink, "up")
        for near, far in [(self.pf, self.host_pf_representor)] + [
                (self.vf_netdev(i), self.representor(i)) for i in range(self.vfs)]:
            host.ip("link", "add", near, "type", "veth", "peer", "name", far,
                    "netns", dpu.name)
            dpu.ip("link", "set", far, "up")
        host.ip("link", "set", self.pf, "up")

    def remove(self) -> None:
        """Undo `build`; tolerates a half-built NIC and VF netdevs moved elsewhere."""
        switch = self.switch_netns
        for i in range(self.vfs):
            switch.ip("link", "del", self.peer(i), check=False)
        self.netns.ip("link", "del", self.pf, check=False)
        if self.dpu:
            switch.ip("link", "del", self.dpu_uplink, check=False)
        net = self.sysfs_root / "class" / "net"
        for name in [self.pf] + [n for i in range(self.vfs)
                                 for n in (self.vf_netdev(i), self.representor(i)) if n]:
            if (net / name).is_symlink():
                (net / name).unlink()
        for pci in [self.pf_pci] + [self.vf_pci(i) for i in range(self.vfs)]:
            shutil.rmtree(self._pci_dir(pci), ignore_errors=True)
        if self.dpu:
            net = self.dpu_sysfs_root / "class" / "net"
            for name in [self.dpu_uplink, self.host_pf_representor] + [
                    self.representor(i) for i in range(self.vfs)]:
                if (net / name).is_symlink():
                    (net / name).unlink()
            shutil.rmtree(self._pci_dir(self.dpu_pci, self.dpu_sysfs_root), ignore_errors=True)
        self.pf_driver().remove_pf(self.pf)

    def _pci_dir(self, pci: str, root: Optional[Path] = None) -> Path:
        return (root or self.sysfs_root) / "bus" / "pci" / "devices" / pci

    def _write_sysfs(self) -> None:
        pf_dir = self._pci_dir(self.pf_pci)
        pf_dir.mkdir(parents=True)
        _write(pf_dir / "sriov_totalvfs", self.total_vfs)
        _write(pf_dir / "sriov_numvfs", self.vfs)
        self._bind(pf_dir, NETDEV_DRIVER)
        uplink = self._netdev(pf_dir, self.pf)
        if not self.dpu:  # in DPU mode the host sees no eswitch: no port name, mode or id
            _write(uplink / "phys_port_name", f"p{self.pf_number}")
            if self.devlink_compat:
                _write(uplink / "compat" / "devlink" / "mode", self.mode)
            if self.mode == "switchdev":
                _write(uplink / "phys_switch_id", self.switch_id)
        for i in range(self.vfs):
            vf_dir = self._pci_dir(self.vf_pci(i))
            vf_dir.mkdir(parents=True)
            _symlink(pf_dir / f"virtfn{i}", f"../{self.vf_pci(i)}")
            _symlink(vf_dir / "physfn", f"../{self.pf_pci}")
            self._bind(vf_dir, self.drivers[i])
            if self.has_netdev(i):
                self._netdev(vf_dir, self.vf_netdev(i))
            if self.mode == "switchdev" and not self.dpu:
                rep = self._netdev(pf_dir, self.representor(i))
                _write(rep / "phys_switch_id", self.switch_id)
                _write(rep / "phys_port_name", f"pf{self.pf_number}vf{i}")
        if self.dpu:
            self._write_dpu_sysfs()

    def _write_dpu_sysfs(self) -> None:
        """The DPU's tree: its PF `p<N>` and, under its PCI device, the host's representors."""
        root = self.dpu_sysfs_root
        ecpf = self._pci_dir(self.dpu_pci, root)
        ecpf.mkdir(parents=True)
        _write(ecpf / "sriov_totalvfs", 0)
        _write(ecpf / "sriov_numvfs", 0)
        self._bind(ecpf, NETDEV_DRIVER, root)
        uplink = self._netdev(ecpf, self.dpu_uplink, root)
        _write(uplink / "phys_port_name", f"p{self.pf_number}")
        _write(uplink / "phys_switch_id", self.switch_id)
        if self.devlink_compat:
            _write(uplink / "compat" / "devlink" / "mode", "switchdev")
        ports = [(self.host_pf_representor, f"c{HOST_CONTROLLER}pf{self.pf_number}")] + [
            (self.representor(i), f"c{HOST_CONTROLLER}pf{self.pf_number}vf{i}")
            for i in range(self.vfs)]
        for name, port in ports:
            rep = self._netdev(ecpf, name, root)
            _write(rep / "phys_switch_id", self.switch_id)
            _write(rep / "phys_port_name", port)

    def _bind(self, device: Path, driver: str, root: Optional[Path] = None) -> None:
        drivers = (root or self.sysfs_root) / "bus" / "pci" / "drivers"
        (drivers / driver).mkdir(parents=True, exist_ok=True)
        _symlink(device / "driver", f"../../drivers/{driver}")

    def _netdev(self, device: Path, name: str, root: Optional[Path] = None) -> Path:
        """`device`/net/`name` with its `device` link, and class/net/`name` linking to it
        (under `root`, the host's tree by default)."""
        netdev = device / "net" / name
        netdev.mkdir(parents=True)
        _symlink(netdev / "device", "../..")
        net = (root or self.sysfs_root) / "class" / "net"
        net.mkdir(parents=True, exist_ok=True)
        _symlink(net / name, os.path.relpath(netdev, net))
        return netdev


def _write(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{value}\n")


def _symlink(path: Path, target: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(target, path)
