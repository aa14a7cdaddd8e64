"""The seed's two-node test, shown step by step (the main job until the lab exists).

Builds a fabric and two nodes in namespaces, attaches pods of two VPCs that
use the same CIDR through the real `vpcni` executable, proves connectivity
inside each VPC and isolation across them with real traffic, then removes
everything.
"""

from __future__ import annotations

import json
import time

from .cluster import Cluster, seed_network
from .netns import Sandbox
from .traffic import start_ident_server, tcp_ident, wait_ping


def _say(msg: str) -> None:
    print(msg, flush=True)


def run_demo() -> int:
    failures = 0
    with Sandbox() as box:
        _say(f"== sandbox {box.prefix}: every namespace below is ours and is removed at the end")
        cluster = Cluster(box)
        n1 = cluster.add_node("n1", "198.51.100.1")
        n2 = cluster.add_node("n2", "198.51.100.2")
        _say(f"fabric {cluster.fabric.ns.name} (bridge br0), nodes {n1.ns.name} "
             f"({n1.address}) and {n2.ns.name} ({n2.address})")
        plan = [("pod-a", n1, 300, "172.16.32.1/24"), ("pod-b", n2, 300, "172.16.32.2/24"),
                ("pod-c", n1, 301, "172.16.32.1/24"), ("pod-d", n2, 301, "172.16.32.2/24")]
        pods = {}
        for name, node, vni, addr in plan:
            pod = cluster.add_pod(node, name)
            peer = n2 if node is n1 else n1
            conf = seed_network(f"vpc{vni}", vni, addr, vteps=[peer.address])
            t0 = time.monotonic()
            result = cluster.attach(pod, conf)
            ms = (time.monotonic() - t0) * 1000
            itf = result["interfaces"][result["ips"][0]["interface"]]
            _say(f"ADD {name:6} on {node.name}: VNI {vni}, {addr}, {itf['name']} mac {itf['mac']}"
                 f" mtu {itf.get('mtu')}  ({ms:.0f} ms)")
            start_ident_server(pod.ns, name)
            pods[name] = pod
        _say("\n-- the seed's network config, as given to vpcni:")
        _say(json.dumps(seed_network("pod-a", 300, "172.16.32.1/24",
                                     vteps=[n2.address])))
        _say("\n-- traffic (TCP answers with the name of the pod reached)")
        checks = [("pod-a", "172.16.32.2", "pod-b"), ("pod-b", "172.16.32.1", "pod-a"),
                  ("pod-c", "172.16.32.2", "pod-d"), ("pod-d", "172.16.32.1", "pod-c")]
        for src, dst, want in checks:
            took = wait_ping(pods[src].ns, dst)
            got = tcp_ident(pods[src].ns, dst)
            ok = got == want
            failures += not ok
            _say(f"{src} -> {dst}: ping ok ({took * 1000:.0f} ms to first reply), "
                 f"TCP reached {got} (expected {want}) {'OK' if ok else 'FAIL'}")
        _say("\n-- dataplane on n1 (devices vpcni made, VXLAN FDB)")
        _say(n1.ns.ip("-d", "-br", "link").stdout.strip())
        _say(n1.ns.exec("bridge", "fdb", "show", "dev", "vpvx300").stdout.strip())
        _say("\n-- DEL every pod")
        for (name, node, vni, addr) in plan:
            pod = pods[name]
            cluster.detach(pod, seed_network(f"vpc{vni}", vni, addr))
        left = [l for n in (n1, n2) for l in n.ns.ip("-br", "link").stdout.split("\n")
                if l.startswith("vp")]
        failures += bool(left)
        _say(f"interfaces left on the nodes after DEL: {left or 'none'}")
    _say(f"\n== {'PASS' if not failures else f'FAIL ({failures})'}; sandbox removed")
    return 1 if failures else 0
