"""What a node and its pods hold after CNI calls, and the assertion that nothing is left over.

The attachment records are the truth: every vpcni device in the node
namespace must be explained by a record (its host interface) or by the VNI
of a record (the per-VNI devices), and nothing else may remain.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterable

from vpcni.lab.cluster import Node, Pod
from vpcni.lab.daemons import Ovs
from vpcni.lab.netns import NETNS_DIR, run

# Node devices each backend keeps per VNI while the VNI has an attachment.
VNI_DEVICES: dict[str, Callable[[int], set[str]]] = {
    "kernel": lambda vni: {f"vpbr{vni}", f"vpvx{vni}"},
    "ovs": lambda vni: set(),  # per VNI only flows and a mark on the bridge
}
DEVICE_PREFIXES = ("vp", "vo")  # kernel veths/bridges/VXLAN devices, OVS ports' veths


def links(ns_name: str) -> dict[str, dict]:
    """name -> `ip -j link` entry of every link in namespace `ns_name` ({} when it is gone)."""
    if not (NETNS_DIR / ns_name).exists():
        return {}
    out = run(["ip", "-n", ns_name, "-j", "-d", "link", "show"]).stdout
    return {link["ifname"]: link for link in json.loads(out or "[]")}


def vp_links(node: Node) -> set[str]:
    return {name for name in links(node.ns.name) if name.startswith(DEVICE_PREFIXES)}


def pod_ifnames(pod: Pod) -> set[str]:
    return set(links(pod.ns.name)) - {"lo"}


def addresses(ns_name: str, ifname: str) -> set[str]:
    out = run(["ip", "-n", ns_name, "-j", "addr", "show", "dev", ifname]).stdout
    return {f"{a['local']}/{a['prefixlen']}" for entry in json.loads(out)
            for a in entry.get("addr_info", [])}


def fdb(node: Node) -> list[dict]:
    out = run(["bridge", "-n", node.ns.name, "-j", "fdb", "show"]).stdout
    return json.loads(out or "[]")


def state_files(node: Node) -> list[Path]:
    """Every file under the node's attachment records (records and stray temp files)."""
    root = node.state_dir / "attachments"
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def records(node: Node) -> list[dict]:
    return [json.loads(p.read_text()) for p in state_files(node) if p.suffix == ".json"]


def record_path(node: Node, network: str, container_id: str, ifname: str) -> Path:
    return node.state_dir / "attachments" / network / container_id / f"{ifname}.json"


def assert_no_leftovers(node: Node, backend: str, keep: Iterable[tuple[str, str, str]] = (),
                        pods: Iterable[Pod] = (), macs: Iterable[str] = ()) -> None:
    """Only the attachments `keep` remain on `node`, with exactly their devices.

    `pods` must have no interface but lo; `macs` (of removed attachments)
    must be in no FDB of the node.
    """
    files = state_files(node)
    recs = records(node)
    have = {(r["network"], r["container_id"], r["ifname"]) for r in recs}
    assert have == set(keep), f"attachment records {sorted(have)}, expected {sorted(set(keep))}"
    assert len(files) == len(recs), f"stray files in the state dir: {files}"
    assert all(r["state"] == "ready" for r in recs), f"incomplete records left: {recs}"
    expected = {r["host_ifname"] for r in recs if r.get("host_ifname")}
    for vni in {r["vni"] for r in recs}:
        expected |= VNI_DEVICES[backend](vni)
    actual = vp_links(node)
    assert actual == expected, (f"node {node.name}: devices {sorted(actual)}, expected "
                                f"{sorted(expected)} (extra: {sorted(actual - expected)}, "
                                f"missing: {sorted(expected - actual)})")
    for pod in pods:
        assert pod_ifnames(pod) == set(), f"pod {pod.name} still has {pod_ifnames(pod)}"
    gone = {m.lower() for m in macs}
    stale = [e for e in fdb(node) if e.get("mac", "").lower() in gone]
    assert not stale, f"FDB entries of removed attachments remain: {stale}"
    if backend == "ovs":
        assert_ovs_matches(node, recs, gone)


def node_ovs(node: Node) -> Ovs:
    return Ovs(node.ns, Path(node.node_config["ovs"]["runDir"]))


def assert_ovs_matches(node: Node, recs: list[dict], gone: set[str]) -> None:
    """OVS holds exactly the records' ports, and flows only of the records' VNIs."""
    ovs = node_ovs(node)
    expected = {r["host_ifname"] for r in recs}
    if "br-int" not in ovs.vsctl("list-br").split():
        assert not expected, f"no br-int, yet records {sorted(expected)}"
        return
    ours = {p for p in ovs.vsctl("list-ports", "br-int").split() if p.startswith("vo")}
    assert ours == expected, f"OVS ports {sorted(ours)}, expected {sorted(expected)}"
    flows = ovs.ofctl("dump-flows", "cookie=0x7670630000000000/0xffffff0000000000",
                      options=("--no-stats",))
    vnis = {r["vni"] for r in recs}
    for line in flows.splitlines():
        if "cookie=" not in line:
            continue
        vni = int(line.split("cookie=")[1].split(",")[0], 16) & 0xFFFFFFFF
        assert vni == 0 or vni in vnis, f"flow of a VNI without attachments remains: {line}"
        assert not any(mac in line for mac in gone), f"flow of a removed attachment: {line}"
