"""`vpcni`: the thin CNI shim. Standard library only, so it starts in milliseconds.

It reads the node config (only `mode`, `agentSocket`, `stateDir`), forwards
{env, stdin} to the node agent over its unix socket and prints the agent's
reply. This file is also installed on its own (`vpcnictl install-cni`) with a
`python3 -S` shebang, so it must not import anything from vpcni.

- Agent unreachable on ADD/CHECK/STATUS/GC: CNI error 11 naming the socket.
- Agent unreachable on DEL: the request is spooled under
  <stateDir>/pending-del/ and the agent replays it when it starts; the DEL
  itself succeeds, so the runtime does not retry forever and the release is
  not lost.
- `"mode": "standalone"` in the node config: the request is served in-process
  (no agent, static flood list only); it must be chosen explicitly.
- Installed under the name `vpcni-ipam` it serves vpcni-ipam, the CNI IPAM
  plugin, the same way: marked {"plugin": "vpcni-ipam"} for the agent (and in a
  spooled DEL), `-m vpcni.ipam.plugin` in standalone mode.
"""

import json
import os
import socket
import sys
import time

DEFAULT_NODE_CONFIG = "/etc/vpcni/node.json"
DEFAULT_SOCKET = "/run/vpcni/agent.sock"
DEFAULT_STATE_DIR = "/var/lib/vpcni"
# Replaced by `vpcnictl install-cni` with the Python that has vpcni installed.
STANDALONE_PYTHON = None
AGENT_TIMEOUT = 120.0
# The same list as vpcni.cni.versions.SUPPORTED (a unit test keeps them equal).
SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
_ENV_PREFIXES = ("CNI_", "VPCNI_")
# The plugins this file serves, by the name it runs under; the module of each in
# standalone mode.
PLUGIN_VPCNI = "vpcni"
PLUGIN_IPAM = "vpcni-ipam"
STANDALONE_MODULES = {PLUGIN_VPCNI: "vpcni.cni.main", PLUGIN_IPAM: "vpcni.ipam.plugin"}


def plugin_of(argv0):
    """vpcni-ipam when run under that name, else vpcni."""
    return PLUGIN_IPAM if os.path.basename(argv0 or "") == PLUGIN_IPAM else PLUGIN_VPCNI


def _error(code, msg, version="1.1.0"):
    sys.stdout.write(json.dumps({"cniVersion": version, "code": code, "msg": msg}) + "\n")
    sys.stdout.flush()
    return 1


def _version_of(stdin):
    try:
        v = json.loads(stdin).get("cniVersion")
        return v if v in SUPPORTED_VERSIONS else "1.1.0"
    except (ValueError, AttributeError):
        return "1.1.0"


def _node_config(path):
    """(config, problem): the node config, or {} and why it is unusable.

    Only the shim's three keys are read here; the agent (or the in-process
    handler) validates the rest and reports it properly.
    """
    try:
        with open(path, "rb") as f:
            cfg = json.load(f)
    except FileNotFoundError:
        return {}, "file not found (set VPCNI_NODE_CONFIG or create it)"
    except OSError as exc:
        return {}, "cannot read it: %s" % (exc.strerror or exc)
    except ValueError as exc:
        return {}, "cannot read JSON: %s" % exc
    if not isinstance(cfg, dict):
        return {}, "must be a JSON object"
    for key in ("mode", "agentSocket", "stateDir"):
        if cfg.get(key) is not None and not isinstance(cfg[key], str):
            return {}, "invalid '%s' = %s: must be a string" % (key, json.dumps(cfg[key]))
    return cfg, None


def _standalone(stdin, plugin=PLUGIN_VPCNI):
    python = STANDALONE_PYTHON
    if python is None:
        # Run from an installed package: this interpreter has vpcni.
        if plugin == PLUGIN_IPAM:
            from vpcni.ipam.plugin import serve
        else:
            from vpcni.cni.main import serve

        return serve(stdin)
    # The config already read becomes the new stdin: a memory file, not a pipe (a
    # pipe holds 64 KiB, and nobody would read it before the exec).
    fd = os.memfd_create("vpcni-stdin")
    view = memoryview(stdin)
    while view:
        view = view[os.write(fd, view):]
    os.lseek(fd, 0, os.SEEK_SET)
    os.dup2(fd, 0)
    os.execv(python, [python, "-m", STANDALONE_MODULES[plugin]])


def agent_call(sock_path, payload, timeout=AGENT_TIMEOUT):
    """One request/reply with the agent: a JSON object each way, EOF-delimited."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(timeout)
        s.connect(sock_path)
        s.sendall(json.dumps(payload).encode())
        s.shutdown(socket.SHUT_WR)
        chunks = []
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        s.close()
    return json.loads(b"".join(chunks))


def _request(env, stdin, plugin):
    """The request for the agent: {env, stdin}, and the plugin unless it is vpcni."""
    req = {"env": env, "stdin": stdin.decode("utf-8", "surrogateescape")}
    if plugin != PLUGIN_VPCNI:
        req["plugin"] = plugin
    return req


def ask_agent(sock_path, env, stdin, timeout=AGENT_TIMEOUT, plugin=PLUGIN_VPCNI):
    """Forward one CNI call; (stdout, rc). Raises OSError if the agent is unreachable."""
    reply = agent_call(sock_path, _request(env, stdin, plugin), timeout)
    return reply["stdout"], int(reply["rc"])


def spool_del(state_dir, env, stdin, plugin=PLUGIN_VPCNI):
    """Record a DEL the agent could not take, for it to replay on start."""
    spool = os.path.join(state_dir, "pending-del")
    os.makedirs(spool, mode=0o700, exist_ok=True)
    name = "%d-%s-%s.json" % (time.time_ns(), env.get("CNI_CONTAINERID", "x")[:64],
                              env.get("CNI_IFNAME", "x"))
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    tmp = os.path.join(spool, "." + name)
    with open(tmp, "w") as f:
        json.dump(_request(env, stdin, plugin), f)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, os.path.join(spool, name))
    return os.path.join(spool, name)


def main():
    plugin = plugin_of(sys.argv[0])
    stdin = sys.stdin.buffer.read()
    command = os.environ.get("CNI_COMMAND", "")
    if command == "VERSION":
        # Needs no node state: answered here, with or without an agent.
        asked = _version_of(stdin)
        sys.stdout.write(json.dumps({
            "cniVersion": asked if asked in SUPPORTED_VERSIONS else "1.1.0",
            "supportedVersions": list(SUPPORTED_VERSIONS)}) + "\n")
        return 0
    cfg_path = os.environ.get("VPCNI_NODE_CONFIG") or DEFAULT_NODE_CONFIG
    node, node_problem = _node_config(cfg_path)
    if node_problem and node_problem.startswith("invalid "):
        # A key of the shim's own is malformed: no guessing which agent was meant.
        return _error(7, "node config %s: %s" % (cfg_path, node_problem), _version_of(stdin))
    if node.get("mode") == "standalone":
        return _standalone(stdin, plugin)
    sock_path = node.get("agentSocket") or DEFAULT_SOCKET
    env = {k: v for k, v in os.environ.items() if k.startswith(_ENV_PREFIXES) or k == "PATH"}
    try:
        out, rc = ask_agent(sock_path, env, stdin, plugin=plugin)
    except (OSError, ValueError, KeyError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        if command == "DEL":
            try:
                where = spool_del(node.get("stateDir") or DEFAULT_STATE_DIR, env, stdin, plugin)
            except OSError as spool_exc:
                return _error(11, "vpcni agent unreachable at %s (%s) and the DEL could not be "
                              "recorded (%s); retry" % (sock_path, reason, spool_exc),
                              _version_of(stdin))
            sys.stderr.write("%s: agent unreachable at %s (%s); DEL recorded in %s, the "
                             "agent completes it when it starts\n"
                             % (plugin, sock_path, reason, where))
            return 0
        if node_problem:
            # Not knowing the mode nor the socket, the agent was only a guess: the
            # node config is what to fix.
            return _error(7, "node config %s: %s (and no vpcni agent at %s: %s)"
                          % (cfg_path, node_problem, sock_path, reason), _version_of(stdin))
        return _error(11, "vpcni agent unreachable at %s (%s): check that the vpcni agent "
                      "(`vpcnictl agent`, the vpcni-agent DaemonSet pod) runs on this node and "
                      "that agentSocket in %s points at its socket" % (sock_path, reason, cfg_path),
                      _version_of(stdin))
    if out:
        sys.stdout.write(out + ("\n" if not out.endswith("\n") else ""))
    sys.stdout.flush()
    return rc


if __name__ == "__main__":
    sys.exit(main())
