"""Where the agent's time goes: the CNI handler served in-process, its steps timed.

Executed inside a lab node's namespace (`in_node`), this process does what the
agent does for each request: one Dispatcher with one Handler for many
ADD/DEL calls, logging set up as the agent sets it up. Selected functions are
wrapped with timers (inclusive: a step's time contains the steps it calls),
and the totals per call are printed as JSON. No EVPN speaker here: its
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
    ("store put (write + 2 fsync)", "vpcni.core.store:AttachmentStore.put"),
    ("store delete", "vpcni.core.store:AttachmentStore.delete"),
    ("store read of all records", "vpcni.core.store:AttachmentStore.all"),
    ("ensure_network", "vpcni.backends.kernel.backend:KernelBackend.ensure_network"),
    ("apply_remote (FDB/neigh converge)", "vpcni.core.handler:Handler.apply_remote"),
    ("attach (veth, pod config, GARP)", "vpcni.backends.kernel.backend:KernelBackend.attach"),
    ("pod interface config", "vpcni.core.podif:configure_interface"),
    ("gratuitous ARP (AF_PACKET socket)", "vpcni.core.podif:announce"),
    ("socket made inside a netns (thread + setns)", "vpcni.core.podif:_socket_in"),
    ("detach", "vpcni.backends.kernel.backend:KernelBackend.detach"),
    ("release_network", "vpcni.backends.kernel.backend:KernelBackend.release_network"),
    ("result conversion", "vpcni.cni.versions:convert"),
    ("netlink requests (pyroute2 IPRoute)", "pyroute2.iproute.linux:IPRoute._run_generic_rtnl"),
    ("log records written", "logging:Handler.handle"),
]


def _resolve(target: str):
    module, _, path = target.partition(":")
    owner = importlib.import_module(module)
    *parents, name = path.split(".")
    for p in parents:
        owner = getattr(owner, p)
    return owner, name


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


def main(spec: dict) -> dict:
    from vpcni.cni.main import setup_logging
    from vpcni.cni.plugin import Dispatcher
    from vpcni.core.config import NodeConfig

    node = NodeConfig.load(spec["nodeConfig"])
    setup_logging(node, stderr_level=100)
    totals: dict = defaultdict(lambda: defaultdict(lambda: [0, 0.0]))
    phase = ["setup"]
    instrument(totals, phase)
    dispatcher = Dispatcher(node)
    base_env = {"CNI_PATH": spec["cniPath"], "CNI_IFNAME": "eth1", "PATH": "/usr/sbin:/usr/bin"}

    def call(command: str, pod: dict) -> None:
        env = dict(base_env, CNI_COMMAND=command, CNI_CONTAINERID=pod["containerId"],
                   CNI_NETNS=pod["netns"])
        out, rc = dispatcher.run(env, json.dumps(pod["config"]).encode())
        if rc != 0:
            raise SystemExit(f"{command} {pod['containerId']} failed: {out}")

    call("ADD", spec["resident"])  # keeps the VNI's bridge and VXLAN device in place
    walls: dict = {"ADD": [], "DEL": []}
    for pod in spec["pods"]:
        for command in ("ADD", "DEL"):
            phase[0] = command
            t0 = time.perf_counter()
            call(command, pod)
            walls[command].append((time.perf_counter() - t0) * 1000)
    phase[0] = "teardown"
    call("DEL", spec["resident"])
    dispatcher.close()
    n = len(spec["pods"])
    return {"calls": n, "wall_ms": walls,
            "steps": {command: [{"step": label, "calls_per_op": round(totals[command][label][0] / n, 1),
                                 "ms_per_op": round(totals[command][label][1] * 1000 / n, 2)}
                                for label, _ in STEPS if totals[command][label][0]]
                      for command in ("ADD", "DEL")}}


def in_node(node, python: str, resident: dict, pods: list[dict]) -> dict:
    """Run this file in lab node `node`'s namespace; its JSON result."""
    spec = {"nodeConfig": str(node.config_path), "cniPath": str(node.cni_bin),
            "resident": resident, "pods": pods}
    proc = node.ns.exec(python, str(Path(__file__).resolve()), input=json.dumps(spec),
                        timeout=600)
    return json.loads(proc.stdout)


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.stdin.read()))))
