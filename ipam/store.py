"""Where vpcni-ipam keeps its reservations: one small interface, two stores.

- SqliteStore: one file (WAL), one transaction per allocation; the UNIQUE
  constraints make a double reservation impossible even across processes.
- EtcdStore: etcd v3 through its JSON gateway (etcd3gw); every reservation
  is one compare-and-swap transaction that creates the address key and the
  owner key only if neither exists, so two nodes never get the same address.
  Over TLS with https:// endpoints (caFile, and certFile/keyFile when etcd
  asks for a client certificate).

An unreachable or locked store is TryAgainLater (CNI code 11) naming it; a
store that cannot be used as configured (a file of its config unreadable, a
TLS handshake refused) is code 5 naming what to fix.
"""

from __future__ import annotations

import abc
import base64
import contextlib
import json
import logging
import re
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

from vpcni.core.errors import IpamError, TryAgainLater

from .config import TLS_FIELDS, EtcdStoreConfig, SqliteStoreConfig

LOG = logging.getLogger(__name__)
# Picks a free address given those in use in the network; None when there is none.
Chooser = Callable[[set[str]], Optional[str]]


@dataclass(frozen=True)
class Owner:
    """Who holds an address: one attachment, plus what GC and operators need to know."""

    network: str
    container_id: str
    ifname: str
    pod: str = ""
    node: str = ""


@dataclass
class Allocation:
    network: str
    ip: str
    rangeset: int
    container_id: str
    ifname: str
    pod: str = ""
    node: str = ""
    created: float = 0.0


class Store(abc.ABC):
    """What the allocator needs from a store; every method is atomic on its own."""

    # Concurrent claimants on other nodes: the allocator picks at random to collide less.
    distributed = False
    name = "store"

    @abc.abstractmethod
    def claim(self, owner: Owner, rangeset: int, choose: Chooser) -> Optional[tuple[str, bool]]:
        """(address, new) of the owner in `rangeset`: the one it holds (new False), else
        one from `choose` (new True); None when `choose` finds none free."""

    @abc.abstractmethod
    def held(self, network: str, container_id: str, ifname: str) -> list[Allocation]:
        ...

    @abc.abstractmethod
    def release(self, network: str, container_id: str, ifname: str) -> list[Allocation]:
        """Free what one attachment holds; what was freed (nothing is fine)."""

    @abc.abstractmethod
    def release_ip(self, network: str, ip: str) -> Optional[Allocation]:
        ...

    @abc.abstractmethod
    def list(self, network: Optional[str] = None) -> list[Allocation]:
        ...

    @abc.abstractmethod
    def ping(self) -> None:
        """Raise TryAgainLater if the store cannot serve now (STATUS)."""

    def close(self) -> None:
        pass


# ---------------------------------------------------------------- SQLite

_SCHEMA = """
CREATE TABLE IF NOT EXISTS allocations (
    network TEXT NOT NULL,
    ip TEXT NOT NULL,
    rangeset INTEGER NOT NULL,
    container_id TEXT NOT NULL,
    ifname TEXT NOT NULL,
    pod TEXT NOT NULL DEFAULT '',
    node TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL,
    PRIMARY KEY (network, ip),
    UNIQUE (network, container_id, ifname, rangeset)
)
"""
_COLUMNS = "network, ip, rangeset, container_id, ifname, pod, node, created"


class SqliteStore(Store):
    name = "sqlite"

    def __init__(self, cfg: SqliteStoreConfig):
        self.path = Path(cfg.path)
        self.timeout = cfg.timeout
        self.name = f"sqlite {self.path}"
        # Threads of one process (the agent) queue here, in order; SQLite's
        # own busy wait between processes backs off up to 100 ms a try.
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._ensure_wal()
            with self._tx() as db:
                db.execute(_SCHEMA)
        except (sqlite3.Error, OSError) as exc:
            reason = getattr(exc, "strerror", None) or exc
            if isinstance(exc, FileExistsError):  # mkdir's word for "not a directory"
                reason = f"{exc.filename} is not a directory"
            elif getattr(exc, "filename", None):
                reason = f"{exc.filename}: {reason}"
            raise IpamError(f"ipam store {self.name}: cannot open the file of "
                            f"'ipam.store.path': {reason}", code=5) from None

    def _ensure_wal(self) -> None:
        """WAL (persistent in the file: readers never wait for the writer).

        Switching needs the file to itself and SQLite does not wait for that
        (no busy handler): when several processes open a new file at once,
        the losers retry until one switch is seen.
        """
        deadline = time.monotonic() + self.timeout
        while True:
            db = sqlite3.connect(self.path, timeout=self.timeout)
            try:
                if db.execute("PRAGMA journal_mode").fetchone()[0] == "wal" or \
                        db.execute("PRAGMA journal_mode=WAL").fetchone()[0] == "wal":
                    return
            except sqlite3.OperationalError:
                if time.monotonic() > deadline:
                    raise
            finally:
                db.close()
            time.sleep(0.01)

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE: writers queue up front, no upgrade deadlock)."""
        if not self._lock.acquire(timeout=self.timeout):
            raise TryAgainLater(f"ipam store {self.name}: busy for {self.timeout:.0f}s in this "
                                "process")
        try:
            db = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None)
        except sqlite3.Error as exc:
            self._lock.release()
            raise IpamError(f"ipam store {self.name}: cannot open: {exc}", code=5) from None
        try:
            # synchronous stays FULL (the default): a committed reservation
            # survives a power loss, else its address could be handed out twice.
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        except sqlite3.OperationalError as exc:
            if "locked" in str(exc) or "busy" in str(exc):
                raise TryAgainLater(f"ipam store {self.name} stayed locked for "
                                    f"{self.timeout:.0f}s: {exc}") from None
            raise IpamError(f"ipam store {self.name}: {exc}", code=5) from None
        finally:
            db.close()
            self._lock.release()

    @staticmethod
    def _rows(cur) -> list[Allocation]:
        return [Allocation(*row) for row in cur.fetchall()]

    def claim(self, owner: Owner, rangeset: int, choose: Chooser) -> Optional[tuple[str, bool]]:
        with self._tx() as db:
            row = db.execute("SELECT ip FROM allocations WHERE network=? AND container_id=? "
                             "AND ifname=? AND rangeset=?",
                             (owner.network, owner.container_id, owner.ifname,
                              rangeset)).fetchone()
            if row:
                return row[0], False
            used = {r[0] for r in db.execute("SELECT ip FROM allocations WHERE network=?",
                                             (owner.network,))}
            ip = choose(used)
            if ip is None:
                return None
            db.execute(f"INSERT INTO allocations ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?)",
                       (owner.network, ip, rangeset, owner.container_id, owner.ifname,
                        owner.pod, owner.node, time.time()))
            return ip, True

    def held(self, network: str, container_id: str, ifname: str) -> list[Allocation]:
        with self._tx() as db:
            return self._rows(db.execute(
                f"SELECT {_COLUMNS} FROM allocations WHERE network=? AND container_id=? "
                "AND ifname=? ORDER BY rangeset", (network, container_id, ifname)))

    def release(self, network: str, container_id: str, ifname: str) -> list[Allocation]:
        with self._tx() as db:
            rows = self._rows(db.execute(
                f"DELETE FROM allocations WHERE network=? AND container_id=? AND ifname=? "
                f"RETURNING {_COLUMNS}", (network, container_id, ifname)))
        return rows

    def release_ip(self, network: str, ip: str) -> Optional[Allocation]:
        with self._tx() as db:
            rows = self._rows(db.execute(
                f"DELETE FROM allocations WHERE network=? AND ip=? RETURNING {_COLUMNS}",
                (network, ip)))
        return rows[0] if rows else None

    def list(self, network: Optional[str] = None) -> list[Allocation]:
        with self._tx() as db:
            if network is None:
                cur = db.execute(f"SELECT {_COLUMNS} FROM allocations ORDER BY network, created")
            else:
                cur = db.execute(f"SELECT {_COLUMNS} FROM allocations WHERE network=? "
                                 "ORDER BY created", (network,))
            return self._rows(cur)

    def ping(self) -> None:
        with self._tx() as db:
            db.execute("SELECT 1")


# ---------------------------------------------------------------- etcd

CLAIM_ATTEMPTS = 64


def _b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


def _unb64(s: str) -> str:
    return base64.b64decode(s).decode()


def _reason(exc: Exception) -> str:
    """The gist of a connection error ('Connection refused'), not urllib3's whole chain."""
    text = getattr(exc, "detail_text", None) or str(exc) or type(exc).__name__
    found = re.search(r"\[Errno \d+\] ([^'\")]+)", text)
    if found:
        return found.group(1)
    return "timed out" if "timeout" in text.lower() else text[:200]


# TLS failures in the text of a connection error (etcd3gw keeps only the text):
# OpenSSL's "[SSL: REASON] text", else an ssl exception's "SSL...Error(n, 'text')".
_SSL_REASON = re.compile(r"\[SSL: ?[A-Z0-9_]*\] ?([^'\"(]+)")
_SSL_ERROR = re.compile(r"\bSSL\w*Error\((?:\d+, )?'([^'(]+)")


def _tls_failure(exc: Exception) -> Optional[str]:
    """What a TLS handshake failure in `exc` says, or None when it is not one."""
    text = getattr(exc, "detail_text", None) or str(exc)
    if "SSLError(" not in text and "[SSL" not in text:
        return None
    found = _SSL_REASON.search(text) or _SSL_ERROR.search(text)
    reason = found.group(1).strip() if found else "TLS error"
    if "EOF" in reason:
        # What a TLS 1.3 client may see of a server that refused its certificate.
        reason += " (etcd ended the handshake)"
    return reason


def _check_pem(cfg: EtcdStoreConfig, key: str) -> None:
    """The file of `ipam.store.<key>` exists, can be read and holds PEM: else code 5
    naming the key (the TLS layer would only say a file was bad, later)."""
    path = getattr(cfg, key)
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 20)
    except OSError as exc:
        raise IpamError(f"ipam store etcd: cannot read the file of 'ipam.store.{key}' "
                        f"({path}): {exc.strerror or exc}", code=5) from None
    if b"-----BEGIN " not in head:
        raise IpamError(f"ipam store etcd: the file of 'ipam.store.{key}' ({path}) is not "
                        "PEM (no '-----BEGIN' line)", code=5)


def _prefix_end(prefix: str) -> str:
    """The range end that selects every key starting with `prefix` (etcd's convention)."""
    b = prefix.encode()
    return (b[:-1] + bytes([b[-1] + 1])).decode()


class EtcdStore(Store):
    """Keys under <prefix>/<network>/:
    ips/<ip> = the Allocation as JSON; owners/<container>/<ifname>/<rangeset> = <ip>.
    Both are created and deleted together, in one transaction."""

    distributed = True

    def __init__(self, cfg: EtcdStoreConfig):
        import etcd3gw
        import requests

        self.prefix = cfg.prefix.rstrip("/")
        self.endpoints = cfg.endpoints
        self.name = f"etcd {', '.join(self.endpoints)}"
        for key in TLS_FIELDS:
            if getattr(cfg, key) is not None:
                _check_pem(cfg, key)
        self._tls_keys = [k for k in TLS_FIELDS if getattr(cfg, k) is not None]
        self._clients = []
        for url in cfg.endpoints:
            protocol, _, hostport = url.partition("://")
            host, _, port = hostport.rpartition(":")
            session = requests.Session()
            session.trust_env = False  # never a proxy (nor a CA bundle) from the environment
            # etcd3gw applies its ca_cert/cert_* only to a session of its own making.
            if cfg.caFile is not None:
                session.verify = cfg.caFile
            if cfg.certFile is not None:
                session.cert = (cfg.certFile, cfg.keyFile)
            self._clients.append((url, etcd3gw.Etcd3Client(
                host=host.strip("[]"), port=int(port or 2379), protocol=protocol,
                timeout=cfg.timeout, api_path="/v3/", session=session)))
        self._current = 0

    def _tls_hint(self) -> str:
        """What the TLS side of the config gave: what to check, or what was missing."""
        hints = []
        if self._tls_keys:
            hints.append("check " + ", ".join(f"'ipam.store.{k}'" for k in self._tls_keys))
        if "caFile" not in self._tls_keys:
            hints.append("no 'ipam.store.caFile': only the CA bundle of Python's requests "
                         "(certifi) is trusted")
        if "certFile" not in self._tls_keys:
            hints.append("no 'ipam.store.certFile'/'keyFile': no client certificate was "
                         "offered")
        return "; ".join(hints)

    # ------------------------------------------------------------ transport

    def _post(self, path: str, body: dict) -> dict:
        """One gateway call, to the first endpoint that answers."""
        from etcd3gw import exceptions

        problems, tls = [], []
        n = len(self._clients)
        for i in range(n):
            url, client = self._clients[(self._current + i) % n]
            try:
                out = client.post(client.get_url(path), data=json.dumps(body))
            except (exceptions.ConnectionFailedError, exceptions.ConnectionTimeoutError) as exc:
                failure = _tls_failure(exc)
                if failure is not None:
                    tls.append(f"{url}: {failure}")
                else:
                    problems.append(f"{url}: {_reason(exc)}")
                continue
            except exceptions.Etcd3Exception as exc:
                raise IpamError(f"ipam store etcd {url}: {path} failed: {exc}") from None
            except OSError as exc:
                # requests checks the TLS files on each request (one gone since the
                # store was opened), before any connection.
                raise IpamError(f"ipam store etcd {url}: {exc} ({self._tls_hint()})",
                                code=5) from None
            self._current = (self._current + i) % n
            return out
        if tls:
            # A refused certificate is not a store that is away: retrying will not help.
            raise IpamError(f"ipam store etcd: TLS handshake failed ({'; '.join(tls + problems)}): "
                            f"{self._tls_hint()}", code=5)
        raise TryAgainLater(f"ipam store etcd unreachable ({'; '.join(problems)}); "
                            "retry when etcd is back")

    def _key(self, network: str, *parts: str) -> str:
        return "/".join((self.prefix, network, *parts))

    def _range(self, prefix: str, keys_only: bool = False) -> list[dict]:
        out = self._post("/kv/range", {"key": _b64(prefix), "range_end": _b64(_prefix_end(prefix)),
                                       "keys_only": keys_only})
        return out.get("kvs", [])

    def _get(self, key: str) -> list[dict]:
        return self._post("/kv/range", {"key": _b64(key)}).get("kvs", [])

    def _txn(self, compare: list, success: list, failure: list = ()) -> dict:
        return self._post("/kv/txn", {"compare": compare, "success": success,
                                      "failure": list(failure)})

    @staticmethod
    def _absent(key: str) -> dict:
        return {"key": _b64(key), "target": "CREATE", "result": "EQUAL", "create_revision": 0}

    @staticmethod
    def _unchanged(kv: dict) -> dict:
        return {"key": kv["key"], "target": "MOD", "result": "EQUAL",
                "mod_revision": kv["mod_revision"]}

    # ------------------------------------------------------------ Store

    def claim(self, owner: Owner, rangeset: int, choose: Chooser) -> Optional[tuple[str, bool]]:
        owner_key = self._key(owner.network, "owners", owner.container_id, owner.ifname,
                              str(rangeset))
        for _ in range(CLAIM_ATTEMPTS):
            kvs = self._range(self._key(owner.network, "ips") + "/", keys_only=True)
            used = {_unb64(kv["key"]).rsplit("/", 1)[1] for kv in kvs}
            ip = choose(used)
            if ip is None:
                # Full: but maybe because we already hold one (a repeated ADD).
                held = self._get(owner_key)
                return (_unb64(held[0]["value"]), False) if held else None
            alloc = Allocation(owner.network, ip, rangeset, owner.container_id, owner.ifname,
                               owner.pod, owner.node, time.time())
            ip_key = self._key(owner.network, "ips", ip)
            out = self._txn(
                [self._absent(ip_key), self._absent(owner_key)],
                [{"request_put": {"key": _b64(ip_key), "value": _b64(json.dumps(asdict(alloc)))}},
                 {"request_put": {"key": _b64(owner_key), "value": _b64(ip)}}],
                [{"request_range": {"key": _b64(owner_key)}}])
            if out.get("succeeded"):
                return ip, True
            # Lost the race for `ip`, or the owner already holds an address.
            got = out.get("responses", [{}])[0].get("response_range", {}).get("kvs", [])
            if got:
                return _unb64(got[0]["value"]), False
        raise TryAgainLater(f"ipam store {self.name}: network {owner.network!r}: no address "
                            f"claimed after {CLAIM_ATTEMPTS} contended attempts")

    def _allocations(self, kvs: list[dict]) -> list[Allocation]:
        out = []
        for kv in kvs:
            try:
                out.append(Allocation(**json.loads(_unb64(kv["value"]))))
            except (ValueError, TypeError, KeyError):
                LOG.warning("ipam store %s: unreadable key %s", self.name, _unb64(kv["key"]))
        return out

    def held(self, network: str, container_id: str, ifname: str) -> list[Allocation]:
        owned = self._range(self._key(network, "owners", container_id, ifname) + "/")
        out = []
        for kv in owned:
            got = self._get(self._key(network, "ips", _unb64(kv["value"])))
            out += [a for a in self._allocations(got)
                    if (a.container_id, a.ifname) == (container_id, ifname)]
        return sorted(out, key=lambda a: a.rangeset)

    def _delete_pair(self, ip_kv: dict, alloc: Allocation) -> bool:
        owner_key = self._key(alloc.network, "owners", alloc.container_id, alloc.ifname,
                              str(alloc.rangeset))
        out = self._txn([self._unchanged(ip_kv)],
                        [{"request_delete_range": {"key": ip_kv["key"]}},
                         {"request_delete_range": {"key": _b64(owner_key)}}])
        return bool(out.get("succeeded"))

    def release(self, network: str, container_id: str, ifname: str) -> list[Allocation]:
        freed = []
        for kv in self._range(self._key(network, "owners", container_id, ifname) + "/"):
            ip = _unb64(kv["value"])
            pair = [(ip_kv, a) for ip_kv in self._get(self._key(network, "ips", ip))
                    for a in self._allocations([ip_kv])
                    if (a.container_id, a.ifname) == (container_id, ifname)]
            if pair and self._delete_pair(*pair[0]):
                freed.append(pair[0][1])
            elif not pair:
                # An owner key without its address key (should not happen): drop it.
                self._txn([self._unchanged(kv)], [{"request_delete_range": {"key": kv["key"]}}])
        return freed

    def release_ip(self, network: str, ip: str) -> Optional[Allocation]:
        for ip_kv in self._get(self._key(network, "ips", ip)):
            for alloc in self._allocations([ip_kv]):
                if self._delete_pair(ip_kv, alloc):
                    return alloc
        return None

    def list(self, network: Optional[str] = None) -> list[Allocation]:
        if network is not None:
            kvs = self._range(self._key(network, "ips") + "/")
        else:
            # <prefix>/<network>/ips/<address>, not the owners/ keys beside them.
            kvs = [kv for kv in self._range(self.prefix + "/")
                   if _unb64(kv["key"])[len(self.prefix):].split("/")[2:3] == ["ips"]]
        return sorted(self._allocations(kvs), key=lambda a: (a.network, a.created))

    def ping(self) -> None:
        self._post("/maintenance/status", {})


def open_store(cfg) -> Store:
    if isinstance(cfg, EtcdStoreConfig):
        return EtcdStore(cfg)
    return SqliteStore(cfg)
