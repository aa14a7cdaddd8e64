"""The PF-driver boundary: a VF's settings as its PF holds them (admin MAC, VLAN, rates, ...).

Everything the sriov backend asks of a NIC's PF driver goes through
`PfDriver`. `NetlinkPfDriver` is the real one: RTM_SETLINK with
IFLA_VFINFO_LIST on the PF, and RTM_GETLINK with RTEXT_FILTER_VF to read
back. `vf_request` builds that request as a pyroute2 message; the driver
sends exactly that message, so a unit test of its encoding checks what a NIC
would receive. `SimulatedPfDriver` is the PF driver of the lab's simulated
NIC (`vpcni.lab.simnic`): it records each VF's state in a JSON file and
applies what it can to the veth that stands in for the VF.

`set_vf` merges the changes into the VF's current state: VLAN, QoS and
protocol travel as one attribute, and so do the two rates, so a partial
change is completed from the current state. The kernel applies the
attributes of one request one after the other and stops at the first
failure: a failed request may have changed part of the VF.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping, Optional

from pyroute2 import IPRoute
from pyroute2.netlink import NLM_F_ACK, NLM_F_REQUEST
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import RTM_SETLINK
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg

from vpcni.core.errors import BackendError, InvalidConfig

ZERO_MAC = "00:00:00:00:00:00"
ETH_P_8021Q = 0x8100
ETH_P_8021AD = 0x88A8
VLAN_PROTOS = {"802.1q": ETH_P_8021Q, "802.1ad": ETH_P_8021AD}
LINK_STATE_AUTO, LINK_STATE_ENABLE, LINK_STATE_DISABLE = 0, 1, 2
LINK_STATES = {"auto": LINK_STATE_AUTO, "enable": LINK_STATE_ENABLE,
               "disable": LINK_STATE_DISABLE}
RTEXT_FILTER_VF = 1
# What the kernel reports for spoofchk/trust when the driver does not say.
_NOT_REPORTED = 0xFFFFFFFF
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
VLAN_KEYS = ("vlan", "qos", "vlan_proto")
RATE_KEYS = ("min_tx_rate", "max_tx_rate")


@dataclass(frozen=True)
class VfState:
    """A VF's settings on its PF; the defaults are those of a fresh VF.

    spoofchk and trust are None when the PF driver does not report them.
    Rates are in Mbit/s, 0 meaning no limit.
    """

    mac: str = ZERO_MAC
    vlan: int = 0
    qos: int = 0
    vlan_proto: int = ETH_P_8021Q
    spoofchk: Optional[bool] = True
    trust: Optional[bool] = False
    link_state: int = LINK_STATE_AUTO
    min_tx_rate: int = 0
    max_tx_rate: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> "VfState":
        unreported = {key: None for key in ("spoofchk", "trust")
                      if key in data and data[key] is None}
        return cls(**check_settings({k: v for k, v in data.items() if v is not None}),
                   **unreported)

    def settings(self) -> dict:
        """The `set_vf` changes that bring a VF back to this state."""
        return {key: value for key, value in self.to_dict().items() if value is not None}


def check_settings(changes: Mapping) -> dict:
    """`changes` validated and normalised; InvalidConfig naming the setting at fault."""
    out = {}
    for key, value in changes.items():
        if key == "mac":
            mac = str(value).lower()
            if not _MAC.match(mac):
                raise InvalidConfig(f"VF mac {value!r} is not a MAC address")
            if int(mac[:2], 16) & 1:
                raise InvalidConfig(f"VF mac {value!r} is a multicast address")
            out[key] = mac
        elif key == "vlan":
            out[key] = _int_in(key, value, 0, 4094)
        elif key == "qos":
            out[key] = _int_in(key, value, 0, 7)
        elif key == "vlan_proto":
            proto = VLAN_PROTOS.get(value.lower()) if isinstance(value, str) else value
            if isinstance(proto, bool) or proto not in (ETH_P_8021Q, ETH_P_8021AD):
                raise InvalidConfig(f"VF vlan_proto {value!r}: expected 802.1Q or 802.1ad")
            out[key] = proto
        elif key in ("spoofchk", "trust"):
            if value not in (True, False, 0, 1):
                raise InvalidConfig(f"VF {key} {value!r}: expected on or off (true/false)")
            out[key] = bool(value)
        elif key == "link_state":
            state = LINK_STATES.get(value) if isinstance(value, str) else value
            if isinstance(state, bool) or state not in LINK_STATES.values():
                raise InvalidConfig(f"VF link_state {value!r}: expected auto, enable or disable")
            out[key] = state
        elif key in RATE_KEYS:
            out[key] = _int_in(key, value, 0, 0xFFFFFFFF)
        else:
            raise InvalidConfig(f"unknown VF setting {key!r} (known: "
                                f"{', '.join(f.name for f in dataclasses.fields(VfState))})")
    return out


def _int_in(key: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidConfig(f"VF {key} {value!r}: expected an integer from {low} to {high}")
    return value


def complete(settings: dict, current: Callable[[], VfState]) -> dict:
    """`settings` with a partial VLAN or rate change filled in from `current()`."""
    groups = [keys for keys in (VLAN_KEYS, RATE_KEYS)
              if any(k in settings for k in keys) and not all(k in settings for k in keys)]
    if groups:
        now = current()
        for keys in groups:
            settings = {**{k: getattr(now, k) for k in keys}, **settings}
    if settings.get("max_tx_rate") and settings.get("min_tx_rate", 0) > settings["max_tx_rate"]:
        raise InvalidConfig(f"VF min_tx_rate {settings['min_tx_rate']} is above max_tx_rate "
                            f"{settings['max_tx_rate']}")
    return settings


class PfDriver(abc.ABC):
    """A PF's driver, as the sriov backend sees it."""

    @abc.abstractmethod
    def get_vf(self, pf: str, index: int) -> VfState:
        """The current settings of VF `index` of PF netdev `pf`."""

    @abc.abstractmethod
    def set_vf(self, pf: str, index: int, **changes) -> None:
        """Change some settings (VfState field names) of VF `index` of `pf`."""

    def restore_vf(self, pf: str, index: int, state: VfState) -> list[str]:
        """Put back a state recorded earlier with `get_vf`: only what differs now, one
        setting per request (a driver stops a request at its first refusal, and some
        refuse a zero MAC or have no setter for rates or trust). Returns what could not
        be restored, for the caller to log; the VF is released all the same."""
        current = self.get_vf(pf, index)
        want, have = state.settings(), current.settings()
        changes: list[dict] = []
        for group in (("mac",), ("vlan", "qos", "vlan_proto"), ("spoofchk",), ("trust",),
                      ("link_state",), ("min_tx_rate", "max_tx_rate")):
            change = {k: want[k] for k in group if k in want and want[k] != have.get(k)}
            if change:
                changes.append({k: want[k] for k in group if k in want})
        failed = []
        for change in changes:
            try:
                self.set_vf(pf, index, **change)
            except BackendError as exc:
                failed.append(f"{', '.join(change)}: {exc}")
        return failed


# ---------------------------------------------------------------- netlink


class VfRequest(ifinfmsg):
    """ifinfmsg whose IFLA_VF_VLAN_INFO has the kernel's size.

    struct ifla_vf_vlan_info is 16 bytes (vf, vlan, qos, __be16 proto and
    padding); pyroute2 0.9 encodes 14, and kernels that check the length
    (`nla_len(attr) < sizeof(struct ifla_vf_vlan_info)`) refuse it with EINVAL.
    """

    # pyroute2 compiles a class's NLA table once and marks the class; a subclass
    # inherits the mark (and the table naming its parent's classes) when the parent
    # was used first. Each overriding class keeps a table of its own.
    _nlmsg_base__compiled_nla = False

    class vflist(ifinfmsg.vflist):
        _nlmsg_base__compiled_nla = False

        class vfinfo(ifinfmsg.vflist.vfinfo):
            _nlmsg_base__compiled_nla = False

            class vf_vlist(ifinfmsg.vflist.vfinfo.vf_vlist):
                _nlmsg_base__compiled_nla = False

                class ivvi(ifinfmsg.vflist.vfinfo.vf_vlist.ivvi):
                    fields = (("vf", "I"), ("vlan", "I"), ("qos", "I"), ("proto", ">H"),
                              ("__pad", "2x"))


def vf_attrs(index: int, settings: Mapping) -> list:
    """The IFLA_VF_* attributes that carry `settings` (checked, VLAN and rates complete)."""
    attrs = []
    if "mac" in settings:
        attrs.append(("IFLA_VF_MAC", {"vf": index, "mac": settings["mac"]}))
    if "vlan" in settings:
        vlan = {"vf": index, "vlan": settings["vlan"], "qos": settings["qos"]}
        if settings["vlan_proto"] == ETH_P_8021Q:
            attrs.append(("IFLA_VF_VLAN", vlan))
        else:  # only the list form carries a protocol
            attrs.append(("IFLA_VF_VLAN_LIST", {"attrs": [
                ("IFLA_VF_VLAN_INFO", {**vlan, "proto": settings["vlan_proto"]})]}))
    if "max_tx_rate" in settings:
        attrs.append(("IFLA_VF_RATE", {"vf": index, "min_tx_rate": settings["min_tx_rate"],
                                       "max_tx_rate": settings["max_tx_rate"]}))
    for key, nla in (("spoofchk", "IFLA_VF_SPOOFCHK"), ("trust", "IFLA_VF_TRUST"),
                     ("link_state", "IFLA_VF_LINK_STATE")):
        if key in settings:
            attrs.append((nla, {"vf": index, key: int(settings[key])}))
    return attrs


def vf_request(pf_index: int, index: int, settings: Mapping) -> VfRequest:
    """The RTM_SETLINK message that applies `settings` to VF `index` of PF `pf_index`."""
    msg = VfRequest()
    msg["header"]["type"] = RTM_SETLINK
    msg["header"]["flags"] = NLM_F_REQUEST | NLM_F_ACK
    msg["index"] = pf_index
    msg["attrs"] = [("IFLA_VFINFO_LIST", {"attrs": [
        ("IFLA_VF_INFO", {"attrs": vf_attrs(index, settings)})]})]
    return msg


def encode_vf_request(pf_index: int, index: int, settings: Mapping) -> bytes:
    """`vf_request` as the bytes that go to the kernel (sequence number and pid 0)."""
    msg = vf_request(pf_index, index, settings)
    msg.encode()
    return bytes(msg.data)


def vf_state_from_link(link: ifinfmsg, index: int) -> Optional[VfState]:
    """VF `index`'s state in an RTM_NEWLINK reply to a RTEXT_FILTER_VF get; None if absent."""
    vflist = link.get_attr("IFLA_VFINFO_LIST")
    for info in vflist.get_attrs("IFLA_VF_INFO") if vflist is not None else ():
        mac = info.get_attr("IFLA_VF_MAC")
        if mac is None or mac["vf"] != index:
            continue
        state = {"mac": mac["mac"]}
        vlan = info.get_attr("IFLA_VF_VLAN")
        if vlan is not None:
            state.update(vlan=vlan["vlan"], qos=vlan["qos"])
        vlan_list = info.get_attr("IFLA_VF_VLAN_LIST")
        if vlan_list is not None and vlan_list.get_attrs("IFLA_VF_VLAN_INFO"):
            state["vlan_proto"] = vlan_list.get_attrs("IFLA_VF_VLAN_INFO")[0]["proto"]
        rate = info.get_attr("IFLA_VF_RATE")
        if rate is not None:
            state.update(min_tx_rate=rate["min_tx_rate"], max_tx_rate=rate["max_tx_rate"])
        for key, nla in (("spoofchk", "IFLA_VF_SPOOFCHK"), ("trust", "IFLA_VF_TRUST")):
            value = info.get_attr(nla)
            state[key] = (None if value is None or value[key] == _NOT_REPORTED
                          else bool(value[key]))
        link_state = info.get_attr("IFLA_VF_LINK_STATE")
        if link_state is not None:
            state["link_state"] = link_state["link_state"]
        return VfState(**state)
    return None


class NetlinkPfDriver(PfDriver):
    """The PF driver of a real NIC, through rtnetlink on `ipr` (the PF's namespace)."""

    def __init__(self, ipr: IPRoute):
        self.ipr = ipr

    def _pf_index(self, pf: str) -> int:
        try:
            return self.ipr.link("get", ifname=pf)[0]["index"]
        except NetlinkError as exc:
            if exc.code == errno.ENODEV:
                raise BackendError(f"PF {pf}: no such network device") from exc
            raise BackendError(f"PF {pf}: {os.strerror(exc.code)}") from exc

    def get_vf(self, pf: str, index: int) -> VfState:
        try:
            link = self.ipr.link("get", index=self._pf_index(pf), ext_mask=RTEXT_FILTER_VF)[0]
        except NetlinkError as exc:
            raise BackendError(f"could not read the VFs of PF {pf}: "
                               f"{os.strerror(exc.code)}") from exc
        state = vf_state_from_link(link, index)
        if state is None:
            raise BackendError(f"PF {pf} reports no VF {index} "
                               f"(it has {link.get_attr('IFLA_NUM_VF') or 0})")
        return state

    def set_vf(self, pf: str, index: int, **changes) -> None:
        settings = complete(check_settings(changes), lambda: self.get_vf(pf, index))
        if not settings:
            return
        msg = vf_request(self._pf_index(pf), index, settings)
        try:
            # pyroute2 0.9's synchronous nlm_request fails (KeyError 'nlm_generator');
            # a batch of one sends the message and raises the kernel's error.
            self.ipr.nlm_request_batch([msg])
        except NetlinkError as exc:
            raise BackendError(f"could not set {', '.join(settings)} of VF {index} on PF {pf}: "
                               f"{os.strerror(exc.code)}") from exc


# ---------------------------------------------------------------- simulation


def _netns_id(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


class SimulatedPfDriver(PfDriver):
    """The PF driver of the lab's simulated NIC, not of real hardware.

    Keeps every simulated VF's state in `state_file` (JSON; flock on a
    `.lock` file beside it; written by atomic rename). A VF is there once its
    NIC registered it with `add_pf`. Of what a real PF driver does, it
    applies one thing: a new admin MAC becomes the MAC of the VF's netdev (a
    veth end) when the calling thread is in the NIC's namespace and the
    netdev is still there (not moved into a pod). A zero MAC means "no admin
    MAC" and changes no netdev. Everything else is recorded only.
    """

    def __init__(self, state_file: Path):
        self.state_file = Path(state_file)
        self.lock_file = self.state_file.with_name(self.state_file.name + ".lock")

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict]:
        """The file's content, under the lock; changes are saved when the block succeeds."""
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                data = json.loads(self.state_file.read_text())
            except FileNotFoundError:
                data = {"pfs": {}}
            before = json.dumps(data, sort_keys=True)
            yield data
            if json.dumps(data, sort_keys=True) != before:
                tmp = self.state_file.with_name(f".{self.state_file.name}.{os.getpid()}.tmp")
                tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
                os.replace(tmp, self.state_file)
        finally:
            os.close(fd)

    def add_pf(self, pf: str, netns: str, netdevs: Mapping[int, Optional[str]]) -> None:
        """Register PF `pf` whose VF i is the veth end `netdevs[i]` in namespace `netns`
        (a path); every VF starts in the state of a fresh NIC."""
        dev, ino = _netns_id(netns)
        with self._locked() as data:
            data["pfs"][pf] = {"netns": {"path": netns, "dev": dev, "ino": ino},
                               "vfs": {str(i): {"netdev": name, "state": VfState().to_dict()}
                                       for i, name in netdevs.items()}}

    def remove_pf(self, pf: str) -> None:
        with self._locked() as data:
            data["pfs"].pop(pf, None)

    def _vf(self, data: dict, pf: str, index: int) -> tuple[dict, dict]:
        nic = data["pfs"].get(pf)
        if nic is None:
            raise BackendError(f"simulated PF {pf}: not in {self.state_file}")
        vf = nic["vfs"].get(str(index))
        if vf is None:
            raise BackendError(f"simulated PF {pf} has no VF {index} (it has {len(nic['vfs'])})")
        return nic, vf

    def get_vf(self, pf: str, index: int) -> VfState:
        with self._locked() as data:
            return VfState.from_dict(self._vf(data, pf, index)[1]["state"])

    def set_vf(self, pf: str, index: int, **changes) -> None:
        settings = check_settings(changes)
        with self._locked() as data:
            nic, vf = self._vf(data, pf, index)
            current = VfState.from_dict(vf["state"])
            new = dataclasses.replace(current, **complete(settings, lambda: current))
            if "mac" in settings and new.mac != ZERO_MAC:
                self._apply_mac(nic["netns"], vf["netdev"], new.mac)
            vf["state"] = new.to_dict()

    @staticmethod
    def _apply_mac(netns: dict, netdev: Optional[str], mac: str) -> None:
        if netdev is None or _netns_id("/proc/thread-self/ns/net") != (netns["dev"],
                                                                        netns["ino"]):
            return
        with IPRoute() as ipr:
            try:
                link = ipr.link("get", ifname=netdev)[0]
            except NetlinkError as exc:
                if exc.code == errno.ENODEV:
                    return  # moved into a pod: the pod's side sets its MAC
                raise BackendError(f"simulated VF {netdev}: {os.strerror(exc.code)}") from exc
            try:
                ipr.link("set", index=link["index"], address=mac)
            except NetlinkError as exc:
                raise BackendError(f"could not set MAC {mac} on simulated VF {netdev}: "
                                   f"{os.strerror(exc.code)}") from exc
