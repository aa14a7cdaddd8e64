"""IPAM: static addresses, and delegation to an IPAM plugin in CNI_PATH.

Delegation follows the CNI spec ("Delegated plugin protocol"): the IPAM
plugin gets the same environment (with CNI_COMMAND set to the operation) and
the same network config on stdin that vpcni got; its error JSON is passed
back with its code, prefixed with the plugin's name.
"""

from __future__ import annotations

import abc
import json
import logging
import os
import subprocess
from pathlib import Path
from typing import Callable, Mapping, Optional

from .errors import InvalidConfig, InvalidEnvironment, IpamError, VpcniError
from .models import IPAddress, IPConfig, Result, Route

# IPAM implementations that serve inside the plugin/agent process, by ipam
# `type`: entry points of this group (vpcni-ipam registers itself there). Core
# never imports them; any other type is a plugin executed from CNI_PATH.
IN_PROCESS_GROUP = "vpcni.ipam"


class Ipam(abc.ABC):
    """The IPAM verbs for one CNI request, in-process or delegated."""

    # True when a repeated ADD of the same attachment should find its earlier
    # reservation (the IPAM keys addresses by attachment): ADD then keeps it.
    keyed_by_attachment: bool = False

    @classmethod
    def check_config(cls, ipam: dict) -> None:
        """Check the config's `ipam` section with the rest of the config, before ADD
        tears down or builds anything; raise a VpcniError naming the key."""

    @abc.abstractmethod
    def add(self) -> Result: ...

    @abc.abstractmethod
    def delete(self, container_id: Optional[str] = None, ifname: Optional[str] = None) -> None:
        ...

    @abc.abstractmethod
    def check(self) -> None: ...

    @abc.abstractmethod
    def status(self) -> None: ...

    @abc.abstractmethod
    def gc(self) -> None: ...


_in_process: Optional[dict] = None


def in_process(ipam_type: str) -> Optional[Callable[..., Ipam]]:
    """The in-process IPAM registered for `ipam_type`, if any (entry points, read once)."""
    global _in_process
    if _in_process is None:
        from importlib.metadata import entry_points

        _in_process = {ep.name: ep for ep in entry_points(group=IN_PROCESS_GROUP)}
    ep = _in_process.get(ipam_type)
    if ep is None:
        return None
    try:
        return ep.load()
    except Exception as exc:
        raise VpcniError(f"cannot load the in-process IPAM {ipam_type!r}: {exc}") from exc

LOG = logging.getLogger(__name__)
EXEC_TIMEOUT = 60.0


def find_plugin(name: str, cni_path: str) -> Path:
    dirs = [d for d in (cni_path or "").split(os.pathsep) if d]
    if not dirs:
        raise InvalidEnvironment(f"CNI_PATH is empty; cannot find IPAM plugin {name!r}")
    for d in dirs:
        candidate = Path(d) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise InvalidConfig(f"ipam.type {name!r}: no executable {name!r} in CNI_PATH "
                        f"({os.pathsep.join(dirs)})")


class DelegatedIpam(Ipam):
    """One IPAM plugin, called with the caller's env and stdin."""

    def __init__(self, plugin_type: str, env: Mapping[str, str], stdin: bytes):
        self.type = plugin_type
        self.env = dict(env)
        self.stdin = stdin
        self.path = find_plugin(plugin_type, self.env.get("CNI_PATH", ""))

    def _exec(self, command: str, env_overrides: Optional[dict] = None,
              stdin: Optional[bytes] = None) -> Optional[dict]:
        env = {k: v for k, v in self.env.items() if k.startswith("CNI_") or k == "PATH"}
        env.setdefault("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        env["CNI_COMMAND"] = command
        env.update(env_overrides or {})
        try:
            proc = subprocess.run([str(self.path)], input=stdin if stdin is not None else self.stdin,
                                  env=env, capture_output=True, timeout=EXEC_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise IpamError(f"ipam {self.type}: {command} did not finish in {EXEC_TIMEOUT:.0f}s",
                            code=11) from None
        except OSError as exc:
            raise IpamError(f"ipam {self.type}: cannot execute {self.path}: {exc}",
                            code=5) from None
        out = proc.stdout.strip()
        if proc.returncode != 0:
            try:
                err = json.loads(out)
                code = int(err.get("code", 999))
                msg = err.get("msg") or "failed"
                details = err.get("details", "")
            except (ValueError, AttributeError, TypeError):
                code, msg = 999, (proc.stderr or proc.stdout).decode(errors="replace").strip()
                details = ""
            raise IpamError(f"ipam {self.type}: {command}: {msg}", details=details, code=code)
        if not out:
            return None
        try:
            return json.loads(out)
        except ValueError:
            raise IpamError(f"ipam {self.type}: {command} printed no JSON: {out[:200]!r}",
                            code=6) from None

    def add(self) -> Result:
        raw = self._exec("ADD")
        if raw is None:
            raise IpamError(f"ipam {self.type}: ADD returned no result")
        try:
            res = Result.model_validate(raw)
        except ValueError as exc:
            raise IpamError(f"ipam {self.type}: unusable result: {exc}") from None
        return res

    def delete(self, container_id: Optional[str] = None, ifname: Optional[str] = None) -> None:
        overrides = {}
        if container_id:
            overrides = {"CNI_CONTAINERID": container_id, "CNI_IFNAME": ifname or "",
                         "CNI_NETNS": ""}
        self._exec("DEL", overrides)

    def check(self) -> None:
        self._exec("CHECK")

    def supports(self, version: str) -> bool:
        try:
            info = self._exec("VERSION", stdin=json.dumps({"cniVersion": version}).encode())
        except IpamError:
            return False
        return version in (info or {}).get("supportedVersions", [])

    def status(self) -> None:
        if self.supports("1.1.0"):
            self._exec("STATUS")

    def gc(self) -> None:
        if self.supports("1.1.0"):
            self._exec("GC")


def routes_via_gateways(routes: list[Route], ips: list[IPConfig]) -> list[Route]:
    """`routes` with a route's missing `gw` set to the gateway of its family in `ips`.

    The reference plugins (ipam.ConfigureIface) read an IPAM result so: a
    default route `{"dst": "0.0.0.0/0"}` next to a gateway goes via that
    gateway, not on-link.
    """
    gateways: dict[int, IPAddress] = {}
    for ip in ips:
        if ip.gateway is not None:
            gateways.setdefault(ip.gateway.version, ip.gateway)
    return [r.model_copy(update={"gw": gateways[r.dst.version]})
            if r.gw is None and r.dst.version in gateways else r
            for r in routes]


def static_ips(addresses: list) -> list[IPConfig]:
    return [IPConfig(address=a) for a in addresses]
