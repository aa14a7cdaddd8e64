"""`vpcnictl`: the operator's tool."""

from __future__ import annotations

import argparse
import json
import sys


def cmd_probe(args) -> int:
    from vpcni.core import backend as backends
    from vpcni.core.config import NodeConfig
    from vpcni.core.errors import VpcniError

    try:
        node = NodeConfig.load(args.node_config)
    except VpcniError as exc:
        print(f"vpcnictl: {exc.msg}", file=sys.stderr)
        return 2
    probes = backends.probe_all(node)
    try:
        chosen, _ = backends.choose(node)
        verdict, why = chosen.name, ("pinned by node config" if node.backend else "best available")
        rc = 0
    except VpcniError as exc:
        verdict, why, rc = None, exc.msg, 1
    if args.json:
        print(json.dumps({"backends": [p.model_dump(mode="json") for p in probes],
                          "chosen": verdict, "why": why}, indent=2))
        return rc
    width = max([len(p.name) for p in probes] + [7])
    print(f"{'BACKEND':<{width}}  USABLE  SCORE  REASON")
    for p in probes:
        print(f"{p.name:<{width}}  {'yes' if p.available else 'no':<6}  {p.score:>5}  {p.reason}")
    print()
    print(f"this node uses: {verdict} ({why})" if verdict else f"this node cannot serve ADD: {why}")
    return rc


def cmd_demo(args) -> int:
    from vpcni.lab.demo import run_demo

    return run_demo()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vpcnictl", description="Operate vpcni on a node.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("probe", help="which dataplane backends are usable here, and why")
    p.add_argument("--node-config", help="node config file (default $VPCNI_NODE_CONFIG "
                                         "or /etc/vpcni/node.json)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_probe)
    p = sub.add_parser("demo", help="the seed's two-node test in network namespaces, step by step")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
