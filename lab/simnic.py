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


class SimNic:
    """One PF of a simulated NIC, its VFs and their representors."""

    def __init__(self, sysfs_root: Path, netns: Netns, pf: str = "enp1s0f0",
                 pf_pci: str = "0000:01:00.0", vfs: int = 4, mode: str = "switchdev",
                 vf_driver: Union[str, Sequence[str], Mapping[int, str]] = NETDEV_DRIVER,
                 total_vfs: Optional[int] = None, devlink_compat: bool = True,
                 state_file: Optional[Path] = None):
        if mode not in ("legacy", "switchdev"):
            raise ValueError(f"SimNic mode {mode!r}: expected legacy or switchdev")
        if not 0 <= vfs <= MAX_VFS:
            raise ValueError(f"SimNic vfs {vfs}: expected 0 to {MAX_VFS}")
        self.sysfs_root = Path(sysfs_root)
        self.netns = netns
        self.pf = pf
        self.pf_pci = check_pci_address(pf_pci, "pf_pci")
        self.vfs = vfs
        self.total_vfs = vfs if total_vfs is None else total_vfs
        self.mode = mode
        self.devlink_compat = devlink_compat
        self.state_file = Path(state_file or self.sysfs_root / "simnic" / "pf-driver.json")
        self.drivers = self._drivers(vf_driver)
        names = [pf, self.wire] + [name for i in range(vfs)
                                   for name in (self.vf_netdev(i), self.peer(i))]
        too_long = [name for name in names if len(name) > IFNAMSIZ]
        if too_long:
            raise ValueError(f"SimNic names longer than {IFNAMSIZ} characters: {too_long}")
        domain, bus, devfn = self.pf_pci.split(":")
        self._bus = f"{domain}:{bus}"
        device, function = devfn.split(".")
        self._device, self.function = int(device, 16), int(function)
        self.pf_number = self.function  # the N of its `p<N>` and `pf<N>vf<M>` port names
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
    def wire(self) -> str:
        """The PF veth's other end: the network behind the NIC's port."""
        return f"{self.pf}w"

    def vf_netdev(self, index: int) -> str:
        """The VF's end of its veth pair (in sysfs only for a netdev driver)."""
        return f"{self.pf}v{index}"

    def representor(self, index: int) -> Optional[str]:
        """The VF's representor; None in legacy mode."""
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
        """Write the sysfs tree, create the links in the namespace, register the VFs."""
        self._write_sysfs()
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

    def remove(self) -> None:
        """Undo `build`; tolerates a half-built NIC and VF netdevs moved elsewhere."""
        for i in range(self.vfs):
            self.netns.ip("link", "del", self.peer(i), check=False)
        self.netns.ip("link", "del", self.pf, check=False)
        net = self.sysfs_root / "class" / "net"
        for name in [self.pf] + [n for i in range(self.vfs)
                                 for n in (self.vf_netdev(i), self.representor(i)) if n]:
            if (net / name).is_symlink():
                (net / name).unlink()
        for pci in [self.pf_pci] + [self.vf_pci(i) for i in range(self.vfs)]:
            shutil.rmtree(self._pci_dir(pci), ignore_errors=True)
        self.pf_driver().remove_pf(self.pf)

    def _pci_dir(self, pci: str) -> Path:
        return self.sysfs_root / "bus" / "pci" / "devices" / pci

    def _write_sysfs(self) -> None:
        pf_dir = self._pci_dir(self.pf_pci)
        pf_dir.mkdir(parents=True)
        _write(pf_dir / "sriov_totalvfs", self.total_vfs)
        _write(pf_dir / "sriov_numvfs", self.vfs)
        self._bind(pf_dir, NETDEV_DRIVER)
        uplink = self._netdev(pf_dir, self.pf)
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
            if self.mode == "switchdev":
                rep = self._netdev(pf_dir, self.representor(i))
                _write(rep / "phys_switch_id", self.switch_id)
                _write(rep / "phys_port_name", f"pf{self.pf_number}vf{i}")

    def _bind(self, device: Path, driver: str) -> None:
        (self.sysfs_root / "bus" / "pci" / "drivers" / driver).mkdir(parents=True, exist_ok=True)
        _symlink(device / "driver", f"../../drivers/{driver}")

    def _netdev(self, device: Path, name: str) -> Path:
        """`device`/net/`name` with its `device` link, and class/net/`name` linking to it."""
        netdev = device / "net" / name
        netdev.mkdir(parents=True)
        _symlink(netdev / "device", "../..")
        net = self.sysfs_root / "class" / "net"
        net.mkdir(parents=True, exist_ok=True)
        _symlink(net / name, os.path.relpath(netdev, net))
        return netdev


def _write(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{value}\n")


def _symlink(path: Path, target: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(target, path)
