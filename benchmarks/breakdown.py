"""Where the agent's time goes: the CNI handler served in-process, its steps timed.

Executed inside a lab node's namespace (`in_node`), this process does what the
agent does for each request: one Dispatcher with one Handler for many
ADD/DEL calls, logging set up as the agent sets it up. Selected functions are
wrapped with timers (inclusive: a step's time contains the steps it calls),
and the totals per call are printed as JSON: once with one other attachment
on the node, once with many. No EVPN speaker here: its
share is the difference between an agent with and without EVPN (run.py).
"""

from __future__ import annotations

import importlib
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

# (label, "module:attribute path"): what to time, in the order to report it.
STEPS = [
    ("dispatch (whole call)", "vpcni.cni.plugin:Dispatcher.run"),
    ("network config parse (pydantic)", "vpcni.core.config:NetworkConfig.parse"),
    ("backend probe per call (choose)", "vpcni.core.backend:choose"),
    ("find_underlay (netlink)", "vpcni.backends.kernel.backend:find_underlay"),
    ("interface provider choice (probe, cached)", "vpcni.core.handler:Handler.provider_for"),
    ("store put (write + rename)", "vpcni.core.store:AttachmentStore.put"),
    ("store delete", "vpcni.core.store:AttachmentStore.delete"),
    ("store listing (all records)", "vpcni.core.store:AttachmentStore.all"),
    ("store listing (a VNI's records)", "vpcni.core.store:AttachmentStore.for_vni"),
    ("ensure_network", "vpcni.backends.kernel.backend:KernelBackend.ensure_network"),
    ("apply_remote (FDB/neigh converge)", "vpcni.core.handler:Handler.apply_remote"),
    ("veth plug (veth, pod config)", "vpcni.backends.veth.provider:VethProvider.plug"),
    ("add_port (bridge, filters, GARP)", "vpcni.backends.kernel.backend:KernelBackend.add_port"),
    ("nftables (port filters, VTEP sets)", "vpcni.backends.common.nft:Nft.run"),
    ("pod interface config", "vpcni.backends.common.podif:configure_interface"),
    ("gratuitous ARP (AF_PACKET socket)", "vpcni.backends.common.podif:announce"),
    ("socket made inside a netns (setns there and back)", "vpcni.backends.common.podif:socket_in"),
    ("remove_port (filters)", "vpcni.backends.kernel.backend:KernelBackend.remove_port"),
    ("veth unplug", "vpcni.backends.veth.provider:VethProvider.unplug"),
    ("release_network", "vpcni.backends.kernel.backend:KernelBackend.release_network"),
    ("result conversion", "vpcni.cni.versions:convert"),
    ("netlink requests (rtnl: pyroute2 messages, own socket)",
     "vpcni.backends.common.rtnl:Rtnl._send"),
    ("log records written", "logging:Handler.handle"),
]


def _resolve(target: str):
    module, _, path = target.partition(":")
    owner = importlib.import_module(module)
    *parents, name = path.split(".")
    for p in parents:
        owner = getattr(owner, p)
    return owner, name


def _packet_socket_step(totals: dict, phase: list, label: str, name: str) -> None:
    """Time socket.socket.`name` for AF_PACKET sockets only (the others are netlink's)."""
    import socket

    original = getattr(socket.socket, name)

    def timed(self, *args, **kwargs):
        if self.family != socket.AF_PACKET:
            return original(self, *args, **kwargs)
        t0 = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            entry = totals[phase[0]][label]
            entry[0] += 1
            entry[1] += time.perf_counter() - t0

    setattr(socket.socket, name, timed)


PACKET_STEPS = [("  of which AF_PACKET bind", "bind"), ("  of which AF_PACKET close", "close")]


def instrument(totals: dict, phase: list) -> None:
    """Wrap every STEP; totals[phase][label] = [calls, seconds]."""
    for label, target in STEPS:
        owner, name = _resolve(target)
        original = getattr(owner, name)
        consume = name == "all"  # a generator: time the reading, not its creation

        def timed(*args, __orig=original, __label=label, __consume=consume, **kwargs):
            t0 = time.perf_counter()
            try:
                value = __orig(*args, **kwargs)
                if __consume:
                    value = iter(list(value))
                return value
            finally:
                entry = totals[phase[0]][__label]
                entry[0] += 1
                entry[1] += time.perf_counter() - t0

        setattr(owner, name, timed)
    for label, name in PACKET_STEPS:
        _packet_socket_step(totals, phase, label, name)


def micro(reps: int, ifname: str = "eth0") -> dict:
    """Median µs of single operations behind the steps above, in this namespace."""
    import socket
    import struct

    from pyroute2 import IPRoute

    def median_us(fn) -> float:
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e6)
        return round(sorted(times)[reps // 2])

    out = {}
    with IPRoute() as ipr:
        out["pyroute2 IPRoute.link('get') of lo"] = median_us(lambda: ipr.link("get", index=1))
    raw = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)
    getlink = struct.pack("=IHHII", 32, 18, 1, 1, 0) + struct.pack("=BxHiII", 0, 0, 1, 0, 0)
    out["raw netlink RTM_GETLINK of lo (send + recv)"] = median_us(
        lambda: (raw.send(getlink), raw.recv(65536)))
    raw.close()
    arp = socket.htons(0x0806)

    def packet(proto: int, bind: bool) -> None:
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, proto)
        if bind:
            s.bind((ifname, 0x0806))
        s.close()
    out["AF_PACKET socket(ETH_P_ARP) + close"] = median_us(lambda: packet(arp, False))
    out["AF_PACKET socket(ETH_P_ARP) + bind + close (what announce does)"] = median_us(
        lambda: packet(arp, True))
    out["AF_PACKET socket(0) + close (no protocol hook)"] = median_us(lambda: packet(0, False))
    probe = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    out["sendto on an open AF_PACKET socket(0) (a reused socket)"] = median_us(
        lambda: probe.sendto(b"\xff" * 6 + b"\x02" + b"\0" * 5 + b"\x88\xb5" + b"\0" * 46,
                             (ifname, 0x88B5)))
    probe.close()
    return out


def main(spec: dict) -> dict:
    from vpcni.cni.main import setup_logging
    from vpcni.cni.plugin import Dispatcher
    from vpcni.core.config import NodeConfig
    from vpcni.core.handler import Handler

    node = NodeConfig.load(spec["nodeConfig"])
    setup_logging(node, stderr_level=100)
    totals: dict = defaultdict(lambda: defaultdict(lambda: [0, 0.0]))
    phase = ["setup"]
    instrument(totals, phase)
    # As the agent serves requests: one handler whose store keeps the records in memory.
    dispatcher = Dispatcher(node, handler=Handler(node, cached_store=True))
    base_env = {"CNI_PATH": spec["cniPath"], "CNI_IFNAME": "eth1", "PATH": "/usr/sbin:/usr/bin"}

    def call(command: str, pod: dict) -> None:
        env = dict(base_env, CNI_COMMAND=command, CNI_CONTAINERID=pod["containerId"],
                   CNI_NETNS=pod["netns"])
        out, rc = dispatcher.run(env, json.dumps(pod["config"]).encode())
        if rc != 0:
            raise SystemExit(f"{command} {pod['containerId']} failed: {out}")

    labels = []
    for label, _ in STEPS:
        labels.append(label)
        if label.startswith("gratuitous ARP"):
            labels += [packet_label for packet_label, _ in PACKET_STEPS]

    def cycles(pods: list[dict]) -> dict:
        """Timed ADD+DEL of each pod; wall times and per-call step totals."""
        totals.clear()
        walls: dict = {"ADD": [], "DEL": []}
        for pod in pods:
            for command in ("ADD", "DEL"):
                phase[0] = command
                t0 = time.perf_counter()
                call(command, pod)
                walls[command].append((time.perf_counter() - t0) * 1000)
        phase[0] = "untimed"
        n = len(pods)
        steps = {command: [{"step": label,
                            "calls_per_op": round(totals[command][label][0] / n, 1),
                            "ms_per_op": round(totals[command][label][1] * 1000 / n, 2)}
                           for label in labels if totals[command][label][0]]
                 for command in ("ADD", "DEL")}
        return {"calls": n, "wall_ms": walls, "steps": steps}

    call("ADD", spec["resident"])  # keeps the VNI's bridge and VXLAN device in place
    out = cycles(spec["pods"])
    # The same again with more attachments on the node (same VNI), added untimed.
    for pod in spec["crowd"]:
        call("ADD", pod)
    out["crowded"] = cycles(spec["crowdPods"]) | {"attachments_on_node": len(spec["crowd"]) + 1}
    for pod in spec["crowd"] + [spec["resident"]]:
        call("DEL", pod)
    dispatcher.close()
    out["micro_us"] = micro(spec.get("microReps", 30))
    return out



def in_node(node, python: str, resident: dict, pods: list[dict], crowd: list[dict],
            crowd_pods: list[dict]) -> dict:
    """Run this file in lab node `node`'s namespace: cycles of `pods` beside `resident`, then
    cycles of `crowd_pods` with `crowd` attached too; its JSON result."""
    spec = {"nodeConfig": str(node.config_path), "cniPath": str(node.cni_bin),
            "resident": resident, "pods": pods, "crowd": crowd, "crowdPods": crowd_pods}
    proc = node.ns.exec(python, str(Path(__file__).resolve()), input=json.dumps(spec),
                        timeout=600)
    return json.loads(proc.stdout)


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.stdin.read()))))
