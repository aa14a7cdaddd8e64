"""`vpcnictl agent`: one long-running process per node.

It owns the request handler (backends loaded once), the attachment store, the
EVPN speaker (gobgpd over gRPC), a reconcile loop, health and metrics. CNI
requests arrive from the shim over a unix socket (mode 0600) as one JSON
object {env, stdin} and are answered with {stdout, rc}; {"op": "status"}
returns the agent's status.

Restarting the agent changes nothing in the dataplane: on start it only
converges (local routes to the store, FDB to the received routes once the
initial route dump is complete), so traffic between existing pods goes on.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
from collections import Counter
import socketserver
from concurrent.futures import ThreadPoolExecutor
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterable, Optional

from vpcni.cni.plugin import COMMANDS, Dispatcher
from vpcni.core import backend as backends
from vpcni.core.config import NodeConfig
from vpcni.core.errors import VpcniError
from vpcni.core.handler import Change, Handler
from vpcni.core.models import Attachment, RemoteState

from .metrics import Metrics

LOG = logging.getLogger("vpcni.agent")
MAX_REQUEST = 4 * 1024 * 1024
# How often the agent checks that the backends' node-wide state (filters) is intact.
QUICK_CHECK = 5.0
# Worker threads for the shim's requests (CNI calls run in parallel up to this).
REQUEST_WORKERS = 16
# How long a client may take to send its request.
REQUEST_READ_TIMEOUT = 10.0
GOBGPD_RESTART_GRACE = 20.0


class _RequestServer(socketserver.UnixStreamServer):
    """The shim's requests, served by a fixed pool of worker threads.

    Not a thread per request: pyroute2 keeps per-thread state (an event loop
    and its sockets) for every thread that uses a shared IPRoute, so a new
    thread per request leaked descriptors and memory on every ADD and DEL.
    A fixed pool bounds that state by the pool's size.
    """

    allow_reuse_address = True
    # Runtimes start many pods at once; with socketserver's default backlog of 5 a
    # burst of callers got EAGAIN from connect (the Go shim does not wait for room).
    request_queue_size = socket.SOMAXCONN

    def __init__(self, path: str, agent: "Agent"):
        self.agent = agent
        self._pool = ThreadPoolExecutor(max_workers=REQUEST_WORKERS,
                                        thread_name_prefix="vpcni-request")
        super().__init__(path, _RequestHandler, bind_and_activate=False)
        old = os.umask(0o177)  # the socket is born 0600: no window with wider access
        try:
            self.server_bind()
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        self.server_activate()


    def process_request(self, request, client_address) -> None:
        self._pool.submit(self._serve_one, request, client_address)

    def _serve_one(self, request, client_address) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)

    def server_close(self) -> None:
        super().server_close()
        self._pool.shutdown(wait=False, cancel_futures=True)


class _RequestHandler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        # A client that connects and sends nothing cannot hold a worker for long.
        self.request.settimeout(REQUEST_READ_TIMEOUT)
        data = b""
        while len(data) <= MAX_REQUEST:
            chunk = self.request.recv(65536)
            if not chunk:
                break
            data += chunk
        reply = self.server.agent.serve_request(data)
        self.request.sendall(json.dumps(reply).encode())


class Agent:
    def __init__(self, node: NodeConfig):
        self.node = node
        self.metrics = Metrics()
        # The agent is the store's only writer while it runs (the shim never runs
        # the plugin in agent mode): the records are kept in memory as well.
        self.handler = Handler(node, cached_store=True)
        self.dispatcher = Dispatcher(node, handler=self.handler)
        self.speaker = None
        self.started = time.time()
        self._stop = threading.Event()
        self._kick = threading.Event()
        self._dirty: set[int] = set()
        self._dirty_lock = threading.Lock()
        self._sync_lock = threading.Lock()
        self._heartbeat = time.monotonic()
        self._server: Optional[_RequestServer] = None
        self._http: Optional[ThreadingHTTPServer] = None
        self._threads: list[threading.Thread] = []
        self.choice: dict[str, Any] = {}
        # After gobgpd restarts, its table is empty until its BGP sessions are
        # back (5-10 s): keep what was learned before, like BGP graceful
        # restart's stale paths, instead of wiping the FDB meanwhile.
        self._grace_until = 0.0
        self._seen_disconnects = 0
        self._last_remote: dict[int, RemoteState] = {}
        self._route_refs: Optional[Counter] = None  # route -> attachments wanting it
        if node.evpn is not None:
            from vpcni.evpn.speaker import EvpnSpeaker

            self.speaker = EvpnSpeaker(f"unix://{node.evpn.gobgpdSocket}", vtep=self._vtep(),
                                       asn=node.evpn.asn, on_change=self._remote_changed)
            self.handler.remote_source = self._remote_state
        self.handler.listeners.append(self._local_changed)

    def _vtep(self):
        if self.node.vtepAddress is not None:
            return self.node.vtepAddress
        probe, _ = backends.choose(self.node)
        return probe.facts.get("vtep")

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._probe()
        self.handler.store.refresh()
        sock = Path(self.node.agentSocket)
        sock.parent.mkdir(parents=True, exist_ok=True)
        if sock.exists() or sock.is_symlink():
            if self._socket_alive(sock):
                raise VpcniError(f"another agent already serves {sock}")
            sock.unlink()
        # DELs spooled while no agent listened go first: a new request for the
        # same attachment must find them done.
        self._replay_pending()
        # Bound before anything is served: a taken health port fails the start
        # cleanly instead of killing an agent that already answered requests.
        if self.node.healthAddress:
            self._http = _health_server(self.node.healthAddress, self)
        self._server = _RequestServer(str(sock), self)
        if self.speaker is not None:
            self.speaker.start()
        self._spawn("requests", self._server.serve_forever)
        self._spawn("reconcile", self._reconcile_loop)
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
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            Path(self.node.agentSocket).unlink(missing_ok=True)
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
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

    def serve_request(self, data: bytes) -> dict:
        if len(data) > MAX_REQUEST:
            return {"stdout": json.dumps({
                "cniVersion": "1.1.0", "code": 7,
                "msg": f"request larger than {MAX_REQUEST // (1024 * 1024)} MiB: a network "
                       "config is never that large"}), "rc": 1}
        try:
            req = json.loads(data)
            if req.get("op") == "status":
                return {"stdout": json.dumps(self.status()), "rc": 0}
            env = {str(k): str(v) for k, v in req["env"].items()}
            stdin = req.get("stdin", "").encode("utf-8", "surrogateescape")
        except (ValueError, KeyError, AttributeError, TypeError) as exc:
            return {"stdout": json.dumps({"cniVersion": "1.1.0", "code": 6,
                                          "msg": f"malformed request from the shim: {exc}"}),
                    "rc": 1}
        # Metric labels from known commands only: bogus ones must not grow /metrics.
        command = env.get("CNI_COMMAND", "")
        command = command if command in COMMANDS else "invalid"
        t0 = time.perf_counter()
        out, rc = self.dispatcher.run(env, stdin)
        self.metrics.latency.labels(command).observe(time.perf_counter() - t0)
        self.metrics.requests.labels(command, "ok" if rc == 0 else "error").inc()
        return {"stdout": out, "rc": rc}

    def _replay_pending(self) -> None:
        """DELs the shim spooled while no agent listened."""
        spool = Path(self.node.stateDir) / "pending-del"
        if not spool.is_dir():
            return
        for path in sorted(spool.glob("*.json")):
            try:
                req = json.loads(path.read_text())
                out, rc = self.dispatcher.run(req["env"], req["stdin"].encode("utf-8",
                                                                              "surrogateescape"))
            except (OSError, ValueError, KeyError) as exc:
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
        for route in (r for att in change.removed for r in local_routes([att])):
            refs[route] -= 1
            if refs[route] <= 0:
                del refs[route]
                gone.add(route)
        for route in (r for att in change.added for r in local_routes([att])):
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
            refs.update(local_routes([att]))
        self._route_refs = refs
        try:
            self.speaker.set_local(set(refs))
        except Exception:
            LOG.exception("could not sync local routes to gobgpd (retried by reconcile)")

    def _converge(self, vnis: set[int]) -> None:
        local = self.handler.local_vnis()
        for vni in sorted(vnis & local):
            backend = self._backend_of_vni(vni)
            if backend is None:
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
        self._note_gobgpd_restart()
        learned = self.speaker.remote_state(vni)
        kept = self._last_remote.get(vni)
        if kept is not None and time.monotonic() < self._grace_until:
            fresh = {ep.mac for ep in learned.endpoints}
            learned = RemoteState(
                endpoints=learned.endpoints + [ep for ep in kept.endpoints if ep.mac not in fresh],
                flood=list(dict.fromkeys([*learned.flood, *kept.flood])))
        self._last_remote[vni] = learned
        return learned

    def _note_gobgpd_restart(self) -> None:
        """Start the grace period when the speaker has lost gobgpd since last seen."""
        disconnects = self.speaker.counters()["disconnects"]
        if disconnects != self._seen_disconnects:
            self._seen_disconnects = disconnects
            self._grace_until = time.monotonic() + GOBGPD_RESTART_GRACE
            LOG.warning("lost gobgpd: keeping learned remote entries for %.0fs while its "
                        "sessions come back", GOBGPD_RESTART_GRACE)

    def _grace_ended(self) -> bool:
        if self._grace_until and time.monotonic() >= self._grace_until:
            self._grace_until = 0.0
            return True
        return False

    def _reconcile_loop(self) -> None:
        interval = self.node.reconcileInterval
        marks = {"full": 0.0, "local": 0.0, "quick": 0.0}  # when each kind of pass last ran
        while not self._stop.is_set():
            self._kick.wait(timeout=min(interval, 5.0))
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
        grace_ended = False
        if self.speaker is not None:
            self._note_gobgpd_restart()
            grace_ended = self._grace_ended()
        now = time.monotonic()
        full = grace_ended or now - marks["full"] >= interval
        # Isolation does not wait for BGP: the backends' filters are checked at
        # least every QUICK_CHECK seconds (however often remote changes wake the
        # loop) and converged to the records every reconcileInterval.
        local_full = now - marks["local"] >= interval
        if local_full or now - marks["quick"] >= QUICK_CHECK * 0.9:
            marks["quick"] = now
            if local_full:
                marks["local"] = now
            try:
                if self.handler.reconcile(full=local_full):
                    with self._dirty_lock:
                        self._dirty |= self.handler.local_vnis()
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
                dirty = self.handler.local_vnis()
                marks["full"] = time.monotonic()
            self._converge(dirty)
            self._update_gauges(routes=True)
            self.metrics.reconciles.labels("ok").inc()
        except Exception:
            LOG.exception("reconcile failed")
            self.metrics.reconciles.labels("error").inc()
        return full

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
            announced = {"type2": 0, "type3": 0}
            for route in self.speaker.local_routes():
                announced[f"type{route.route_type}"] += 1
            for kind, n in announced.items():
                self.metrics.routes_announced.labels(kind).set(n)
            counts = self.speaker.counters()
            for kind in ("type2", "type3"):
                self.metrics.routes_received.labels(kind).set(counts.get(f"remote_{kind}", 0))

    def ready(self) -> tuple[bool, str]:
        if self._server is None:
            return False, "not serving requests yet"
        if not self.choice.get("backend"):
            return False, f"no usable backend: {self.choice.get('why')}"
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

    def status(self) -> dict[str, Any]:
        ready, why = self.ready()
        vnis = {str(vni): n for vni, n in sorted(self.handler.store.vni_counts().items())}
        out = {"node": self.node.source, "socket": str(self.node.agentSocket),
               "uptime": round(time.time() - self.started, 1), "ready": ready,
               "readyReason": why, "backend": self.choice, "attachmentsPerVni": vnis}
        if self.speaker is not None:
            out["evpn"] = {"connected": self.speaker.connected, "synced": self.speaker.synced,
                           "peers": self.speaker.peers(),
                           "gobgpd": self.speaker.target, "announcing": len(self.speaker.local_routes()),
                           **self.speaker.counters()}
        return out


def local_routes(attachments: Iterable[Attachment]) -> set:
    """What this node announces: a MAC/IP route per address of each ready
    attachment (MAC-only without one), and an inclusive-multicast route per VNI."""
    from vpcni.evpn.routes import LocalRoute

    routes = set()
    for att in attachments:
        if att.state != "ready" or not att.mac:
            continue
        routes.add(LocalRoute.inclusive_multicast(att.vni))
        if not att.ips:
            routes.add(LocalRoute.mac_ip(att.vni, att.mac))
        for ip in att.ips:
            routes.add(LocalRoute.mac_ip(att.vni, att.mac, ip.address.ip))
    return routes


def _health_server(address: str, agent: Agent) -> ThreadingHTTPServer:
    host, _, port = address.rpartition(":")

    class Health(BaseHTTPRequestHandler):
        def _send(self, code: int, body: bytes, ctype: str = "text/plain") -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            if self.path == "/metrics":
                self._send(200, agent.metrics.render(), "text/plain; version=0.0.4")
            elif self.path in ("/healthz", "/livez"):
                ok, why = agent.alive()
                self._send(200 if ok else 503, why.encode() + b"\n")
            elif self.path == "/readyz":
                ok, why = agent.ready()
                self._send(200 if ok else 503, why.encode() + b"\n")
            elif self.path == "/status":
                self._send(200, json.dumps(agent.status(), indent=1).encode(),
                           "application/json")
            else:
                self._send(404, b"not found\n")

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer((host.strip("[]") or "127.0.0.1", int(port)), Health)
    server.daemon_threads = True
    return server
