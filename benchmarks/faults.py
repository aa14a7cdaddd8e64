"""Traffic lost to a node while its gobgpd restarts, per route reflector daemon.

For each reflector daemon (FRR bgpd, gobgpd) a lab of two vpcni nodes and one
reflector of that daemon; a pod on node1 pings a pod on node2 every 10 ms
while node2's gobgpd is restarted (SIGTERM, start: `vpcnictl lab
restart-gobgpd`). Reported: probes lost, and so the milliseconds of loss.
With a gobgpd reflector the node's routes are kept through BGP graceful
restart; FRR 8.4 has none for l2vpn-evpn and withdraws them until the new
session sends them again.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Callable

from vpcni.lab.lab import Lab
from vpcni.lab.netns import Netns
from vpcni.lab.topology import Topology
from vpcni.lab.traffic import continuous_ping

TOPOLOGY = """
name = "{name}"
[[reflectors]]
name = "rr1"
address = "198.51.100.201"
daemon = "{daemon}"
[[nodes]]
name = "node1"
address = "198.51.100.11"
[[nodes]]
name = "node2"
address = "198.51.100.12"
[[vpcs]]
name = "blue"
vni = 300
cidr = "172.16.32.0/24"
[[pods]]
name = "a"
node = "node1"
vpc = "blue"
address = "172.16.32.11/24"
[[pods]]
name = "b"
node = "node2"
vpc = "blue"
address = "172.16.32.12/24"
"""
INTERVAL = 0.01


def gobgpd_restart_loss(log: Callable[[str], None] = print, window: float = 20.0) -> dict:
    out: dict = {"interval_ms": INTERVAL * 1000, "window_s": window}
    for daemon in ("frr", "gobgpd"):
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "topo.toml"
            path.write_text(TOPOLOGY.format(name=f"bf{os.urandom(3).hex()}", daemon=daemon))
            lab = Lab(Topology.load(path))
            lab.up()
            try:
                src = Netns(lab.pods["a"].netns, lab.box, create=False)
                ping = continuous_ping(src, lab.pods["b"].ip, window, INTERVAL)
                time.sleep(2)
                t0 = time.monotonic()
                lab.restart_gobgpd("node2")
                restart_s = time.monotonic() - t0
                ping.join()
                sent, received = ping.result
                lost = sent - received
                out[daemon] = {"sent": sent, "lost": lost,
                               "loss_ms": round(lost * INTERVAL * 1000),
                               "restart_s": round(restart_s, 2)}
                log(f"gobgpd restart on node2 with a {daemon} reflector: lost {lost} of "
                    f"{sent} probes ({lost * INTERVAL * 1000:.0f} ms)")
            finally:
                lab.down()
    return out


def render_faults(f: dict) -> list[str]:
    lines = [f"A node's gobgpd restarted (SIGTERM, start) while a pod on another node pings "
             f"a pod on it every {f['interval_ms']:.0f} ms for {f['window_s']:.0f} s; one "
             f"route reflector of each daemon.", "",
             "| reflector | probes lost | loss |", "| --- | ---: | ---: |"]
    for daemon, why in (("frr", "FRR 8.4: no graceful restart for l2vpn-evpn"),
                        ("gobgpd", "gobgpd: graceful-restart helper")):
        r = f.get(daemon)
        if r:
            lines.append(f"| {daemon} ({why}) | {r['lost']} of {r['sent']} | "
                         f"{r['loss_ms']} ms |")
    return lines
