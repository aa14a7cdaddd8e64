"""The attachment store: one JSON record per (network, container ID, ifname).

Records are written atomically (tmp + rename) under
<stateDir>/attachments/<network>/<containerID>/<ifname>.json; names are
validated before they become paths. They are not fsynced: a record describes
kernel state (links, FDB entries, filters) that a crash of the machine takes
with it, while a crash of the process keeps both (the page cache survives
it). A record that power loss left torn is skipped with a warning when
listing; GC still finds its links by their marks.

The agent, the only writer while it runs, keeps every record in memory as
well (`cached=True`): listing the records of a VNI or of the node is then a
dictionary lookup, not a directory walk and a parse per record, and ADD/DEL
cost does not grow with the number of attachments. `refresh()` re-reads the
disk (the agent does so on every full reconcile). Locks are flock(2) files under
<stateDir>/locks: one per attachment (exclusive) and one per VNI (shared
while an ADD builds on the VNI, exclusive while a DEL decides whether the
VNI's last attachment has gone).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import re
import threading
import time
from pathlib import Path
from typing import Iterator, Optional

from pydantic import ValidationError

from .errors import InvalidEnvironment, IOFailure, LockTimeout
from .models import Attachment

LOG = logging.getLogger(__name__)
Key = tuple[str, str, str]
PUT_ATTEMPTS = 10

_NAME = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$")
_IFNAME_BAD = re.compile(r"[/:\s]")


def check_name(value: str, what: str) -> str:
    if not _NAME.match(value or "") or value in (".", ".."):
        raise InvalidEnvironment(f"{what} {value!r} is not a valid name "
                                 "(letters, digits, '_', '.', '-'; first a letter or digit)")
    return value


def check_ifname(value: str, what: str = "CNI_IFNAME") -> str:
    if not value:
        raise InvalidEnvironment(f"{what} is empty")
    if len(value) > 15:
        raise InvalidEnvironment(f"{what} {value!r} is longer than 15 characters")
    if value in (".", "..") or _IFNAME_BAD.search(value):
        raise InvalidEnvironment(f"{what} {value!r} must not be '.' or '..' nor contain "
                                 "'/', ':' or whitespace")
    if not value.isascii() or not value.isprintable():
        raise InvalidEnvironment(f"{what} {value!r} must be printable ASCII (an interface "
                                 "name)")
    return value


class AttachmentStore:
    def __init__(self, state_dir: Path, lock_timeout: float = 30.0, cached: bool = False):
        self.root = Path(state_dir)
        self.records = self.root / "attachments"
        self.locks = self.root / "locks"
        self.lock_timeout = lock_timeout
        self.cached = cached
        self._mem: Optional[dict[Key, Attachment]] = None  # loaded on first use
        self._by_vni: dict[int, set[Key]] = {}
        self._mem_lock = threading.Lock()
        self._gen = 0  # counts changes, so that refresh() can tell it raced one
        self._seen: dict[str, tuple[tuple, Attachment]] = {}  # refresh()'s file identities
        try:
            self.records.mkdir(parents=True, exist_ok=True)
            self.locks.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise self._io_failure("cannot create its directories", exc) from None

    def _io_failure(self, what: str, exc: OSError) -> IOFailure:
        """Code 5 naming the node config's stateDir (what to fix) and the failure."""
        reason = exc.strerror or str(exc)
        where = f" ({exc.filename})" if exc.filename and str(exc.filename) not in what else ""
        return IOFailure(f"stateDir {self.root}: {what}: {reason}{where}")

    # ------------------------------------------------------------ records

    def _path(self, network: str, container_id: str, ifname: str) -> Path:
        check_name(network, "network name")
        check_name(container_id, "CNI_CONTAINERID")
        check_ifname(ifname)
        return self.records / network / container_id / f"{ifname}.json"

    def get(self, network: str, container_id: str, ifname: str) -> Optional[Attachment]:
        """The record of one attachment (a copy: the caller may change it)."""
        path = self._path(network, container_id, ifname)
        if self.cached:
            att = self._memory().get((network, container_id, ifname))
            return att.model_copy(deep=True) if att is not None else None
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise self._io_failure(f"cannot read {path}", exc) from None
        try:
            return Attachment.model_validate_json(data)
        except ValidationError as exc:
            raise IOFailure(f"record {path} is unreadable ({exc.error_count()} errors, first: "
                            f"{exc.errors()[0]['msg']}): remove it once its attachment is "
                            "cleaned up") from None

    def put(self, att: Attachment) -> None:
        path = self._path(*att.key)
        tmp = path.with_suffix(f".tmp{os.getpid()}.{threading.get_ident()}")
        text = att.model_dump_json(indent=1)
        for attempt in range(PUT_ATTEMPTS):
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                with open(tmp, "w") as f:
                    f.write(text)
                os.rename(tmp, path)
                break
            except (FileNotFoundError, FileExistsError) as exc:
                # A concurrent delete removed a directory of ours the moment it was
                # empty (delete prunes empty directories; pathlib's mkdir then says
                # "exists" for one that went again): make it again.
                with contextlib.suppress(OSError):
                    tmp.unlink()
                if attempt == PUT_ATTEMPTS - 1:
                    raise self._io_failure(f"cannot write {path}", exc) from None
            except OSError as exc:
                with contextlib.suppress(OSError):
                    tmp.unlink()
                raise self._io_failure(f"cannot write {path}", exc) from None
        if self.cached:
            self._remember(Attachment.model_validate_json(text))

    def delete(self, network: str, container_id: str, ifname: str) -> None:
        path = self._path(network, container_id, ifname)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        for d in (path.parent, path.parent.parent):
            with contextlib.suppress(OSError):
                d.rmdir()  # only when empty
        if self.cached:
            self._forget((network, container_id, ifname))

    # ------------------------------------------------------------ the agent's copy

    def _memory(self) -> dict[Key, Attachment]:
        if self._mem is None:
            self.refresh()
        return self._mem

    def refresh(self) -> None:
        """Load every record from disk into memory (cached stores only)."""
        if not self.cached:
            return
        for attempt in range(5):
            with self._mem_lock:
                gen = self._gen
            records = {att.key: att for att in self._read_all(None, self._seen)}
            with self._mem_lock:
                # A put or delete during the read: the read may predate it (the
                # very first load has nothing better, and later changes re-apply).
                if self._gen != gen and (self._mem is not None or attempt < 4):
                    continue
                self._mem = records
                self._seen = {path: entry for path, entry in self._seen.items()
                              if entry[1].key in records}
                self._by_vni = {}
                for key, att in records.items():
                    self._by_vni.setdefault(att.vni, set()).add(key)
                return
        LOG.info("attachment records changed during each of 5 re-reads: kept the copy in memory")

    def _remember(self, att: Attachment) -> None:
        mem = self._memory()
        with self._mem_lock:
            self._gen += 1
            old = mem.get(att.key)
            if old is not None and old.vni != att.vni:
                keys = self._by_vni.get(old.vni, set())
                keys.discard(att.key)
                if not keys:
                    self._by_vni.pop(old.vni, None)
            mem[att.key] = att
            self._by_vni.setdefault(att.vni, set()).add(att.key)

    def _forget(self, key: Key) -> None:
        mem = self._memory()
        with self._mem_lock:
            self._gen += 1
            old = mem.pop(key, None)
            if old is not None:
                keys = self._by_vni.get(old.vni, set())
                keys.discard(key)
                if not keys:
                    self._by_vni.pop(old.vni, None)

    def vni_counts(self) -> dict[int, int]:
        """Attachments per VNI."""
        if self.cached:
            self._memory()
            with self._mem_lock:
                return {vni: len(keys) for vni, keys in self._by_vni.items()}
        counts: dict[int, int] = {}
        for att in self.all():
            counts[att.vni] = counts.get(att.vni, 0) + 1
        return counts

    @staticmethod
    def _entries(directory) -> list[os.DirEntry]:
        """The entries of `directory`; none when a concurrent DEL just removed it."""
        try:
            with os.scandir(directory) as it:
                return sorted(it, key=lambda e: e.name)
        except (FileNotFoundError, NotADirectoryError):
            return []

    def all(self, network: Optional[str] = None) -> Iterator[Attachment]:
        """Every record (of `network`), in key order. From a cached store these are
        the stored objects themselves: read them, do not change them."""
        if network:
            check_name(network, "network name")
        if not self.cached:
            yield from self._read_all(network)
            return
        mem = self._memory()
        with self._mem_lock:
            atts = sorted((a for k, a in mem.items() if not network or k[0] == network),
                          key=lambda a: a.key)
        yield from atts

    def _read_all(self, network: Optional[str],
                  seen: Optional[dict[str, tuple[tuple, Attachment]]] = None
                  ) -> Iterator[Attachment]:
        """Every record on disk (of `network`), tolerating records and directories
        that concurrent DELs remove while we list. With `seen` (path -> (file
        identity, record), updated here), a file whose identity (inode, size,
        mtime) is unchanged is not read and parsed again."""
        networks = ([str(self.records / check_name(network, "network name"))] if network
                    else [e.path for e in self._entries(self.records) if e.is_dir()])
        for net_dir in networks:
            for cid in self._entries(net_dir):
                for rec in self._entries(cid.path):
                    if not rec.name.endswith(".json"):
                        continue
                    try:
                        if seen is not None:
                            st = rec.stat()
                            ident = (st.st_ino, st.st_size, st.st_mtime_ns)
                            known = seen.get(rec.path)
                            if known is not None and known[0] == ident:
                                yield known[1]
                                continue
                        with open(rec.path, "rb") as f:
                            data = f.read()
                    except (FileNotFoundError, NotADirectoryError):
                        continue
                    try:
                        att = Attachment.model_validate_json(data)
                        if seen is not None:
                            seen[rec.path] = (ident, att)
                        yield att
                    except ValidationError as exc:
                        LOG.warning("record %s is unreadable (%s): skipped", rec.path,
                                    exc.errors()[0]["msg"])

    def for_vni(self, vni: int) -> list[Attachment]:
        """The records of VNI `vni` (from a cached store: read them, do not change them)."""
        if not self.cached:
            return [a for a in self.all() if a.vni == vni]
        mem = self._memory()
        with self._mem_lock:
            return sorted((mem[k] for k in self._by_vni.get(vni, ())), key=lambda a: a.key)

    # ------------------------------------------------------------ locks

    @contextlib.contextmanager
    def _flock(self, name: str, mode: int) -> Iterator[None]:
        path = self.locks / name
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise self._io_failure("cannot open a lock file", exc) from None
        try:
            deadline = time.monotonic() + self.lock_timeout
            delay = 0.001
            while True:
                try:
                    fcntl.flock(fd, mode | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise LockTimeout(f"lock {path} still held after {self.lock_timeout}s; "
                                          "another operation is in progress") from None
                    time.sleep(delay)
                    delay = min(delay * 2, 0.05)
            yield
        finally:
            os.close(fd)

    def attachment_lock(self, network: str, container_id: str, ifname: str):
        check_name(network, "network name")
        check_name(container_id, "CNI_CONTAINERID")
        check_ifname(ifname)
        # A bounded set of lock files: hashed buckets. Two attachments that share
        # a bucket only serialise; lock files are never unlinked (that races).
        key = hashlib.sha1(f"{network}/{container_id}/{ifname}".encode()).hexdigest()[:2]
        return self._flock(f"att.{key}", fcntl.LOCK_EX)

    def vni_lock(self, vni: int, exclusive: bool):
        return self._flock(f"vni.{int(vni)}", fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)

    def network_lock(self, network: str):
        """Serialises GC of one network against itself."""
        return self._flock(f"net.{check_name(network, 'network name')}", fcntl.LOCK_EX)
