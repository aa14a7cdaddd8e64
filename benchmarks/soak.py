"""Are the agent's resources flat? ADD/DEL cycles against a kernel and an OVS node.

Two agent nodes (one per switch backend, no EVPN) in one Cluster. Each gets
`cycles` ADD/DEL pairs from `callers` parallel callers (a pod each) through
the shim, alternating between two VNIs so that a VNI's switch state is made
and removed as well (the emptying VNI path) while the other keeps a resident
pod. At the end only the resident's record and links may remain. Every `every` cycles the
agent's descriptors, threads and resident memory (VmRSS) are sampled.

Reported per node: the samples, and the growth per cycle between the sample
after warm-up (the first `warmup` cycles fill caches and the allocator's
arenas) and the last: descriptors and threads must not grow at all; memory
growth is reported in KB per cycle (a least-squares slope over the samples
after warm-up, less sensitive to one sample's noise than end minus start).
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import threading
from typing import Callable

from vpcni.lab.cluster import Cluster
from vpcni.lab.netns import Sandbox

from .scale import agent_pid, process_facts

VNIS = (6100, 6101)
MALLOC_ARENA_MAX = "2"
# (label, switch, routed subnets, address): one agent node each. The routed node's VNIs
# are two subnets of one VPC: its router stays (the resident's subnet), the emptied
# subnet's gateway is made and removed again and again.
NODES = (("kernel", "kernel", False, "198.51.100.61"), ("ovs", "ovs", False, "198.51.100.62"),
         ("kernel-routed", "kernel", True, "198.51.100.63"))


def _network(vni: int, host: int, routed: bool = False) -> dict:
    """The soak's network of `vni`; `routed`: the two VNIs are routed subnets of one VPC
    (the emptied one's gateway comes and goes; the resident's keeps the router)."""
    if not routed:
        return {"cniVersion": "1.0.0", "name": f"soak{vni}", "type": "vpcni", "vni": vni,
                "addr": f"172.16.61.{host}/24"}
    third = 62 + VNIS.index(vni)
    return {"cniVersion": "1.0.0", "name": f"soak{vni}", "type": "vpcni", "vni": vni,
            "addr": f"172.16.{third}.{host}/24",
            "routing": {"vpc": "soak", "l3vni": 6199, "subnet": f"172.16.{third}.0/24"}}


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys over xs (0 with fewer than two points)."""
    n = len(xs)
    if n < 2:
        return 0.0
    mx, my = sum(xs) / n, sum(ys) / n
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else 0.0


def _vpcni_links(node) -> set[str]:
    links = json.loads(node.ns.ip("-j", "link", "show").stdout)
    return {link["ifname"] for link in links
            if link["ifname"].startswith(("vp", "vo", "vgw", "vl3", "vrt"))}


def soak(box: Sandbox, cycles: int, every: int, warmup: int, callers: int = 8,
         log: Callable[[str], None] = print) -> dict:
    cluster = Cluster(box)
    out: dict = {"cycles": cycles, "every": every, "warmup": warmup, "callers": callers,
                 "malloc_arena_max": MALLOC_ARENA_MAX}
    for label, backend, routed, address in NODES:
        # The agents run as the DaemonSet runs them (deploy/base/agent.yaml).
        saved = os.environ.get("MALLOC_ARENA_MAX")
        os.environ["MALLOC_ARENA_MAX"] = MALLOC_ARENA_MAX
        try:
            node = cluster.add_node(f"soak-{label}", address, agent=True, backend=backend)
        finally:
            if saved is None:
                os.environ.pop("MALLOC_ARENA_MAX")
            else:
                os.environ["MALLOC_ARENA_MAX"] = saved
        resident = cluster.add_pod(node, f"res-{label}")
        cluster.attach(resident, _network(VNIS[0], 2, routed))
        pods = [cluster.add_pod(node, f"c{i}-{label}") for i in range(callers)]
        before = _vpcni_links(node)
        pid = agent_pid(node)
        samples = [{"cycle": 0, **process_facts(pid)}]
        done, failures, lock = [0], [0], threading.Lock()
        next_sample = [every]

        def caller(k: int) -> None:
            pod = pods[k]
            for j in range(k, cycles, callers):
                config = _network(VNIS[j % 2], 3 + k, routed)
                add = node.cni("ADD", config, pod.container_id, pod.netns)
                delete = node.cni("DEL", config, pod.container_id, pod.netns)
                with lock:
                    failures[0] += (not add.ok) + (not delete.ok)
                    done[0] += 1
                    if done[0] >= next_sample[0]:
                        samples.append({"cycle": done[0], **process_facts(pid)})
                        next_sample[0] += every

        with concurrent.futures.ThreadPoolExecutor(callers) as pool:
            list(pool.map(caller, range(callers)))
        # Leaks: anything but the resident's record and what was there before the cycles.
        records = sorted(p.parent.name for p in
                         (node.state_dir / "attachments").rglob("*.json")
                         if p.parent.name != resident.container_id)
        vpcni_links = sorted(_vpcni_links(node) - before)
        log(f"soak {label}: {cycles} cycles by {callers} callers, {failures[0]} failed "
            f"calls, first {samples[0]}, last {samples[-1]}; records left {records}, "
            f"vpcni links left {vpcni_links}")
        after = [s for s in samples if s["cycle"] >= warmup]
        first, last = after[0], after[-1]
        span = max(1, last["cycle"] - first["cycle"])
        out[label] = {
            "samples": samples, "failed_calls": failures[0],
            "records_left": records, "links_left": vpcni_links,
            "fds_growth": last["fds"] - first["fds"],
            "threads_growth": last["threads"] - first["threads"],
            "rss_growth_mb": round(last["rss_mb"] - first["rss_mb"], 1),
            "rss_kb_per_cycle": round(1024 * slope([s["cycle"] for s in after],
                                                   [s["rss_mb"] for s in after]), 2),
            "rss_kb_per_cycle_end_to_end": round(1024 * (last["rss_mb"] - first["rss_mb"])
                                                 / span, 2),
        }
    return out


def render_soak(s: dict) -> list[str]:
    lines = [f"Soak: {s['cycles']} ADD/DEL cycles per node by {s.get('callers', 1)} parallel "
             f"callers through the shim and the agent (alternating two VNIs, one emptied "
             f"again and again); samples every {s['every']} cycles, growth from cycle "
             f"{s['warmup']} (after warm-up) to the end; left over: records and vpcni links "
             f"other than the resident pod's (and than before the cycles). Agents with "
             f"MALLOC_ARENA_MAX={s.get('malloc_arena_max', 'unset')}, as the DaemonSet runs "
             f"them; kernel-routed: the two VNIs are routed subnets of one VPC.", "",
             "| node | failed calls | left over | descriptors | threads | RSS (MB) | RSS growth, "
             "KB/cycle (slope / end-to-end) |", "| --- | ---: | --- | ---: | ---: | ---: | ---: |"]
    for backend in [label for label, *_ in NODES]:
        r = s.get(backend)
        if not r:
            continue
        a, b = r["samples"][0], r["samples"][-1]
        left = (f"{len(r['records_left'])} records, "
                f"{len(r['links_left'])} links")
        lines.append(f"| {backend} | {r['failed_calls']} | {left} | {a['fds']} → {b['fds']} "
                     f"({r['fds_growth']:+d} after warm-up) | {a['threads']} → {b['threads']} "
                     f"({r['threads_growth']:+d}) | {a['rss_mb']} → {b['rss_mb']} | "
                     f"{r['rss_kb_per_cycle']} / {r['rss_kb_per_cycle_end_to_end']} |")
    return lines
