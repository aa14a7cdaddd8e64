"""The sriov interface provider (entry point `sriov` in `vpcni.interfaces`).

    pod netns                  node netns
    <CNI_IFNAME> = VF netdev   VF representor, renamed to the switch's port name ── the switch
    (or, vfio: nothing in the pod; the VM gets the PCI device)

An attachment gets the VF Multus named (`deviceID`, from the SR-IOV device
plugin) or, without one, a free VF from the node's pool. Its PF must be in
switchdev mode: the representor is the VF's port in the node's VPC switch
(kernel VNI bridge or OVS br-int), where the EVPN-derived FDB and flows apply
to it as to a veth, and from where the NIC offloads them. A legacy-mode VF
bypasses the host's switch; a VXLAN VPC cannot reach it (code 50, with why).

A VF on a netdev driver is moved into the pod under CNI_IFNAME and configured
there; a VF on vfio-pci (KubeVirt) stays where it is and the result carries
its `pciID`. Either way its admin MAC, spoof check and trust are set through
the PF first, after the settings the PF had are saved in the VF's claim
(pool.py); DEL puts them back through the PF before the VF is released.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
from contextlib import ExitStack
from pathlib import Path
from typing import Optional

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from vpcni.backends.common import podif
from vpcni.backends.common.podif import describe, get_link
from vpcni.backends.common.underlay import netlink_errors
from vpcni.core.backend import InterfaceProvider
from vpcni.core.config import NodeConfig
from vpcni.core.errors import (BackendError, InvalidConfig, InvalidEnvironment, NotAvailable,
                               TryAgainLater)
from vpcni.core.models import Attachment, Capabilities, Probe, VpcNetwork

from . import sysfs
from .config import SriovConfig
from .pfdriver import NetlinkPfDriver, PfDriver, SimulatedPfDriver, VfState, check_settings
from .pool import Claim, VfPool

LOG = logging.getLogger(__name__)
DEVICE_INFO_VERSION = "1.1.0"


def attachment_mac(key: tuple[str, str, str]) -> str:
    """A stable, locally administered unicast MAC for an attachment that asked for none."""
    digest = hashlib.sha256("/".join(key).encode()).digest()
    return "02:" + ":".join(f"{b:02x}" for b in digest[:5])


def device_info(vf: sysfs.VF, representor: Optional[str]) -> dict:
    """The CNI device-info file (spec 1.1.0) for a VF."""
    pci = {"pci-address": vf.pci, "pf-pci-address": vf.pf_pci}
    if representor:
        pci["representor-device"] = representor
    return {"type": "pci", "version": DEVICE_INFO_VERSION, "pci": pci}


def _own_netns_fd() -> int:
    """The calling thread's network namespace (where the node's netdevs live)."""
    return os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)


class SriovProvider(InterfaceProvider):
    name = "sriov"
    kinds = ("vf", "vfio")
    config_model = SriovConfig

    def __init__(self, node: NodeConfig):
        super().__init__(node)
        self.ipr = IPRoute()
        self.pool = VfPool(node.stateDir)
        self.driver = self._driver(self.settings, self.ipr)

    @staticmethod
    def _driver(cfg: SriovConfig, ipr: IPRoute) -> PfDriver:
        if cfg.pfDriver == "simulated":
            return SimulatedPfDriver(cfg.simulatedStateFile)
        return NetlinkPfDriver(ipr)

    def close(self) -> None:
        self.ipr.close()

    # ------------------------------------------------------------ probe

    @classmethod
    def probe(cls, node: NodeConfig) -> Probe:
        cfg = node.section(cls.name, SriovConfig)
        try:
            pfs = sysfs.discover(cfg.sysfsRoot)
        except BackendError as exc:
            return Probe(name=cls.name, available=False, reason=str(exc))
        if cfg.pfs:
            pfs = [pf for pf in pfs if pf.name in cfg.pfs]
        claimed = {c.pci for c in VfPool(node.stateDir).all()}
        facts = {pf.name: {"pci": pf.pci, "mode": pf.eswitch_mode or "unknown",
                           "vfs": len(pf.vfs), "total_vfs": pf.total_vfs,
                           "free_vfs": sum(vf.pci not in claimed for vf in pf.vfs),
                           "offload": pf.vpc_offload.possible,
                           "why": pf.vpc_offload.reason} for pf in pfs}
        if not pfs:
            return Probe(name=cls.name, available=False, facts=facts,
                         reason=f"no SR-IOV PF under {cfg.sysfsRoot}/class/net "
                                "(no device/sriov_totalvfs)")
        if cfg.dpuHost:
            usable = [pf for pf in pfs if pf.vfs]
            free = sum(facts[pf.name]["free_vfs"] for pf in usable)
            if usable:
                return Probe(name=cls.name, available=True, score=10, facts=facts,
                             reason=f"DPU host: {', '.join(pf.name for pf in usable)}, "
                                    f"{free} VF(s) free; their representors are the DPU's")
        hosts = [pf for pf in pfs
                 if any(r.port.flavour == "vf" for r in pf.external_representors)]
        if hosts:
            reps = sum(r.port.flavour == "vf" for pf in hosts for r in pf.external_representors)
            return Probe(name=cls.name, available=True, score=10, facts=facts,
                         reason=f"DPU: {', '.join(pf.name for pf in hosts)} carries the "
                                f"representors of {reps} host VF(s)")
        usable = [pf for pf in pfs if pf.vpc_offload.possible]
        if not usable:
            return Probe(name=cls.name, available=False, facts=facts,
                         reason="no PF can give a VF to a VXLAN VPC: " +
                                "; ".join(pf.vpc_offload.reason for pf in pfs))
        free = sum(facts[pf.name]["free_vfs"] for pf in usable)
        return Probe(name=cls.name, available=True, score=10, facts=facts,
                     reason=f"{', '.join(pf.name for pf in usable)} in switchdev mode, "
                            f"{free} VF(s) free; " +
                            "; ".join(pf.vpc_offload.reason for pf in pfs))

    # ------------------------------------------------------------ choosing a VF

    def _pfs(self) -> dict[str, sysfs.PF]:
        return {pf.name: pf for pf in sysfs.discover(self.settings.sysfsRoot)}

    def _requested(self, pci: str) -> tuple[sysfs.VF, sysfs.PF]:
        vf = sysfs.vf_by_pci(self.settings.sysfsRoot, pci)
        pf = self._pfs().get(vf.pf)
        if pf is None:
            raise BackendError(f"deviceID {pci}: its PF {vf.pf} is not an SR-IOV PF under "
                               f"{self.settings.sysfsRoot}")
        return vf, pf

    def _candidates(self, remote: bool = False) -> list[tuple[sysfs.VF, sysfs.PF]]:
        out = []
        for pf in self._pfs().values():
            if self.settings.pfs and pf.name not in self.settings.pfs:
                continue
            if not remote and not pf.vpc_offload.possible:
                continue
            for vf in pf.vfs:
                # The pool hands out VFs for pods: netdev VFs that are on the node.
                if vf.userspace or not vf.netdev or get_link(self.ipr, vf.netdev) is None:
                    continue
                out.append((vf, pf))
        return out

    @staticmethod
    def _claim(att: Attachment, vf: sysfs.VF) -> Claim:
        """A claim on `vf` for `att`; the VF's settings are read and saved in it only once
        it is ours (under its lock), so a DEL that is still restoring the VF for its
        previous holder can never make that holder's MAC look like the original."""
        return Claim(pci=vf.pci, key=att.key, pf=vf.pf, index=vf.index,
                     mode="vfio" if vf.userspace else "vf", saved={}, netdev=vf.netdev,
                     representor=vf.representor)

    def _save_original(self, claim: Claim) -> None:
        claim.saved = self.driver.get_vf(claim.pf, claim.index).to_dict()
        if claim.mode == "vf" and claim.netdev:
            link = get_link(self.ipr, claim.netdev)
            claim.mtu = link.get("IFLA_MTU") if link is not None else None
        self.pool.update(claim)

    @staticmethod
    def _vf_settings(att: Attachment) -> dict:
        """The network's `vf` settings, checked, over the defaults: spoof checking on and
        trust off, whatever the VF had (a pod must not send as another)."""
        raw = att.provider_state.get("vf") or {}
        if not isinstance(raw, dict):
            raise InvalidConfig(f"network config: invalid 'vf' = {raw!r}: must be an object")
        try:
            settings = check_settings(raw)
        except InvalidConfig as exc:
            raise InvalidConfig(f"network config 'vf': {exc.msg}") from None
        if "mac" in settings:
            raise InvalidConfig("network config 'vf': the MAC is runtimeConfig.mac's "
                                "(or CNI_ARGS MAC), not a VF setting")
        return {"spoofchk": True, "trust": False} | settings

    def preflight(self, att: Attachment, switch: Capabilities) -> None:
        """What plug would refuse, checked before an earlier attachment is torn down."""
        remote = "remote-representor" in switch.ports
        if att.interface == "host-vf":
            host_vf = att.provider_state.get("host_vf", "")
            pf_number, vf_index = (int(x) for x in host_vf[2:].split("vf"))
            try:
                sysfs.host_vf_representor(self.settings.sysfsRoot, pf_number, vf_index)
            except BackendError as exc:
                raise InvalidConfig(f"hostVF {host_vf}: {exc}") from None
            return
        if not remote and "representor" not in switch.ports:
            raise NotAvailable("the node's switch cannot take a VF representor as a port")
        self._vf_settings(att)
        if att.pci_id:
            vf, pf = self._requested(att.pci_id)
            if not remote and not pf.vpc_offload.possible:
                raise NotAvailable(f"deviceID {vf.pci} (VF {vf.index} of {pf.name}) cannot join "
                                   f"a VXLAN VPC: {pf.vpc_offload.reason}")
            holder = self.pool.get(vf.pci)
            if holder is not None and holder.key != att.key:
                raise TryAgainLater(f"deviceID {vf.pci} is in use by attachment "
                                    f"{'/'.join(holder.key)}")

    def _take(self, att: Attachment, remote: bool = False) -> tuple[sysfs.VF, sysfs.PF, Claim]:
        """The attachment's VF, claimed: the requested one, or the first free one. With
        `remote` the switch is on a DPU: the host sees no eswitch and no representors."""
        if att.pci_id:
            vf, pf = self._requested(att.pci_id)
            if not remote and not pf.vpc_offload.possible:
                raise NotAvailable(f"deviceID {vf.pci} (VF {vf.index} of {pf.name}) cannot join "
                                   f"a VXLAN VPC: {pf.vpc_offload.reason}")
            claim = self._claim(att, vf)
            if not self.pool.claim(claim):
                holder = self.pool.get(vf.pci)
                raise TryAgainLater(f"deviceID {vf.pci} is in use by attachment "
                                    f"{'/'.join(holder.key) if holder else '(being released)'}")
            return vf, pf, claim
        candidates = self._candidates(remote)
        for vf, pf in candidates:
            claim = self._claim(att, vf)
            if self.pool.claim(claim):
                return vf, pf, claim
        if not candidates:
            raise NotAvailable(f"no VF of a switchdev PF with a netdev on this node "
                               f"({self.settings.sysfsRoot}); give a deviceID or check "
                               "`vpcnictl probe`")
        raise NotAvailable(f"every VF is in use ({len(candidates)} on this node)")

    # ------------------------------------------------------------ plug

    def plug(self, net: VpcNetwork, att: Attachment, mtu: int,
             switch: Capabilities) -> tuple[Attachment, bool]:
        remote = "remote-representor" in switch.ports
        if att.interface != "host-vf" and not remote and "representor" not in switch.ports:
            raise NotAvailable("the node's switch cannot take a VF representor as a port")
        leftover = self.pool.of(att.key)
        if leftover is not None:
            # A crashed earlier ADD of this attachment: put its VF back first.
            self._release(leftover, att)
        if att.interface == "host-vf":
            return self._plug_host_vf(att, mtu), leftover is not None
        vf, pf, claim = self._take(att, remote)
        mac = (att.mac or attachment_mac(att.key)).lower()
        alias = podif.attachment_alias(*att.key)
        with ExitStack() as undo:
            undo.callback(self._quietly, self._release, claim, att)
            with self.pool.locked(vf.pci):
                self._save_original(claim)
                self.driver.set_vf(vf.pf, vf.index, mac=mac, **self._vf_settings(att))
                if not remote:
                    self._take_representor(vf, att.host_ifname, alias, mtu)
                out = att.model_copy(update={
                    "mac": mac, "pci_id": vf.pci, "interface": claim.mode,
                    "provider": self.name,
                    "provider_state": {"pf": vf.pf, "vf": vf.index, "pf_pci": vf.pf_pci,
                                       "pf_number": pf.number, "dpu": remote}})
                if claim.mode == "vf":
                    pod = self._move_into_pod(vf, att, mtu, mac, alias)
                    out.mtu = pod.mtu
                    if switch.pod_tx_checksum_off:
                        with netlink_errors(f"could not turn tx checksum offload off on "
                                            f"{att.ifname} in netns {att.netns}"):
                            podif.disable_tx_checksum(att.netns, att.ifname)
                else:
                    out.mtu = mtu  # the VM's to set: the port takes no more
                if att.device_info_file:
                    self._write_device_info(att.device_info_file, vf,
                                            None if remote else att.host_ifname)
            undo.pop_all()
        return out, leftover is not None

    def _plug_host_vf(self, att: Attachment, mtu: int) -> Attachment:
        """On a DPU: the host's VF `pf<N>vf<M>` is the attachment; its representor (here,
        `c1pf<N>vf<M>`) becomes the port. Nothing to move, nothing to set through a PF:
        the host did that. The claim keeps the representor's name for DEL."""
        host_vf = att.provider_state.get("host_vf", "")
        pf_number, vf_index = (int(x) for x in host_vf[2:].split("vf"))
        rep = sysfs.host_vf_representor(self.settings.sysfsRoot, pf_number, vf_index)
        claim = Claim(pci=f"host-{host_vf}", key=att.key, pf=f"host-pf{pf_number}",
                      index=vf_index, mode="host-vf", saved={}, representor=rep)
        if not self.pool.claim(claim):
            holder = self.pool.get(claim.pci)
            raise InvalidConfig(f"hostVF {host_vf} is in use by attachment "
                                f"{'/'.join(holder.key) if holder else '(being released)'}")
        if not att.mac:
            self.pool.release(claim.pci)
            raise InvalidConfig("a host-vf attachment needs runtimeConfig.mac (the MAC the "
                                "host gave the VF)")
        with ExitStack() as undo:
            undo.callback(self._quietly, self._release, claim, att)
            with self.pool.locked(claim.pci):
                rep_vf = sysfs.VF(pf=claim.pf, pf_pci="", index=vf_index, pci=claim.pci,
                                  driver=None, netdev=None, representor=rep)
                self._take_representor(rep_vf, att.host_ifname,
                                       podif.attachment_alias(*att.key), mtu)
            undo.pop_all()
        return att.model_copy(update={"provider": self.name, "mtu": mtu,
                                      "provider_state": {"host_vf": host_vf,
                                                         "representor": rep}})

    def _take_representor(self, vf: sysfs.VF, port: str, alias: str,
                          mtu: Optional[int] = None) -> None:
        """Rename the VF's representor to the switch's port name, give it the VPC's MTU
        and mark it as ours."""
        link = get_link(self.ipr, port)
        if link is None:
            link = get_link(self.ipr, vf.representor) if vf.representor else None
        if link is None:
            raise BackendError(f"representor {vf.representor} of VF {vf.index} of {vf.pf} "
                               "is not in the node's namespace")
        with netlink_errors(f"could not take representor {vf.representor} as {port}"):
            self.ipr.link("set", index=link["index"], state="down")
            extra = {"mtu": mtu} if mtu else {}
            podif.claim_port(self.ipr, link["index"], alias, ifname=port, **extra)

    def _move_into_pod(self, vf: sysfs.VF, att: Attachment, mtu: int, mac: str,
                       alias: str) -> podif.PodInterface:
        link = get_link(self.ipr, vf.netdev)
        if link is None:
            raise BackendError(f"VF netdev {vf.netdev} ({vf.pci}) is not in the node's "
                               "namespace")
        with podif.open_netns(att.netns) as pod_ns:
            if get_link(pod_ns.ipr, att.ifname) is not None:
                raise BackendError(f"interface {att.ifname} already exists in netns {att.netns}")
            with podif.netns_fd(att.netns) as fd, netlink_errors(
                    f"could not move VF {vf.netdev} into netns {att.netns} as {att.ifname}"):
                self.ipr.link("set", index=link["index"], state="down")
                # Marked in the same message: a crash right after the move leaves a
                # netdev that DEL recognises as the attachment's and moves back.
                self.ipr.link("set", index=link["index"], net_ns_fd=fd, ifname=att.ifname,
                              ifalias=alias)
            with netlink_errors(f"could not configure {att.ifname} in netns {att.netns}"):
                return podif.configure_interface(pod_ns, att.ifname, att.ips, att.routes,
                                                 mtu=mtu, mac=mac, alias=alias)

    @staticmethod
    def _write_device_info(path: str, vf: sysfs.VF, representor: Optional[str]) -> None:
        target = Path(path)
        try:
            target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(device_info(vf, representor)))
            os.replace(tmp, target)
        except OSError as exc:
            raise BackendError(f"could not write the device-info file {path} "
                               f"(runtimeConfig.CNIDeviceInfoFile): {describe(exc)}") from None

    # ------------------------------------------------------------ unplug

    @staticmethod
    def _quietly(fn, *args) -> None:
        try:
            fn(*args)
        except Exception as exc:
            LOG.error("rollback: %s", exc)

    def unplug(self, att: Attachment) -> None:
        claim = self.pool.get(att.pci_id) if att.pci_id else None
        if claim is None or claim.key != att.key:
            claim = self.pool.of(att.key)
        if claim is None:
            return  # never claimed, or already released
        self._release(claim, att)

    def _release(self, claim: Claim, att: Attachment) -> None:
        """Put the VF back as it was and give it back to the pool; what is gone is fine."""
        alias = podif.attachment_alias(*claim.key)
        with self.pool.locked(claim.pci):
            if claim.mode == "vf" and self._now_userspace(claim):
                LOG.warning("VF %s was rebound to a user-space driver since its ADD: "
                            "nothing to move back", claim.pci)
            elif claim.mode == "vf":
                self._move_back(claim, att, alias)
            self._return_representor(claim, att.host_ifname, alias)
            if att.device_info_file:
                Path(att.device_info_file).unlink(missing_ok=True)
            if claim.mode != "host-vf" and claim.saved:
                for problem in self.driver.restore_vf(claim.pf, claim.index,
                                                      VfState.from_dict(claim.saved)):
                    LOG.warning("VF %s of %s: could not restore %s", claim.pci, claim.pf,
                                problem)
            self.pool.release(claim.pci)

    def _move_back(self, claim: Claim, att: Attachment, alias: str) -> None:
        """The VF netdev from the pod back to the node, under its own name and MTU."""
        if att.netns:
            try:
                with podif.open_netns(att.netns) as pod_ns:
                    link = get_link(pod_ns.ipr, att.ifname)
                    if link is not None and link.get("IFLA_IFALIAS") == alias:
                        fd = _own_netns_fd()
                        try:
                            with netlink_errors(f"could not move {att.ifname} in netns "
                                                f"{att.netns} back to the node"):
                                pod_ns.ipr.link("set", index=link["index"], state="down")
                                pod_ns.ipr.link("set", index=link["index"], net_ns_fd=fd,
                                                ifname=claim.netdev)
                        finally:
                            os.close(fd)
            except InvalidEnvironment:
                # The pod's namespace is gone: a real VF netdev returns to the host's
                # initial namespace by itself (a simulated one, a veth, is gone with
                # it); its settings are restored through the PF all the same.
                LOG.info("netns %s of %s is gone: VF %s is restored through its PF only",
                         att.netns, "/".join(claim.key), claim.pci)
        link = get_link(self.ipr, claim.netdev) if claim.netdev else None
        if link is None and claim.netdev:
            link = self._returned_netdev(claim)
        if link is not None:
            settings = {"ifalias": ""}
            if claim.mtu:
                settings["mtu"] = claim.mtu
            try:
                self.ipr.link("set", index=link["index"], state="down", **settings)
            except NetlinkError as exc:
                if exc.code != errno.ENODEV:
                    raise BackendError(f"could not restore VF netdev {claim.netdev}: "
                                       f"{describe(exc)}") from exc

    def _now_userspace(self, claim: Claim) -> bool:
        """The VF's driver as sysfs says now (it may have changed since ADD)."""
        try:
            return sysfs.vf_by_pci(self.settings.sysfsRoot, claim.pci).userspace
        except (BackendError, InvalidConfig):
            return False

    def _returned_netdev(self, claim: Claim):
        """A VF netdev that came back to the host by itself (its pod's namespace went
        away) under the kernel's name for it: found by PCI address, given its own name."""
        try:
            name = sysfs.vf_by_pci(self.settings.sysfsRoot, claim.pci).netdev
        except (BackendError, InvalidConfig):
            return None
        link = get_link(self.ipr, name) if name and name != claim.netdev else None
        if link is None:
            return None
        try:
            self.ipr.link("set", index=link["index"], state="down", ifname=claim.netdev)
        except NetlinkError as exc:
            if exc.code == errno.ENODEV:
                return None
            raise BackendError(f"could not give VF netdev {name} ({claim.pci}) its name "
                               f"{claim.netdev} back: {describe(exc)}") from exc
        return get_link(self.ipr, claim.netdev)

    def _return_representor(self, claim: Claim, port: Optional[str], alias: str) -> None:
        if not claim.representor or not port:
            return
        link = get_link(self.ipr, port)
        if link is None or link.get("IFLA_IFALIAS") != alias:
            return
        try:
            self.ipr.link("set", index=link["index"], state="down", master=0)
            self.ipr.link("set", index=link["index"], ifname=claim.representor, ifalias="")
            # A representor stays up: it is the NIC's port (the simulated one too).
            self.ipr.link("set", index=link["index"], state="up")
        except NetlinkError as exc:
            if exc.code == errno.ENODEV:
                return  # gone meanwhile (a simulated VF dies with its pod's namespace)
            raise BackendError(f"could not give representor {port} its name "
                               f"{claim.representor} back: {describe(exc)}") from exc

    # ------------------------------------------------------------ check, inventory

    def check(self, att: Attachment) -> list[str]:
        claim = self.pool.of(att.key)
        if claim is None:
            return [f"no VF is claimed for {'/'.join(att.key)}"]
        if claim.mode == "host-vf":
            port = get_link(self.ipr, att.host_ifname) if att.host_ifname else None
            if port is None or port.get("IFLA_IFALIAS") != podif.attachment_alias(*att.key):
                return [f"representor {claim.representor} of host VF is not the port "
                        f"{att.host_ifname}"]
            return []
        problems = []
        if att.pci_id and claim.pci != att.pci_id:
            problems.append(f"VF {claim.pci} is claimed, the record says {att.pci_id}")
        state = self.driver.get_vf(claim.pf, claim.index)
        if att.mac and state.mac.lower() != att.mac.lower():
            problems.append(f"VF {claim.pci} has admin MAC {state.mac}, recorded {att.mac}")
        if state.spoofchk is False:
            problems.append(f"VF {claim.pci} has spoof checking off")
        if claim.mode == "vf":
            problems += podif.check_pod(att)
        return problems

    def set_mtu(self, att: Attachment, mtu: int) -> bool:
        """A VF netdev in a pod follows (the VF's MTU there, then its representor, the
        switch's port; a NIC that refuses, e.g. above its PF's MTU, is an error the
        caller reports). A VF a VM holds (vfio) does not: its MTU is the guest's.
        Neither does a host's VF on a DPU: its representor is the DPU's."""
        if att.interface != "vf" or att.provider_state.get("dpu"):
            return False
        podif.set_mtu(self.ipr, att, mtu)
        return True

    def owned(self) -> dict[str, tuple[str, str, str]]:
        """Representors renamed for an attachment, and every claim (by PCI address when
        its representor was never taken: a crash right after the claim)."""
        claims = {c.key: c for c in self.pool.all()}
        out = {}
        for link in self.ipr.link("dump"):
            key = podif.alias_attachment(link.get("IFLA_IFALIAS"))
            if key is not None and key in claims:
                out[link.get("IFLA_IFNAME")] = key
        named = set(out.values())
        out.update({c.pci: key for key, c in claims.items() if key not in named})
        return out
