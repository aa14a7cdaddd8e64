"""200 VNIs on a node: a VXLAN device and a bridge per VNI, against one VXLAN device
with VNI filtering (`external vnifilter`, iproute2 `bridge vni`).

In a namespace of its own for each variant:

- per-VNI devices (what the kernel backend builds): `vpbr<VNI>` bridge +
  `vpvx<VNI>` VXLAN device in it, both up, built with one `ip -batch`;
- one device: `vxlan external vnifilter` and `bridge vni add` of every VNI,
  with one `bridge -batch`. A working single-device design also needs a
  VLAN-aware bridge mapping VLANs to VNIs (`vlan_filtering 1`, `vlan_tunnel`);
  whether this kernel has it is probed and reported.

Reported per variant: the time to build all VNIs, the links in the namespace,
the time of a full link dump (what `ip link`, GC and probes pay), and the
kernel memory taken (MemAvailable before/after, a rough figure).
"""

from __future__ import annotations

import json
import time

from vpcni.lab.netns import run


def _mem_available_kb() -> int:
    for line in open("/proc/meminfo"):
        if line.startswith("MemAvailable:"):
            return int(line.split()[1])
    return 0


def _dump_ms(ns, reps: int = 5) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        ns.ip("-d", "link", "show")
        times.append((time.perf_counter() - t0) * 1000)
    return round(sorted(times)[reps // 2], 1)


def per_vni_devices(ns, vnis: list[int]) -> dict:
    batch = []
    for v in vnis:
        batch += [f"link add vpbr{v} type bridge stp_state 0 mcast_snooping 0",
                  f"link add vpvx{v} type vxlan id {v} dstport 4789 local 127.0.0.1 nolearning",
                  f"link set vpvx{v} master vpbr{v} up", f"link set vpbr{v} up"]
    mem0 = _mem_available_kb()
    t0 = time.perf_counter()
    run(["ip", "-n", ns.name, "-batch", "-"], input="\n".join(batch) + "\n")
    took = time.perf_counter() - t0
    mem1 = _mem_available_kb()
    links = len(ns.ip("-o", "link", "show").stdout.splitlines())
    return {"build_s": round(took, 2), "links": links, "link_dump_ms": _dump_ms(ns),
            "mem_kb": mem0 - mem1}


def one_device(ns, vnis: list[int]) -> dict:
    mem0 = _mem_available_kb()
    t0 = time.perf_counter()
    ns.ip("link", "add", "vpvx", "type", "vxlan", "external", "vnifilter", "local", "127.0.0.1",
          "dstport", "4789")
    ns.ip("link", "set", "vpvx", "up")
    run(["ip", "netns", "exec", ns.name, "bridge", "-batch", "-"],
        input="".join(f"vni add dev vpvx vni {v}\n" for v in vnis))
    took = time.perf_counter() - t0
    mem1 = _mem_available_kb()
    ranges = json.loads(ns.exec("bridge", "-j", "vni", "show", "dev", "vpvx").stdout)
    listed = sum(r.get("vniEnd", r["vni"]) - r["vni"] + 1
                 for dev in ranges for r in dev.get("vnis", []))
    links = len(ns.ip("-o", "link", "show").stdout.splitlines())
    bridge = ns.ip("link", "add", "vpbrv", "type", "bridge", "vlan_filtering", "1",
                   check=False)
    return {"build_s": round(took, 2), "links": links, "link_dump_ms": _dump_ms(ns),
            "mem_kb": mem0 - mem1,
            "vnis_listed": listed,
            "vlan_aware_bridge": bridge.returncode == 0,
            "vlan_aware_bridge_error": bridge.stderr.strip() or None}


def compare(sandbox, n: int = 200) -> dict:
    vnis = list(range(6000, 6000 + n))
    out = {"vnis": n}
    out["per_vni_devices"] = per_vni_devices(sandbox.netns("vf-devices"), vnis)
    out["one_vnifilter_device"] = one_device(sandbox.netns("vf-filter"), vnis)
    return out
