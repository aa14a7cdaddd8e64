"""From ADD returning to the first reply across nodes; the same on a plain VXLAN; iperf3.

vpcni: a Lab with one route reflector (FRR bgpd or gobgpd) and two vpcni
nodes (gobgpd + agent each), one VPC, a pod `anchor` on node2. Each sample
ADDs a new pod on node1 through `Node.cni` while `anchor` ARPs for the new
address every 5 ms and, once answered, pings it every 5 ms (probe.FirstReply),
and while node2's namespace is watched for the new pod's neighbour entry
(probe.NeighbourWatch: the EVPN type-2 route has been applied there).

- cold: node1 has no other pod in the VPC: the ADD builds the VNI's devices
  and the type-3 route (flood list) must reach node2 too; the pod is deleted
  (and its withdrawal awaited) before the next sample.
- warm: node1 already has pods in the VPC (they accumulate): ARP can cross
  on the flood list before the new pod's own route arrives.

Baseline: the same two-node shape built with `ip` only (VXLAN device in a
bridge, static all-zero FDB entries towards the other node: no control plane);
the time from the last `ip` command of the attach to the first reply is what
the dataplane alone costs.
"""

from __future__ import annotations

import json
import os
import time
from typing import Optional

from vpcni.lab.cluster import Cluster, Pod
from vpcni.lab.lab import Lab
from vpcni.lab.netns import Netns, Sandbox, wait_for
from vpcni.lab.topology import Topology

from .cni import agent_latency, agent_mean_ms
from .probe import FirstReply, NeighbourWatch
from .stats import summarize, time_ms

VNI = 4100
SUBNET = "172.16.50"
PLAIN_SUBNET = "172.16.60"
POD_MTU = 1450
IPERF_PORT = 5201


def _ms(later: Optional[float], earlier: float) -> Optional[float]:
    return None if later is None else (later - earlier) * 1000


def _distributions(samples: list[dict], keys: tuple[str, ...]) -> dict:
    out = {}
    for key in keys:
        values = [s[key] for s in samples if s.get(key) is not None]
        out[key] = summarize(values)
        out[key]["missing"] = len(samples) - len(values)
    return out


# ------------------------------------------------------------------ iperf3

def _listening(ns: Netns) -> bool:
    return f":{IPERF_PORT}" in ns.exec("ss", "-Hltn").stdout


def iperf_server(ns: Netns) -> None:
    """An iperf3 server in `ns` unless one listens already (killed by pid with the sandbox)."""
    if _listening(ns):
        return
    ns.spawn("iperf3", "-s", "-p", str(IPERF_PORT))
    wait_for(lambda: _listening(ns), timeout=10, what=f"iperf3 listening in {ns.name}")


def rx_packets(ns: Optional[Netns]) -> Optional[int]:
    """Packets eth1 in `ns` received so far."""
    if ns is None:
        return None
    return int(ns.exec("cat", "/sys/class/net/eth1/statistics/rx_packets").stdout)


def iperf_gbps(client: Netns, server_ip: str, seconds: int) -> float:
    """TCP throughput client -> server over `seconds` (Gbit/s, as the receiver counted)."""
    proc = client.exec("iperf3", "-c", server_ip, "-p", str(IPERF_PORT), "-t", str(seconds),
                       "-J", timeout=seconds + 30)
    return json.loads(proc.stdout)["end"]["sum_received"]["bits_per_second"] / 1e9


# ------------------------------------------------------------------ vpcni lab

def lab_topology(daemon: str) -> Topology:
    name = f"bn{os.urandom(2).hex()}{daemon[:3]}"
    return Topology.model_validate({
        "name": name, "asn": 65000, "underlay": "198.51.100.0/24",
        "reflectors": [{"name": "rr", "address": "198.51.100.250", "daemon": daemon}],
        "nodes": [{"name": "node1", "address": "198.51.100.1"},
                  {"name": "node2", "address": "198.51.100.2"}],
        "vpcs": [{"name": "bench", "vni": VNI, "cidr": f"{SUBNET}.0/24"}],
        "pods": [{"name": "anchor", "node": "node2", "vpc": "bench",
                  "address": f"{SUBNET}.2/24"}]})


class VpcniFirstReply:
    """A Lab for one reflector daemon; `up()` then `cold()`, `warm()`; `down()` always."""

    def __init__(self, daemon: str):
        self.daemon = daemon
        self.lab = Lab(lab_topology(daemon))
        self.prober: Optional[FirstReply] = None
        self.watch: Optional[NeighbourWatch] = None
        self.count = 0
        self.warm_pods: list[tuple[str, Netns, str]] = []  # (container ID, netns, address)

    def up(self) -> float:
        t0 = time.monotonic()
        self.lab.up()
        anchor = self.lab.pods["anchor"]
        self.node1 = self.lab.node("node1")
        self.node2_ns = self.lab.box.namespaces["node2"]
        self.prober = FirstReply(Netns(anchor.netns, self.lab.box, create=False).path, "eth1",
                                 anchor.ip)
        self.watch = NeighbourWatch(self.node2_ns.path)
        return time.monotonic() - t0

    def warm_up(self) -> float:
        """One ADD+DEL, not a sample: `Lab.up` waits for the routes of the topology's pods,
        and node1 has none, so its BGP session may still be opening. Seconds until node2
        had node1's route."""
        cid, ns, address = self._new_pod()
        self._cni("ADD", cid, ns, address)
        t0 = time.monotonic()
        wait_for(self._node2_knows_node1, timeout=120, interval=0.01,
                 what="node1's first route reaching node2")
        took = time.monotonic() - t0
        self._cni("DEL", cid, ns, address)
        ns.delete()
        wait_for(lambda: not self._node2_knows_node1(), timeout=10, interval=0.01,
                 what="node1's withdrawal reaching node2")
        return took

    def close_probes(self) -> None:
        """Close the probe sockets (before iperf3: a packet socket copies every frame)."""
        for probe in (self.prober, self.watch):
            if probe is not None:
                probe.close()
        self.prober = self.watch = None

    def down(self) -> None:
        self.close_probes()
        self.lab.down()

    def _config(self, address: str) -> dict:
        return self.lab.network_config("bench") | {"addr": address}

    def _new_pod(self) -> tuple[str, Netns, str]:
        self.count += 1
        ns = self.lab.box.netns(f"pod-b{self.count}")
        return f"{self.lab.box.prefix}-b{self.count}", ns, f"{SUBNET}.{10 + self.count}/24"

    def _cni(self, command: str, cid: str, ns: Netns, address: str) -> float:
        # As kubelet/Multus call: the pod's namespace (the lab's VPCs bind "lab": tenancy).
        ms, res = time_ms(lambda: self.node1.cni(command, self._config(address), cid, ns.path,
                                                 "eth1", args="K8S_POD_NAMESPACE=lab;"
                                                              "K8S_POD_NAME=bench"))
        if not res.ok:
            raise RuntimeError(f"{command} {cid} on node1 failed: {res.stdout or res.stderr}")
        return ms

    def _sample(self, cid: str, ns: Netns, address: str) -> dict:
        ip = address.split("/")[0]
        self.watch.start(ip)
        self.prober.start(ip)
        t0 = time.monotonic()
        self._cni("ADD", cid, ns, address)
        t1 = time.monotonic()
        reply, seen = self.prober.wait(), self.watch.wait()
        return {"add_ms": (t1 - t0) * 1000, "reply_after_add_ms": _ms(reply.get("reply"), t1),
                "arp_after_add_ms": _ms(reply.get("arp"), t1),
                "evpn_after_add_ms": _ms(seen.get("seen"), t1),
                "reply_after_add_start_ms": _ms(reply.get("reply"), t0)}

    def _node2_knows_node1(self) -> bool:
        fdb = self.node2_ns.exec("bridge", "fdb", "show", "dev", f"vpvx{VNI}", check=False).stdout
        return "dst 198.51.100.1 " in fdb

    def cold(self, n: int) -> dict:
        samples = []
        for _ in range(n):
            cid, ns, address = self._new_pod()
            samples.append(self._sample(cid, ns, address))
            ms = self._cni("DEL", cid, ns, address)
            samples[-1]["del_ms"] = ms
            ns.delete()
            wait_for(lambda: not self._node2_knows_node1(), timeout=10, interval=0.01,
                     what="node1's withdrawal reaching node2")
        return _distributions(samples, ("add_ms", "del_ms", "reply_after_add_ms",
                                        "arp_after_add_ms", "evpn_after_add_ms",
                                        "reply_after_add_start_ms"))

    def warm(self, n: int) -> dict:
        resident = self._new_pod()  # node1 is in the VPC before the first sample
        self._cni("ADD", *resident)
        self.warm_pods.append(resident)
        wait_for(self._node2_knows_node1, timeout=10, interval=0.01,
                 what="node1's type-3 route reaching node2")
        before = agent_latency(self.node1)
        samples = []
        for _ in range(n):
            pod = self._new_pod()
            samples.append(self._sample(*pod))  # returns once node2 applied the route
            self.warm_pods.append(pod)
        after = agent_latency(self.node1)
        out = _distributions(samples, ("add_ms", "reply_after_add_ms", "arp_after_add_ms",
                                       "evpn_after_add_ms", "reply_after_add_start_ms"))
        out["agent_service_ms"] = {"ADD": agent_mean_ms(before, after, "ADD")}
        return out

    def remove_warm(self) -> dict:
        """DEL the warm pods (timed: a DEL with EVPN withdraws a route)."""
        before = agent_latency(self.node1)
        times = []
        for cid, ns, address in self.warm_pods[1:]:
            times.append(self._cni("DEL", cid, ns, address))
            ns.delete()
        after = agent_latency(self.node1)
        out = {"del_ms": summarize(times), "agent_service_ms": {"DEL": agent_mean_ms(before, after,
                                                                                     "DEL")}}
        self.warm_pods = self.warm_pods[:1]
        return out

    def perf_pair(self) -> tuple[Netns, str, Netns, Optional[Netns]]:
        """(client netns on node1, server address, server netns, a bystander pod's netns on
        node1 or None) for iperf3."""
        anchor = self.lab.pods["anchor"]
        bystander = self.warm_pods[1][1] if len(self.warm_pods) > 1 else None
        return (self.warm_pods[0][1], anchor.ip, Netns(anchor.netns, self.lab.box, create=False),
                bystander)


# ------------------------------------------------------------------ plain ip VXLAN

class PlainVxlan:
    """Two nodes on their own fabric, VXLAN built with `ip`, static flood entries."""

    def __init__(self, sandbox: Sandbox):
        self.box = sandbox
        self.cluster = Cluster(sandbox, "203.0.113.0/24")
        self.nodes = [self.cluster.add_node("node1", "203.0.113.1"),
                      self.cluster.add_node("node2", "203.0.113.2")]
        for node, other in ((self.nodes[0], self.nodes[1]), (self.nodes[1], self.nodes[0])):
            node.ns.ip("link", "add", "br0", "type", "bridge")
            node.ns.ip("link", "add", "vx0", "type", "vxlan", "id", str(VNI), "dstport", "4789",
                       "local", node.address, "nolearning")
            node.ns.ip("link", "set", "vx0", "master", "br0", "up")
            node.ns.ip("link", "set", "br0", "up")
            node.ns.exec("bridge", "fdb", "append", "00:00:00:00:00:00", "dev", "vx0",
                         "dst", other.address)
        self.count = 0
        self.anchor = self.cluster.add_pod(self.nodes[1], "anchor")
        self.attach(self.anchor, f"{PLAIN_SUBNET}.2/24")
        self.prober = FirstReply(self.anchor.netns, "eth1", f"{PLAIN_SUBNET}.2")
        self.first: Optional[Pod] = None
        self.last: Optional[Pod] = None

    def close_probes(self) -> None:
        if self.prober is not None:
            self.prober.close()
            self.prober = None

    def attach(self, pod: Pod, address: str) -> None:
        """What a minimal plugin does: veth into the bridge, MTU, address, up."""
        self.count += 1
        host = f"h{self.count}"
        self.box.veth(pod.node.ns, host, pod.ns, "eth1")
        pod.node.ns.ip("link", "set", host, "mtu", str(POD_MTU), "master", "br0", "up")
        pod.ns.ip("link", "set", "eth1", "mtu", str(POD_MTU), "up")
        pod.ns.ip("addr", "add", address, "dev", "eth1")

    def first_reply(self, n: int) -> dict:
        samples = []
        for i in range(n):
            pod = self.cluster.add_pod(self.nodes[0], f"p{i}")
            address = f"{PLAIN_SUBNET}.{10 + i}/24"
            self.prober.start(address.split("/")[0])
            t0 = time.monotonic()
            self.attach(pod, address)
            t1 = time.monotonic()
            reply = self.prober.wait()
            samples.append({"attach_ms": (t1 - t0) * 1000,
                            "reply_after_attach_ms": _ms(reply.get("reply"), t1),
                            "arp_after_attach_ms": _ms(reply.get("arp"), t1)})
            self.last = pod
            self.first = self.first or pod
        return _distributions(samples, ("attach_ms", "reply_after_attach_ms",
                                        "arp_after_attach_ms"))

    def perf_pair(self) -> tuple[Netns, str, Netns, Optional[Netns]]:
        bystander = self.first.ns if self.first is not self.last else None
        return self.last.ns, f"{PLAIN_SUBNET}.2", self.anchor.ns, bystander


def iperf_compare(vpcni_pair, plain_pair, seconds: int, rounds: int) -> dict:
    """Alternating runs plain, vpcni, plain, ...: Gbit/s per run, the ratio of medians, and
    how many packets a bystander pod on the client's node received meanwhile."""
    for _, _, server, _ in (vpcni_pair, plain_pair):
        iperf_server(server)
    runs: dict[str, list[float]] = {"plain-vxlan": [], "vpcni": []}
    bystander: dict[str, Optional[int]] = {}
    for _ in range(rounds):
        for name, (client, ip, _, other) in (("plain-vxlan", plain_pair), ("vpcni", vpcni_pair)):
            before = rx_packets(other)
            runs[name].append(round(iperf_gbps(client, ip, seconds), 2))
            if before is not None:
                bystander[name] = (bystander.get(name) or 0) + rx_packets(other) - before
    med = {k: sorted(v)[len(v) // 2] for k, v in runs.items()}
    return {"seconds_per_run": seconds, "runs_gbps": runs, "median_gbps": med,
            "ratio_vpcni_over_plain": round(med["vpcni"] / med["plain-vxlan"], 2),
            "bystander_rx_packets": bystander}
