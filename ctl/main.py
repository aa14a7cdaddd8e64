"""`vpcnictl`: the operator's tool."""

from __future__ import annotations

import argparse
import json
import sys


def _default_route_interface() -> tuple[str | None, str]:
    """The interface of this network namespace's default route (IPv4 first), read
    over netlink, and how it was found (or why there is none)."""
    import socket as sk

    from vpcni.backends.common.rtnl import Rtnl

    try:
        with Rtnl() as ipr:
            for family in (sk.AF_INET, sk.AF_INET6):
                for route in ipr.route("dump", family=family):
                    if route["dst_len"] != 0 or route.get("RTA_TABLE", 254) != 254:
                        continue
                    index = route.get("RTA_OIF")
                    if index is None:
                        continue
                    name = ipr.link("get", index=index)[0].get("IFLA_IFNAME")
                    return name, f"the interface of the default route ({name})"
    except OSError as exc:
        return None, f"cannot read the routes: {exc}"
    return None, "this network namespace has no default route"


def _probe_node(path: str | None):
    """(node config, what probe assumed for lack of one: None when it read one).

    Without --node-config, $VPCNI_NODE_CONFIG or the default file, the probes run
    with the defaults and the underlay of the default route; what that leaves
    undetermined is said."""
    import os

    from vpcni.core.config import DEFAULT_NODE_CONFIG, NODE_CONFIG_ENV, NodeConfig

    if path or os.environ.get(NODE_CONFIG_ENV) or os.path.lexists(DEFAULT_NODE_CONFIG):
        return NodeConfig.load(path), None
    ifname, how = _default_route_interface()
    source = "(no node config)"
    if ifname:
        node = NodeConfig(underlayInterface=ifname, logFile=None, source=source)
    else:
        # No underlay to give: the switches that need one say so (below).
        node = NodeConfig.model_construct(logFile=None, source=source)
    assumed = [
        f"underlay (VTEP address): {'guessed from ' + how if ifname else 'unknown: ' + how}; "
        "a node config sets it (vtepAddress or underlayInterface)",
        "backend: not pinned, the best usable one is shown (node config `backend`)",
        "backend sections at their defaults: ovs (OVSDB under /run/openvswitch), "
        "sriov (every PF under /sys), no dpu section (not a DPU host)",
        f"stateDir {node.stateDir} (the VFs claimed there count as used)",
        "EVPN, tenancy and the agent's readiness are not probed: `vpcnictl status` "
        "says them",
    ]
    return node, assumed


def cmd_probe(args) -> int:
    from vpcni.core import backend as backends
    from vpcni.core.errors import VpcniError

    try:
        node, assumed = _probe_node(args.node_config)
    except VpcniError as exc:
        print(f"vpcnictl: {exc.msg}", file=sys.stderr)
        return 2
    probes = backends.probe_all(node)
    if assumed is not None and node.vtepAddress is None and node.underlayInterface is None:
        for p in probes:
            if not p.available and p.reason.startswith("probe failed"):
                p.reason = ("cannot tell without an underlay: no node config names one and "
                            "this network namespace has no default route")
    if assumed is not None:  # nothing pinned: the best usable one, as choose() picks
        usable = [p for p in probes if p.available]
        verdict, why, rc = ((usable[0].name, "best available", 0) if usable else
                            (None, "no usable backend on this node (" + "; ".join(
                                f"{p.name}: {p.reason}" for p in probes) + ")", 1))
    else:
        try:
            chosen, _ = backends.choose(node)
            verdict, why = chosen.name, ("pinned by node config" if node.backend
                                         else "best available")
            rc = 0
        except VpcniError as exc:
            verdict, why, rc = None, exc.msg, 1
    interfaces = backends.probe_all(node, backends.INTERFACES)
    if args.json:
        print(json.dumps({"backends": [p.model_dump(mode="json") for p in probes],
                          "interfaces": [p.model_dump(mode="json") for p in interfaces],
                          "chosen": verdict, "why": why,
                          "nodeConfig": None if assumed is not None else node.source,
                          "assumed": assumed or []}, indent=2))
        return rc
    width = max([len(p.name) for p in probes + interfaces] + [9])
    if assumed is not None:
        print("no node config (--node-config, $VPCNI_NODE_CONFIG, /etc/vpcni/node.json): "
              "probed with the defaults; what that leaves open:")
        for line in assumed:
            print(f"  - {line}")
        print()
    print(f"{'SWITCH':<{width}}  USABLE  SCORE  REASON")
    for p in probes:
        print(f"{p.name:<{width}}  {'yes' if p.available else 'no':<6}  {p.score:>5}  {p.reason}")
    print()
    print(f"{'INTERFACE':<{width}}  USABLE  REASON")
    for p in interfaces:
        print(f"{p.name:<{width}}  {'yes' if p.available else 'no':<6}  {p.reason}")
        if p.name == "sriov":
            for pf, f in sorted(p.facts.items()):
                print(f"{'':<{width}}    PF {pf} ({f['pci']}): mode {f['mode']}, "
                      f"{f['free_vfs']} of {f['vfs']} VFs free (total {f['total_vfs']}), "
                      f"offload {'yes' if f['offload'] else 'no'}: {f['why']}")
    print()
    print(f"this node uses: {verdict} ({why})" if verdict else f"this node cannot serve ADD: {why}")
    return rc


def _load_node(path):
    from vpcni.core.config import NodeConfig
    from vpcni.core.errors import VpcniError

    try:
        return NodeConfig.load(path)
    except VpcniError as exc:
        raise SystemExit(f"vpcnictl: {exc.msg}") from None


def cmd_agent(args) -> int:
    import logging

    from vpcni.agent.server import Agent
    from vpcni.cni.main import setup_logging

    node = _load_node(args.node_config)
    setup_logging(node, stderr_level=getattr(logging, node.logLevel))
    Agent(node).run_forever()
    return 0


def _duration(seconds) -> str:
    """12.3s, 4m05s, 3h02m, 2d04h."""
    if not isinstance(seconds, (int, float)):
        return "?"
    if seconds < 60:
        return f"{seconds:.1f}s"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    d, h = divmod(h, 24)
    if d:
        return f"{d}d{h:02d}h"
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def format_status(st: dict) -> str:
    """The agent's status (its JSON, `vpcnictl status --json`) for a person."""
    lines: list[str] = []

    def row(key: str, text: str) -> None:
        lines.append(f"{key:<13} {text}")

    row("agent", f"vpcni {st.get('version', '?')}, node config {st.get('node')}, "
                 f"socket {st.get('socket')}")
    row("ready", ("yes" if st.get("ready") else f"NO: {st.get('readyReason')}")
        + f" (up {_duration(st.get('uptime'))})")
    backend = st.get("backend") or {}
    if backend.get("backend"):
        row("backend", f"{backend['backend']}, {backend.get('why')}: {backend.get('reason')}")
    else:
        row("backend", f"none usable: {backend.get('why')}")
    vnis = st.get("attachmentsPerVni") or {}
    row("attachments", f"{sum(vnis.values())} in {len(vnis)} VNI(s)"
        + (": " + ", ".join(f"VNI {vni}: {n}" for vni, n in vnis.items()) if vnis else ""))
    evpn = st.get("evpn")
    if evpn is None:
        row("EVPN", "not configured (static flood lists only)")
    else:
        row("EVPN", f"gobgpd {evpn.get('gobgpd')}: "
                    + ("connected" if evpn.get("connected") else "NOT CONNECTED") + ", "
                    + ("initial route dump received" if evpn.get("synced")
                       else "waiting for the initial route dump"))
        peers = evpn.get("peers") or {}
        up = sum(1 for state in peers.values() if state == "established")
        row("  sessions", f"{up} of {len(peers)} established"
            + (": " + ", ".join(f"{addr} {state}" for addr, state in sorted(peers.items()))
               if peers else ""))
        hold = evpn.get("holdingStale")
        row("  remote", f"HOLDING STALE entries for {_duration(evpn.get('holdingFor'))}: {hold}"
            if hold else "following gobgpd's table (not holding stale)")
        t2, t3 = evpn.get("remote_type2", 0), evpn.get("remote_type3", 0)
        row("  routes", f"announcing {evpn.get('announcing', 0)}, received {t2 + t3} "
                        f"(type-2 {t2}, type-3 {t3})")
    tenancy = st.get("tenancy")
    if tenancy is not None:
        row("tenancy", ("enforced" if tenancy.get("enforced") else "NOT ENFORCED")
            + f" (bindings {tenancy.get('bindingsFile')})")
        per_ns = tenancy.get("attachmentsPerNamespace") or {}
        row("  namespaces", ", ".join(f"{ns}: {n}" for ns, n in per_ns.items())
            or "no attachments")
    mtu = st.get("mtu")
    if mtu is not None:
        pod_mtu = mtu.get("podMtu") or {}
        differ = mtu.get("differ", 0)
        row("MTU", (f"{differ} attachment(s) not at the MTU they should have"
                    if differ else "no drift")
            + (" (pod MTU " + ", ".join(f"VNI {vni}: {m}" for vni, m in pod_mtu.items()) + ")"
               if pod_mtu else ""))
        listed = mtu.get("attachments") or []
        for entry in listed[:5]:
            row("", f"{entry.get('attachment')}: MTU {entry.get('mtu')}, expected "
                    f"{entry.get('expected')}: {entry.get('why')}")
        if differ > 5:
            row("", f"... {differ - 5} more (--json lists up to 100)")
    return "\n".join(lines)


def cmd_status(args) -> int:
    from vpcni.cni.shim import agent_call

    node = _load_node(args.node_config)
    try:
        reply = agent_call(str(node.agentSocket), {"op": "status"}, timeout=10)
        status = json.loads(reply["stdout"])
    except (OSError, ValueError, KeyError) as exc:
        print(f"vpcnictl: agent unreachable at {node.agentSocket}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(status, indent=2) if args.json else format_status(status))
    return 0 if status.get("ready") else 1


def cmd_install_cni(args) -> int:
    from vpcni.cni.install import install_shim

    try:
        target = install_shim(args.dest, args.python, kind=args.kind)
    except (OSError, RuntimeError) as exc:
        print(f"vpcnictl install-cni: {exc}", file=sys.stderr)
        return 1
    how = "static Go binary" if args.kind == "go" else f"run by {args.python} -S"
    print(f"installed {target} and {target.with_name('vpcni-ipam')} ({how}; standalone mode "
          f"runs {sys.executable})")
    return 0


def _lab_name(arg: str | None) -> str:
    """A lab is named by its topology file's `name`, or given by name."""
    from pathlib import Path

    from vpcni.lab.topology import Topology

    if arg is None:
        return Topology.load().name
    if Path(arg).is_file():
        return Topology.load(Path(arg)).name
    return arg


# `vpcnictl lab VERB TARGET`: the faults operators and tests inject the same way.
FAULTS = {
    "stop-reflector": "stop a route reflector's daemon (FRR or gobgpd)",
    "start-reflector": "start a stopped route reflector again",
    "restart-agent": "restart a node's agent",
    "restart-gobgpd": "restart a node's gobgpd (or a gobgpd reflector's)",
    "cut-underlay": "take a node's underlay link down (its fabric port)",
    "restore-underlay": "bring a node's underlay link back",
}


def _lab_fault(args) -> int:
    from vpcni.lab.lab import Lab

    if not args.topology:
        print(f"vpcnictl lab {args.action}: name the reflector or node", file=sys.stderr)
        return 2
    lab = Lab.load(_lab_name(args.lab))
    target = args.topology
    method = getattr(lab, args.action.replace("-", "_"))
    result = method(target)
    what = "ready" if isinstance(result, dict) and result.get("ready") else "done"
    print(f"lab {lab.topo.name}: {args.action} {target}: {what}")
    return 0


def cmd_lab(args) -> int:
    import time

    from vpcni.lab.lab import Lab, LabError, down_by_name
    from vpcni.lab.topology import Topology

    try:
        if args.action == "up":
            topo = Topology.load(args.topology)
            t0 = time.monotonic()
            lab = Lab(topo)

            def progress(elapsed: float, what: str) -> None:
                # stderr: stdout stays what `up` prints at the end
                print(f"lab {topo.name}: [{elapsed:5.1f}s] {what}", file=sys.stderr, flush=True)
            lab.up(progress=progress)
            print(f"lab {topo.name} up in {time.monotonic() - t0:.1f}s: "
                  f"{len(topo.reflectors)} route reflectors "
                  f"({', '.join(f'{r.name}={r.daemon}' for r in topo.reflectors)}), "
                  f"{len(topo.nodes)} nodes, {len(topo.vpcs)} VPCs, {len(topo.pods)} pods "
                  f"(namespaces {lab.box.prefix}-*, files {lab.dir}); BGP sessions up "
                  f"{lab.sessions_after:.1f}s after the agents were ready; EVPN converged "
                  f"{lab.converged_after * 1000:.0f} ms after the last ADD")
            for pod in lab.pods.values():
                print(f"  pod {pod.name:10} node {pod.node:8} vpc {pod.vpc:6} (VNI {pod.vni}) "
                      f"{pod.address:18} mac {pod.mac}  {pod.origin}")
            return 0
        if args.action in FAULTS:
            return _lab_fault(args)
        name = _lab_name(args.topology)
        if args.action == "check":
            return 0 if Lab.load(name).check() else 1
        if args.action == "down":
            found = down_by_name(name)
            print(f"lab {name} {'removed' if found else 'was not up'}")
            return 0
    except (LabError, ValueError, TimeoutError) as exc:
        print(f"vpcnictl lab {args.action}: {exc}", file=sys.stderr)
        return 1
    return 2


def cmd_render(args) -> int:
    from vpcni.evpn import render

    try:
        if args.what == "gobgpd-node":
            text = render.gobgpd_node_toml(args.router_id, args.asn, args.reflector)
        elif args.what == "gobgpd-rr":
            text = render.gobgpd_reflector_toml(args.router_id, args.asn, args.vtep_prefix,
                                                args.cluster_id)
        elif args.what == "frr-rr":
            text = render.frr_reflector_bgpd(args.router_id, args.asn, args.vtep_prefix,
                                             args.cluster_id)
        else:
            text = render.frr_vtep_bgpd(args.router_id, args.asn, args.reflector)
    except ValueError as exc:
        print(f"vpcnictl render {args.what}: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(text)
    return 0


def cmd_demo(args) -> int:
    from vpcni.lab.demo import run_demo

    return run_demo()


def cmd_controller(args) -> int:
    """The VPC controller (docs/vpc-api.md): a kopf operator; needs an API server."""
    import importlib.util
    import logging

    missing = [m for m in ("kopf", "kubernetes") if importlib.util.find_spec(m) is None]
    if missing:
        print(f"vpcnictl controller: {' and '.join(missing)} not installed: pip install "
              "'vpcni[controller]'", file=sys.stderr)
        return 1

    from vpcni.controller.main import load_config, run

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    run(load_config(args.config), standalone=args.standalone, peering=args.peering,
        liveness=args.liveness)
    return 0


def _ipam_store(args):
    """The store and network named on the command line (--conf, or --sqlite / --etcd)."""
    from vpcni.ipam.config import (DEFAULT_PREFIX, EtcdStoreConfig, SqliteStoreConfig,
                                   parse_settings)
    from vpcni.ipam.store import open_store

    network = args.network
    if args.conf:
        try:
            conf = json.loads(open(args.conf, "rb").read())
        except (OSError, ValueError) as exc:
            raise SystemExit(f"vpcnictl ipam: cannot read {args.conf}: {exc}") from None
        cfg = parse_settings(conf.get("ipam")).store
        network = network or conf.get("name")
    elif args.etcd:
        cfg = EtcdStoreConfig(type="etcd", endpoints=args.etcd,
                              prefix=args.prefix or DEFAULT_PREFIX)
    elif args.sqlite:
        cfg = SqliteStoreConfig(type="sqlite", path=args.sqlite)
    else:
        raise SystemExit("vpcnictl ipam: name the store: --conf FILE, --sqlite PATH or --etcd URL")
    return open_store(cfg), network


def cmd_ipam(args) -> int:
    from dataclasses import asdict

    from vpcni.core.errors import VpcniError

    try:
        store, network = _ipam_store(args)
        if args.action == "show":
            rows = store.list(network)
            if args.node:
                rows = [a for a in rows if a.node == args.node]
            if args.json:
                print(json.dumps([asdict(a) for a in rows], indent=1))
                return 0
            print(f"{'NETWORK':<16} {'ADDRESS':<28} {'CONTAINER':<24} {'IFNAME':<8} "
                  f"{'POD':<24} NODE")
            for a in rows:
                print(f"{a.network:<16} {a.ip:<28} {a.container_id:<24} {a.ifname:<8} "
                      f"{a.pod or '-':<24} {a.node or '-'}")
            print(f"{len(rows)} allocation(s) in {store.name}")
            return 0
        if not network:
            raise SystemExit("vpcnictl ipam release: --network is required")
        freed = []
        if args.ip:
            one = store.release_ip(network, args.ip)
            freed = [one] if one else []
        elif args.container:
            ifnames = [args.ifname] if args.ifname else sorted(
                {a.ifname for a in store.list(network) if a.container_id == args.container})
            for ifname in ifnames:
                freed += store.release(network, args.container, ifname)
        elif args.node:
            for a in store.list(network):
                if a.node == args.node:
                    freed += store.release(network, a.container_id, a.ifname)
        else:
            raise SystemExit("vpcnictl ipam release: say what: --ip, --container or --node")
        for a in freed:
            print(f"released {a.ip} ({a.network} {a.container_id}/{a.ifname}"
                  f"{' pod ' + a.pod if a.pod else ''}{' node ' + a.node if a.node else ''})")
        if not freed:
            print("nothing held matched")
        return 0 if freed else 1
    except VpcniError as exc:
        print(f"vpcnictl ipam {args.action}: {exc.msg}", file=sys.stderr)
        return 1


def _gobgpd_version() -> str:
    """`gobgpd --version` of the gobgpd in PATH (a static binary: milliseconds)."""
    import shutil
    import subprocess

    exe = shutil.which("gobgpd")
    if exe is None:
        return "gobgpd: not found in PATH"
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=5)
        words = (out.stdout or out.stderr).split()
    except (OSError, subprocess.SubprocessError) as exc:
        return f"gobgpd: {exe}: {exc}"
    return f"gobgpd {words[-1] if words else '?'} ({exe})"


def versions() -> str:
    """What `vpcnictl --version` prints: vpcni's version (the package metadata), the
    Python it runs on, and the gobgpd in PATH."""
    import platform

    from vpcni.agent.metrics import package_version

    return "\n".join([f"vpcni {package_version()}",
                      f"Python {platform.python_version()} ({sys.executable})",
                      _gobgpd_version()])


class _Version(argparse.Action):
    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(versions())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vpcnictl", description="Operate vpcni on a node.")
    parser.add_argument("--version", action=_Version,
                        help="vpcni's version, the Python it runs on and gobgpd's; exit")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("probe", help="which dataplane backends are usable here, and why")
    p.add_argument("--node-config", help="node config file (default $VPCNI_NODE_CONFIG "
                                         "or /etc/vpcni/node.json)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_probe)
    p = sub.add_parser("agent", help="run the node agent (serves the vpcni shim)")
    p.add_argument("--node-config", help="node config file")
    p.set_defaults(func=cmd_agent)
    p = sub.add_parser("status", help="the node agent's status (backend choice, EVPN, attachments)")
    p.add_argument("--node-config", help="node config file")
    p.add_argument("--json", action="store_true", help="the agent's status as JSON (as /status)")
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("install-cni",
                       help="install the vpcni shim (as vpcni and vpcni-ipam) into a CNI bin dir")
    p.add_argument("--dest", default="/opt/cni/bin", help="CNI bin dir (default /opt/cni/bin)")
    p.add_argument("--kind", choices=["go", "python"], default="go",
                   help="the static Go shim (default; built with the Go toolchain) or the "
                        "Python one")
    p.add_argument("--python", default="/usr/bin/python3",
                   help="interpreter for the Python shim (stdlib only; default /usr/bin/python3)")
    p.set_defaults(func=cmd_install_cni)
    p = sub.add_parser("lab", help="a simulated multi-node cluster in network namespaces")
    p.add_argument("action", choices=["up", "check", "down", *FAULTS],
                   help="up, check, down; or a fault to inject: "
                        + "; ".join(f"{verb}: {what}" for verb, what in FAULTS.items()))
    p.add_argument("topology", nargs="?",
                   help="topology file (up; default: the shipped default.toml) or lab name; "
                        "for a fault, the reflector or node")
    p.add_argument("--lab", help="the lab a fault goes to (default: the default lab)")
    p.set_defaults(func=cmd_lab)
    p = sub.add_parser("render", help="configuration for the BGP daemons of the control plane",
                       description="gobgpd-node: a node's speaker (router-id = its VTEP); "
                                   "gobgpd-rr / frr-rr: a route reflector for every VTEP of a "
                                   "prefix (dynamic neighbours, l2vpn evpn only); frr-vtep: a "
                                   "plain FRR VTEP as the seed deploys it")
    p.add_argument("what", choices=["gobgpd-node", "gobgpd-rr", "frr-rr", "frr-vtep"])
    p.add_argument("--router-id", required=True, help="router id (a node's VTEP address)")
    p.add_argument("--asn", type=int, default=65000)
    p.add_argument("--reflector", action="append", default=[],
                   help="route reflector address (gobgpd-node, frr-vtep; repeat for each)")
    p.add_argument("--vtep-prefix", help="the VTEP range reflectors accept (gobgpd-rr, frr-rr)")
    p.add_argument("--cluster-id", help="route reflector cluster id (default: router id)")
    p.set_defaults(func=cmd_render)
    p = sub.add_parser("ipam", help="see and fix vpcni-ipam's allocations (show, release)",
                       description="show: the allocations in a store; release: free one "
                                   "address, an attachment's, or all of a (dead) node's")
    p.add_argument("action", choices=["show", "release"])
    p.add_argument("--conf", help="a network config file with the ipam section (store, name)")
    p.add_argument("--sqlite", help="the SQLite store file")
    p.add_argument("--etcd", action="append", help="an etcd endpoint URL (repeat for each)")
    p.add_argument("--prefix", help="etcd key prefix (default /vpcni/ipam)")
    p.add_argument("--network", help="the network (default: the name in --conf; show: all)")
    p.add_argument("--ip", help="release: this address")
    p.add_argument("--container", help="release: this container's addresses")
    p.add_argument("--ifname", help="release: with --container, this interface only")
    p.add_argument("--node", help="show: this node's only; release: all of this node's")
    p.add_argument("--json", action="store_true", help="show: machine-readable output")
    p.set_defaults(func=cmd_ipam)
    p = sub.add_parser("controller", help="the VPC controller: Vpc objects to VNIs, NADs, "
                                          "status and tenancy bindings (needs an API server)")
    p.add_argument("--config", help="controller config JSON (default $VPCNI_CONTROLLER_CONFIG "
                                    "or /etc/vpcni/controller.json)")
    p.add_argument("--standalone", action="store_true",
                   help="no peering with other controller replicas")
    p.add_argument("--peering", help="kopf peering object name (makes peering mandatory; "
                                     "default: kopf's, if its CRD is installed)")
    p.add_argument("--liveness", help="liveness endpoint, e.g. http://0.0.0.0:8080/healthz")
    p.set_defaults(func=cmd_controller)
    p = sub.add_parser("demo", help="the seed's two-node test in network namespaces, step by step")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
