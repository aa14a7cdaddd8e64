"""The node's EVPN speaker: drives the gobgpd beside the agent over its gRPC API.

Local routes are level-triggered. The owner states the whole desired set
(`set_local`) or changes it (`update_local`); the speaker makes gobgpd hold
exactly that. On every (re)connection it lists gobgpd's locally originated
EVPN paths and only adds what is missing and deletes what is stale, so an
agent restart leaves routes that are still wanted untouched (peers see no
withdraw), and a restarted, empty gobgpd gets everything back. Nothing is
reconciled before the owner's first statement: a fresh agent must not
withdraw what its predecessor announced.

Remote routes come from one WatchEvent stream (best paths, with the current
table first) into a RemoteTable: the first message of every stream is
gobgpd's whole table and replaces ours, later ones are changes; paths gobgpd
originated and paths whose next hop is our own VTEP (a reflector sending
ours back) are ignored. `on_change(vnis)` is called from a notifier thread,
coalesced over `debounce` seconds, with the VNIs whose remote state changed:
L2 VNIs (`remote_state`) and L3VNIs (`routed_state`, symmetric IRB).
While gobgpd is unreachable the table is kept as it was.

Routes that differ only in attributes (a type-2 route with and without its
L3VNI and router MAC) are the same NLRI: the desired set holds at most one of
them, and replacing one by the other is one AddPath, without a withdraw.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
from collections import Counter
from typing import Callable, Iterable, Optional, Union

import grpc

from vpcni.core.models import RemoteState, RoutedState

from . import routes
from .gobgpapi import gobgp_pb2 as api
from .gobgpapi import gobgp_pb2_grpc as api_grpc
from .routes import LocalRoute, Received, RouteError
from .table import RemoteTable

log = logging.getLogger(__name__)

_WATCH_BEST = api.WatchEventRequest(table=api.WatchEventRequest.Table(filters=[
    api.WatchEventRequest.Table.Filter(type=api.WatchEventRequest.Table.Filter.BEST, init=True)]))
_CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", -1),  # the initial table dump is one message
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
]
# Codes that mean "gobgpd is not there (any more)": reconnect, re-send.
_GONE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED,
         grpc.StatusCode.DEADLINE_EXCEEDED)


class SpeakerError(Exception):
    """gobgpd refused an operation for a reason other than being unreachable."""


class _Disconnected(Exception):
    pass


class EvpnSpeaker:
    """One node's EVPN routes through one gobgpd (`target` like unix:///run/vpcni/gobgp.sock)."""

    def __init__(self, target: str, vtep: Union[str, ipaddress.IPv4Address], asn: int,
                 on_change: Optional[Callable[[set[int]], None]] = None, *,
                 debounce: float = 0.02, rpc_timeout: float = 10.0,
                 backoff: tuple[float, float] = (0.1, 5.0)):
        self.target = target
        self.vtep = ipaddress.ip_address(vtep)
        routes.route_distinguisher(self.vtep, 1, asn)  # IPv4 VTEP check, early
        self.asn = asn
        self.on_change = on_change
        self.debounce = debounce
        self.rpc_timeout = rpc_timeout
        self.backoff = backoff

        self._channel = grpc.insecure_channel(target, options=_CHANNEL_OPTIONS)
        self._stub = api_grpc.GobgpApiStub(self._channel)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._stream = None

        # Local side: _desired is None until the owner first states it.
        self._local_lock = threading.Lock()
        self._desired: Optional[set[LocalRoute]] = None
        self._pushed: set[LocalRoute] = set()
        self._local_synced = False  # gobgpd holds _pushed: listed, reconciled on this connection
        self._connected = threading.Event()
        self._dumped = threading.Event()  # this connection's table dump is in the table

        # Remote side: the table, and the VNIs the consumer has not been told about.
        self._table = RemoteTable(self.vtep, asn)
        self._pending: set[int] = set()
        self._pending_cond = threading.Condition()

        self._counters: Counter = Counter()
        self._counters_lock = threading.Lock()

    # ------------------------------------------------------------ lifecycle

    def start(self) -> "EvpnSpeaker":
        for name, fn in (("evpn-watch", self._watch_loop), ("evpn-notify", self._notify_loop)):
            thread = threading.Thread(target=fn, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def close(self, timeout: float = 5.0) -> None:
        """Stop the threads and close the channel; gobgpd keeps its routes."""
        self._stop.set()
        stream = self._stream
        if stream is not None:
            stream.cancel()
        self._channel.close()  # also ends a GetBgp waiting for gobgpd
        with self._pending_cond:
            self._pending_cond.notify_all()
        for thread in self._threads:
            thread.join(timeout)
        self._threads.clear()

    def __enter__(self) -> "EvpnSpeaker":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def connected(self) -> bool:
        """gobgpd answers, and holds the desired local routes if they were stated."""
        return self._connected.is_set()

    def wait_connected(self, timeout: Optional[float] = None) -> bool:
        return self._connected.wait(timeout)

    @property
    def synced(self) -> bool:
        """Connected, and the remote table holds gobgpd's table as of this
        connection (its initial dump applied): remote state is not partial
        because of us. (A gobgpd that just started is still empty.)"""
        return self._connected.is_set() and self._dumped.is_set()

    def counters(self) -> dict[str, int]:
        """For metrics: announced, withdrawn, disconnects, and the table's
        received_type2/3/5, received_withdrawals, rejected, ignored_own, remote_type2/3/5."""
        with self._counters_lock:
            out = {name: self._counters[name] for name in ("announced", "withdrawn", "disconnects")}
        out.update(self._table.counts())
        return out

    def _count(self, name: str, n: int = 1) -> None:
        with self._counters_lock:
            self._counters[name] += n

    # ------------------------------------------------------------ local routes

    def set_local(self, desired: Iterable[LocalRoute]) -> bool:
        """Make gobgpd originate exactly `desired`.

        True when gobgpd holds it now; False when gobgpd is unreachable (the
        set is kept and sent on reconnection). SpeakerError when gobgpd
        rejects a route; ValueError when two routes are the same NLRI (see
        `update_local`).
        """
        desired = _distinct(set(desired))
        with self._local_lock:
            self._desired = desired
            return self._reconcile_now()

    def update_local(self, add: Iterable[LocalRoute] = (),
                     remove: Iterable[LocalRoute] = ()) -> bool:
        """Add routes to and remove routes from the desired set (e.g. one pod's ADD/DEL).

        Safe for concurrent callers, unlike computing whole sets apart.
        Return value as for `set_local`, which must have stated the whole set
        first (else what an earlier agent announced would count as stale).
        Changing a route's attributes (e.g. giving a type-2 route its L3VNI) is
        add=[new], remove=[old]: both are the same NLRI; of two routes of one NLRI
        in the desired set only one is announced (_distinct).
        """
        with self._local_lock:
            if self._desired is None:
                raise RuntimeError("EvpnSpeaker.update_local() before set_local(): state the "
                                   "whole desired set first")
            desired = set(self._desired)
            desired.difference_update(remove)
            desired.update(add)
            self._desired = _distinct(desired)
            return self._reconcile_now()

    def local_routes(self) -> set[LocalRoute]:
        with self._local_lock:
            return set(self._desired or ())

    def _reconcile_now(self) -> bool:
        """For the owner's calls: converge if connected; the caller holds _local_lock."""
        if not self._connected.is_set():
            return False
        try:
            self._reconcile_local()
        except _Disconnected:
            self._count("disconnects")
            self._connected.clear()
            self._local_synced = False
            # Make the watch thread reconnect and list again, even if its
            # stream survived (an RPC that timed out on a live gobgpd).
            stream = self._stream
            if stream is not None:
                stream.cancel()
            return False
        return True

    def _reconcile_local(self) -> None:
        """Converge gobgpd to _desired; the caller holds _local_lock."""
        if self._desired is None:
            return
        if not self._local_synced:
            self._full_sync()
        else:
            self._push(self._desired - self._pushed, self._pushed - self._desired)

    def _full_sync(self) -> None:
        """List gobgpd's own EVPN paths; add the missing, delete the stale."""
        desired = self._desired or set()
        present: set[LocalRoute] = set()
        stale: list[tuple[tuple, api.Path]] = []
        for path in self._list_local():
            try:
                got = routes.decode(path, self.asn)
            except RouteError as exc:
                log.warning("evpn: gobgpd holds a local EVPN path we did not make (%s): "
                            "replacing or deleting it", exc)
                got = None
            if got is not None and self._is_ours(got) and got.local_route() in desired:
                present.add(got.local_route())
            else:
                try:
                    stale.append((routes.nlri_key(path), path))
                except RouteError:  # unreadable: nothing we add replaces it
                    stale.append((None, path))
        replaced = {routes.nlri_key(routes.encode(r, self.vtep, self.asn)) for r in desired}
        gone = [path for key, path in stale if key not in replaced]
        log.info("evpn: reconciling with gobgpd: %d kept, %d to add, %d stale to delete",
                 len(present), len(desired - present), len(gone))
        self._pushed = present
        self._local_synced = True
        # Adding first replaces a stale path of the same NLRI in place, without
        # a withdraw; only stale paths nobody replaces are deleted.
        self._push(add=desired - present, stale=gone)

    def _is_ours(self, got: Received) -> bool:
        """A local path exactly as we would encode it now (same RD, next hop, VTEP)."""
        want = routes.nlri_key(routes.encode(got.local_route(), self.vtep, self.asn))
        return got.key == want and got.nexthop == self.vtep and got.vtep == self.vtep

    def _push(self, add: Iterable[LocalRoute] = (), remove: Iterable[LocalRoute] = (),
              stale: Iterable[api.Path] = ()) -> None:
        """AddPath `add`, then DeletePath `remove` and the `stale` paths gobgpd listed.

        A route of `remove` that an added route of the same NLRI replaced is
        not deleted (that would withdraw its replacement). One rejected route
        does not stop the others; SpeakerError names them all.
        """
        replaced = set()
        steps = ([(r, True, routes.encode(r, self.vtep, self.asn)) for r in sorted(add, key=_order)]
                 + [(r, False, routes.encode(r, self.vtep, self.asn))
                    for r in sorted(remove, key=_order)]
                 + [(None, False, path) for path in stale])
        failed = []
        for route, adding, path in steps:
            if not adding and route is not None and route.nlri_identity in replaced:
                self._pushed.discard(route)
                log.debug("evpn: %s replaced in place", route)
                continue
            try:
                if adding:
                    self._rpc("AddPath", api.AddPathRequest(table_type=api.GLOBAL, path=path))
                else:
                    self._rpc("DeletePath", api.DeletePathRequest(
                        table_type=api.GLOBAL, family=routes.EVPN_FAMILY, path=path))
            except SpeakerError as exc:
                failed.append(f"{route or 'stale path'}: {exc}")
                continue
            if adding:
                self._pushed.add(route)
                replaced.add(route.nlri_identity)
            else:
                self._pushed.discard(route)
            self._count("announced" if adding else "withdrawn")
            log.debug("evpn: %s %s", "announced" if adding else "withdrew", route or path)
        if failed:
            raise SpeakerError("; ".join(failed))

    def _list_local(self) -> list[api.Path]:
        request = api.ListPathRequest(table_type=api.GLOBAL, family=routes.EVPN_FAMILY)
        try:
            return [path for resp in self._stub.ListPath(request, timeout=self.rpc_timeout)
                    for path in resp.destination.paths if routes.is_local(path)]
        except grpc.RpcError as exc:
            self._raise(exc, "ListPath")
            raise

    def _rpc(self, name: str, request):
        try:
            return getattr(self._stub, name)(request, timeout=self.rpc_timeout)
        except grpc.RpcError as exc:
            self._raise(exc, name)
            raise

    def _raise(self, exc: grpc.RpcError, what: str) -> None:
        code = exc.code() if hasattr(exc, "code") else None
        if code in _GONE:
            raise _Disconnected(str(code)) from None
        details = exc.details() if hasattr(exc, "details") else str(exc)
        raise SpeakerError(f"gobgpd {self.target}: {what} failed: {code}: {details}") from None

    def peers(self) -> dict[str, str]:
        """gobgpd's BGP sessions: neighbour address -> state ("established", "active", ...).

        Empty when gobgpd is unreachable."""
        return self.sessions() or {}

    def sessions(self, timeout: float = 2.0) -> Optional[dict[str, str]]:
        """As `peers`, but None when gobgpd does not answer (unknown, not "none")."""
        if not self._connected.is_set():
            return None
        try:
            replies = self._stub.ListPeer(api.ListPeerRequest(), timeout=timeout)
            return {r.peer.state.neighbor_address:
                    api.PeerState.SessionState.Name(r.peer.state.session_state).lower()
                    for r in replies}
        except grpc.RpcError:
            return None

    # ------------------------------------------------------------ remote routes

    def remote_state(self, vni: int) -> RemoteState:
        """Endpoints and flood VTEPs of `vni` behind other VTEPs (see RemoteTable.state)."""
        return self._table.state(vni)

    def routed_state(self, l3vni: int) -> RoutedState:
        """Hosts and prefixes of `l3vni` behind other VTEPs (see RemoteTable.routed)."""
        return self._table.routed(l3vni)

    def remote_vnis(self) -> set[int]:
        """The VNIs and L3VNIs with remote routes."""
        return self._table.vnis()

    def _apply(self, paths: Iterable[api.Path], snapshot: bool) -> None:
        changed = self._table.apply(paths, snapshot)
        if changed:
            with self._pending_cond:
                self._pending |= changed
                self._pending_cond.notify()

    # ------------------------------------------------------------ threads

    def _watch_loop(self) -> None:
        delay = self.backoff[0]
        quiet = False  # the current outage was already logged
        while not self._stop.is_set():
            gone = None
            try:
                self._session()
            except _Disconnected as exc:
                gone = exc
            except SpeakerError as exc:
                log.error("evpn: %s: retrying in %.1fs", exc, delay)
            except Exception:  # the thread must live on: log, back off, retry
                if not self._stop.is_set():  # else close() closed the channel under us
                    log.exception("evpn: watch loop failed: retrying in %.1fs", delay)
            with self._local_lock:
                if self._connected.is_set():
                    self._count("disconnects")
                    delay, quiet = self.backoff[0], False
                self._connected.clear()
                self._dumped.clear()
                self._local_synced = False
            if gone is not None and not self._stop.is_set():
                log.log(logging.DEBUG if quiet else logging.WARNING,
                        "evpn: gobgpd %s unreachable (%s): retrying", self.target, gone)
                quiet = True
            if self._stop.wait(delay):
                break
            delay = min(delay * 2, self.backoff[1])

    def _session(self) -> None:
        """One connection: wait for gobgpd, reconcile local routes, follow the table."""
        try:
            # wait_for_ready: no error loop while gobgpd is down, prompt once it is up.
            bgp = self._stub.GetBgp(api.GetBgpRequest(), wait_for_ready=True,
                                    timeout=self.backoff[1])
        except grpc.RpcError as exc:
            self._raise(exc, "GetBgp")
        bgp = getattr(bgp, "global")  # a Python keyword as a field name
        if bgp.asn == 0:
            # Not started: it would skip the initial table dump the watch relies on.
            raise _Disconnected("gobgpd has not started BGP yet")
        if bgp.asn != self.asn:
            log.warning("evpn: gobgpd runs AS %d, the speaker is configured with AS %d",
                        bgp.asn, self.asn)
        stream = self._stub.WatchEvent(_WATCH_BEST)
        self._stream = stream
        try:
            if self._stop.is_set():
                return
            with self._local_lock:
                self._local_synced = False
                try:
                    self._reconcile_local()
                except SpeakerError as exc:
                    log.error("evpn: gobgpd rejected local routes: %s", exc)
                self._connected.set()
            log.info("evpn: connected to gobgpd %s (router-id %s)", self.target,
                     bgp.router_id)
            first = True
            for resp in stream:
                if resp.HasField("table"):
                    self._apply(resp.table.paths, snapshot=first)
                    if first:
                        self._dumped.set()
                    first = False
            raise _Disconnected("watch stream ended")
        except grpc.RpcError as exc:
            self._raise(exc, "WatchEvent")
        finally:
            self._stream = None
            stream.cancel()

    def _notify_loop(self) -> None:
        while True:
            with self._pending_cond:
                while not self._pending and not self._stop.is_set():
                    self._pending_cond.wait()
                if not self._pending:
                    return
            # Let a burst of updates land before telling the consumer.
            self._stop.wait(self.debounce)
            with self._pending_cond:
                vnis, self._pending = self._pending, set()
            if self.on_change is None:
                continue
            try:
                self.on_change(vnis)
            except Exception:
                log.exception("evpn: on_change(%s) failed", sorted(vnis))


def _order(route: LocalRoute) -> tuple:
    # Type-3 first on add (the flood entry before the MACs), stable otherwise.
    return (route.vni, route.route_type != 3, route.route_type, route.mac or "",
            str(route.ip or ""), str(route.prefix or ""), route.l3vni or 0, route.rmac or "")


def _distinct(desired: set[LocalRoute]) -> set[LocalRoute]:
    """`desired` with one route per NLRI (gobgpd holds only one of them, and the speaker
    would flip between them): of two routes of one NLRI (one pod's MAC and address in a
    VNI both as a routed subnet's and as a plain one's, say) the one with the L3VNI is
    kept, deterministically, and the other logged. One such pair never stops the node's
    other announcements."""
    kept: dict[tuple, LocalRoute] = {}
    for route in sorted(desired, key=lambda r: (r.l3vni is None, _order(r))):
        other = kept.setdefault(route.nlri_identity, route)
        if other is not route:
            log.warning("evpn: %s and %s are the same EVPN route (NLRI): announcing the "
                        "first only", other, route)
    return set(kept.values())
