"""What the pod tests look at beyond tests.functional.leftovers: routes,
sysctls, and the pod's interface in a CNI result.
"""

from __future__ import annotations

import ipaddress
import json
from contextlib import contextmanager
from typing import Optional

from pyroute2 import netns as pr_netns

from tests.functional.leftovers import addresses
from vpcni.lab.netns import Netns


@contextmanager
def inside(ns: Netns):
    """Run the calling thread in `ns` for the duration of the block."""
    pr_netns.pushns(ns.path)
    try:
        yield
    finally:
        pr_netns.popns()


def assigned_addresses(ns: Netns, ifname: str) -> set[str]:
    """The addresses on `ifname` except the IPv6 link-local one the kernel adds."""
    return {a for a in addresses(ns.name, ifname)
            if not ipaddress.ip_interface(a).is_link_local}


def routes(ns: Netns, dev: str) -> dict[str, Optional[str]]:
    """IPv4 routes of the main table through `dev`: destination -> gateway (or None)."""
    shown = json.loads(ns.ip("-j", "-4", "route", "show", "dev", dev).stdout)
    return {r["dst"]: r.get("gateway") for r in shown}


def sysctl(ns: Netns, key: str) -> str:
    """A per-namespace sysctl, read through /proc/sys/net inside `ns`."""
    return ns.exec("cat", "/proc/sys/" + key.replace(".", "/")).stdout.strip()


def pod_interface(result: dict, netns: str, ifname: str = "eth1") -> tuple[int, dict]:
    """Index and entry of the result's one interface with a sandbox: `ifname` in `netns`."""
    found = [(i, itf) for i, itf in enumerate(result.get("interfaces", []))
             if itf.get("sandbox")]
    assert len(found) == 1, f"expected one interface with a sandbox: {result}"
    idx, itf = found[0]
    assert (itf["name"], itf["sandbox"]) == (ifname, netns), itf
    return idx, itf
