"""nftables for the backends, in-process through libnftables.

The binding is the nftables project's own (Debian python3-nftables), loaded
from the system when the running Python (a venv) does not have it. One
context per `Nft`, created, and so bound to a network namespace, with it;
commands are serialised (a libnftables context is not thread-safe).
"""

from __future__ import annotations

import importlib.util
import json
import sys
import threading
from pathlib import Path

from vpcni.core.errors import BackendError

DEBIAN_BINDING = Path("/usr/lib/python3/dist-packages/nftables/__init__.py")


def load_binding():
    """The module `nftables`, or BackendError saying what to install."""
    try:
        import nftables  # noqa: F401  (the system Python, or a venv that has it)
        return sys.modules["nftables"]
    except ImportError:
        pass
    if not DEBIAN_BINDING.exists():
        raise BackendError("the nftables Python binding is missing (Debian package "
                           "python3-nftables): without it pod isolation cannot be enforced")
    spec = importlib.util.spec_from_file_location(
        "nftables", DEBIAN_BINDING, submodule_search_locations=[str(DEBIAN_BINDING.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["nftables"] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules["nftables"]
        raise BackendError(f"cannot load the nftables binding from {DEBIAN_BINDING}: "
                           f"{exc}") from None
    return module


class Nft:
    """One libnftables context in the caller's network namespace."""

    def __init__(self) -> None:
        self._ctx = load_binding().Nftables()
        self._ctx.set_json_output(False)
        self.lock = threading.RLock()

    def run(self, commands: str, what: str) -> str:
        """Run nft commands (one transaction); BackendError naming `what` on failure."""
        with self.lock:
            rc, out, err = self._ctx.cmd(commands)
        if rc != 0:
            raise BackendError(f"nftables: could not {what}: {' '.join(err.split())}")
        return out

    def try_run(self, commands: str) -> bool:
        with self.lock:
            return self._ctx.cmd(commands)[0] == 0

    def list_json(self, what: str) -> list[dict]:
        """`nft -j list <what>` as its list of objects."""
        with self.lock:
            self._ctx.set_json_output(True)
            try:
                rc, out, err = self._ctx.cmd(f"list {what}")
            finally:
                self._ctx.set_json_output(False)
        if rc != 0:
            raise BackendError(f"nftables: could not list {what}: {' '.join(err.split())}")
        return json.loads(out).get("nftables", [])
