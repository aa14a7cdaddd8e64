"""CNI call latency and throughput: vpcni (agent, standalone) against bridge + host-local.

One lab Cluster holds a node per way of serving a call:

- `agent`: vpcni through the shim and the node's `vpcnictl agent` (no EVPN);
- `standalone`: vpcni with node config mode "standalone" (the shim re-executes
  the whole plugin in-process for every call);
- `bridge`: the reference `bridge` plugin with `host-local` IPAM, the baseline;

and further agent nodes that are each compared with `agent` in the same
rounds: a pod alone in its VNI, a node with many attachments, DEBUG logging.

Every call goes through `Node.cni` (`ip netns exec <node> <plugin>`, CNI
environment, config on stdin), each ADD into a fresh pod namespace created
beforehand (not timed). vpcni nodes keep one resident pod in the VNI, as the
bridge plugin keeps its bridge: a cycle measures attaching a pod, not building
the VNI (that case has its own row).
"""

from __future__ import annotations

import concurrent.futures
import re
import time
from typing import Callable, Optional

from vpcni.lab.cluster import Cluster, Node, Pod, installed_executable

from . import breakdown
from .stats import ratio, summarize, time_ms

CNI_VERSION = "1.0.0"
SHIM_IMPORTS = "import json, os, socket, sys, time"
STANDALONE_STACK = "import vpcni.cni.plugin, vpcni.core.handler, vpcni.backends.kernel"


class Variant:
    """One way of serving CNI calls on one node, with its network config."""

    def __init__(self, name: str, node: Node, plugin: str, config: Callable[[int], dict]):
        self.name = name
        self.node = node
        self.plugin = plugin
        self.config = config

    def try_call(self, command: str, pod: Pod, i: int) -> tuple[float, Optional[str]]:
        """One timed call: (ms, None) or (ms, the plugin's error)."""
        ms, res = time_ms(lambda: self.node.cni(command, self.config(i), pod.container_id,
                                                pod.netns, "eth1", plugin=self.plugin))
        if res.ok:
            return ms, None
        return ms, (f"{self.name}: {command} of {pod.name} failed: "
                    f"{res.stdout.strip() or res.stderr.strip()}")

    def call(self, command: str, pod: Pod, i: int) -> float:
        """One timed call (ms); raises with the plugin's answer when it fails."""
        ms, error = self.try_call(command, pod, i)
        if error:
            raise RuntimeError(error)
        return ms


def vpcni_config(network: str, vni: int, subnet: str) -> Callable[[int], dict]:
    """Static addresses `subnet`.(10 + i) (i < 240) in VNI `vni`."""
    return lambda i: {"cniVersion": CNI_VERSION, "name": network, "type": "vpcni", "vni": vni,
                      "addr": f"{subnet}.{10 + i % 240}/24"}


def agent_latency(node: Node) -> dict[str, tuple[float, float]]:
    """The agent's own service time per command from its metrics: {command: (sum s, count)}."""
    address = node.node_config["healthAddress"]
    text = node.ns.exec("curl", "-sf", f"http://{address}/metrics").stdout
    out: dict[str, list[float]] = {}
    for kind, command, value in re.findall(
            r'^vpcni_cni_request_duration_seconds_(sum|count)\{command="(\w+)"\} (\S+)$', text,
            re.MULTILINE):
        out.setdefault(command, [0.0, 0.0])[kind == "count"] = float(value)
    return {c: (s, n) for c, (s, n) in out.items()}


def agent_mean_ms(before: dict, after: dict, command: str) -> Optional[float]:
    s0, n0 = before.get(command, (0.0, 0.0))
    s1, n1 = after.get(command, (0.0, 0.0))
    return round((s1 - s0) * 1000 / (n1 - n0), 1) if n1 > n0 else None


class CniBench:
    """The cluster for benchmarks 1 and 3; build it inside a Sandbox that the caller cleans."""

    def __init__(self, sandbox, log=print):
        self.log = log
        self.cluster = Cluster(sandbox, "198.51.100.0/24")
        c = self.cluster
        self.python = installed_executable("python")
        # logLevel INFO, the product's default (the lab's own nodes log at DEBUG).
        agent = c.add_node("agent", "198.51.100.11", agent=True, logLevel="INFO")
        standalone = c.add_node("standalone", "198.51.100.12", mode="standalone",
                                logLevel="INFO")
        bridge = c.add_node("bridge", "198.51.100.13")
        hostlocal_dir = sandbox.dir("host-local")
        self.agent = Variant("vpcni-agent", agent, "vpcni",
                             vpcni_config("bench-agent", 4001, "172.16.40"))
        self.standalone = Variant("vpcni-standalone", standalone, "vpcni",
                                  vpcni_config("bench-standalone", 4002, "172.16.40"))
        self.bridge = Variant("bridge", bridge, "bridge", lambda i: {
            "cniVersion": CNI_VERSION, "name": "bench-bridge", "type": "bridge",
            "bridge": "bbr0", "ipam": {"type": "host-local", "subnet": "172.16.41.0/24",
                                       "dataDir": str(hostlocal_dir)}})
        self._pods = 0
        for v in (self.agent, self.standalone):
            v.call("ADD", self.pods(v.node, 1, "resident")[0], 238)

    def pods(self, node: Node, n: int, tag: str = "p") -> list[Pod]:
        """`n` fresh pod namespaces (created now, before any timing)."""
        out = []
        for _ in range(n):
            self._pods += 1
            out.append(self.cluster.add_pod(node, f"{tag}{self._pods}"))
        return out

    # ------------------------------------------------------------ 1: floors

    def floors(self, reps: int) -> dict:
        """What any call costs before a plugin does anything, interleaved `reps` times."""
        agent, bridge = self.agent.node, self.bridge.node
        probes = {
            "ip netns exec true": lambda: agent.ns.exec("true"),
            "python3 -S -c pass (the shim's interpreter)":
                lambda: agent.ns.exec("/usr/bin/python3", "-S", "-c", "pass"),
            "python3 -S importing the shim's modules (json, socket, os, sys, time)":
                lambda: agent.ns.exec("/usr/bin/python3", "-S", "-c", SHIM_IMPORTS),
            "vpcni shim VERSION": lambda: agent.cni("VERSION", {"cniVersion": CNI_VERSION}),
            "bridge VERSION": lambda: bridge.cni("VERSION", {"cniVersion": CNI_VERSION},
                                                 plugin="bridge"),
            "venv python -c pass": lambda: agent.ns.exec(self.python, "-c", "pass"),
            "venv python importing the standalone stack":
                lambda: agent.ns.exec(self.python, "-c", STANDALONE_STACK),
        }
        samples: dict[str, list[float]] = {k: [] for k in probes}
        for _ in range(reps):
            for name, fn in probes.items():
                samples[name].append(time_ms(fn)[0])
        return {k: summarize(v) for k, v in samples.items()}

    # ------------------------------------------------------------ 1: sequential cycles

    def round_robin(self, variants: tuple[Variant, ...], cycles: int, what: str) -> dict:
        """`cycles` ADD+DEL cycles per variant, one variant after the other in every round,
        so that load from elsewhere on the machine hits them all alike."""
        pods = {v.name: self.pods(v.node, cycles) for v in variants}
        times = {v.name: {"ADD": [], "DEL": []} for v in variants}
        for i in range(cycles):
            for v in variants:
                pod = pods[v.name][i]
                times[v.name]["ADD"].append(v.call("ADD", pod, i))
                times[v.name]["DEL"].append(v.call("DEL", pod, i))
            if (i + 1) % 25 == 0:
                self.log(f"  {what}: {i + 1}/{cycles} rounds")
        return {name: {cmd: summarize(t) for cmd, t in per.items()} for name, per in times.items()}

    def sequential(self, cycles: int) -> dict:
        """The three ways of serving a call, and the agent's own view of its time."""
        before = agent_latency(self.agent.node)
        out = self.round_robin((self.agent, self.standalone, self.bridge), cycles, "sequential")
        after = agent_latency(self.agent.node)
        out["vpcni-agent"]["agent_service_ms"] = {
            cmd: agent_mean_ms(before, after, cmd) for cmd in ("ADD", "DEL")}
        return out

    def _agent_node(self, name: str, address: str, vni: int, subnet: str, resident: bool = True,
                    **node_config) -> Variant:
        """Another agent node (logLevel INFO unless given), optionally with a resident pod."""
        node = self.cluster.add_node(name, address, agent=True,
                                     **({"logLevel": "INFO"} | node_config))
        v = Variant(f"vpcni-agent-{name}", node, "vpcni", vpcni_config(f"bench-{name}", vni,
                                                                       subnet))
        if resident:
            v.call("ADD", self.pods(node, 1, "resident")[0], 238)
        return v

    def debug_logging(self, cycles: int) -> dict:
        """The agent at logLevel INFO against one at DEBUG (as the lab runs its nodes)."""
        debug = self._agent_node("debug", "198.51.100.14", 4013, "172.16.46", logLevel="DEBUG")
        out = self.round_robin((self.agent, debug), cycles, "debug logging")
        lines = (debug.node.dir / "vpcni.log").read_text(errors="replace").splitlines()
        out["debug_log_lines_per_call"] = round(len(lines) / (2 * cycles + 1))
        out["pyroute2_share_of_lines"] = round(
            sum(" pyroute2." in line for line in lines) / max(1, len(lines)), 2)
        return out

    def cold_vni(self, cycles: int) -> dict:
        """Against the agent's usual cycle: the pod alone in its VNI on its node, so that
        each ADD builds the bridge and VXLAN device and each DEL removes them."""
        cold = self._agent_node("cold", "198.51.100.15", 4011, "172.16.43", resident=False)
        return self.round_robin((self.agent, cold), cycles, "cold VNI")

    def crowded(self, residents: int, cycles: int) -> dict:
        """Against the agent's usual cycle: a node with `residents` more attachments."""
        crowded = self._agent_node("crowded", "198.51.100.16", 4012, "172.16.44")
        for i, pod in enumerate(self.pods(crowded.node, residents, "r")):
            crowded.call("ADD", pod, i)
        out = self.round_robin((self.agent, crowded), cycles, "crowded")
        out["attachments_on_node"] = residents + 1
        return out

    def breakdown(self, cycles: int, residents: int) -> dict:
        """The handler's steps, timed in-process inside the standalone node, with one and
        with `residents` + 1 attachments on the node."""
        node = self.standalone.node
        config = vpcni_config("bench-breakdown", 4021, "172.16.45")
        resident, *pods = self.pods(node, 2 * cycles + 1, "k")
        crowd = self.pods(node, residents, "kr")

        def spec(pod: Pod, i: int) -> dict:
            return {"containerId": pod.container_id, "netns": pod.netns, "config": config(i)}
        return breakdown.in_node(node, self.python, spec(resident, 239),
                                 [spec(p, i) for i, p in enumerate(pods[:cycles])],
                                 [spec(p, 100 + i) for i, p in enumerate(crowd)],
                                 [spec(p, i) for i, p in enumerate(pods[cycles:])])

    # ------------------------------------------------------------ 3: parallel callers

    def parallel(self, variant: Variant, callers: int, cycles: int) -> dict:
        """`callers` threads, each `cycles` ADD+DEL cycles of its own pods, at once.

        A failed call is counted and kept (as a runtime would, the DEL follows a
        failed ADD); ops/s counts the calls that succeeded.
        """
        pods = [self.pods(variant.node, cycles) for _ in range(callers)]

        def worker(k: int) -> dict:
            out: dict[str, list] = {"ADD": [], "DEL": [], "errors": []}
            for j, pod in enumerate(pods[k]):
                for command in ("ADD", "DEL"):
                    ms, error = variant.try_call(command, pod, k * cycles + j)
                    if error:
                        out["errors"].append(error)
                    else:
                        out[command].append(ms)
            return out

        t0 = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(callers) as pool:
            results = list(pool.map(worker, range(callers)))
        wall = time.perf_counter() - t0
        merged = {key: [x for r in results for x in r[key]] for key in ("ADD", "DEL", "errors")}
        done = len(merged["ADD"]) + len(merged["DEL"])
        return {"callers": callers, "cycles_per_caller": cycles, "calls": 2 * callers * cycles,
                "failed": len(merged["errors"]), "errors": merged["errors"][:5],
                "wall_s": round(wall, 2), "ops_per_s": round(done / wall, 1),
                "ADD": summarize(merged["ADD"]), "DEL": summarize(merged["DEL"]),
                "all": summarize(merged["ADD"] + merged["DEL"])}

    def throughput(self, callers: int, cycles: int) -> dict:
        out = {v.name: self.parallel(v, callers, cycles) for v in (self.bridge, self.agent)}
        out["ratio_ops_per_s_agent_over_bridge"] = ratio(out["vpcni-agent"]["ops_per_s"],
                                                         out["bridge"]["ops_per_s"])
        return out
