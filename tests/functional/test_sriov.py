"""The sriov provider on a simulated switchdev NIC (lab.simnic: sysfs tree, veth pairs as
VF netdev + representor, SimulatedPfDriver below the PF-driver boundary), through the
installed plugin and the node agent, as a runtime calls it.

n1 has the NIC (4 VFs on mlx5_core, 1 on vfio-pci) and the kernel switch; n2 is a plain
kernel node. Static flood lists connect them (no EVPN here: test_lab covers that).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest

from tests.functional.outcome import failed, ok
from vpcni.backends.sriov.provider import attachment_mac
from vpcni.lab.cluster import installed_executable, seed_network
from vpcni.lab.netns import wait_for

pytestmark = pytest.mark.functional

N1, N2 = "198.51.100.1", "198.51.100.2"
VNI = 710
NET = "vpc-sriov"


def net(addr=None, **extra) -> dict:
    return seed_network(NET, VNI, addr, vteps=[N1, N2], **extra)


@pytest.fixture
def nodes(cluster):
    n1 = cluster.add_node("n1", N1, agent=True, backend="kernel",
                          nic={"vfs": 5, "mode": "switchdev",
                               "vf_driver": ["mlx5_core"] * 4 + ["vfio-pci"]})
    n2 = cluster.add_node("n2", N2, agent=True, backend="kernel")
    return cluster, n1, n2


def links(ns) -> dict[str, dict]:
    return {l["ifname"]: l for l in json.loads(ns.ip("-j", "-d", "link", "show").stdout)}


def vf_state(node, index: int) -> dict:
    data = json.loads(node.nic.state_file.read_text())
    return data["pfs"][node.nic.pf]["vfs"][str(index)]["state"]


def claims(node) -> list[str]:
    d = node.state_dir / "sriov" / "claims"
    return sorted(p.name for p in d.glob("*.json")) if d.exists() else []


def test_a_vf_pod_a_veth_pod_and_a_remote_pod_reach_each_other(nodes):
    cluster, n1, n2 = nodes
    vf_pod, veth_pod, remote = (cluster.add_pod(n1, "vf"), cluster.add_pod(n1, "veth"),
                                cluster.add_pod(n2, "remote"))
    res = cluster.attach(vf_pod, net("172.16.71.1/24", interface="vf"))
    cluster.attach(veth_pod, net("172.16.71.2/24"))
    cluster.attach(remote, net("172.16.71.3/24"))
    pod_if = [i for i in res["interfaces"] if i.get("sandbox")][0]
    # The pod's eth1 is VF 0's netdev (the veth end of the simulated NIC), moved in.
    assert pod_if["pciID"] == n1.nic.vf_pci(0) and pod_if["mac"] == attachment_mac(
        (NET, vf_pod.container_id, "eth1"))
    assert n1.nic.vf_netdev(0) not in links(n1.ns)
    eth1 = links(vf_pod.ns)["eth1"]
    assert eth1["address"] == pod_if["mac"] and eth1["mtu"] == 1450
    # Its representor is the port in VNI 710's bridge, under the switch's port name.
    host = [i for i in res["interfaces"] if not i.get("sandbox")][0]["name"]
    rep = links(n1.ns)[host]
    assert rep["master"] == f"vpbr{VNI}" and n1.nic.representor(0) not in links(n1.ns)
    # The PF applied the MAC and spoof checking (what the simulated NIC recorded).
    assert vf_state(n1, 0)["mac"] == pod_if["mac"] and vf_state(n1, 0)["spoofchk"]
    for src, dst in ((vf_pod, "172.16.71.2"), (vf_pod, "172.16.71.3"), (remote, "172.16.71.1"),
                     (veth_pod, "172.16.71.1")):
        wait_for(lambda: src.ns.ping(dst), timeout=10, what=f"{src.name} -> {dst}")
    ok(n1.cni("CHECK", net("172.16.71.1/24", interface="vf", prevResult=res),
              vf_pod.container_id, vf_pod.netns))

    cluster.detach(vf_pod, net("172.16.71.1/24", interface="vf"))
    # Back as it was: netdev on the node under its name, representor renamed back, the
    # PF's settings restored, the VF free again.
    assert n1.nic.vf_netdev(0) in links(n1.ns) and n1.nic.representor(0) in links(n1.ns)
    assert "master" not in links(n1.ns)[n1.nic.representor(0)]
    assert vf_state(n1, 0)["mac"] == "00:00:00:00:00:00" and claims(n1) == []


def test_kubevirt_vfio_vf_stays_and_device_info_is_written(nodes, tmp_path):
    cluster, n1, _ = nodes
    vm = cluster.add_pod(n1, "vm")
    vfio = n1.nic.vf_pci(4)
    info_file = tmp_path / "devinfo" / "vm-net1.json"
    cfg = net("172.16.71.10/24", deviceID=vfio, runtimeConfig={
        "mac": "02:00:00:71:00:10", "CNIDeviceInfoFile": str(info_file)})
    res = cluster.attach(vm, cfg)
    itf = [i for i in res["interfaces"] if i.get("sandbox")][0]
    assert itf == {"name": "eth1", "mac": "02:00:00:71:00:10", "sandbox": vm.netns,
                   "pciID": vfio}
    assert [ip["address"] for ip in res["ips"]] == ["172.16.71.10/24"]
    assert set(links(vm.ns)) == {"lo"}  # nothing moved into the pod
    host = [i for i in res["interfaces"] if not i.get("sandbox")][0]["name"]
    assert json.loads(info_file.read_text()) == {
        "type": "pci", "version": "1.1.0",
        "pci": {"pci-address": vfio, "pf-pci-address": n1.nic.pf_pci,
                "representor-device": host}}
    assert vf_state(n1, 4)["mac"] == "02:00:00:71:00:10"
    cluster.detach(vm, cfg)
    assert vf_state(n1, 4)["mac"] == "00:00:00:00:00:00" and not info_file.exists()
    # The same MAC again (the VM restarted elsewhere on this node): no collision.
    again = cluster.add_pod(n1, "vm2")
    cluster.attach(again, cfg)
    assert vf_state(n1, 4)["mac"] == "02:00:00:71:00:10"
    cluster.detach(again, cfg)


def test_a_vf_in_use_is_not_given_twice_and_bad_device_ids_are_clean_errors(nodes):
    cluster, n1, _ = nodes
    a, b = cluster.add_pod(n1, "a"), cluster.add_pod(n1, "b")
    cluster.attach(a, net("172.16.71.21/24", deviceID=n1.nic.vf_pci(1)))
    # In use: try again later (its holder's DEL may be on its way).
    body = failed(n1.cni("ADD", net("172.16.71.22/24", deviceID=n1.nic.vf_pci(1)),
                         b.container_id, b.netns), code=11)
    assert n1.nic.vf_pci(1) in body["msg"] and "in use" in body["msg"]
    body = failed(n1.cni("ADD", net("172.16.71.22/24", deviceID="0000:99:00.1"),
                         b.container_id, b.netns), code=7)
    assert "0000:99:00.1" in body["msg"]
    body = failed(n1.cni("ADD", net("172.16.71.22/24", deviceID="nonsense"),
                         b.container_id, b.netns), code=7)
    assert "deviceID" in body["msg"]
    assert claims(n1) == [f"{n1.nic.vf_pci(1)}.json"]


def test_del_with_the_pod_netns_gone_restores_the_vf(nodes):
    cluster, n1, _ = nodes
    pod = cluster.add_pod(n1, "gone")
    cfg = net("172.16.71.31/24", interface="vf", runtimeConfig={"mac": "02:00:00:71:00:31"})
    cluster.attach(pod, cfg)
    pod.ns.delete()
    ok(n1.cni("DEL", cfg, pod.container_id, pod.netns))
    assert vf_state(n1, 0)["mac"] == "00:00:00:00:00:00" and claims(n1) == []
    # A simulated VF is a veth: it went with the namespace, and its representor with
    # it (a real VF returns to the host). The pool skips a VF without its netdev.
    assert n1.nic.vf_netdev(0) not in links(n1.ns)
    other = cluster.add_pod(n1, "other")
    res = cluster.attach(other, cfg)
    assert [i for i in res["interfaces"] if i.get("sandbox")][0]["pciID"] == n1.nic.vf_pci(1)


@pytest.fixture
def eight_vfs(cluster):
    return cluster.add_node("n8", N1, agent=True, backend="kernel",
                            nic={"vfs": 8, "mode": "switchdev"})


def assert_all_vfs_back(node, vfs: int = 8) -> None:
    """No claim left, every VF's netdev and representor back on the node, unenslaved
    (the callers compare the PF's settings with what they were before)."""
    assert claims(node) == []
    for i in range(vfs):
        here = links(node.ns)
        assert node.nic.vf_netdev(i) in here and node.nic.representor(i) in here
        assert "master" not in here[node.nic.representor(i)]


@pytest.mark.slow
def test_200_parallel_add_del_cycles_never_give_a_vf_twice(cluster, eight_vfs):
    """8 callers x 25 ADD+DEL cycles on 8 VFs: no VF given twice, none leaked, every VF's
    settings restored. ADDs that find every VF taken would fail cleanly (code 50)."""
    node = eight_vfs
    fresh = {i: vf_state(node, i) for i in range(8)}
    pods = [cluster.add_pod(node, f"p{i}") for i in range(8)]
    errors, held = [], []  # held: (pci, ADD answered, DEL sent) per cycle
    lock = threading.Lock()

    def cycle(i: int, pod) -> None:
        for round_ in range(25):
            cfg = net(f"172.16.{72 + i}.{round_ + 1}/24", interface="vf")
            res = node.cni("ADD", cfg, pod.container_id, pod.netns)
            if not res.ok:
                if json.loads(res.stdout)["code"] not in (50, 11):
                    errors.append(res.stdout)
                continue
            got = time.monotonic()
            pci = [x for x in res.json["interfaces"] if x.get("sandbox")][0]["pciID"]
            sent = time.monotonic()
            del_res = node.cni("DEL", cfg, pod.container_id, pod.netns)
            with lock:
                held.append((pci, got, sent))
            if not del_res.ok:
                errors.append(del_res.stdout)

    threads = [threading.Thread(target=cycle, args=(i, p)) for i, p in enumerate(pods)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(held) == 200
    # A VF is held from its ADD's answer until its DEL is sent: no two holds of one VF
    # may overlap (the ADD that got it again answered after the DEL that freed it began).
    by_vf: dict[str, list] = {}
    for pci, got, sent in held:
        by_vf.setdefault(pci, []).append((got, sent))
    for pci, spans in by_vf.items():
        spans.sort()
        for (a_got, a_sent), (b_got, _) in zip(spans, spans[1:]):
            assert b_got > a_sent, f"{pci} given twice"
    assert {i: vf_state(node, i) for i in range(8)} == fresh
    assert_all_vfs_back(node)


@pytest.mark.slow
def test_agent_killed_during_adds_then_every_vf_comes_back(cluster, eight_vfs):
    node = eight_vfs
    fresh = {i: vf_state(node, i) for i in range(8)}
    pods = [cluster.add_pod(node, f"k{i}") for i in range(8)]
    cfgs = [net(f"172.16.80.{i + 1}/24", interface="vf") for i in range(8)]
    threads = [threading.Thread(target=node.cni, args=("ADD", cfgs[i], p.container_id,
                                                        p.netns)) for i, p in enumerate(pods)]
    for t in threads:
        t.start()
    wait_for(lambda: claims(node), timeout=10, interval=0.005, what="a VF being claimed")
    for pid in node.ns.sandbox.pids(node.ns.name, "vpcnictl"):
        os.kill(pid, signal.SIGKILL)
    for t in threads:
        t.join()
    node.start_agent()
    node.wait_agent_ready()
    for cfg, pod in zip(cfgs, pods):
        ok(node.cni("DEL", cfg, pod.container_id, pod.netns))
    assert {i: vf_state(node, i) for i in range(8)} == fresh
    assert_all_vfs_back(node)


def test_a_node_without_a_usable_vf_says_why(cluster):
    legacy = cluster.add_node("leg", N1, agent=True, backend="kernel",
                              nic={"vfs": 2, "mode": "legacy"})
    pod = cluster.add_pod(legacy, "a")
    body = failed(legacy.cni("ADD", net("172.16.71.41/24", interface="vf"), pod.container_id,
                             pod.netns), code=50)
    assert "legacy mode" in body["msg"] and "VLAN" in body["msg"], body
    plain = cluster.add_node("plain", N2, agent=True, backend="kernel")
    pod2 = cluster.add_pod(plain, "b")
    body = failed(plain.cni("ADD", net("172.16.71.42/24", interface="vf"), pod2.container_id,
                            pod2.netns), code=50)
    assert "no SR-IOV PF" in body["msg"], body
    # A veth pod on the same nodes is unaffected.
    ok(plain.cni("ADD", net("172.16.71.43/24"), pod2.container_id, pod2.netns))


def test_probe_on_a_switchdev_a_legacy_and_a_plain_node(cluster):
    nodes = {"sdev": cluster.add_node("sdev", N1, nic={"vfs": 2, "mode": "switchdev"}),
             "leg": cluster.add_node("leg", N2, nic={"vfs": 2, "mode": "legacy"}),
             "plain": cluster.add_node("plain", "198.51.100.3")}
    out = {}
    for name, node in nodes.items():
        proc = node.ns.exec(installed_executable("vpcnictl"), "probe", "--node-config",
                            str(node.config_path))
        out[name] = proc.stdout
        sriov = [l for l in proc.stdout.splitlines() if l.startswith("sriov")]
        assert len(sriov) == 1, proc.stdout
    assert "sriov      yes" in out["sdev"] and "enp1s0f0 in switchdev mode, 2 VF(s) free" \
        in out["sdev"]
    assert "PF enp1s0f0 (0000:01:00.0): mode switchdev, 2 of 2 VFs free" in out["sdev"]
    assert "sriov      no" in out["leg"] and "legacy mode" in out["leg"] and "VLAN" in out["leg"]
    assert "offload no" in out["leg"]
    assert "sriov      no" in out["plain"] and "no SR-IOV PF" in out["plain"]
    for text in out.values():
        assert "veth       yes" in text and "this node uses: kernel" in text


def test_vf_settings_from_the_network_are_applied_and_restored(nodes):
    cluster, n1, _ = nodes
    pod = cluster.add_pod(n1, "s")
    before = vf_state(n1, 0)
    cfg = net("172.16.71.51/24", interface="vf", vf={"vlan": 10, "qos": 2, "trust": True,
                                                     "max_tx_rate": 1000})
    cluster.attach(pod, cfg)
    state = vf_state(n1, 0)
    assert (state["vlan"], state["qos"], state["trust"], state["max_tx_rate"],
            state["spoofchk"]) == (10, 2, True, 1000, True)
    cluster.detach(pod, cfg)
    assert vf_state(n1, 0) == before
    for bad, words in (({"vlan": 5000}, "vlan 5000"), ({"colour": 1}, "colour"),
                       ({"mac": "02:00:00:00:00:09"}, "runtimeConfig.mac")):
        body = failed(n1.cni("ADD", net("172.16.71.51/24", interface="vf", vf=bad),
                             pod.container_id, pod.netns), code=7)
        assert "'vf'" in body["msg"] and words in body["msg"], body


def test_a_bad_sriov_section_is_a_config_error(cluster):
    node = cluster.add_node("n1", N1, nic={"vfs": 1, "mode": "switchdev"})
    node.write_node_config(**(node.node_config | {"sriov": node.node_config["sriov"] | {
        "pfDriver": "simulated", "simulatedStateFile": None}}))
    pod = cluster.add_pod(node, "a")
    body = failed(node.cni("ADD", net("172.16.71.61/24", interface="vf"), pod.container_id,
                           pod.netns), code=7)
    assert "sriov" in body["msg"] and "simulatedStateFile" in body["msg"], body
