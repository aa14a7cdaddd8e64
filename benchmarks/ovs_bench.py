"""The ovs backend's numbers, against the kernel backend in the same run.

    .venv/bin/python -m benchmarks.ovs_bench [--cycles 30] [--iperf-seconds 3] [--json out.json]

Four agent nodes (no EVPN, static flood lists): two OVS nodes (userspace
datapath, `datapath_type=netdev`, as this machine has no openvswitch kernel
module) and two kernel nodes. Measured, interleaved ovs/kernel:

- ADD and DEL latency through the shim and the agent, each ADD into a fresh
  pod namespace, with one resident pod keeping the VNI on the node (a cycle
  measures attaching a pod, not building the VNI);
- OpenFlow flows per attachment: vpcni's flows on br-int before and after
  `--flows-pods` more pods in one VNI;
- TCP throughput pod to pod across two nodes (iperf3), OVS->OVS through the
  userspace datapath and kernel->kernel, labelled as measured on this machine.

Needs root; everything lives in namespaces of one sandbox, removed at the end.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vpcni.lab.cluster import Cluster, Node, seed_network  # noqa: E402
from vpcni.lab.daemons import Ovs  # noqa: E402
from vpcni.lab.netns import Sandbox  # noqa: E402

from benchmarks.first_reply import iperf_gbps, iperf_server  # noqa: E402
from benchmarks.stats import summarize, time_ms  # noqa: E402

OURS = "cookie=0x7670630000000000/0xffffff0000000000"
ADDRS = {"o1": "198.51.100.21", "o2": "198.51.100.22", "k1": "198.51.100.31",
         "k2": "198.51.100.32"}


def config(node: str, vni: int, host: int) -> dict:
    peer = {"o1": "o2", "o2": "o1", "k1": "k2", "k2": "k1"}[node]
    return seed_network(f"bench-{vni}", vni, f"172.16.{vni % 200}.{host}/24",
                        vteps=[ADDRS[peer]])


def ovs_flows(node: Node) -> int:
    out = Ovs(node.ns, Path(node.node_config["ovs"]["runDir"])).ofctl(
        "dump-flows", OURS, options=("--no-stats",))
    return sum(1 for line in out.splitlines() if "actions=" in line)


def attach(cluster: Cluster, node: Node, name: str, vni: int, host: int):
    pod = cluster.add_pod(node, name)
    ms, res = time_ms(lambda: node.cni("ADD", config(node.name, vni, host), pod.container_id,
                                       pod.netns))
    if not res.ok:
        raise RuntimeError(f"ADD {name} on {node.name}: {res.stdout or res.stderr}")
    return pod, ms


def run(cycles: int, flows_pods: int, iperf_seconds: int) -> dict:
    out: dict = {}
    with Sandbox() as box:
        cluster = Cluster(box)
        nodes = {name: cluster.add_node(name, addr, agent=True,
                                        backend="ovs" if name.startswith("o") else "kernel")
                 for name, addr in ADDRS.items()}
        vni = {"o": 120, "k": 130}
        resident_host = {"o1": 2, "o2": 3, "k1": 2, "k2": 3}
        residents = {name: attach(cluster, node, f"r-{name}", vni[name[0]], resident_host[name])[0]
                     for name, node in nodes.items()}
        # ADD/DEL latency, interleaved so both backends see the same machine load.
        lat: dict[str, dict[str, list[float]]] = {b: {"ADD": [], "DEL": []} for b in ("ovs",
                                                                                      "kernel")}
        for i in range(cycles):
            for backend, name in (("ovs", "o1"), ("kernel", "k1")):
                node = nodes[name]
                pod, ms = attach(cluster, node, f"c{i}-{name}", vni[name[0]], 10 + i % 200)
                lat[backend]["ADD"].append(ms)
                ms, res = time_ms(lambda: node.cni("DEL", config(name, vni[name[0]], 10 + i % 200),
                                                   pod.container_id, pod.netns))
                lat[backend]["DEL"].append(ms)
                pod.ns.delete()
        out["latency_ms"] = {b: {c: summarize(v) for c, v in d.items()} for b, d in lat.items()}
        # Flows per attachment on the OVS node.
        before = ovs_flows(nodes["o1"])
        for i in range(flows_pods):
            attach(cluster, nodes["o1"], f"f{i}", vni["o"], 100 + i)
        after = ovs_flows(nodes["o1"])
        out["flows"] = {"node_with_1_pod": before, f"node_with_{1 + flows_pods}_pods": after,
                        "per_attachment": round((after - before) / flows_pods, 2)}
        # Throughput pod to pod across two nodes.
        tput = {}
        for backend, (a, b) in (("ovs-userspace", ("o1", "o2")), ("kernel", ("k1", "k2"))):
            iperf_server(residents[b].ns)
            server_ip = f"172.16.{vni[a[0]] % 200}.{resident_host[b]}"
            client = residents[a]
            tput[backend] = round(iperf_gbps(client.ns, server_ip, iperf_seconds), 2)
        out["throughput_gbps"] = tput
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cycles", type=int, default=30)
    ap.add_argument("--flows-pods", type=int, default=10)
    ap.add_argument("--iperf-seconds", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    res = run(args.cycles, args.flows_pods, args.iperf_seconds)
    for backend, cmds in res["latency_ms"].items():
        for cmd, s in cmds.items():
            print(f"{backend:7} {cmd}: p50 {s['p50']} ms, p90 {s['p90']} ms, mean {s['mean']} ms "
                  f"(n={s['n']})")
    print(f"flows: {res['flows']}")
    print(f"TCP pod-to-pod across nodes (iperf3, this machine): {res['throughput_gbps']} Gbit/s")
    if args.json:
        for cmds in res["latency_ms"].values():
            for s in cmds.values():
                s.pop("samples", None)
        args.json.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
