"""The remote EVPN routes a node follows: gobgpd's best paths, per VNI. No I/O.

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

from vpcni.core.models import RemoteEndpoint, RemoteState

from . import routes
from .gobgpapi import gobgp_pb2 as api
from .routes import Received, RouteError

log = logging.getLogger(__name__)


class RemoteTable:
    """Thread-safe table of accepted remote routes, indexed by VNI."""

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
        not EVPN type-2/3, originated by this gobgpd, next hop our own VTEP (a
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
        """Apply best-path changes (a snapshot replaces everything); the VNIs that changed."""
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

    def vnis(self) -> set[int]:
        with self._lock:
            return set(self._by_vni)

    def counts(self) -> dict[str, int]:
        """received_type2/3, received_withdrawals, rejected, ignored_own; and
        remote_type2/3, the routes held now."""
        with self._lock:
            out = dict(self._counts)
            held = Counter(entry.route_type for _, entry in self._routes.values())
        for name in ("received_type2", "received_type3", "received_withdrawals", "rejected",
                     "ignored_own"):
            out.setdefault(name, 0)
        out["remote_type2"], out["remote_type3"] = held[2], held[3]
        return out

    def _store(self, key: tuple, got: Received) -> set[int]:
        old = self._routes.get(key)
        if old is not None and old[1] == got:
            return set()
        changed = self._remove(key)
        self._arrivals += 1
        self._routes[key] = (self._arrivals, got)
        self._by_vni.setdefault(got.vni, set()).add(key)
        return changed | {got.vni}

    def _remove(self, key: tuple) -> set[int]:
        old = self._routes.pop(key, None)
        if old is None:
            return set()
        vni = old[1].vni
        keys = self._by_vni[vni]
        keys.discard(key)
        if not keys:
            del self._by_vni[vni]
        return {vni}
