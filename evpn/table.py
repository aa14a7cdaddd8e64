"""The remote EVPN routes a node follows: gobgpd's best paths, per VNI. No I/O.

Two views: per L2 VNI the endpoints and flood VTEPs (type-2/3, `state`), and
per L3VNI the routed hosts and prefixes (symmetric IRB: type-2 routes that
carry that L3VNI and type-5 routes, `routed`).

Fed with WatchEvent batches by the speaker: the first batch of a stream is
gobgpd's whole table and replaces ours, later ones are changes. Keyed by the
NLRI, as BGP is: a withdraw removes exactly the route it names, and a new
best path for an NLRI replaces the old one.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
from collections import Counter
from typing import Iterable, Optional, Union

from vpcni.core.models import RemoteEndpoint, RemoteState, RoutedHost, RoutedState

from . import routes
from .gobgpapi import gobgp_pb2 as api
from .routes import Received, RouteError

log = logging.getLogger(__name__)


def _indexes(got: Received) -> set[int]:
    """The VNIs whose state a route is part of: its VNI (type-5: its L3VNI),
    and a type-2 route's L3VNI."""
    return {got.vni} if got.l3vni is None else {got.vni, got.l3vni}


class RemoteTable:
    """Thread-safe table of accepted remote routes, indexed by VNI and L3VNI."""

    def __init__(self, vtep: Union[str, ipaddress.IPv4Address], asn: int):
        self.vtep = ipaddress.ip_address(vtep)
        self.asn = asn
        self._lock = threading.Lock()
        self._routes: dict[tuple, tuple[int, Received]] = {}  # key -> (arrival, route)
        self._by_vni: dict[int, set[tuple]] = {}
        self._arrivals = 0
        self._counts: Counter = Counter()

    def accept(self, path: api.Path, counts: Counter) -> Optional[Received]:
        """The remote route a best path stands for; None when it is not one for us:
        not EVPN type-2/3/5, originated by this gobgpd, next hop our own VTEP (a
        reflector sending ours back), or malformed (counted as rejected)."""
        if routes.is_local(path):
            return None
        try:
            got = routes.decode(path, self.asn)
        except RouteError as exc:
            counts["rejected"] += 1
            log.info("evpn: ignoring a route from %s: %s", path.neighbor_ip, exc)
            return None
        if got is None:
            return None
        if got.is_from(self.vtep):
            counts["ignored_own"] += 1
            return None
        return got

    def apply(self, paths: Iterable[api.Path], snapshot: bool = False) -> set[int]:
        """Apply best-path changes (a snapshot replaces everything); the VNIs
        that changed: L2 VNIs, and L3VNIs whose routed state changed."""
        new: dict[tuple, Optional[Received]] = {}
        counts: Counter = Counter()
        for path in paths:
            try:
                key = routes.nlri_key(path)
            except RouteError:
                key = None
            if key is None:
                continue
            if path.is_withdraw:
                counts["received_withdrawals"] += 1
                new[key] = None
                continue
            got = self.accept(path, counts)
            if got is not None:
                counts[f"received_type{got.route_type}"] += 1
            # A best path that is no acceptable remote route replaces what we had.
            new[key] = got
        changed: set[int] = set()
        with self._lock:
            self._counts.update(counts)
            if snapshot:
                for key in [k for k in self._routes if k not in new]:
                    changed |= self._remove(key)
            for key, got in new.items():
                changed |= self._remove(key) if got is None else self._store(key, got)
        return changed

    def state(self, vni: int) -> RemoteState:
        """Endpoints and flood VTEPs of `vni`.

        When one MAC is announced from several VTEPs (a pod that moved), the
        most recently received VTEP wins.
        """
        with self._lock:
            entries = [self._routes[key] for key in self._by_vni.get(vni, ())]
        # A type-2 route indexed here for its L3VNI is not part of this VNI's L2 state.
        entries = [(arrival, entry) for arrival, entry in entries
                   if entry.route_type in (2, 3) and entry.vni == vni]
        newest: dict[str, tuple[int, routes.AnyIP]] = {}
        flood = set()
        for arrival, entry in entries:
            if entry.route_type == 3:
                flood.add(entry.vtep)
            elif entry.mac not in newest or arrival > newest[entry.mac][0]:
                newest[entry.mac] = (arrival, entry.vtep)
        endpoints = {RemoteEndpoint(mac=entry.mac, ip=entry.ip, vtep=entry.vtep)
                     for _, entry in entries
                     if entry.route_type == 2 and newest[entry.mac][1] == entry.vtep}
        return RemoteState(
            endpoints=sorted(endpoints, key=lambda e: (e.mac, str(e.ip or ""), str(e.vtep))),
            flood=sorted(flood, key=lambda a: (a.version, int(a))))

    def routed(self, l3vni: int) -> RoutedState:
        """Routed hosts and prefixes of `l3vni` (symmetric IRB).

        Hosts: type-2 routes carrying `l3vni`, one per IP; when one IP is
        announced from several VTEPs (a pod that moved), the most recently
        received wins. Prefixes: type-5 routes of `l3vni`, every VTEP that
        announces a prefix (ECMP).
        """
        with self._lock:
            entries = [self._routes[key] for key in self._by_vni.get(l3vni, ())]
        newest: dict[routes.AnyIP, tuple[int, RoutedHost]] = {}
        prefixes = set()
        for arrival, entry in entries:
            if entry.route_type == 2 and entry.l3vni == l3vni:
                host = entry.routed_host()
                if entry.ip not in newest or arrival > newest[entry.ip][0]:
                    newest[entry.ip] = (arrival, host)
            elif entry.route_type == 5 and entry.vni == l3vni:
                prefixes.add(entry.routed_prefix())
        hosts = [host for _, host in newest.values()]
        return RoutedState(
            hosts=sorted(hosts, key=lambda h: (h.ip.version, int(h.ip))),
            prefixes=sorted(prefixes, key=lambda p: (
                p.prefix.version, int(p.prefix.network_address), p.prefix.prefixlen,
                p.vtep.version, int(p.vtep), p.rmac)))

    def vnis(self) -> set[int]:
        """The VNIs and L3VNIs with routes."""
        with self._lock:
            return set(self._by_vni)

    def counts(self) -> dict[str, int]:
        """received_type2/3/5, received_withdrawals, rejected, ignored_own; and
        remote_type2/3/5, the routes held now."""
        with self._lock:
            out = dict(self._counts)
            held = Counter(entry.route_type for _, entry in self._routes.values())
        for name in ("received_type2", "received_type3", "received_type5",
                     "received_withdrawals", "rejected", "ignored_own"):
            out.setdefault(name, 0)
        for route_type in (2, 3, 5):
            out[f"remote_type{route_type}"] = held[route_type]
        return out

    def _store(self, key: tuple, got: Received) -> set[int]:
        old = self._routes.get(key)
        if old is not None and old[1] == got:
            return set()
        changed = self._remove(key)
        self._arrivals += 1
        self._routes[key] = (self._arrivals, got)
        vnis = _indexes(got)
        for vni in vnis:
            self._by_vni.setdefault(vni, set()).add(key)
        return changed | vnis

    def _remove(self, key: tuple) -> set[int]:
        old = self._routes.pop(key, None)
        if old is None:
            return set()
        vnis = _indexes(old[1])
        for vni in vnis:
            keys = self._by_vni[vni]
            keys.discard(key)
            if not keys:
                del self._by_vni[vni]
        return vnis
