"""The CNI spec layer: environment + stdin in, result or error JSON out.

`run(env, stdin)` is a pure function of its inputs (plus the node's state),
so the executable, the agent and the tests all call the same code. Order of
checks follows the reference skel: command, then JSON, then version, then
the per-command environment, then the config.
"""

from __future__ import annotations

import json
import logging
import os
import re
from typing import Any, Mapping, Optional

from vpcni.core.config import NODE_CONFIG_ENV, NetworkConfig, NodeConfig, not_json
from vpcni.core.errors import (DecodeError, IncompatibleVersion, InvalidConfig,
                               InvalidEnvironment, VpcniError)
from vpcni.core.ipam import in_process
from vpcni.core.store import check_ifname

from . import versions

LOG = logging.getLogger("vpcni.cni")
COMMANDS = ("ADD", "DEL", "CHECK", "STATUS", "VERSION", "GC")
# Container IDs become file names (with a suffix) in the store: keep under NAME_MAX.
MAX_CONTAINER_ID = 200
_CONTAINER_ID = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$")
# Which variables each command needs (CNI SPEC.md, "Parameters").
_NEEDS = {
    "ADD": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"),
    "CHECK": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"),
    "DEL": ("CNI_CONTAINERID", "CNI_IFNAME", "CNI_PATH"),
    "GC": ("CNI_PATH",),
    "STATUS": ("CNI_PATH",),
}
# Oldest spec version that has the command.
_SINCE = {"CHECK": "0.4.0", "GC": "1.1.0", "STATUS": "1.1.0"}
# The largest network config read (the agent's limit on a whole request is the same).
MAX_STDIN = 4 * 1024 * 1024


def _shown(value: Any, limit: int = 120) -> str:
    """A value as JSON for a message, cut to `limit` characters."""
    text = json.dumps(value, default=str)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def parse_cni_args(raw: str) -> dict[str, str]:
    """CNI_ARGS 'K=V;K=V': lenient, as Multus sends IgnoreUnknown=true;K8S_POD_NAME=..."""
    out: dict[str, str] = {}
    for part in (raw or "").split(";"):
        if not part.strip():
            continue
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise InvalidEnvironment(f"CNI_ARGS: {part!r} is not KEY=VALUE")
        out[key.strip()] = value.strip()
    return out


def validate_env(command: str, env: Mapping[str, str]) -> dict[str, Any]:
    for var in _NEEDS[command]:
        if not env.get(var):
            raise InvalidEnvironment(f"{var} is required for {command}")
    cid = env.get("CNI_CONTAINERID", "")
    if len(cid) > MAX_CONTAINER_ID:
        raise InvalidEnvironment(f"CNI_CONTAINERID is {len(cid)} characters long; at most "
                                 f"{MAX_CONTAINER_ID} (a file name on the node)")
    if cid and not _CONTAINER_ID.fullmatch(cid):
        raise InvalidEnvironment(f"CNI_CONTAINERID {cid!r} must match "
                                 "^[a-zA-Z0-9][a-zA-Z0-9_.\\-]*$")
    ifname = env.get("CNI_IFNAME", "")
    if ifname:
        check_ifname(ifname)
    netns = env.get("CNI_NETNS") or None
    if netns and command in ("ADD", "CHECK"):
        if not os.path.isabs(netns):
            raise InvalidEnvironment(f"CNI_NETNS {netns!r} must be an absolute path")
        if not os.path.exists(netns):
            raise InvalidEnvironment(f"CNI_NETNS {netns!r} does not exist")
    return {
        "container_id": cid,
        "ifname": ifname,
        "netns": netns,
        "cni_path": env.get("CNI_PATH", ""),
        "args": parse_cni_args(env.get("CNI_ARGS", "")),
    }


def _check_ipam(cfg) -> None:
    """An IPAM served in-process (vpcni-ipam) checks its section here, with the rest
    of the config: a repeated ADD with a bad key must fail before the earlier
    attachment is torn down. A delegated plugin's section is the plugin's."""
    ipam = getattr(cfg, "ipam", None)
    if ipam is None:
        return
    raw = ipam if isinstance(ipam, dict) else ipam.model_dump()
    if isinstance(raw.get("type"), str):
        factory = in_process(raw["type"])
        if factory is not None:
            factory.check_config(raw)


def error_json(err: VpcniError, version: str) -> str:
    body = {"cniVersion": version, "code": err.code, "msg": err.msg}
    if err.details:
        body["details"] = err.details
    return json.dumps(body)


class Dispatcher:
    """Turns one CNI invocation into a handler call; keeps a handler per node config."""

    def __init__(self, node: Optional[NodeConfig] = None, handler=None):
        self._node = node
        self._handler = handler

    def handler(self):
        if self._handler is None:
            from vpcni.core.handler import Handler

            self._handler = Handler(self._node or NodeConfig.load())
        return self._handler

    def close(self) -> None:
        if self._handler is not None:
            self._handler.close()

    def run(self, env: Mapping[str, str], stdin: bytes) -> tuple[str, int]:
        """(stdout, exit code) for one invocation; never raises."""
        version = versions.CURRENT
        try:
            command, raw, version = self.decode(env, stdin)
            if raw is None:
                return self._version(stdin), 0
            req = self.request(command, env, raw, stdin)
            return self._call(req, version)
        except VpcniError as err:
            LOG.warning("%s failed (code %d): %s", env.get("CNI_COMMAND"), err.code, err.msg)
            return error_json(err, version), 1
        except Exception as exc:  # the last line of defence: never a traceback on stdout
            LOG.exception("internal error")
            err = VpcniError(f"internal error: {type(exc).__name__}: {exc}")
            return error_json(err, version), 1

    def parse(self, env: Mapping[str, str], stdin: bytes):
        """The edge on its own: the validated Request of one invocation (None for
        VERSION), or the VpcniError that run() reports. Every variable and every
        field is checked here, before the handler sees anything."""
        command, raw, _ = self.decode(env, stdin)
        return None if raw is None else self.request(command, env, raw, stdin)

    def decode(self, env: Mapping[str, str], stdin: bytes) -> tuple[str, Optional[dict], str]:
        """(command, config, cniVersion): the command checked and the config decoded,
        with a supported version (config None: VERSION, which needs nothing else)."""
        command = env.get("CNI_COMMAND", "")
        if command not in COMMANDS:
            raise InvalidEnvironment(f"CNI_COMMAND {command!r} is not one of "
                                     f"{', '.join(COMMANDS)}")
        if command == "VERSION":
            return command, None, versions.CURRENT
        if len(stdin) > MAX_STDIN:
            raise InvalidConfig(f"network config on stdin is larger than "
                                f"{MAX_STDIN // (1024 * 1024)} MiB: a network config is "
                                "never that large")
        try:
            raw = json.loads(stdin, parse_constant=not_json)
        except ValueError as exc:
            raise DecodeError(f"network config on stdin is not JSON: {exc}") from None
        except RecursionError:
            raise DecodeError("network config on stdin is nested too deeply to be a "
                              "network config") from None
        if not isinstance(raw, dict):
            raise DecodeError("network config on stdin must be a JSON object")
        asked = raw.get("cniVersion")
        # A config without a usable cniVersion is a version mismatch (code 1), as in
        # the reference skel, which reads a missing cniVersion as 0.1.0.
        if not isinstance(asked, str) or not asked:
            raise IncompatibleVersion(
                f"network config: 'cniVersion' is missing or not a string "
                f"(got {_shown(asked)}); supported: {', '.join(versions.SUPPORTED)}")
        if asked not in versions.SUPPORTED:
            raise IncompatibleVersion(
                f"cniVersion {_shown(asked)} is not supported; supported: "
                f"{', '.join(versions.SUPPORTED)}")
        return command, raw, asked

    def request(self, command: str, env: Mapping[str, str], raw: dict, stdin: bytes):
        """The Request of a decoded invocation: the command against the version, the
        environment, the config, and (agent) the node config the caller named."""
        version = raw["cniVersion"]
        since = _SINCE.get(command)
        if since and not versions.at_least(version, since):
            raise IncompatibleVersion(f"{command} needs cniVersion {since} or later "
                                      f"(config has {version})")
        fields = validate_env(command, env)
        cfg = self.parse_config(raw)
        if command == "GC" and cfg.gc_valid() is None:
            raise InvalidConfig("network config: GC needs 'cni.dev/valid-attachments'")
        _check_ipam(cfg)
        try:
            self._check_node_config(env)
        except VpcniError as exc:
            # Cleaning up is never refused for a difference in settings (kubelet would
            # retry a DEL forever, a spooled one would be given up): logged instead.
            if command not in ("DEL", "GC"):
                raise
            LOG.warning("%s served despite the node config: %s", command, exc)
        from vpcni.core.handler import Request

        return Request(command=command, config=cfg, env=dict(env), stdin=stdin, **fields)

    def _check_node_config(self, env: Mapping[str, str]) -> None:
        """A caller that names a node config (VPCNI_NODE_CONFIG) other than the one this
        dispatcher serves with (the agent's, loaded at its start) gets that file's
        errors, as the plugin in-process would, or, when the file is valid but says
        something else, an error naming the difference: the agent never serves a
        request with settings other than those the caller's node config gives."""
        named = env.get(NODE_CONFIG_ENV)
        node = self._node
        if not named or node is None or named == node.source:
            return
        try:
            if os.path.samefile(named, node.source):
                return
        except (OSError, ValueError):
            pass
        other = NodeConfig.load(named)
        diff = node.differences(other)
        if diff:
            key, theirs, ours = diff[0]
            more = f" (and {', '.join(repr(k) for k, _, _ in diff[1:])})" if diff[1:] else ""
            raise InvalidConfig(
                f"node config {named} ({NODE_CONFIG_ENV}) is not the one the vpcni agent "
                f"serves ({node.source}), and differs from it: {key!r} = {_shown(theirs)} "
                f"there, {_shown(ours)} in the agent's{more}; restart the agent with "
                f"{named} or set {NODE_CONFIG_ENV} to {node.source}")

    def parse_config(self, raw: dict):
        """The network config model; vpcni-ipam's executable has its own."""
        return NetworkConfig.parse(raw)

    def _call(self, req, version: str) -> tuple[str, int]:
        handler = self.handler()
        if req.command == "ADD":
            result = handler.add(req)
            return json.dumps(versions.convert(result, version)), 0
        if req.command == "DEL":
            handler.delete(req)
        elif req.command == "CHECK":
            handler.check(req)
        elif req.command == "STATUS":
            handler.status(req)
        elif req.command == "GC":
            errors = handler.gc(req)
            if errors:
                first = errors[0]
                raise VpcniError(f"GC finished with {len(errors)} error(s): "
                                 + "; ".join(e.msg for e in errors),
                                 details=json.dumps([{"code": e.code, "msg": e.msg}
                                                     for e in errors]),
                                 code=first.code)
        return "", 0

    @staticmethod
    def _version(stdin: bytes) -> str:
        asked = versions.CURRENT
        try:
            raw = json.loads(stdin or b"{}")
            if isinstance(raw, dict) and raw.get("cniVersion") in versions.SUPPORTED:
                asked = raw["cniVersion"]
        except (ValueError, TypeError, RecursionError):
            pass  # VERSION answers whatever stdin holds
        return json.dumps({"cniVersion": asked, "supportedVersions": list(versions.SUPPORTED)})
