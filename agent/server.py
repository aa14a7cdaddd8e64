"""`vpcnictl agent`: one long-running process per node.

It owns the request handler (backends loaded once), the attachment store, the
EVPN speaker (gobgpd over gRPC), a reconcile loop, health and metrics. CNI
requests arrive from the shim over a unix socket (mode 0600) as one JSON
object {env, stdin} and are answered with {stdout, rc}; {"op": "status"}
returns the agent's status. The shim installed as `vpcni-ipam` adds
{"plugin": "vpcni-ipam"}: the agent serves that IPAM plugin in-process.

Restarting the agent changes nothing in the dataplane: on start it only
converges (local routes to the store, FDB to the received routes once the
initial route dump is complete), so traffic between existing pods goes on.
"""

from __future__ import annotations

import json
import logging
import resource
import os
import signal
import socket
import stat
from collections import Counter
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Optional

from vpcni.cni.plugin import COMMANDS, Dispatcher
from vpcni.core import backend as backends
from vpcni.core.config import NodeConfig
from vpcni.core.errors import VpcniError
from vpcni.core.handler import Change, Handler
from vpcni.core.models import Attachment, RemoteState, RoutedState, router_mac
from vpcni.ipam import IPAM_TYPE

from .metrics import Metrics, code_label, ipam_pool_usage, package_version
from .serve import PooledServer

LOG = logging.getLogger("vpcni.agent")
MAX_REQUEST = 4 * 1024 * 1024
# How often the agent checks that the backends' node-wide state (filters) is intact.
QUICK_CHECK = 5.0
# Worker threads for the shim's requests (CNI calls run in parallel up to this).
REQUEST_WORKERS = 16
# How long a client may take to send its request.
REQUEST_READ_TIMEOUT = 10.0
# Headless operation: while gobgpd is unreachable or none of its BGP sessions is
# established, the agent keeps the remote entries it learned (stale, not
# flushed). It lets them go only once a session has been up for RESYNC_MIN
# seconds and no remote change has arrived for RESYNC_QUIET: the table is then
# the control plane's again, and one full converge drops what went meanwhile.
# RESYNC_MIN covers the other nodes: each node's gobgpd dials the returning
# reflectors on its own clock (every 5-10 s), so a node whose session came back
# first must not take the reflectors' table as complete before the others' routes
# are in it (tested: at 3 s a node dropped a whole node's routes for seconds).
RESYNC_MIN = 12.0
RESYNC_QUIET = 1.0
# ... but never longer than this after a session is back (routes that keep
# changing somewhere in the cluster must not keep deleted pods' entries forever).
RESYNC_MAX = 60.0
# While holding, the reconcile loop looks at the sessions this often.
HOLD_POLL = 0.5
# The vpcni-ipam pools of the networks the node's attachments use, as the requests
# named them (network -> ipam section), kept across restarts for the metrics.
IPAM_POOLS_FILE = "ipam-pools.json"


def _raise_descriptor_limit() -> None:
    """Use the hard limit on open descriptors: a node's worth of namespaces, netlink
    sockets and clients must not run into the soft default of 1024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:
            LOG.warning("could not raise the descriptor limit from %d to %d: %s", soft, hard, exc)


def _unix_listener(path: str) -> socket.socket:
    """The shim's socket at `path`, born 0600 (no window with wider access)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old = os.umask(0o177)
    try:
        sock.bind(path)
    except OSError:
        sock.close()
        raise
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    # Runtimes start many pods at once: a backlog of 5 (socketserver's) made a burst
    # of callers get EAGAIN from connect.
    sock.listen(socket.SOMAXCONN)
    return sock


class Agent:
    def __init__(self, node: NodeConfig):
        self.node = node
        self.metrics = Metrics(evpn=node.evpn is not None)
        # The agent is the store's only writer while it runs (the shim never runs
        # the plugin in agent mode): the records are kept in memory as well.
        self.handler = Handler(node, cached_store=True)
        self.dispatcher = _AgentDispatcher(node, handler=self.handler,
                                           on_ipam=self._ipam_seen)
        self._ipam_dispatcher: Optional[Dispatcher] = None  # vpcni-ipam's, made on first use
        self.speaker = None
        self.started = time.time()
        self._stop = threading.Event()
        self._kick = threading.Event()
        self._dirty: set[int] = set()
        self._dirty_lock = threading.Lock()
        self._sync_lock = threading.Lock()
        self._heartbeat = time.monotonic()
        self._server: Optional[PooledServer] = None
        self._http: Optional[PooledServer] = None
        self._threads: list[threading.Thread] = []
        self.choice: dict[str, Any] = {}
        # Why remote entries are held stale now (None: they follow gobgpd's
        # table), since when, and since when a session is back (resyncing).
        self._hold: Optional[str] = None
        self._hold_since = 0.0
        self._sessions_since: Optional[float] = None
        self._last_remote_change = 0.0
        self._seen_disconnects = 0
        self._sessions: dict[str, str] = {}
        self._cp_lock = threading.Lock()  # _check_control_plane: reconcile thread and ADDs
        self._last_remote: dict[int, RemoteState] = {}
        # What a hold keeps: the remote state as it was when the control plane went
        # (routes learned and withdrawn during the hold are the control plane's word).
        self._held: dict[int, RemoteState] = {}
        # The same for the routed state of each L3VNI (routed subnets' VPC routers).
        self._last_routed: dict[int, RoutedState] = {}
        self._held_routed: dict[int, RoutedState] = {}
        self._route_refs: Optional[Counter] = None  # route -> attachments wanting it
        self._rmac: Optional[str] = None  # this node's router MAC (with EVPN)
        self._problems: list[str] = []  # what keeps the node from serving (readiness)
        # vpcni-ipam usage (metrics): the pools seen in requests, refreshed by a thread
        # of its own on the reconcile loop's signal (a slow store never stalls it).
        self._ipam_pools: dict[str, dict] = {}
        self._ipam_noted: dict[str, float] = {}  # network -> when a request last named it
        self._ipam_lock = threading.Lock()
        self._ipam_kick = threading.Event()
        self._ipam_series: set[tuple[str, str, str]] = set()
        self._ipam_failing: dict[str, str] = {}
        if node.evpn is not None:
            from vpcni.evpn.speaker import EvpnSpeaker

            self.speaker = EvpnSpeaker(f"unix://{node.evpn.gobgpdSocket}", vtep=self._vtep(),
                                       asn=node.evpn.asn, on_change=self._remote_changed)
            self.handler.remote_source = self._remote_state
            self.handler.routed_source = self._routed_state
            # This node's router MAC: routed subnets' type-2 and type-5 routes carry it.
            self._rmac = router_mac(self.speaker.vtep)
        self.handler.listeners.append(self._local_changed)

    def _vtep(self):
        if self.node.vtepAddress is not None:
            return self.node.vtepAddress
        probe, _ = backends.choose(self.node)
        return probe.facts.get("vtep")

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        _raise_descriptor_limit()
        self._probe()
        self.handler.store.refresh()
        sock = Path(self.node.agentSocket)
        sock.parent.mkdir(parents=True, exist_ok=True)
        if sock.exists() or sock.is_symlink():
            if not stat.S_ISSOCK(sock.lstat().st_mode):
                raise VpcniError(f"agentSocket {sock} exists and is not a socket: the agent "
                                 "removes only a socket it left behind; remove the file or "
                                 "point agentSocket elsewhere")
            if self._socket_alive(sock):
                raise VpcniError(f"another agent already serves {sock}")
            sock.unlink()
        # DELs spooled while no agent listened go first: a new request for the
        # same attachment must find them done.
        self._replay_pending()
        self._load_ipam_pools()
        self._problems = self._node_problems()
        # Bound before anything is served: a taken health port fails the start
        # cleanly instead of killing an agent that already answered requests.
        if self.node.healthAddress:
            self._http = _health_server(self.node.healthAddress, self)
        # One reader thread for every connection, a fixed pool for the requests: an
        # idle or slow client holds no thread (see agent/serve.py).
        self._server = PooledServer(
            _unix_listener(str(sock)), "vpcni-request", complete=lambda data, eof: eof,
            handle=lambda data: json.dumps(self.serve_request(data)).encode(),
            workers=REQUEST_WORKERS, read_timeout=REQUEST_READ_TIMEOUT, max_request=MAX_REQUEST,
            too_large=lambda: json.dumps(self._too_large()).encode())
        if self.speaker is not None:
            self.speaker.start()
        self._spawn("requests", self._server.serve_forever)
        self._spawn("reconcile", self._reconcile_loop)
        self._spawn("ipam-usage", self._ipam_loop)
        if self._http is not None:
            self._spawn("health", self._http.serve_forever)
        self._local_changed(Change(everything=True))
        LOG.info("agent serving %s (backend %s: %s)", sock, self.choice.get("backend"),
                 self.choice.get("why"))

    def _spawn(self, name: str, target) -> None:
        t = threading.Thread(target=target, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    @staticmethod
    def _socket_alive(path: Path) -> bool:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.settimeout(1)
            s.connect(str(path))
            return True
        except OSError:
            return False
        finally:
            s.close()

    def stop(self) -> None:
        """Stop serving; the dataplane and gobgpd's routes are left as they are."""
        self._stop.set()
        self._kick.set()
        self._ipam_kick.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.close()
            Path(self.node.agentSocket).unlink(missing_ok=True)
        if self._http is not None:
            self._http.shutdown()
            self._http.close()
        if self.speaker is not None:
            self.speaker.close()
        self.handler.close()

    def run_forever(self) -> None:
        done = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: done.set())
        self.start()
        done.wait()
        LOG.info("agent stopping")
        self.stop()

    # ------------------------------------------------------------ requests

    @staticmethod
    def _too_large() -> dict:
        return {"stdout": json.dumps({
            "cniVersion": "1.1.0", "code": 7,
            "msg": f"request larger than {MAX_REQUEST // (1024 * 1024)} MiB: a network "
                   "config is never that large"}), "rc": 1}

    def serve_request(self, data: bytes) -> dict:
        if len(data) > MAX_REQUEST:
            return self._too_large()
        try:
            req = json.loads(data)
            if req.get("op") == "status":
                return {"stdout": json.dumps(self.status()), "rc": 0}
            env = {str(k): str(v) for k, v in req["env"].items()}
            stdin = req.get("stdin", "").encode("utf-8", "surrogateescape")
            dispatcher = self._dispatcher_for(req.get("plugin"))
        except (ValueError, KeyError, AttributeError, TypeError) as exc:
            return {"stdout": json.dumps({"cniVersion": "1.1.0", "code": 6,
                                          "msg": f"malformed request from the shim: {exc}"}),
                    "rc": 1}
        # Metric labels from known commands only: bogus ones must not grow /metrics.
        command = env.get("CNI_COMMAND", "")
        command = command if command in COMMANDS else "invalid"
        t0 = time.perf_counter()
        out, rc = dispatcher.run(env, stdin)
        self.metrics.latency.labels(command).observe(time.perf_counter() - t0)
        self.metrics.requests.labels(command, "ok" if rc == 0 else "error").inc()
        if rc != 0:
            self.metrics.errors.labels(command, code_label(_error_code(out))).inc()
        return {"stdout": out, "rc": rc}

    def _dispatcher_for(self, plugin: Optional[str]) -> Dispatcher:
        """The dispatcher of the plugin a request names: vpcni (no name: shims before
        vpcni-ipam's forwarding), or vpcni-ipam, which the shim installed under that name
        forwards (served here in-process, as its executable would). Anything else is a
        ValueError (a malformed request)."""
        if plugin is None or plugin == "vpcni":
            return self.dispatcher
        if plugin == IPAM_TYPE:
            if self._ipam_dispatcher is None:
                from vpcni.ipam.plugin import IpamDispatcher

                self._ipam_dispatcher = IpamDispatcher()
            return self._ipam_dispatcher
        raise ValueError(f"no plugin {str(plugin)[:64]!r} here (this agent serves vpcni and "
                         f"{IPAM_TYPE})")

    def _replay_pending(self) -> None:
        """DELs the shim spooled while no agent listened.

        A spooled DEL runs the IPAM plugin it names, as root: only a spool
        directory and files that are ours (the agent's user) and writable by
        nobody else are trusted; anything else is left alone with a log line."""
        spool = Path(self.node.stateDir) / "pending-del"
        try:
            st = os.lstat(spool)
        except FileNotFoundError:
            return
        why = _untrusted(st, directory=True)
        if why:
            LOG.error("spooled DELs in %s ignored: the directory %s", spool, why)
            return
        for path in sorted(spool.glob("*.json")):
            try:
                req = json.loads(_read_trusted(path))
                env = {str(k): str(v) for k, v in req["env"].items()}
                if env.get("CNI_COMMAND") != "DEL":
                    raise _Untrusted(f"asks for {env.get('CNI_COMMAND')!r}, not DEL")
                dispatcher = self._dispatcher_for(req.get("plugin"))
                out, rc = dispatcher.run(env, req["stdin"].encode("utf-8", "surrogateescape"))
            except _Untrusted as exc:
                LOG.error("pending DEL %s ignored: the file %s", path, exc)
                continue
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                LOG.error("pending DEL %s is unreadable (%s): kept for an operator", path, exc)
                continue
            if rc == 0:
                LOG.info("pending DEL %s done", path.name)
                path.unlink(missing_ok=True)
            elif json.loads(out).get("code") == 11:
                LOG.warning("pending DEL %s: %s; will retry", path.name, out)
            else:
                LOG.error("pending DEL %s failed for good: %s", path.name, out)
                path.rename(path.with_suffix(".failed"))
        self.metrics.pending_del.set(len(list(spool.glob("*.json"))))

    # ------------------------------------------------------------ reconcile

    def _local_changed(self, change: Change) -> None:
        """Attachments changed: announce/withdraw now, so remote nodes learn it at once.

        Itemised changes (one ADD or DEL) cost the routes of those attachments,
        not a pass over every record: what is announced is kept as a count of
        the attachments that want each route (a VNI's inclusive-multicast route
        is wanted by each of its attachments)."""
        if change.everything:
            self._sync_local()
        elif self.speaker is not None:
            with self._sync_lock:
                self._apply_change(change)
        if change.everything:
            self._update_gauges(routes=True)
        else:
            self._update_vni_gauges({a.vni for a in change.added + change.removed})

    def _apply_change(self, change: Change) -> None:
        """Update the route counts with `change` and tell the speaker; the caller
        holds _sync_lock."""
        if self._route_refs is None:
            self._sync_local_locked()
            return
        refs = self._route_refs
        gone, new = set(), set()
        for route in (r for att in change.removed for r in local_routes([att], self._rmac)):
            refs[route] -= 1
            if refs[route] <= 0:
                del refs[route]
                gone.add(route)
        for route in (r for att in change.added for r in local_routes([att], self._rmac)):
            refs[route] += 1
            if refs[route] == 1:
                new.add(route)
        gone, new = gone - new, new - gone  # a repeated ADD: the same routes again
        if not (gone or new):
            return
        try:
            self.speaker.update_local(add=new, remove=gone)
        except Exception:
            LOG.exception("could not sync local routes to gobgpd (retried by reconcile)")

    def _remote_changed(self, vnis: set[int]) -> None:
        self._last_remote_change = time.monotonic()
        with self._dirty_lock:
            self._dirty |= set(vnis)
        self._kick.set()

    def _sync_local(self) -> None:
        if self.speaker is None:
            return
        with self._sync_lock:
            self._sync_local_locked()

    def _sync_local_locked(self) -> None:
        """Announce exactly the routes of the records; the caller holds _sync_lock."""
        refs: Counter = Counter()
        for att in self.handler.store.all():
            refs.update(local_routes([att], self._rmac))
        self._route_refs = refs
        try:
            self.speaker.set_local(set(refs))
        except Exception:
            LOG.exception("could not sync local routes to gobgpd (retried by reconcile)")

    def _converge(self, vnis: set[int]) -> None:
        routed = self.handler.local_l3vnis()
        for l3vni in sorted(vnis & routed.keys()):
            try:
                self.handler.apply_routed(self.handler.backend_named(routed[l3vni]), l3vni)
            except VpcniError as exc:
                LOG.error("converge L3VNI %d: %s", l3vni, exc)
        local = self.handler.local_vnis()
        for vni in sorted(vnis & local):
            backend = self._backend_of_vni(vni)
            if backend is None:
                continue
            if self._hold is not None and vni not in self._last_remote:
                # Nothing learned in this process yet (an agent started while the
                # control plane is away): leave the entries the dataplane has.
                continue
            try:
                self.handler.apply_remote(backend, vni)
            except VpcniError as exc:
                LOG.error("converge VNI %d: %s", vni, exc)

    def _backend_of_vni(self, vni: int):
        for att in self.handler.store.for_vni(vni):
            return self.handler.backend_named(att.backend)
        return None

    def _remote_state(self, vni: int) -> RemoteState:
        """What the backend is to hold for `vni`: gobgpd's table, plus, while the
        control plane is away or resynchronising, the entries it had when the control
        plane went (nothing, for an agent that starts without sessions). Called
        by the reconcile thread and by ADDs: a remote state that shrank is checked
        against gobgpd's sessions first, so that an ADD racing the withdrawals of a
        session that just went down does not flush what the hold is to keep."""
        learned = self.speaker.remote_state(vni)
        kept = self._last_remote.get(vni)
        if (kept is not None and self._hold is None
                and len(learned.endpoints) + len(learned.flood)
                < len(kept.endpoints) + len(kept.flood)):
            with self._cp_lock:
                self._check_control_plane()
        kept = self._held.get(vni) if self._hold is not None else None
        if kept is not None:
            # Fresh entries win: a kept one goes when its MAC or its address is in
            # gobgpd's table now (a pod moved, or its address was reused).
            macs = {ep.mac for ep in learned.endpoints}
            ips = {ep.ip for ep in learned.endpoints if ep.ip is not None}
            learned = RemoteState(
                endpoints=learned.endpoints + [ep for ep in kept.endpoints
                                               if ep.mac not in macs and ep.ip not in ips],
                flood=list(dict.fromkeys([*learned.flood, *kept.flood])))
        self._last_remote[vni] = learned
        return learned

    def _routed_state(self, l3vni: int) -> RoutedState:
        """What a VPC router is to hold: gobgpd's routes of the L3VNI, plus, while the
        control plane is away or resynchronising, those it had when it went (fresh
        ones win by address and by prefix and VTEP), as _remote_state does for a VNI."""
        learned = self.speaker.routed_state(l3vni)
        kept = self._held_routed.get(l3vni) if self._hold is not None else None
        if kept is not None:
            ips = {h.ip for h in learned.hosts}
            prefixes = {(p.prefix, p.vtep) for p in learned.prefixes}
            learned = RoutedState(
                hosts=learned.hosts + [h for h in kept.hosts if h.ip not in ips],
                prefixes=learned.prefixes + [p for p in kept.prefixes
                                             if (p.prefix, p.vtep) not in prefixes])
        self._last_routed[l3vni] = learned
        return learned

    def _start_hold(self, why: str, now: float) -> None:
        """Hold remote entries (`why`): a hold that starts, or the control plane lost
        again while resynchronising, keeps what the dataplane has now."""
        if self._hold is None:
            self._hold_since = now
        if self._hold is None or self._sessions_since is not None:
            self._held = dict(self._last_remote)
            self._held_routed = dict(self._last_routed)
        self._hold = why

    def _check_control_plane(self) -> bool:
        """Update the hold on remote entries from gobgpd's sessions (see RESYNC_MIN);
        True when a hold just ended, so a full converge is due."""
        now = time.monotonic()
        disconnects = self.speaker.counters()["disconnects"]
        lost_gobgpd = disconnects != self._seen_disconnects
        self._seen_disconnects = disconnects
        sessions = self.speaker.sessions()
        self._sessions = sessions or {}
        up = sorted(a for a, state in self._sessions.items() if state == "established")
        if lost_gobgpd or sessions is None or not up:
            why = ("gobgpd unreachable or restarted" if lost_gobgpd or sessions is None
                   else f"no BGP session established (route reflectors "
                        f"{', '.join(sorted(self._sessions)) or 'none configured'} unreachable)")
            if self._hold is None or self._sessions_since is not None:
                LOG.log(logging.WARNING if self._last_remote else logging.INFO,
                        "control plane lost (%s): keeping the remote entries learned so far "
                        "until it is back and resynchronised", why)
            self._start_hold(why, now)
            self._sessions_since = None
            return False
        if self._hold is None:
            return False
        if self._sessions_since is None:
            self._sessions_since = now
            self._hold = f"resynchronising (sessions up: {', '.join(up)})"
            LOG.info("control plane back after %.1fs (%s): resynchronising",
                     now - self._hold_since, ", ".join(up))
        settled = (now - self._sessions_since >= RESYNC_MIN
                   and now - self._last_remote_change >= RESYNC_QUIET)
        if settled or now - self._sessions_since >= RESYNC_MAX:
            LOG.info("control plane resynchronised: remote entries follow gobgpd's table "
                     "again (held %.1fs%s)", now - self._hold_since,
                     "" if settled else "; routes still changing, held no longer")
            self._hold, self._sessions_since, self._held = None, None, {}
            self._held_routed = {}
            # What was kept for VNIs no longer on this node goes too.
            local = self.handler.local_vnis()
            for vni in [v for v in self._last_remote if v not in local]:
                del self._last_remote[vni]
            routed = self.handler.local_l3vnis()
            for l3vni in [v for v in self._last_routed if v not in routed]:
                del self._last_routed[l3vni]
            return True
        return False

    def _reconcile_loop(self) -> None:
        interval = self.node.reconcileInterval
        # When each kind of pass last ran (ipam: the pool usage metrics were asked for).
        marks = {"full": 0.0, "local": 0.0, "quick": 0.0, "ipam": 0.0}
        while not self._stop.is_set():
            self._kick.wait(timeout=HOLD_POLL if self._hold else min(interval, 5.0))
            self._kick.clear()
            self._heartbeat = time.monotonic()
            if self._stop.is_set():
                return
            cpu0, wall0 = time.thread_time(), time.monotonic()
            if self._reconcile_once(interval, marks):
                self.metrics.last_full_reconcile.labels("cpu").set(time.thread_time() - cpu0)
                self.metrics.last_full_reconcile.labels("wall").set(time.monotonic() - wall0)

    def _reconcile_once(self, interval: float, marks: dict[str, float]) -> bool:
        """One pass of the reconcile loop (updating `marks`); True when it was a full one."""
        hold_ended = False
        if self.speaker is not None:
            try:
                with self._cp_lock:
                    hold_ended = self._check_control_plane()
            except Exception:
                LOG.exception("checking gobgpd's sessions failed: holding remote entries")
                self._start_hold(self._hold or "checking gobgpd's sessions failed",
                                 time.monotonic())
            self.metrics.holding_stale.set(1 if self._hold else 0)
            established = sum(1 for st in self._sessions.values() if st == "established")
            self.metrics.bgp_sessions.labels("established").set(established)
            self.metrics.bgp_sessions.labels("down").set(len(self._sessions) - established)
        now = time.monotonic()
        if now - marks.get("ipam", 0.0) >= interval:
            marks["ipam"] = now
            self._ipam_kick.set()
        full = hold_ended or now - marks["full"] >= interval
        # Isolation does not wait for BGP: the backends' filters are checked at
        # least every QUICK_CHECK seconds (however often remote changes wake the
        # loop) and converged to the records every reconcileInterval.
        local_full = now - marks["local"] >= interval
        if local_full or now - marks["quick"] >= QUICK_CHECK * 0.9:
            marks["quick"] = now
            self._problems = self._node_problems()
            if local_full:
                marks["local"] = now
            try:
                if self.handler.reconcile(full=local_full):
                    with self._dirty_lock:
                        self._dirty |= self.handler.local_vnis() | \
                            self.handler.local_l3vnis().keys()
            except Exception:
                LOG.exception("reconcile of the backends' local state failed")
                self.metrics.reconciles.labels("error").inc()
        # Never converge the FDB on a partial picture: wait for gobgpd's initial dump.
        if self.speaker is not None and not self.speaker.synced:
            return False
        with self._dirty_lock:
            dirty, self._dirty = self._dirty, set()
        try:
            if full:
                self.handler.store.refresh()
                self._sync_local()
                self._replay_pending()
                dirty = self.handler.local_vnis() | self.handler.local_l3vnis().keys()
                marks["full"] = time.monotonic()
            self._converge(dirty)
            self._update_gauges(routes=True)
            self.metrics.reconciles.labels("ok").inc()
        except Exception:
            LOG.exception("reconcile failed")
            self.metrics.reconciles.labels("error").inc()
        return full

    # ------------------------------------------------------------ IPAM usage

    def _ipam_seen(self, network: str, ipam: dict) -> None:
        """A request of `network` named this vpcni-ipam section (validated): remember it
        (in memory, and in the state dir when it is new or changed) for the metrics,
        which the reconcile loop has computed (never a request)."""
        with self._ipam_lock:
            self._ipam_noted[network] = time.monotonic()
            if self._ipam_pools.get(network) == ipam:
                return
            self._ipam_pools[network] = ipam
            pools = dict(self._ipam_pools)
        self._save_ipam_pools(pools)

    def _ipam_pools_path(self) -> Path:
        return Path(self.node.stateDir) / IPAM_POOLS_FILE

    def _load_ipam_pools(self) -> None:
        path = self._ipam_pools_path()
        try:
            data = json.loads(_read_trusted(path))
        except FileNotFoundError:
            return
        except (OSError, ValueError, _Untrusted) as exc:
            LOG.warning("%s ignored (%s): vpcni-ipam usage metrics come back with the "
                        "networks' next requests", path, exc)
            return
        if isinstance(data, dict):
            with self._ipam_lock:
                self._ipam_pools.update({str(k): v for k, v in data.items()
                                         if isinstance(v, dict)})

    def _save_ipam_pools(self, pools: dict[str, dict]) -> None:
        path = self._ipam_pools_path()
        tmp = path.with_name(f".{IPAM_POOLS_FILE}.{threading.get_ident()}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(pools, f, indent=1, sort_keys=True)
            os.replace(tmp, path)
        except OSError as exc:
            LOG.warning("cannot save %s: %s", path, exc)
            tmp.unlink(missing_ok=True)

    def _ipam_loop(self) -> None:
        while not self._stop.is_set():
            self._ipam_kick.wait()
            self._ipam_kick.clear()
            if self._stop.is_set():
                return
            try:
                self._update_ipam_gauges()
            except Exception:
                LOG.exception("vpcni-ipam usage metrics failed")

    def _update_ipam_gauges(self) -> None:
        """vpcni_ipam_addresses of every vpcni-ipam network this node's attachments use:
        one list of the network's allocations from its store per network."""
        from vpcni.ipam.config import parse_settings
        from vpcni.ipam.plugin import store_for

        used_here = {att.network for att in self.handler.store.all()
                     if att.ipam_type == IPAM_TYPE}
        # A network no attachment uses is forgotten, unless a request named it lately
        # (an ADD under way is recorded after it named its pool).
        recent = time.monotonic() - max(60.0, 2 * self.node.reconcileInterval)
        with self._ipam_lock:
            gone = {n for n in self._ipam_pools
                    if n not in used_here and self._ipam_noted.get(n, 0.0) < recent}
            for network in gone:
                del self._ipam_pools[network]
                self._ipam_noted.pop(network, None)
            pools = {n: raw for n, raw in self._ipam_pools.items() if n in used_here}
        if gone:
            self._save_ipam_pools(pools)
        series: set[tuple[str, str, str]] = set()
        for network, raw in sorted(pools.items()):
            try:
                settings = parse_settings(raw)
                store = settings.store
                if store.type == "sqlite" and not Path(store.path).exists():
                    continue  # never create a store for a metric
                usage = ipam_pool_usage(settings, store_for(settings).list(network))
            except Exception as exc:
                why = getattr(exc, "msg", None) or str(exc) or type(exc).__name__
                if self._ipam_failing.get(network) != why:
                    LOG.warning("vpcni-ipam usage of network %s not known: %s", network, why)
                self._ipam_failing[network] = why
                # The last values stay (a store away is not an empty pool).
                series |= {s for s in self._ipam_series if s[0] == network}
                continue
            self._ipam_failing.pop(network, None)
            for pool, used, free in usage:
                for state, n in (("used", used), ("free", free)):
                    self.metrics.ipam_addresses.labels(network, pool, state).set(n)
                    series.add((network, pool, state))
        for labels in self._ipam_series - series:
            try:
                self.metrics.ipam_addresses.remove(*labels)
            except KeyError:
                pass
        self._ipam_series = series

    # ------------------------------------------------------------ status

    def _probe(self) -> None:
        try:
            probe, probes = backends.choose(self.node)
            why = (f"pinned by node config {self.node.source}" if self.node.backend
                   else "best available probe")
            self.choice = {"backend": probe.name, "why": why, "reason": probe.reason,
                           "probes": [p.model_dump(mode="json") for p in probes]}
        except VpcniError as exc:
            self.choice = {"backend": None, "why": exc.msg,
                           "probes": [p.model_dump(mode="json")
                                      for p in backends.probe_all(self.node)]}

    def _update_vni_gauges(self, vnis: set[int]) -> None:
        """The attachment gauges of these VNIs only (what one ADD or DEL changed)."""
        for vni in vnis:
            n = len(self.handler.store.for_vni(vni))
            if n:
                self.metrics.attachments.labels(str(vni)).set(n)
            else:
                try:
                    self.metrics.attachments.remove(str(vni))
                except KeyError:
                    pass

    def _update_gauges(self, routes: bool = False) -> None:
        """Every attachment gauge; with `routes`, the speaker's too (they read every
        route: the reconcile loop's business, not every ADD's)."""
        counts = self.handler.store.vni_counts()
        self.metrics.attachments.clear()
        for vni, n in counts.items():
            self.metrics.attachments.labels(str(vni)).set(n)
        if routes and self.speaker is not None:
            self.metrics.speaker_up.set(1 if self.speaker.connected else 0)
            announced = {"type2": 0, "type3": 0, "type5": 0}
            for route in self.speaker.local_routes():
                announced[f"type{route.route_type}"] += 1
            for kind, n in announced.items():
                self.metrics.routes_announced.labels(kind).set(n)
            counts = self.speaker.counters()
            for kind in ("type2", "type3", "type5"):
                self.metrics.routes_received.labels(kind).set(counts.get(f"remote_{kind}", 0))

    def _node_problems(self) -> list[str]:
        """What keeps the node from serving now (checked every few seconds by the
        reconcile loop; /readyz and status report it): the chosen backend's own
        verdict (underlay down, VTEP address gone, ...) and descriptors near the limit."""
        problems = []
        name = self.choice.get("backend")
        if name:
            try:
                problems += self.handler.backend_named(name).health()
            except VpcniError as exc:
                problems.append(f"backend {name}: {exc}")
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        try:
            used = len(os.listdir("/proc/self/fd"))
        except OSError:
            used = 0
        if soft and used > 0.9 * soft:
            problems.append(f"{used} of {soft} file descriptors in use")
        return problems

    def ready(self) -> tuple[bool, str]:
        if self._server is None:
            return False, "not serving requests yet"
        if not self.choice.get("backend"):
            return False, f"no usable backend: {self.choice.get('why')}"
        if self._problems:
            return False, "; ".join(self._problems)
        if self.speaker is not None:
            if not self.speaker.connected:
                return False, f"gobgpd not reachable at {self.node.evpn.gobgpdSocket}"
            if not self.speaker.synced:
                return False, "waiting for gobgpd's initial route dump"
        return True, "ready"

    def alive(self) -> tuple[bool, str]:
        age = time.monotonic() - self._heartbeat
        limit = 3 * min(self.node.reconcileInterval, 5.0) + 10
        if age > limit:
            return False, f"reconcile loop silent for {age:.0f}s"
        return True, "alive"

    def _tenancy_status(self) -> dict[str, Any]:
        """Whether tenancy is enforced, and who holds the attachments (by namespace)."""
        per_ns = Counter(att.pod_namespace or "(none)" for att in self.handler.store.all())
        return {"enforced": self.node.tenancy.enforce,
                "bindingsFile": str(self.node.tenancy.bindingsFile),
                "attachmentsPerNamespace": dict(sorted(per_ns.items()))}

    def status(self) -> dict[str, Any]:
        ready, why = self.ready()
        vnis = {str(vni): n for vni, n in sorted(self.handler.store.vni_counts().items())}
        out = {"version": package_version(),
               "node": self.node.source, "socket": str(self.node.agentSocket),
               "uptime": round(time.time() - self.started, 1), "ready": ready,
               "readyReason": why, "backend": self.choice, "attachmentsPerVni": vnis,
               "tenancy": self._tenancy_status(),
               "mtu": self.handler.mtu_status()}
        if self.speaker is not None:
            out["evpn"] = {"connected": self.speaker.connected, "synced": self.speaker.synced,
                           "peers": self.speaker.peers(),
                           "holdingStale": self._hold,
                           "holdingFor": (round(time.monotonic() - self._hold_since, 1)
                                          if self._hold else None),
                           "gobgpd": self.speaker.target, "announcing": len(self.speaker.local_routes()),
                           **self.speaker.counters()}
        return out


class _AgentDispatcher(Dispatcher):
    """The agent's dispatcher: tells `on_ipam(network, section)` which vpcni-ipam pool
    each request's network uses (the metrics of its usage), from the config the
    request was validated with (nothing parsed again)."""

    def __init__(self, node: NodeConfig, handler: Handler, on_ipam):
        super().__init__(node, handler=handler)
        self._on_ipam = on_ipam

    def request(self, command: str, env, raw: dict, stdin: bytes):
        req = super().request(command, env, raw, stdin)
        ipam = raw.get("ipam")
        if isinstance(ipam, dict) and ipam.get("type") == IPAM_TYPE:
            try:
                self._on_ipam(req.config.name, ipam)
            except Exception:
                LOG.exception("noting the vpcni-ipam pool of %s failed", req.config.name)
        return req


def _error_code(out: str):
    """The CNI error code of an error answer (None when it has none)."""
    try:
        return json.loads(out).get("code")
    except (ValueError, AttributeError):
        return None


class _Untrusted(Exception):
    pass


def _untrusted(st: os.stat_result, directory: bool) -> Optional[str]:
    """Why a spool entry with these stats is not to be trusted (None: it is)."""
    kind = stat.S_ISDIR(st.st_mode) if directory else stat.S_ISREG(st.st_mode)
    if not kind:
        return f"is not a {'directory' if directory else 'regular file'}"
    if st.st_uid != os.geteuid():
        return f"is owned by uid {st.st_uid}, not {os.geteuid()} (the agent's)"
    if st.st_mode & 0o022:
        return f"is writable by group or others (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def _read_trusted(path: Path) -> str:
    """The text of spool file `path`, opened without following a symlink and checked
    on the open descriptor (no window to swap the file between check and read)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        why = _untrusted(os.fstat(fd), directory=False)
        if why:
            raise _Untrusted(why)
        with os.fdopen(fd, "r", closefd=False) as f:
            return f.read(MAX_REQUEST + 1)
    finally:
        os.close(fd)


def local_routes(attachments: Iterable[Attachment], rmac: Optional[str] = None) -> set:
    """What this node announces: a MAC/IP route per address of each ready
    attachment (MAC-only without one), and an inclusive-multicast route per VNI.
    In a routed subnet (with this node's router MAC) the MAC/IP routes of its IPv4
    addresses carry the VPC's L3VNI and the router MAC (symmetric IRB), and the
    subnet's prefix is announced as a type-5 route, and so is each of the VPC's static
    routes whose next hop is one of the attachment's addresses."""
    from vpcni.evpn.routes import LocalRoute

    routes = set()
    for att in attachments:
        if att.state != "ready" or not att.mac:
            continue
        routes.add(LocalRoute.inclusive_multicast(att.vni))
        if not att.ips:
            routes.add(LocalRoute.mac_ip(att.vni, att.mac))
        routed = att.subnet if rmac is not None else None
        for ip in att.ips:
            if routed is not None and ip.address.ip in routed.prefix:
                routes.add(LocalRoute.mac_ip(att.vni, att.mac, ip.address.ip,
                                             l3vni=routed.router.l3vni, rmac=rmac))
            else:
                routes.add(LocalRoute.mac_ip(att.vni, att.mac, ip.address.ip))
        if routed is not None:
            routes.add(LocalRoute.ip_prefix(routed.router.l3vni, routed.prefix, rmac))
            # The VPC's static routes whose next hop this attachment is (an appliance).
            mine = {ip.address.ip for ip in att.ips}
            for static in routed.router.routes:
                if static.via in mine:
                    routes.add(LocalRoute.ip_prefix(routed.router.l3vni, static.dst, rmac))
    return routes


HTTP_WORKERS = 2
HTTP_READ_TIMEOUT = 5.0
HTTP_MAX_REQUEST = 16 * 1024
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            431: "Request Header Fields Too Large", 503: "Service Unavailable"}


def _http_response(code: int, body: bytes, ctype: str = "text/plain") -> bytes:
    head = (f"HTTP/1.0 {code} {_REASONS.get(code, '')}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
    return head.encode() + body


def _health_answer(agent: Agent, data: bytes) -> bytes:
    """The answer to one HTTP request (GET only; the request line is all we read)."""
    line = data.split(b"\r\n", 1)[0].split(b"\n", 1)[0].decode("latin-1").split()
    if len(line) != 3 or not line[2].startswith("HTTP/"):
        return _http_response(400, b"bad request\n")
    method, path = line[0], line[1].split("?", 1)[0]
    if method not in ("GET", "HEAD"):
        return _http_response(405, b"GET only\n")
    if path == "/metrics":
        out = _http_response(200, agent.metrics.render(), "text/plain; version=0.0.4")
    elif path in ("/healthz", "/livez"):
        ok, why = agent.alive()
        out = _http_response(200 if ok else 503, why.encode() + b"\n")
    elif path == "/readyz":
        ok, why = agent.ready()
        out = _http_response(200 if ok else 503, why.encode() + b"\n")
    elif path == "/status":
        out = _http_response(200, json.dumps(agent.status(), indent=1).encode(),
                             "application/json")
    else:
        out = _http_response(404, b"not found\n")
    return out.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n" if method == "HEAD" else out


def _health_server(address: str, agent: Agent) -> PooledServer:
    """Health, readiness, metrics and status over HTTP/1.0 on `address` (host:port)."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, int(port)))
        sock.listen(socket.SOMAXCONN)
    except OSError:
        sock.close()
        raise
    return PooledServer(
        sock, "vpcni-health",
        complete=lambda data, eof: b"\r\n\r\n" in data or b"\n\n" in data or (eof and data),
        handle=lambda data: _health_answer(agent, data), workers=HTTP_WORKERS,
        read_timeout=HTTP_READ_TIMEOUT, max_request=HTTP_MAX_REQUEST,
        too_large=lambda: _http_response(431, b"request too large\n"))
