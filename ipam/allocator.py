"""The allocator of one VPC network: range sets, exclusions, gateways, reservations.

One address per range set (one set per family, or several subnets that fill
up one after the other). Allocations are keyed by (network, container ID,
ifname): a repeated ADD gets what it holds, DEL frees exactly that.
"""

from __future__ import annotations

import ipaddress
import os
import random
import socket
from typing import Mapping, Optional

from vpcni.core.errors import IpamError
from vpcni.core.models import DNS, IPConfig, Result

from .config import IpamSettings, Range
from .store import Allocation, Owner, Store

RANDOM_PROBES = 64
# Beyond this many addresses scanned in one range, call it full (a /64 never is).
SCAN_LIMIT = 1 << 20


def node_name(settings: IpamSettings, env: Mapping[str, str]) -> str:
    """This node's name, recorded with its allocations so that its GC touches only those:
    the config's, the request's VPCNI_NODE_NAME, the serving process's (the agent's
    DaemonSet sets it from spec.nodeName; runtimes do not pass it), the host name."""
    return (settings.node or env.get("VPCNI_NODE_NAME") or os.environ.get("VPCNI_NODE_NAME")
            or socket.gethostname())


def _address(version: int, value: int):
    return ipaddress.IPv4Address(value) if version == 4 else ipaddress.IPv6Address(value)


class Allocator:
    def __init__(self, settings: IpamSettings, network: str, store: Store):
        self.settings = settings
        self.network = network
        self.store = store
        self.range_sets = settings.range_sets()
        self.excluded = list(settings.excluded())
        self.gateways = {(r.subnet.version, int(r.gateway_address()))
                         for rs in self.range_sets for r in rs}

    # ------------------------------------------------------------ choosing

    def _reserved_for(self, owner: Owner, rs: list[Range]) -> tuple[Optional[str], set[int]]:
        """(the address this owner's pod has reserved in `rs`, addresses others have)."""
        namespace, _, pod = owner.pod.rpartition("/")
        mine, others = None, set()
        for res in self.settings.reservations:
            for ip in res.ips:
                if not any(ip in r.subnet for r in rs):
                    continue
                if res.matches(pod or None, namespace or None):
                    mine = mine or str(ip)
                else:
                    others.add(int(ip))
        return mine, others

    def _chooser(self, owner: Owner, index: int):
        rs = self.range_sets[index]
        version = rs[0].subnet.version
        mine, others = self._reserved_for(owner, rs)
        blocked = {g for v, g in self.gateways if v == version} | others
        excluded = [(a, b) for v, a, b in self.excluded if v == version]

        def free(value: int, used: set[str]) -> bool:
            if value in blocked or any(a <= value <= b for a, b in excluded):
                return False
            return str(_address(version, value)) not in used

        def choose(used: set[str]) -> Optional[str]:
            if mine is not None:
                if mine in used:
                    raise IpamError(f"network {self.network!r}: address {mine} reserved for pod "
                                    f"{owner.pod} is held by another attachment (see "
                                    "`vpcnictl ipam show`)")
                return mine
            bounds = [r.bounds() for r in rs]
            if self.store.distributed:
                # Other nodes claim at the same moment: a random free address
                # rarely collides, where the lowest free one always would.
                sizes = [max(0, b - a + 1) for a, b in bounds]
                total = sum(sizes)
                for _ in range(RANDOM_PROBES if total else 0):
                    k = random.randrange(total)
                    for (a, _), size in zip(bounds, sizes):
                        if k < size:
                            if free(a + k, used):
                                return str(_address(version, a + k))
                            break
                        k -= size
            for a, b in bounds:
                for value in range(a, min(b, a + SCAN_LIMIT) + 1):
                    if free(value, used):
                        return str(_address(version, value))
            return None

        return choose

    # ------------------------------------------------------------ verbs

    def allocate(self, owner: Owner) -> Result:
        claimed_now: list[str] = []
        ips = []
        try:
            for index, rs in enumerate(self.range_sets):
                claim = self.store.claim(owner, index, self._chooser(owner, index))
                if claim is None:
                    raise IpamError(self._exhausted(rs))
                ip, new = claim
                if new:
                    claimed_now.append(ip)
                ips.append(self._ip_config(ip, rs))
        except BaseException:
            # Undo only this call's claims: what the attachment held before stays.
            for ip in claimed_now:
                self.store.release_ip(owner.network, ip)
            raise
        dns = self.settings.dns or DNS()
        return Result(ips=ips, routes=list(self.settings.routes), dns=dns)

    def _exhausted(self, rs: list[Range]) -> str:
        subnets = ", ".join(str(r.subnet) for r in rs)
        held = len([a for a in self.store.list(self.network)
                    if any(ipaddress.ip_address(a.ip) in r.subnet for r in rs)])
        return (f"VPC network {self.network!r}: no free address in subnet {subnets} "
                f"({held} held; gateway, exclusions and reservations are never handed out); "
                "free some (`vpcnictl ipam show`, GC) or add a subnet to the range set")

    @staticmethod
    def _ip_config(ip: str, rs: list[Range]) -> IPConfig:
        addr = ipaddress.ip_address(ip)
        r = next(r for r in rs if addr in r.subnet)
        return IPConfig(address=f"{ip}/{r.subnet.prefixlen}", gateway=r.gateway_address())

    def held(self, container_id: str, ifname: str) -> list[Allocation]:
        return self.store.held(self.network, container_id, ifname)

    def release(self, container_id: str, ifname: str) -> list[Allocation]:
        return self.store.release(self.network, container_id, ifname)

    def gc(self, valid: set[tuple[str, str]], node: str) -> list[Allocation]:
        """Free this node's allocations whose attachment is not in `valid`.

        Other nodes' allocations are not ours to judge: their runtime sends
        their own valid list (a dead node's: `vpcnictl ipam release --node`).
        """
        freed = []
        for a in self.store.list(self.network):
            if a.node == node and (a.container_id, a.ifname) not in valid:
                freed += self.store.release(self.network, a.container_id, a.ifname)
        return freed


def owner_for(network: str, container_id: str, ifname: str, args: Mapping[str, str],
              node: str) -> Owner:
    pod = args.get("K8S_POD_NAME", "")
    if pod:
        pod = f"{args.get('K8S_POD_NAMESPACE', '')}/{pod}"
    return Owner(network, container_id, ifname, pod, node)

