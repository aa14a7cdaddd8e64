"""A node at scale: 1,000 attachments over 200 VNIs, against a node with 10.

One Cluster, two agent nodes (no EVPN: the control plane has its own
benchmark), both with the product's INFO logging:

- `big`: filled with `vnis` x `per_vni` attachments (the same CIDR in every
  VNI: VPCs may overlap), by 8 parallel callers through the shim;
- `small`: 10 attachments over 2 VNIs.

Then, in this order:

1. ADD and DEL of a fresh pod into a VNI that exists, round-robin between the
   two nodes (the ratio big/small says whether the cost per call grows with
   the node's size);
2. the agents' resident memory (VmRSS) and open descriptors;
3. the CPU time of a full reconcile pass with nothing to change (the agent's
   own gauge `vpcni_reconcile_full_seconds`, read after two passes);
4. a restart of big's agent: SIGTERM, start, time until it says ready; the
   dataplane (links, FDB, neighbours, nftables) compared before and after;
   meanwhile two of its pods ping each other every 10 ms and the lost
   replies are counted.

Everything is built in namespaces of the benchmark's sandbox and removed with it.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import subprocess
import time
from typing import Optional

from vpcni.lab.cluster import Cluster, Node, Pod
from vpcni.lab.netns import wait_for

from .stats import ratio, summarize, time_ms

CNI_VERSION = "1.0.0"
BASE_VNI = 5000


def network(vni: int, i: int) -> dict:
    """Pod `i` (< 240) of VNI `vni`: the same CIDR in every VNI."""
    return {"cniVersion": CNI_VERSION, "name": f"scale{vni}", "type": "vpcni", "vni": vni,
            "addr": f"172.16.0.{10 + i}/24"}


def agent_pid(node: Node) -> int:
    pids = node.ns.sandbox.pids(node.ns.name, "vpcnictl")
    if len(pids) != 1:
        raise RuntimeError(f"expected one agent on {node.name}, found {pids}")
    return pids[0]


def process_facts(pid: int) -> dict:
    status = open(f"/proc/{pid}/status").read()
    rss_kb = int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.M).group(1))
    threads = int(re.search(r"^Threads:\s+(\d+)", status, re.M).group(1))
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    return {"rss_mb": round(rss_kb / 1024, 1), "fds": fds, "threads": threads}


def metric(node: Node, name: str, labels: str) -> Optional[float]:
    text = node.ns.exec("curl", "-sf", f"http://{node.node_config['healthAddress']}/metrics",
                        check=False).stdout
    m = re.search(rf"^{re.escape(name)}\{{{re.escape(labels)}\}} (\S+)$", text, re.M)
    return float(m.group(1)) if m else None


def dataplane(node: Node) -> dict:
    """What the agent must not change by restarting: links, FDB, neighbours, filters."""
    ns = node.ns
    links = sorted((link["ifname"], link.get("master"), link.get("mtu"), link.get("address"),
                    tuple(sorted(link.get("flags", []))), link.get("ifalias"))
                   for link in json.loads(ns.ip("-j", "-d", "link", "show").stdout))
    fdb = sorted(ns.exec("bridge", "fdb", "show").stdout.splitlines())
    neigh = sorted(line for line in ns.ip("neigh", "show", "nud", "permanent").stdout.splitlines())
    rules = ns.exec("nft", "-s", "list", "ruleset").stdout  # -s: without counters
    return {"links": links, "fdb": fdb, "neigh": neigh, "nft": rules}


class ScaleBench:
    def __init__(self, sandbox, log=print, vnis: int = 200, per_vni: int = 5,
                 reconcile_interval: float = 3.0):
        self.log = log
        self.vnis, self.per_vni = vnis, per_vni
        self.cluster = Cluster(sandbox, "198.51.100.0/24")
        c = self.cluster
        cfg = {"logLevel": "INFO", "reconcileInterval": reconcile_interval}
        self.big = c.add_node("big", "198.51.100.31", agent=True, **cfg)
        self.small = c.add_node("small", "198.51.100.32", agent=True, **cfg)
        self._n = 0
        self.residents: dict[str, list[tuple[Pod, dict]]] = {"big": [], "small": []}

    def pod(self, node: Node) -> Pod:
        self._n += 1
        return self.cluster.add_pod(node, f"s{self._n}")

    def _add(self, node: Node, pod: Pod, cfg: dict) -> None:
        res = node.cni("ADD", cfg, pod.container_id, pod.netns)
        if not res.ok:
            raise RuntimeError(f"ADD {pod.name} on {node.name} failed: {res.stdout}")

    def fill(self, callers: int = 8) -> dict:
        """`vnis` x `per_vni` attachments on big, 10 over 2 VNIs on small; timed."""
        jobs = []
        for node, vnis, per_vni in ((self.big, self.vnis, self.per_vni), (self.small, 2, 5)):
            for v in range(vnis):
                for i in range(per_vni):
                    jobs.append((node, self.pod(node), network(BASE_VNI + v, i)))
        before = {n.name: process_facts(agent_pid(n)) for n in (self.big, self.small)}
        t0 = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(callers) as pool:
            list(pool.map(lambda j: self._add(*j), jobs))
        took = time.monotonic() - t0
        for node, pod, cfg in jobs:
            self.residents[node.name].append((pod, cfg))
        return {"attachments": {"big": self.vnis * self.per_vni, "small": 10},
                "vnis": {"big": self.vnis, "small": 2}, "fill_s": round(took, 1),
                "agent_before_fill": before}

    def add_cost(self, cycles: int) -> dict:
        """ADD+DEL of a fresh pod into an existing VNI, round-robin big / small."""
        times = {n: {"ADD": [], "DEL": []} for n in ("big", "small")}
        pods = {n.name: [self.pod(n) for _ in range(cycles)] for n in (self.big, self.small)}
        for k in range(cycles):
            for node in (self.big, self.small):
                pod, cfg = pods[node.name][k], network(BASE_VNI + k % 2, 100 + k % 100)
                for command in ("ADD", "DEL"):
                    ms, res = time_ms(lambda: node.cni(command, cfg, pod.container_id,
                                                       pod.netns))
                    if not res.ok:
                        raise RuntimeError(f"{command} {pod.name} on {node.name}: {res.stdout}")
                    times[node.name][command].append(ms)
        out = {n: {c: summarize(v) for c, v in d.items()} for n, d in times.items()}
        out["ratio_add_p50_big_over_small"] = ratio(out["big"]["ADD"]["p50"],
                                                    out["small"]["ADD"]["p50"])
        out["ratio_del_p50_big_over_small"] = ratio(out["big"]["DEL"]["p50"],
                                                    out["small"]["DEL"]["p50"])
        return out

    def resources(self) -> dict:
        return {n.name: process_facts(agent_pid(n)) for n in (self.big, self.small)}

    def reconcile_cost(self, interval: float, passes: int = 6) -> dict:
        """CPU and wall time of full passes with nothing to change: after two passes
        (the first after the fill re-reads what changed), the gauges read once per
        pass; the median and the worst of `passes`."""
        time.sleep(2 * interval + 1)
        samples: dict = {n.name: {"cpu": [], "wall": []} for n in (self.big, self.small)}
        for _ in range(passes):
            for n in (self.big, self.small):
                for kind in ("cpu", "wall"):
                    value = metric(n, "vpcni_reconcile_full_seconds", f'kind="{kind}"')
                    if value is not None:
                        samples[n.name][kind].append(value * 1000)
            time.sleep(interval + 0.1)
        out: dict = {}
        for name, kinds in samples.items():
            cpu, wall = sorted(kinds["cpu"]), sorted(kinds["wall"])
            out[name] = {"cpu_ms": round(cpu[len(cpu) // 2], 1) if cpu else None,
                         "cpu_max_ms": round(cpu[-1], 1) if cpu else None,
                         "wall_ms": round(wall[len(wall) // 2], 1) if wall else None,
                         "passes": len(cpu), "cpu_samples_ms": [round(x, 1) for x in kinds["cpu"]]}
        return out

    def restart(self, ping_interval: float = 0.01) -> dict:
        """Restart big's agent under a 10 ms ping between two of its pods."""
        a = self.residents["big"][0][0]  # pings pod 1 of the same VNI
        target = network(BASE_VNI, 1)["addr"].split("/")[0]
        count = 800  # 8 s at 10 ms: covers stop, start and readiness
        ping = a.ns.spawn("ping", "-n", "-q", "-i", str(ping_interval), "-c", str(count),
                          "-W", "1", target, stdout=subprocess.PIPE, text=True)
        time.sleep(1.0)  # the flow exists (the bridge has learned both pods) before the snapshot
        before = dataplane(self.big)
        self.big.stop_agent()
        t0 = time.monotonic()
        self.big.start_agent()
        wait_for(lambda: (self.big.agent_status() or {}).get("ready"), timeout=60,
                 interval=0.02, what="big's agent ready again")
        ready_s = time.monotonic() - t0
        time.sleep(0.5)
        after = dataplane(self.big)
        out, _ = ping.communicate(timeout=60)
        m = re.search(r"(\d+) packets transmitted, (\d+) received", out)
        sent, got = (int(m.group(1)), int(m.group(2))) if m else (None, None)
        changed = {k: (len(set(map(str, before[k])) ^ set(map(str, after[k]))))
                   for k in ("links", "fdb", "neigh")}
        changed["nft"] = int(before["nft"] != after["nft"])
        return {"ready_s": round(ready_s, 2), "pings_sent": sent,
                "pings_lost": None if sent is None else sent - got,
                "ping_interval_ms": ping_interval * 1000, "dataplane_differences": changed,
                "after_restart": process_facts(agent_pid(self.big))}
