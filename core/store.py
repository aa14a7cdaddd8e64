"""The attachment store: one JSON record per (network, container ID, ifname).

Records are written atomically (tmp + fsync + rename) under
<stateDir>/attachments/<network>/<containerID>/<ifname>.json; names are
validated before they become paths. Locks are flock(2) files under
<stateDir>/locks: one per attachment (exclusive) and one per VNI (shared
while an ADD builds on the VNI, exclusive while a DEL decides whether the
VNI's last attachment has gone).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import time
from pathlib import Path
from typing import Iterator, Optional

from .errors import InvalidEnvironment, IOFailure, LockTimeout
from .models import Attachment

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
    def __init__(self, state_dir: Path, lock_timeout: float = 30.0):
        self.root = Path(state_dir)
        self.records = self.root / "attachments"
        self.locks = self.root / "locks"
        self.lock_timeout = lock_timeout
        try:
            self.records.mkdir(parents=True, exist_ok=True)
            self.locks.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise IOFailure(f"state dir {self.root}: {exc}") from None

    # ------------------------------------------------------------ records

    def _path(self, network: str, container_id: str, ifname: str) -> Path:
        check_name(network, "network name")
        check_name(container_id, "CNI_CONTAINERID")
        check_ifname(ifname)
        return self.records / network / container_id / f"{ifname}.json"

    def get(self, network: str, container_id: str, ifname: str) -> Optional[Attachment]:
        path = self._path(network, container_id, ifname)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise IOFailure(f"cannot read {path}: {exc}") from None
        return Attachment.model_validate_json(data)

    def put(self, att: Attachment) -> None:
        path = self._path(*att.key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        try:
            with open(tmp, "w") as f:
                f.write(att.model_dump_json(indent=1))
                f.flush()
                os.fsync(f.fileno())
            os.rename(tmp, path)
            dfd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise IOFailure(f"cannot write {path}: {exc}") from None

    def delete(self, network: str, container_id: str, ifname: str) -> None:
        path = self._path(network, container_id, ifname)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        for d in (path.parent, path.parent.parent):
            with contextlib.suppress(OSError):
                d.rmdir()  # only when empty

    @staticmethod
    def _entries(directory: Path) -> list[os.DirEntry]:
        """The entries of `directory`; none when a concurrent DEL just removed it."""
        try:
            with os.scandir(directory) as it:
                return sorted(it, key=lambda e: e.name)
        except (FileNotFoundError, NotADirectoryError):
            return []

    def all(self, network: Optional[str] = None) -> Iterator[Attachment]:
        """Every record (of `network`), tolerating records and directories that
        concurrent DELs remove while we list."""
        networks = ([self.records / check_name(network, "network name")] if network
                    else [Path(e.path) for e in self._entries(self.records) if e.is_dir()])
        for net_dir in networks:
            for cid in self._entries(net_dir):
                for rec in self._entries(Path(cid.path)):
                    if not rec.name.endswith(".json"):
                        continue
                    try:
                        data = Path(rec.path).read_bytes()
                    except FileNotFoundError:
                        continue
                    yield Attachment.model_validate_json(data)

    def for_vni(self, vni: int) -> list[Attachment]:
        return [a for a in self.all() if a.vni == vni]

    # ------------------------------------------------------------ locks

    @contextlib.contextmanager
    def _flock(self, name: str, mode: int) -> Iterator[None]:
        path = self.locks / name
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
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
