"""Which attachment holds which VF on this node: one claim file per VF.

A claim is created with O_EXCL, so two callers (threads, the agent and a
standalone plugin, or two agents after a restart) never get one VF. It is
written before anything about the VF changes and holds what DEL needs to put
the VF back: the settings the PF had for it, its netdev's and representor's
names. An ADD that crashed midway leaves the claim; the next ADD, DEL or GC of
that attachment finds it by key and restores from it. Operations on one VF
hold its lock (flock).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Optional

from vpcni.core.errors import BackendError

LOG = logging.getLogger(__name__)


def _write_synced(path: Path, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())


def _sync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tmp(path: Path) -> Path:
    """A temporary name beside `path`, unique per process and thread."""
    return path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")


@dataclass
class Claim:
    pci: str
    key: tuple[str, str, str]
    pf: str
    index: int
    mode: str                        # "vf" (netdev into the pod) or "vfio" (left for a VM)
    saved: dict                      # VfState of the PF before we changed it
    netdev: Optional[str] = None     # the VF netdev's name on the node
    mtu: Optional[int] = None        # ... and its MTU
    representor: Optional[str] = None  # the representor's name before we renamed it


class VfPool:
    def __init__(self, state_dir: Path):
        self.dir = Path(state_dir) / "sriov"
        self.claims = self.dir / "claims"
        self.locks = self.dir / "locks"

    def _path(self, pci: str) -> Path:
        return self.claims / f"{pci}.json"

    @contextlib.contextmanager
    def locked(self, pci: str) -> Iterator[None]:
        self.locks.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.locks / f"{pci}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def get(self, pci: str) -> Optional[Claim]:
        try:
            data = json.loads(self._path(pci).read_text())
            data["key"] = tuple(data["key"])
            return Claim(**data)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise BackendError(f"VF claim {self._path(pci)} is unreadable: {exc}") from None

    def claim(self, claim: Claim) -> bool:
        """Take the VF for `claim.key`; False when another attachment holds it."""
        self.claims.mkdir(parents=True, exist_ok=True)
        path = self._path(claim.pci)
        tmp = _tmp(path)
        _write_synced(tmp, asdict(claim))
        try:
            os.link(tmp, path)  # atomic, fails when the claim exists
        except OSError as exc:
            if exc.errno != errno.EEXIST:
                raise BackendError(f"cannot claim VF {claim.pci} ({path}): "
                                   f"{os.strerror(exc.errno)}") from None
            return False
        finally:
            tmp.unlink(missing_ok=True)
        _sync_dir(self.claims)
        return True

    def update(self, claim: Claim) -> None:
        path = self._path(claim.pci)
        tmp = _tmp(path)
        _write_synced(tmp, asdict(claim))
        os.replace(tmp, path)
        _sync_dir(self.claims)

    def release(self, pci: str) -> None:
        self._path(pci).unlink(missing_ok=True)
        _sync_dir(self.claims)

    def all(self) -> list[Claim]:
        try:
            names = sorted(p.name for p in self.claims.iterdir() if p.suffix == ".json")
        except FileNotFoundError:
            return []
        out = []
        for name in names:
            try:
                claim = self.get(name[:-len(".json")])
            except BackendError as exc:
                # One damaged claim must not stop every ADD, DEL and probe of the node;
                # its VF stays taken (the file still exists) until someone looks.
                LOG.error("%s", exc)
                continue
            if claim is not None:
                out.append(claim)
        return out

    def of(self, key: tuple[str, str, str]) -> Optional[Claim]:
        return next((c for c in self.all() if c.key == tuple(key)), None)
