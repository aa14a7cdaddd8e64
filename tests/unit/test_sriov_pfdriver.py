"""The PF-driver boundary without hardware: the exact netlink request, and the simulated driver.

Requests are decoded with pyroute2's stock ifinfmsg (not the class that
encoded them) and, where sizes matter, walked byte by byte.
"""

from __future__ import annotations

import errno
import json
import os
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from pyroute2.netlink import NLM_F_ACK, NLM_F_REQUEST
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import RTM_NEWLINK, RTM_SETLINK
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg

from vpcni.backends.sriov.pfdriver import (ETH_P_8021AD, ETH_P_8021Q, LINK_STATE_DISABLE,
                                           NetlinkPfDriver, SimulatedPfDriver, VfRequest,
                                           VfState, check_settings, complete,
                                           encode_vf_request, vf_state_from_link)
from vpcni.core.errors import BackendError, InvalidConfig

IFLA_VFINFO_LIST, IFLA_VF_INFO, IFLA_VF_MAC, IFLA_VF_VLAN_LIST, IFLA_VF_VLAN_INFO = 22, 1, 1, 12, 1


def decode(data: bytes) -> ifinfmsg:
    msg = ifinfmsg(data)
    msg.decode()
    return msg


def vf_attrs(msg: ifinfmsg) -> list[tuple[str, dict]]:
    """The IFLA_VF_* attributes of the request's single IFLA_VF_INFO, fields without 'header'."""
    [vflist] = msg.get_attrs("IFLA_VFINFO_LIST")
    [info] = vflist.get_attrs("IFLA_VF_INFO")
    out = []
    for nla in info["attrs"]:
        name, value = nla[0], nla[1]
        if name == "IFLA_VF_VLAN_LIST":
            value = [dict(v) for _, v in ((x[0], x[1]) for x in value["attrs"])]
        else:
            value = {k: v for k, v in dict(value).items() if k != "header"}
        out.append((name, value))
    return out


def nlas(data: bytes) -> list[tuple[int, bytes]]:
    """(type, payload) of each netlink attribute in `data`, lengths as the header says."""
    out, pos = [], 0
    while pos + 4 <= len(data):
        length, kind = struct.unpack_from("=HH", data, pos)
        out.append((kind & 0x3FFF, data[pos + 4:pos + length]))
        pos += (length + 3) & ~3
    return out


def vf_info_nlas(request: bytes) -> list[tuple[int, bytes]]:
    """The attributes inside IFLA_VFINFO_LIST/IFLA_VF_INFO, past the 32 bytes of
    nlmsghdr and ifinfomsg."""
    [(kind, vflist)] = nlas(request[32:])
    assert kind == IFLA_VFINFO_LIST
    [(kind, info)] = nlas(vflist)
    assert kind == IFLA_VF_INFO
    return nlas(info)


# ---------------------------------------------------------------- the request


def test_request_carries_every_setting():
    data = encode_vf_request(7, 3, {
        "mac": "02:00:5e:10:00:01", "vlan": 100, "qos": 3, "vlan_proto": ETH_P_8021Q,
        "min_tx_rate": 10, "max_tx_rate": 1000, "spoofchk": False, "trust": True,
        "link_state": LINK_STATE_DISABLE})
    msg = decode(data)
    assert msg["header"]["type"] == RTM_SETLINK
    assert msg["header"]["flags"] == NLM_F_REQUEST | NLM_F_ACK
    assert msg["header"]["length"] == len(data)
    assert msg["index"] == 7
    assert [name for name, _ in msg["attrs"]] == ["IFLA_VFINFO_LIST"]
    assert vf_attrs(msg) == [
        ("IFLA_VF_MAC", {"vf": 3, "mac": "02:00:5e:10:00:01"}),
        ("IFLA_VF_VLAN", {"vf": 3, "vlan": 100, "qos": 3}),
        ("IFLA_VF_RATE", {"vf": 3, "min_tx_rate": 10, "max_tx_rate": 1000}),
        ("IFLA_VF_SPOOFCHK", {"vf": 3, "spoofchk": 0}),
        ("IFLA_VF_TRUST", {"vf": 3, "trust": 1}),
        ("IFLA_VF_LINK_STATE", {"vf": 3, "link_state": 2}),
    ]


def test_request_carries_only_what_changes():
    msg = decode(encode_vf_request(9, 0, {"mac": "02:00:00:00:00:aa"}))
    assert vf_attrs(msg) == [("IFLA_VF_MAC", {"vf": 0, "mac": "02:00:00:00:00:aa"})]
    [(kind, mac_payload)] = vf_info_nlas(encode_vf_request(9, 0, {"mac": "02:00:00:00:00:aa"}))
    assert kind == IFLA_VF_MAC
    assert len(mac_payload) == 36  # struct ifla_vf_mac: __u32 vf, __u8 mac[32]
    assert mac_payload[4:10] == bytes.fromhex("0200000000aa")


def test_qinq_vlan_goes_in_a_vlan_list_of_kernel_size():
    data = encode_vf_request(7, 2, {"vlan": 200, "qos": 1, "vlan_proto": ETH_P_8021AD})
    assert vf_attrs(decode(data)) == [
        ("IFLA_VF_VLAN_LIST", [{"vf": 2, "vlan": 200, "qos": 1, "proto": ETH_P_8021AD}])]
    [(kind, vlan_list)] = vf_info_nlas(data)
    assert kind == IFLA_VF_VLAN_LIST
    [(kind, vlan_info)] = nlas(vlan_list)
    assert kind == IFLA_VF_VLAN_INFO
    # sizeof(struct ifla_vf_vlan_info) == 16: shorter, and the kernel says EINVAL.
    assert len(vlan_info) == 16
    assert struct.unpack("=III", vlan_info[:12]) == (2, 200, 1)
    assert struct.unpack(">H", vlan_info[12:14]) == (ETH_P_8021AD,)


# ---------------------------------------------------------------- settings


@pytest.mark.parametrize("changes, words", [
    ({"mac": "02:00:00:00:00"}, "VF mac '02:00:00:00:00' is not a MAC address"),
    ({"mac": "01:00:5e:00:00:01"}, "is a multicast address"),
    ({"vlan": 4095}, "VF vlan 4095: expected an integer from 0 to 4094"),
    ({"vlan": "7"}, "VF vlan '7'"),
    ({"qos": 8}, "VF qos 8"),
    ({"vlan_proto": 0x9100}, "VF vlan_proto 37120: expected 802.1Q or 802.1ad"),
    ({"spoofchk": "yes"}, "VF spoofchk 'yes'"),
    ({"link_state": "down"}, "VF link_state 'down'"),
    ({"link_state": True}, "VF link_state True"),
    ({"max_tx_rate": -1}, "VF max_tx_rate -1"),
    ({"mtu": 9000}, "unknown VF setting 'mtu'"),
])
def test_bad_settings_name_the_setting(changes, words):
    with pytest.raises(InvalidConfig) as err:
        check_settings(changes)
    assert words in str(err.value) and err.value.code == 7


def test_settings_are_normalised():
    assert check_settings({"mac": "02:AA:00:00:00:01", "vlan_proto": "802.1ad",
                           "link_state": "enable", "spoofchk": 0, "trust": 1}) == {
        "mac": "02:aa:00:00:00:01", "vlan_proto": ETH_P_8021AD, "link_state": 1,
        "spoofchk": False, "trust": True}


def test_partial_vlan_or_rate_is_completed_from_the_current_state():
    now = VfState(vlan=5, qos=2, vlan_proto=ETH_P_8021AD, min_tx_rate=1, max_tx_rate=50)
    assert complete({"vlan": 7}, lambda: now) == {"vlan": 7, "qos": 2,
                                                  "vlan_proto": ETH_P_8021AD}
    assert complete({"max_tx_rate": 100}, lambda: now) == {"min_tx_rate": 1, "max_tx_rate": 100}
    assert complete({"mac": "02:00:00:00:00:01"}, lambda: pytest.fail("not needed")) == {
        "mac": "02:00:00:00:00:01"}
    with pytest.raises(InvalidConfig, match="min_tx_rate 60 is above max_tx_rate 50"):
        complete({"min_tx_rate": 60}, lambda: now)


def test_vf_state_dict_round_trip_keeps_unreported():
    state = VfState(mac="02:00:00:00:00:09", vlan=3, spoofchk=None, trust=None)
    assert VfState.from_dict(json.loads(json.dumps(state.to_dict()))) == state
    assert "spoofchk" not in state.settings() and "trust" not in state.settings()
    with pytest.raises(InvalidConfig, match="unknown VF setting 'colour'"):
        VfState.from_dict({**state.to_dict(), "colour": "blue"})


# ---------------------------------------------------------------- reading back


def kernel_reply() -> ifinfmsg:
    """An RTM_NEWLINK for a PF with two VFs, encoded as the kernel does, decoded by pyroute2."""
    def info(vf, mac, vlan, qos, proto, spoofchk, trust, link_state, rates):
        return ("IFLA_VF_INFO", {"attrs": [
            ("IFLA_VF_MAC", {"vf": vf, "mac": mac}),
            ("IFLA_VF_VLAN", {"vf": vf, "vlan": vlan, "qos": qos}),
            ("IFLA_VF_VLAN_LIST", {"attrs": [("IFLA_VF_VLAN_INFO", {
                "vf": vf, "vlan": vlan, "qos": qos, "proto": proto})]}),
            ("IFLA_VF_TX_RATE", {"vf": vf, "tx_rate": rates[1]}),
            ("IFLA_VF_RATE", {"vf": vf, "min_tx_rate": rates[0], "max_tx_rate": rates[1]}),
            ("IFLA_VF_SPOOFCHK", {"vf": vf, "spoofchk": spoofchk}),
            ("IFLA_VF_LINK_STATE", {"vf": vf, "link_state": link_state}),
            ("IFLA_VF_TRUST", {"vf": vf, "trust": trust}),
        ]})
    msg = VfRequest()
    msg["header"]["type"] = RTM_NEWLINK
    msg["index"] = 7
    msg["attrs"] = [("IFLA_IFNAME", "enp1s0f0"), ("IFLA_NUM_VF", 2), ("IFLA_VFINFO_LIST", {
        "attrs": [info(0, "00:00:00:00:00:00", 0, 0, ETH_P_8021Q, 1, 0, 0, (0, 0)),
                  info(1, "02:00:00:00:01:01", 300, 5, ETH_P_8021AD, 0xFFFFFFFF, 1, 1,
                       (5, 900))]})]
    msg.encode()
    return decode(bytes(msg.data))


def test_vf_state_from_link():
    reply = kernel_reply()
    assert vf_state_from_link(reply, 0) == VfState()
    assert vf_state_from_link(reply, 1) == VfState(
        mac="02:00:00:00:01:01", vlan=300, qos=5, vlan_proto=ETH_P_8021AD, spoofchk=None,
        trust=True, link_state=1, min_tx_rate=5, max_tx_rate=900)
    assert vf_state_from_link(reply, 2) is None


class FakeIPRoute:
    """Answers the driver's gets with `kernel_reply()`; keeps each request it is sent."""

    def __init__(self, fail: int = 0):
        self.sent: list[bytes] = []
        self.fail = fail

    def link(self, command, **kw):
        assert command == "get"
        if kw.get("ifname") not in (None, "enp1s0f0"):
            raise NetlinkError(errno.ENODEV)
        if "ifname" in kw:
            return [{"index": 7}]
        assert kw == {"index": 7, "ext_mask": 1}
        return [kernel_reply()]

    def nlm_request_batch(self, msgs):
        [msg] = msgs
        msg.encode()
        self.sent.append(bytes(msg.data))
        if self.fail:
            raise NetlinkError(self.fail)
        return []


def test_netlink_driver_sends_the_request_with_the_rest_of_the_vlan():
    ipr = FakeIPRoute()
    driver = NetlinkPfDriver(ipr)
    assert driver.get_vf("enp1s0f0", 1).vlan == 300
    driver.set_vf("enp1s0f0", 1, vlan=301, trust=False)
    [sent] = ipr.sent
    assert decode(sent)["index"] == 7
    assert vf_attrs(decode(sent)) == [
        ("IFLA_VF_VLAN_LIST", [{"vf": 1, "vlan": 301, "qos": 5, "proto": ETH_P_8021AD}]),
        ("IFLA_VF_TRUST", {"vf": 1, "trust": 0})]
    driver.set_vf("enp1s0f0", 1)
    assert len(ipr.sent) == 1  # nothing to change, nothing sent


def test_netlink_driver_errors_name_pf_vf_and_settings():
    driver = NetlinkPfDriver(FakeIPRoute(fail=errno.EOPNOTSUPP))
    with pytest.raises(BackendError, match=r"could not set mac, spoofchk of VF 2 on PF "
                                           r"enp1s0f0: Operation not supported"):
        driver.set_vf("enp1s0f0", 2, mac="02:00:00:00:00:02", spoofchk=True)
    with pytest.raises(BackendError, match="PF enp9s0: no such network device"):
        driver.get_vf("enp9s0", 0)
    with pytest.raises(BackendError, match=r"PF enp1s0f0 reports no VF 4 \(it has 2\)"):
        driver.get_vf("enp1s0f0", 4)


# ---------------------------------------------------------------- simulated


@pytest.fixture
def sim(tmp_path) -> SimulatedPfDriver:
    # A namespace id that is never the caller's: these tests touch no netdev.
    not_our_netns = tmp_path / "elsewhere"
    not_our_netns.touch()
    driver = SimulatedPfDriver(tmp_path / "nic" / "pf-driver.json")
    driver.add_pf("enp1s0f0", str(not_our_netns), {i: f"enp1s0f0v{i}" for i in range(4)})
    return driver


def test_fresh_simulated_vf_is_like_a_fresh_nic(sim):
    assert sim.get_vf("enp1s0f0", 3) == VfState(
        mac="00:00:00:00:00:00", vlan=0, qos=0, vlan_proto=ETH_P_8021Q, spoofchk=True,
        trust=False, link_state=0, min_tx_rate=0, max_tx_rate=0)


def test_simulated_record_and_restore_round_trip(sim, tmp_path):
    original = sim.get_vf("enp1s0f0", 1)
    record = json.dumps(original.to_dict())  # what a backend keeps until DEL
    sim.set_vf("enp1s0f0", 1, mac="02:00:00:00:00:11", vlan=42, qos=1, vlan_proto="802.1ad",
               spoofchk=False, trust=True, link_state="disable", max_tx_rate=500)
    changed = VfState(mac="02:00:00:00:00:11", vlan=42, qos=1, vlan_proto=ETH_P_8021AD,
                      spoofchk=False, trust=True, link_state=2, max_tx_rate=500)
    # Another process sees the same state through the file.
    assert SimulatedPfDriver(tmp_path / "nic" / "pf-driver.json").get_vf("enp1s0f0", 1) == changed
    sim.set_vf("enp1s0f0", 1, vlan=43)  # qos and protocol stay
    assert sim.get_vf("enp1s0f0", 1).vlan_proto == ETH_P_8021AD
    sim.restore_vf("enp1s0f0", 1, VfState.from_dict(json.loads(record)))
    assert sim.get_vf("enp1s0f0", 1) == original
    assert sim.get_vf("enp1s0f0", 0) == VfState()
    assert sorted(p.name for p in (tmp_path / "nic").iterdir()) == ["pf-driver.json",
                                                                   "pf-driver.json.lock"]


def test_simulated_errors(sim, tmp_path):
    with pytest.raises(BackendError, match="simulated PF enp2s0f0: not in"):
        sim.get_vf("enp2s0f0", 0)
    with pytest.raises(BackendError, match=r"simulated PF enp1s0f0 has no VF 4 \(it has 4\)"):
        sim.set_vf("enp1s0f0", 4, trust=True)
    before = (tmp_path / "nic" / "pf-driver.json").read_text()
    with pytest.raises(InvalidConfig, match="VF vlan 5000"):
        sim.set_vf("enp1s0f0", 0, trust=True, vlan=5000)
    assert (tmp_path / "nic" / "pf-driver.json").read_text() == before
    sim.remove_pf("enp1s0f0")
    with pytest.raises(BackendError, match="not in"):
        sim.get_vf("enp1s0f0", 0)


def test_simulated_updates_are_not_lost_under_concurrency(sim, tmp_path):
    path = tmp_path / "nic" / "pf-driver.json"

    def worker(vf: int) -> None:
        driver = SimulatedPfDriver(path)  # as separate CNI calls would
        for n in range(1, 16):
            driver.set_vf("enp1s0f0", vf, vlan=vf * 100 + n)
    threads = [threading.Thread(target=worker, args=(vf,)) for vf in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [sim.get_vf("enp1s0f0", vf).vlan for vf in range(4)] == [15, 115, 215, 315]


def test_kernel_size_holds_after_pyroute2_compiled_its_own_vlan_list_first():
    """pyroute2 compiles a class's NLA table on first use and marks the class; VfRequest
    must not inherit its parent's mark and table (then the VLAN info is 14 bytes again).
    A fresh interpreter, in which pyroute2's own classes are used first."""
    script = ("from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg\n"
              "ifinfmsg.vflist(); ifinfmsg.vflist.vfinfo(); ifinfmsg.vflist.vfinfo.vf_vlist()\n"
              "from tests.unit.test_sriov_pfdriver import "
              "test_qinq_vlan_goes_in_a_vlan_list_of_kernel_size as check\n"
              "check()\n")
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", script], check=True, cwd=root,
                   env={**os.environ, "PYTHONPATH": str(root)})
