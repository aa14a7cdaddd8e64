"""vpcni-ipam allocation latency: the SQLite store against etcd, in one run.

    .venv/bin/python -m benchmarks.ipam_bench [--n 500] [--threads 8] [--exec-n 30]

Builds a Sandbox with one namespace holding an etcd (Debian etcd-server) on
its loopback, and runs the measuring worker inside that namespace (this
module again, `worker`), so both stores are measured from the same place:

- `alloc`: Allocator.allocate for `n` new attachments, one caller;
- `alloc-Nthreads`: the same with `threads` callers at once (contention);
- `release`: freeing each of them (DEL);
- `exec`: the whole `vpcni-ipam` executable, ADD as a delegating plugin
  calls it (Python start-up included).

Prints a JSON report with p50/p99 in milliseconds; removes everything it
started (namespace, etcd by pid, files).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import subprocess
import sys
import time
from pathlib import Path

SUBNET = "172.16.0.0/16"


def _settings(store: dict):
    from vpcni.ipam.config import parse_settings

    return parse_settings({"type": "vpcni-ipam", "subnets": [SUBNET], "store": store})


def worker(store: dict, n: int, threads: int, exec_n: int) -> dict:
    """Runs inside the namespace; returns {case: samples in ms}."""
    from vpcni.ipam.allocator import Allocator, owner_for
    from vpcni.ipam.plugin import store_for
    from vpcni.lab.cluster import installed_executable

    settings = _settings(store)
    alloc = Allocator(settings, "bench", store_for(settings))
    out: dict[str, list[float]] = {"alloc": [], f"alloc-{threads}threads": [], "release": [],
                                   "exec": []}

    def one(cid: str) -> float:
        t0 = time.perf_counter()
        alloc.allocate(owner_for("bench", cid, "eth0", {}, "bench"))
        return (time.perf_counter() - t0) * 1000
    out["alloc"] = [one(f"s{i}") for i in range(n)]
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        out[f"alloc-{threads}threads"] = list(pool.map(one, [f"p{i}" for i in range(n)]))
    for a in alloc.store.list("bench"):
        t0 = time.perf_counter()
        alloc.release(a.container_id, a.ifname)
        out["release"].append((time.perf_counter() - t0) * 1000)
    conf = json.dumps({"cniVersion": "1.0.0", "name": "bench-exec", "type": "bridge",
                       "ipam": {"type": "vpcni-ipam", "subnets": [SUBNET], "store": store}})
    exe = installed_executable("vpcni-ipam")
    for i in range(exec_n):
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "CNI_COMMAND": "ADD",
               "CNI_CONTAINERID": f"x{i}", "CNI_IFNAME": "eth0",
               "CNI_NETNS": "/proc/self/ns/net", "CNI_PATH": "/nonexistent"}
        t0 = time.perf_counter()
        proc = subprocess.run([exe], input=conf.encode(), env=env, capture_output=True)
        out["exec"].append((time.perf_counter() - t0) * 1000)
        if proc.returncode != 0:
            raise RuntimeError(f"vpcni-ipam ADD failed: {proc.stdout!r} {proc.stderr!r}")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=500, help="allocations per case")
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--exec-n", type=int, default=30, help="executable ADDs per store")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # store JSON: run the worker
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker), args.n, args.threads, args.exec_n)))
        return 0

    from vpcni.lab.daemons import Etcd
    from vpcni.lab.netns import Sandbox

    from .stats import summarize

    report: dict = {"n": args.n, "threads": args.threads, "subnet": SUBNET, "stores": {}}
    with Sandbox() as box:
        ns = box.netns("etcd")
        etcd = Etcd(ns, box.dir("etcd")).start()
        stores = {"sqlite": {"type": "sqlite", "path": str(box.dir("sqlite") / "ipam.sqlite")},
                  "etcd": {"type": "etcd", "endpoints": [etcd.endpoint],
                           "prefix": f"/{box.prefix}/ipam"}}
        root = Path(__file__).resolve().parent.parent
        for name, store in stores.items():
            proc = ns.exec(sys.executable, "-m", "benchmarks.ipam_bench", "--n", str(args.n),
                           "--threads", str(args.threads), "--exec-n", str(args.exec_n),
                           "--worker", json.dumps(store), timeout=3600,
                           env=dict(os.environ, PYTHONPATH=str(root)))
            samples = json.loads(proc.stdout)
            report["stores"][name] = {case: {k: v for k, v in summarize(s).items()
                                             if k != "samples"}
                                      for case, s in samples.items()}
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
