"""The core's pod-MTU following (Handler.follow_mtu, CHECK's MTU comparison, the status),
against a fake switch and a fake interface provider: which attachments follow the
underlay, in which order, what is left and reported, and what a pass costs."""

from __future__ import annotations

import logging

import pytest

from vpcni.core.backend import Backend, Guarded, InterfaceProvider
from vpcni.core.config import NetworkConfig, NodeConfig
from vpcni.core.errors import BackendError
from vpcni.core.handler import Handler
from vpcni.core.models import Attachment, Owned, Probe


class FakeSwitch(Backend):
    name = "fake"

    def __init__(self, node, calls):
        super().__init__(node)
        self.mtu = 1450
        self.calls = calls
        self.asked = 0

    @classmethod
    def probe(cls, node):
        return Probe(name=cls.name, available=True, reason="fake")

    def port_name(self, att):
        return f"fk-{att.container_id}"

    def pod_mtu(self, net):
        self.asked += 1
        return net.mtu or self.mtu

    def set_network_mtu(self, vni, mtu):
        self.calls.append(("vni", vni, mtu))
        return True

    def ensure_network(self, net):
        return False

    def release_network(self, vni):
        pass

    def add_port(self, net, att):
        pass

    def remove_port(self, att):
        pass

    def check_port(self, net, att):
        return []

    def apply_remote(self, vni, remote):
        pass

    def owned(self):
        return Owned()


class FakeProvider(InterfaceProvider):
    name = "veth"

    def __init__(self, node, calls):
        super().__init__(node)
        self.calls = calls
        self.refuse: set[str] = set()

    @classmethod
    def probe(cls, node):
        return Probe(name=cls.name, available=True, reason="fake")

    def plug(self, net, att, mtu, switch):
        raise NotImplementedError

    def unplug(self, att):
        pass

    def check(self, att):
        return []

    def set_mtu(self, att, mtu):
        if att.container_id in self.refuse:
            raise BackendError(f"{att.ifname}: Invalid argument (EINVAL)")
        if att.interface == "vfio":
            return False
        self.calls.append((att.container_id, att.mtu, mtu))
        return True


@pytest.fixture
def setup(tmp_path):
    node = NodeConfig(stateDir=tmp_path, logFile=None, vtepAddress="192.0.2.1")
    handler = Handler(node, cached_store=True)
    calls: list = []
    switch, provider = FakeSwitch(node, calls), FakeProvider(node, calls)
    handler._backends["fake"] = Guarded(switch)
    handler._backends["interface:veth"] = Guarded(provider)

    def put(cid, mtu, pinned, vni=300, **kw):
        handler.store.put(Attachment(network="net", vni=vni, container_id=cid, ifname="eth1",
                                     backend="fake", provider="veth", state="ready",
                                     host_ifname=f"fk-{cid}", mtu=mtu, mtu_pinned=pinned, **kw))
    return handler, switch, provider, calls, put


def mtus(handler):
    return {a.container_id: a.mtu for a in handler.store.all()}


def test_followers_go_down_and_up_pinned_and_vms_stay_and_are_listed(setup, caplog):
    handler, switch, provider, calls, put = setup
    put("follows", 1450, False)
    put("pinned", 1450, True)
    put("small-pin", 1300, True)
    put("old", 1450, None)          # recorded before mtu_pinned existed
    put("vm", 1450, False, interface="vfio")
    caplog.set_level(logging.INFO, "vpcni.core.handler")
    assert handler.follow_mtu(full=False) == 0 and calls == []
    assert handler.mtu_status()["differ"] == 0

    switch.mtu = 1350
    assert handler.follow_mtu(full=False) == 2
    # Lowering: the attachments first, then the VNI's devices.
    assert calls == [("follows", 1450, 1350), ("old", 1450, 1350), ("vni", 300, 1350)]
    assert mtus(handler) == {"follows": 1350, "pinned": 1450, "small-pin": 1300, "old": 1350,
                             "vm": 1450}
    status = handler.mtu_status()
    assert status["podMtu"] == {"300": 1350}
    assert {(e["attachment"], e["mtu"], e["expected"]) for e in status["attachments"]} == {
        ("net/pinned/eth1", 1450, 1350), ("net/vm/eth1", 1450, 1350)}
    assert [r.getMessage() for r in caplog.records if "pod MTU" in r.getMessage()] == [
        "pod MTU 1350 (was 1450: the underlay's MTU changed) in VNI 300: 2 attachment(s) "
        "brought to it; 2 left at another MTU (vpcnictl status lists them)"]

    # Nothing changed: no attachment touched, nothing logged again.
    calls.clear()
    caplog.clear()
    handler.follow_mtu(full=False)
    handler.follow_mtu(full=True)
    assert calls == [] and not [r for r in caplog.records if r.levelno >= logging.INFO]

    switch.mtu = 1450
    handler.follow_mtu(full=False)
    # Raising: the VNI's devices first; an old record is never raised.
    assert calls == [("vni", 300, 1450), ("follows", 1350, 1450)]
    assert mtus(handler)["old"] == 1350
    status = handler.mtu_status()
    assert [(e["attachment"], e["why"]) for e in status["attachments"]] == [
        ("net/old/eth1", "recorded before vpcni kept whether its MTU is pinned: lowered with "
                         "the underlay, never raised")]


def test_quick_pass_reads_no_record_when_nothing_changed(setup, monkeypatch):
    handler, switch, provider, calls, put = setup
    for i in range(20):
        put(f"p{i}", 1450, False, vni=300 + i % 4)
    handler.follow_mtu(full=True)
    monkeypatch.setattr(handler.store, "for_vni", lambda vni: pytest.fail("read records"))
    monkeypatch.setattr(handler.store, "all", lambda *a: pytest.fail("read records"))
    asked = switch.asked
    handler.follow_mtu(full=False)
    assert switch.asked - asked == 4  # one pod MTU per VNI, from the backend's cache
    assert calls == []


def test_a_refusal_is_logged_once_listed_and_retried_on_full_passes(setup, caplog):
    handler, switch, provider, calls, put = setup
    put("a", 1450, False)
    handler.follow_mtu(full=True)
    provider.refuse.add("a")
    switch.mtu = 1350
    caplog.set_level(logging.WARNING, "vpcni.core.handler")
    handler.follow_mtu(full=False)
    handler.follow_mtu(full=True)
    handler.follow_mtu(full=True)
    keeps = [r for r in caplog.records if "keeps MTU" in r.getMessage()]
    assert len(keeps) == 1 and "Invalid argument" in keeps[0].getMessage()
    [entry] = handler.mtu_status()["attachments"]
    assert entry["attachment"] == "net/a/eth1" and "Invalid argument" in entry["why"]
    provider.refuse.clear()
    handler.follow_mtu(full=False)  # a quick pass leaves it to the full one
    assert mtus(handler) == {"a": 1450}
    handler.follow_mtu(full=True)
    assert mtus(handler) == {"a": 1350} and handler.mtu_status()["differ"] == 0


def test_check_names_the_interface_its_mtu_and_the_expected_one(setup):
    handler, switch, provider, calls, put = setup
    put("a", 1450, False)
    att = handler.store.get("net", "a", "eth1")
    backend = handler.backend_named("fake")
    cfg = NetworkConfig.parse({"cniVersion": "1.1.0", "name": "net", "type": "vpcni",
                               "vni": 300})
    assert handler._mtu_problems(backend, cfg, att) == []
    switch.mtu = 1350
    assert handler._mtu_problems(backend, cfg, att) == [
        "eth1 (port fk-a) has MTU 1450, expected 1350 (the node's underlay MTU less VXLAN's "
        "overhead)"]
    pinned = NetworkConfig.parse({"cniVersion": "1.1.0", "name": "net", "type": "vpcni",
                                  "vni": 300, "mtu": 1300})
    [msg] = handler._mtu_problems(backend, pinned, att)
    assert msg == "eth1 (port fk-a) has MTU 1450, expected 1300 (the network's mtu)"
    over = NetworkConfig.parse({"cniVersion": "1.1.0", "name": "net", "type": "vpcni",
                                "vni": 300, "mtu": 1450})
    [msg] = handler._mtu_problems(backend, over, att)
    assert "the network's mtu 1450 exceeds 1350" in msg
