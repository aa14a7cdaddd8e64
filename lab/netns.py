"""Network namespaces for simulated hosts: the lab's, the tests' and the benchmarks'.

Everything is built inside namespaces this module creates, named with one
unique prefix per run, and removed by `Sandbox.cleanup()` even after a
failure. Nothing is added to the root namespace: veth pairs are born with
both ends inside namespaces. Processes are started through `Netns.spawn` so
that cleanup kills exactly those, by pid.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import signal
import subprocess
import time
from pathlib import Path
from typing import Optional, Sequence

NETNS_DIR = Path("/var/run/netns")


def run(cmd: Sequence[str], check: bool = True, input: Optional[str] = None,
        env: Optional[dict] = None, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run a command; on failure raise with its stderr in the message."""
    proc = subprocess.run(list(cmd), input=input, capture_output=True, text=True, env=env,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} -> {proc.returncode}: {proc.stderr.strip()}")
    return proc


def wait_for(cond, timeout: float = 10.0, interval: float = 0.05, what: str = "condition"):
    """Poll `cond()` until it returns a truthy value; raise TimeoutError naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class Netns:
    """One network namespace, created by us, with loopback up."""

    def __init__(self, name: str, sandbox: "Sandbox", create: bool = True):
        self.name = name
        self.sandbox = sandbox
        if create:
            run(["ip", "netns", "add", name])
            self.ip("link", "set", "lo", "up")

    @property
    def path(self) -> str:
        return str(NETNS_DIR / self.name)

    def ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return run(["ip", "-n", self.name, *args], check=check)

    def exec(self, *cmd: str, check: bool = True, input: Optional[str] = None,
             env: Optional[dict] = None, timeout: float = 60) -> subprocess.CompletedProcess:
        return run(["ip", "netns", "exec", self.name, *cmd], check=check, input=input, env=env,
                   timeout=timeout)

    def spawn(self, *cmd: str, env: Optional[dict] = None, stdout=subprocess.DEVNULL,
              stderr=subprocess.DEVNULL, same_mounts: bool = False,
              **kw) -> subprocess.Popen:
        """Start a process in this namespace; cleanup kills it by pid. `same_mounts`:
        keep our mount namespace (nsenter) instead of `ip netns exec`'s private one
        (which also shows the namespace's own /sys)."""
        enter = (["nsenter", f"--net={self.path}", "--"] if same_mounts
                 else ["ip", "netns", "exec", self.name])
        proc = subprocess.Popen([*enter, *cmd], env=env,
                                stdout=stdout, stderr=stderr, start_new_session=True, **kw)
        self.sandbox.adopt(proc.pid, self.name)
        return proc

    def ping(self, dst: str, count: int = 1, timeout: float = 1.0) -> bool:
        """One or more ICMP echo probes; True when any reply came back."""
        proc = self.exec("ping", "-n", "-q", "-c", str(count), "-i", "0.2", "-W", str(timeout),
                         str(dst), check=False, timeout=count * (timeout + 1) + 5)
        return proc.returncode == 0

    def delete(self) -> None:
        self.sandbox.kill_processes(self.name)
        run(["ip", "netns", "del", self.name], check=False)


def _start_time(pid: int) -> Optional[str]:
    """The kernel's start time of `pid` (field 22 of /proc/pid/stat): tells a reused pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)  # reap our own children
            if done == pid:
                return True
        except ChildProcessError:
            pass
        if _start_time(pid) is None or _is_zombie(pid):
            return True
        time.sleep(0.02)
    return False


def _is_zombie(pid: int) -> bool:
    """Exited, waiting to be reaped: daemons that detached are init's children, and
    init reaps them when it gets to it (seconds, here)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return False


class Sandbox:
    """All namespaces and processes of one run under one unique prefix.

    With a `state_file`, what it creates is written down as it goes, so that
    another process (`vpcnictl lab down`) can remove everything later, also
    after a failed or interrupted build. Several processes may hold the same
    sandbox (a test and the `vpcnictl lab` fault verbs it runs): every write
    merges with the file under a lock, so none drops what another started.
    """

    def __init__(self, prefix: Optional[str] = None, root_dir: Optional[Path] = None,
                 state_file: Optional[Path] = None):
        self.prefix = prefix or f"vpt{secrets.token_hex(3)}"
        self.namespaces: dict[str, Netns] = {}
        self.root_dir = Path(root_dir or Path("/tmp") / self.prefix)
        self.root_dir.mkdir(parents=True, exist_ok=True)
        self.state_file = Path(state_file) if state_file else None
        # pid -> (start time, namespace name): processes we started, to kill by pid.
        self.processes: dict[int, tuple[str, str]] = {}
        self.ns_names: list[str] = []
        self._gone: set[int] = set()  # pids this object killed: not merged back
        self._cleanups: list = []
        self._save()

    def _save(self) -> None:
        """Write the state down, merged with what other holders wrote (under a lock):
        their live processes and namespaces are kept, and learnt here too."""
        if self.state_file is None:
            return
        with open(self.state_file.with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                disk = json.loads(self.state_file.read_text())
            except (OSError, ValueError):
                disk = {"namespaces": [], "processes": []}
            for name in disk["namespaces"]:
                if name not in self.ns_names:
                    self.ns_names.append(name)
            for p in disk["processes"]:
                if p["pid"] not in self._gone and _start_time(p["pid"]) == p["start"]:
                    self.processes.setdefault(p["pid"], (p["start"], p["netns"]))
            data = {"prefix": self.prefix, "root_dir": str(self.root_dir),
                    "namespaces": self.ns_names,
                    "processes": [{"pid": pid, "start": st, "netns": ns}
                                  for pid, (st, ns) in self.processes.items()]}
            tmp = self.state_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(data, indent=1))
            os.replace(tmp, self.state_file)

    @classmethod
    def restore(cls, state_file: Path) -> "Sandbox":
        """The sandbox another process wrote down, ready for cleanup()."""
        data = json.loads(Path(state_file).read_text())
        box = cls.__new__(cls)
        box.prefix = data["prefix"]
        box.root_dir = Path(data["root_dir"])
        box.state_file = Path(state_file)
        box.ns_names = list(data["namespaces"])
        box.namespaces = {n.removeprefix(box.prefix + "-"): Netns(n, box, create=False)
                          for n in box.ns_names if (NETNS_DIR / n).exists()}
        box.processes = {p["pid"]: (p["start"], p["netns"]) for p in data["processes"]}
        box._gone = set()
        box._cleanups = []
        return box

    def netns(self, short: str) -> Netns:
        name = f"{self.prefix}-{short}"
        self.ns_names.append(name)
        self._save()  # written down before it exists: down removes it even if add fails midway
        ns = Netns(name, self)
        self.namespaces[short] = ns
        return ns

    def adopt(self, pid: int, netns: str) -> None:
        """Take responsibility for `pid` (started by us, e.g. a daemon's pid file)."""
        start = _start_time(pid)
        if start is not None:
            self.processes[pid] = (start, netns)
            self._save()

    def pids(self, netns: str, exe: str) -> list[int]:
        """Our live processes in `netns` whose command (after `ip netns exec NS`) is `exe`."""
        self._save()  # what other holders of the sandbox started since
        out = []
        for pid, (start, ns) in self.processes.items():
            if ns != netns or _start_time(pid) != start:
                continue
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if any(Path(a.decode(errors="replace")).name == exe for a in argv[:2]):
                out.append(pid)
        return out

    def kill_pid(self, pid: int) -> None:
        """Stop one of our processes (SIGTERM, then SIGKILL) and wait until it is gone."""
        self.kill_processes(pids=[pid])

    def kill_processes(self, netns: Optional[str] = None,
                       pids: Optional[list[int]] = None) -> None:
        """SIGTERM (then SIGKILL) our processes, all or those of one namespace, by pid."""
        self._save()  # what other holders of the sandbox started since
        victims = [pid for pid, (_, ns) in self.processes.items()
                   if netns in (None, ns) and (pids is None or pid in pids)]
        for pid in victims:
            start, _ = self.processes[pid]
            if _start_time(pid) == start:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
        for pid in victims:
            start, _ = self.processes.pop(pid)
            self._gone.add(pid)
            if not _wait_gone(pid, 10) and _start_time(pid) == start:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                _wait_gone(pid, 5)
        self._save()

    def dir(self, short: str) -> Path:
        d = self.root_dir / short
        d.mkdir(parents=True, exist_ok=True)
        return d

    def on_cleanup(self, fn) -> None:
        """Run `fn` at cleanup, before namespaces go (last registered first)."""
        self._cleanups.append(fn)

    def veth(self, a: Netns, a_name: str, b: Netns, b_name: str) -> None:
        """A veth pair with one end in each namespace (never in the root one)."""
        run(["ip", "link", "add", a_name, "netns", a.name, "type", "veth",
             "peer", "name", b_name, "netns", b.name])

    def cleanup(self) -> None:
        errors = []
        for fn in reversed(self._cleanups):
            try:
                fn()
            except Exception as exc:  # keep going: everything must go
                errors.append(exc)
        self._cleanups.clear()
        self.kill_processes()
        for name in reversed(self.ns_names):
            run(["ip", "netns", "del", name], check=False)
        # Namespaces made by what ran in ours (VPC routers: <node namespace>-r<L3VNI>).
        for name in sorted(os.listdir(NETNS_DIR)) if NETNS_DIR.is_dir() else ():
            if name.startswith(self.prefix + "-"):
                run(["ip", "netns", "del", name], check=False)
        self.namespaces.clear()
        self.ns_names.clear()
        run(["rm", "-rf", str(self.root_dir)], check=False)
        if self.state_file is not None:
            self.state_file.unlink(missing_ok=True)
            self.state_file.with_suffix(".lock").unlink(missing_ok=True)
        if errors:
            raise RuntimeError(f"cleanup errors: {errors}")

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc) -> None:
        self.cleanup()


class Fabric:
    """An underlay: a bridge in its own namespace, nodes hang off it by veth."""

    def __init__(self, sandbox: Sandbox, cidr: str = "198.51.100.0/24", short: str = "fab"):
        self.sandbox = sandbox
        self.cidr = cidr
        self.prefixlen = int(cidr.split("/")[1])
        self.ns = sandbox.netns(short)
        self.ns.ip("link", "add", "br0", "type", "bridge")
        self.ns.ip("link", "set", "br0", "up")
        self._ports = 0

    def connect(self, node: Netns, address: str, ifname: str = "eth0", mtu: int = 1500) -> str:
        """Wire `node` to the fabric with `address` on its `ifname`; the fabric's port name."""
        self._ports += 1
        port = f"p{self._ports}"
        wire(self.sandbox, self.ns, port, node, f"{address}/{self.prefixlen}", ifname, mtu)
        return port


def wire(box: Sandbox, fabric: Netns, port: str, node: Netns, address: str,
         ifname: str = "eth0", mtu: int = 1500) -> None:
    """`node` on the fabric's bridge through port `port`, with `address` (CIDR) on its
    `ifname`."""
    box.veth(fabric, port, node, ifname)
    fabric.ip("link", "set", port, "mtu", str(mtu), "master", "br0", "up")
    node.ip("link", "set", ifname, "mtu", str(mtu), "up")
    node.ip("addr", "add", address, "dev", ifname)


WORLD_GATEWAY = "198.51.100.254"
WORLD = "203.0.113.10"


def add_world(box: Sandbox, fabric: Netns, nodes: list[Netns], prefixlen: int = 24,
              gateway: str = WORLD_GATEWAY, world: str = WORLD) -> Netns:
    """The world outside every VPC: host `world` (203.0.113.0/24) behind a router on the
    underlay (`gateway`), through which the nodes reach it, as a cluster's nodes reach
    the internet through the underlay's gateway. (A VPC's way out never reaches the
    underlay's own prefix: docs/routing.md.) Namespaces of `box`; `nodes` get a route."""
    router = box.netns("wgw")
    wire(box, fabric, "pwgw", router, f"{gateway}/{prefixlen}")
    host = box.netns("world")
    box.veth(router, "eth1", host, "eth0")
    prefix = ".".join(world.split(".")[:3])
    router.ip("addr", "add", f"{prefix}.1/24", "dev", "eth1")
    router.ip("link", "set", "eth1", "up")
    router.exec("sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward")
    host.ip("addr", "add", f"{world}/24", "dev", "eth0")
    host.ip("link", "set", "eth0", "up")
    host.ip("route", "add", "default", "via", f"{prefix}.1")
    for node in nodes:
        node.ip("route", "replace", f"{prefix}.0/24", "via", gateway)
    return host
