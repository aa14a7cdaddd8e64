"""SR-IOV discovery from sysfs: PFs, their VFs, drivers, netdevs and representors.

Pure reading under a configurable root (`/sys` on a node, a fake tree in the
tests and the lab's simulated NIC); no netlink, no devlink.

What is read, and the choices made where the kernel leaves room:

* A PF is a `class/net/<name>` whose `device/sriov_totalvfs` exists, unless
  its `phys_port_name` names a function representor (`pf0vf1`, `c1pf0`, ...):
  mlx5 hangs its representors under the PF's PCI device, so they too have a
  `device/sriov_totalvfs`.
* VF n of a PF is the `device/virtfn<n>` link; its PCI address is the
  basename of the link's target, its details are read under
  `bus/pci/devices/<bdf>`.
* Eswitch mode comes from `class/net/<pf>/compat/devlink/mode` (mlx5 only).
  When that file is absent the mode is None: unknown, not guessed. Whether
  the PF can offload a VPC is then decided by evidence: every VF has a
  representor, or it is treated as legacy (see `PF.vpc_offload`).
* Representors are found by scanning `class/net/*` for the PF's non-empty
  `phys_switch_id` and parsing `phys_port_name`. The PF's number N (the
  `pf<N>` in representor names) comes from the PF's own `phys_port_name`
  `p<N>` when it has one, else from its PCI function number. Two PFs of one
  NIC may share a switch id; N tells their representors apart.
* `pf<N>vf<M>` (controller omitted or `c0`) is the representor of this
  host's VF M. `c<K>pf<N>...` with K >= 1 is a function of an external
  controller: on a DPU's Arm side, the representors of the host's PF and VFs.
  Those are listed in `PF.external_representors`, never matched to local VFs.
  `host_vf_representor` finds the one of host PF N's VF M by that port name.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Optional

from vpcni.core.errors import BackendError, InvalidConfig

SYSFS_ROOT = Path("/sys")
ESWITCH_MODES = ("legacy", "switchdev")
# Drivers that give a VF to user space (DPDK, KubeVirt): no kernel netdev.
USERSPACE_DRIVERS = frozenset({"vfio-pci", "uio_pci_generic", "igb_uio"})

_PCI_ADDRESS = re.compile(r"^[0-9a-f]{4}:[0-9a-f]{2}:[01][0-9a-f]\.[0-7]$")
_UPLINK_PORT = re.compile(r"^p(?P<pf>\d+)$")
_FUNCTION_PORT = re.compile(
    r"^(?:c(?P<controller>\d+))?pf(?P<pf>\d+)(?:(?P<flavour>vf|sf)(?P<number>\d+))?$")
_VIRTFN = re.compile(r"^virtfn(?P<index>\d+)$")


@dataclass(frozen=True)
class PortName:
    """A parsed `phys_port_name`.

    flavour: "uplink" (`p<N>`), "pf" (`pf<N>`), "vf" (`pf<N>vf<M>`) or
    "sf" (`pf<N>sf<M>`); `number` is M; `controller` is K of a `c<K>` prefix
    (None without one; 0 is the local controller).
    """

    flavour: str
    pf: int
    number: Optional[int] = None
    controller: Optional[int] = None

    @property
    def external(self) -> bool:
        """A function of another controller (the host, seen from a DPU)."""
        return bool(self.controller)


def parse_phys_port_name(name: Optional[str]) -> Optional[PortName]:
    """The port a `phys_port_name` describes; None for anything else (or nothing)."""
    if not name:
        return None
    match = _UPLINK_PORT.match(name)
    if match:
        return PortName("uplink", int(match["pf"]))
    match = _FUNCTION_PORT.match(name)
    if match is None:
        return None
    controller = match["controller"]
    return PortName(match["flavour"] or "pf", int(match["pf"]),
                    int(match["number"]) if match["number"] is not None else None,
                    int(controller) if controller is not None else None)


@dataclass(frozen=True)
class Representor:
    netdev: str
    port: PortName


@dataclass
class VF:
    pf: str
    pf_pci: str
    index: int
    pci: str
    driver: Optional[str]
    netdev: Optional[str]
    representor: Optional[str]

    @property
    def userspace(self) -> bool:
        """Bound to a user-space driver (vfio-pci, ...): a device for DPDK or a VM."""
        return self.driver in USERSPACE_DRIVERS


class Offload(NamedTuple):
    possible: bool
    reason: str


LEGACY_REASON = ("VFs bypass the host switch: only a VLAN mapped to the VNI outside the host "
                 "could carry a VPC")


@dataclass
class PF:
    name: str
    pci: str
    total_vfs: int
    num_vfs: int
    eswitch_mode: Optional[str]
    switch_id: Optional[str]
    uplink: Optional[str]
    vfs: list[VF]
    number: int = 0
    external_representors: list[Representor] = field(default_factory=list)

    @property
    def vpc_offload(self) -> Offload:
        """Whether this PF's VFs can join VXLAN VPCs through the host's switch, and why."""
        if self.total_vfs == 0:
            return Offload(False, f"{self.name} ({self.pci}) supports no VFs "
                                  "(sriov_totalvfs is 0)")
        if self.num_vfs == 0 or not self.vfs:
            return Offload(False, f"{self.name} ({self.pci}) has no VFs enabled (sriov_numvfs "
                                  f"is {self.num_vfs} of {self.total_vfs})")
        if self.eswitch_mode == "legacy":
            return Offload(False, f"{self.name} is in legacy mode: {LEGACY_REASON}")
        missing = [vf.index for vf in self.vfs if vf.representor is None]
        if self.eswitch_mode == "switchdev":
            if missing:
                return Offload(False, f"{self.name} is in switchdev mode but VF "
                                      f"{', '.join(map(str, missing))} has no representor "
                                      f"(phys_switch_id {self.switch_id})")
            return Offload(True, f"{self.name} is in switchdev mode: every VF has a "
                                 "representor to plug into the VPC's switch")
        if not missing:
            return Offload(True, f"{self.name}: eswitch mode not in sysfs, but every VF has "
                                 "a representor (switchdev)")
        return Offload(False, f"{self.name}: eswitch mode unknown (no compat/devlink/mode; "
                              f"see `devlink dev eswitch show pci/{self.pci}`) and its VFs "
                              f"have no representors, so it is treated as legacy: "
                              f"{LEGACY_REASON}")


def check_pci_address(pci: object, field_name: str = "deviceID") -> str:
    """`pci` in its canonical lower-case form; InvalidConfig naming `field_name` otherwise."""
    if not isinstance(pci, str) or not pci:
        raise InvalidConfig(f"{field_name} is missing: the PCI address of a VF is needed")
    canonical = pci.strip().lower()
    if not _PCI_ADDRESS.match(canonical):
        raise InvalidConfig(f"{field_name} {pci!r} is not a PCI address "
                            "(expected domain:bus:device.function, e.g. 0000:01:00.2)")
    return canonical


def discover(root: Path = SYSFS_ROOT) -> list[PF]:
    """Every SR-IOV PF under `root`, with its VFs and representors, sorted by name."""
    root = Path(root)
    ports = _switch_ports(root)
    pfs = []
    for name in _listdir(root / "class" / "net"):
        if _is_pf(root, name):
            pfs.append(_pf(root, name, ports))
    return pfs


def vf_by_pci(root: Path, pci: str, field_name: str = "deviceID") -> VF:
    """The VF at PCI address `pci`; InvalidConfig when there is no such VF."""
    root = Path(root)
    pci = check_pci_address(pci, field_name)
    device = _pci_dir(root, pci)
    if not device.is_dir():
        raise InvalidConfig(f"{field_name} {pci}: no such PCI device ({device} does not exist)")
    physfn = device / "physfn"
    if not physfn.exists():
        raise InvalidConfig(f"{field_name} {pci} is not an SR-IOV VF ({physfn} does not exist)")
    pf_pci = _link_basename(physfn)
    pf_names = [name for name in _listdir(_pci_dir(root, pf_pci) / "net")
                if _is_pf(root, name, _pci_dir(root, pf_pci) / "net" / name)]
    if not pf_names:
        raise BackendError(f"PF {pf_pci} of VF {pci} has no netdev under "
                           f"{_pci_dir(root, pf_pci) / 'net'} (is its driver bound?)")
    pf = _pf(root, pf_names[0], _switch_ports(root))
    for vf in pf.vfs:
        if vf.pci == pci:
            return vf
    raise BackendError(f"VF {pci}: its PF {pf.name} ({pf_pci}) has no virtfn link to it")


def host_vf_representor(root: Path, pf: int, vf: int, controller: int = 1) -> str:
    """The representor netdev of the host's VF `vf` of PF `pf`, as a DPU sees it.

    That is the eswitch port (non-empty `phys_switch_id`) under `root`/class/net whose
    `phys_port_name` is `c<controller>pf<pf>vf<vf>`; controller 0 is the local one
    (`pf<pf>vf<vf>`). BackendError naming what is missing when there is no such port
    (or, with two eswitches under one root, more than one).
    """
    for name, value in (("pf", pf), ("vf", vf), ("controller", controller)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"host_vf_representor: {name} {value!r} is not a number >= 0")
    net = Path(root) / "class" / "net"
    wanted = controller or None  # `pf<N>vf<M>` and `c0pf<N>vf<M>` are both the local one
    port_name = f"c{controller}pf{pf}vf{vf}" if controller else f"pf{pf}vf{vf}"
    what = f"host PF {pf} VF {vf} (controller {controller})"
    if not net.is_dir():
        raise BackendError(f"no representor of {what}: {net} does not exist")
    ports = _switch_ports(Path(root))
    found = [name for name, (_, port) in ports.items()
             if port is not None and port.flavour == "vf" and port.pf == pf
             and port.number == vf and (port.controller or None) == wanted]
    if len(found) == 1:
        return found[0]
    if found:
        raise BackendError(f"{what}: several representors with phys_port_name {port_name} "
                           f"under {net}: {', '.join(found)}")
    if not ports:
        raise BackendError(f"no representor of {what}: no eswitch port (netdev with a "
                           f"phys_switch_id) under {net}; is the eswitch in switchdev mode?")
    siblings = sorted(port.number for _, port in ports.values()
                      if port is not None and port.flavour == "vf" and port.pf == pf
                      and (port.controller or None) == wanted)
    if siblings:
        raise BackendError(f"no representor of {what}: no eswitch port with phys_port_name "
                           f"{port_name} under {net} (there are VF {', '.join(map(str, siblings))}"
                           f" of that PF); is VF {vf} enabled on the host (sriov_numvfs)?")
    raise BackendError(f"no representor of {what}: no eswitch port with phys_port_name "
                       f"{port_name} under {net}, nor any of that controller's PF {pf}; is "
                       "this a DPU that owns the host's eswitch?")


# ---------------------------------------------------------------- helpers


def _pci_dir(root: Path, pci: str) -> Path:
    return root / "bus" / "pci" / "devices" / pci


def _listdir(path: Path) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except (FileNotFoundError, NotADirectoryError):
        return []


def _read(path: Path) -> Optional[str]:
    """A sysfs attribute, stripped; None when absent, unreadable or empty.

    Reading `phys_switch_id` or `phys_port_name` of a netdev that has none
    fails with EOPNOTSUPP on a real kernel; an absent file is the fake tree's
    way of saying the same.
    """
    try:
        value = path.read_text().strip()
    except OSError:
        return None
    return value or None


def _read_int(path: Path) -> int:
    value = _read(path)
    if value is None:
        return 0
    try:
        return int(value)
    except ValueError:
        raise BackendError(f"{path}: expected an integer, found {value!r}") from None


def _link_basename(path: Path) -> str:
    """The name of what a sysfs link points to (`virtfn0` -> `0000:01:00.2`)."""
    return Path(os.readlink(path)).name


def _driver(root: Path, pci: str) -> Optional[str]:
    link = _pci_dir(root, pci) / "driver"
    return _link_basename(link) if link.is_symlink() else None


def _netdev(root: Path, pci: str) -> Optional[str]:
    """The netdev of a VF. A multi-port VF (mlx4) lists several: the first is taken."""
    names = _listdir(_pci_dir(root, pci) / "net")
    return names[0] if names else None


def _is_pf(root: Path, name: str, netdev_dir: Optional[Path] = None) -> bool:
    netdev_dir = netdev_dir or root / "class" / "net" / name
    if not (netdev_dir / "device" / "sriov_totalvfs").exists():
        return False
    port = parse_phys_port_name(_read(netdev_dir / "phys_port_name"))
    return port is None or port.flavour == "uplink"


def _switch_ports(root: Path) -> dict[str, tuple[str, Optional[PortName]]]:
    """netdev -> (phys_switch_id, parsed phys_port_name) of every eswitch port under `root`."""
    ports = {}
    net = root / "class" / "net"
    for name in _listdir(net):
        switch_id = _read(net / name / "phys_switch_id")
        if switch_id:
            ports[name] = (switch_id, parse_phys_port_name(_read(net / name / "phys_port_name")))
    return ports


def _pf(root: Path, name: str, ports: dict[str, tuple[str, Optional[PortName]]]) -> PF:
    netdev_dir = root / "class" / "net" / name
    device = netdev_dir / "device"
    pci = Path(os.path.realpath(device)).name
    mode = _read(netdev_dir / "compat" / "devlink" / "mode")
    own_port = parse_phys_port_name(_read(netdev_dir / "phys_port_name"))
    number = own_port.pf if own_port else int(pci.rsplit(".", 1)[1])
    switch_id = ports.get(name, (None, None))[0]

    uplink = None
    representors: dict[int, str] = {}
    external: list[Representor] = []
    for netdev, (port_switch, port) in ports.items():
        if switch_id is None or port_switch != switch_id or port is None or port.pf != number:
            continue
        if port.external:
            external.append(Representor(netdev, port))
        elif port.flavour == "uplink":
            uplink = netdev
        elif port.flavour == "vf":
            representors[port.number] = netdev

    vfs = []
    for entry in _listdir(device):
        match = _VIRTFN.match(entry)
        if match is None:
            continue
        index = int(match["index"])
        vf_pci = _link_basename(device / entry)
        vfs.append(VF(pf=name, pf_pci=pci, index=index, pci=vf_pci, driver=_driver(root, vf_pci),
                      netdev=_netdev(root, vf_pci), representor=representors.get(index)))
    vfs.sort(key=lambda vf: vf.index)
    return PF(name=name, pci=pci, total_vfs=_read_int(device / "sriov_totalvfs"),
              num_vfs=_read_int(device / "sriov_numvfs"),
              eswitch_mode=mode if mode in ESWITCH_MODES else None, switch_id=switch_id,
              uplink=uplink, vfs=vfs, number=number, external_representors=external)
