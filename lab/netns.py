"""Network namespaces for simulated hosts: the lab's, the tests' and the benchmarks'.

Everything is built inside namespaces this module creates, named with one
unique prefix per run, and removed by `Sandbox.cleanup()` even after a
failure. Nothing is added to the root namespace: veth pairs are born with
both ends inside namespaces. Processes are started through `Netns.spawn` so
that cleanup kills exactly those, by pid.
"""

from __future__ import annotations

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

    def __init__(self, name: str, sandbox: "Sandbox"):
        self.name = name
        self.sandbox = sandbox
        self.procs: list[subprocess.Popen] = []
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
              stderr=subprocess.DEVNULL, **kw) -> subprocess.Popen:
        """Start a process in this namespace; cleanup kills it by pid."""
        proc = subprocess.Popen(["ip", "netns", "exec", self.name, *cmd], env=env,
                                stdout=stdout, stderr=stderr, start_new_session=True, **kw)
        self.procs.append(proc)
        return proc

    def ping(self, dst: str, count: int = 1, timeout: float = 1.0) -> bool:
        """One or more ICMP echo probes; True when any reply came back."""
        proc = self.exec("ping", "-n", "-q", "-c", str(count), "-i", "0.2", "-W", str(timeout),
                         str(dst), check=False, timeout=count * (timeout + 1) + 5)
        return proc.returncode == 0

    def kill_procs(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    continue
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(5)
        self.procs.clear()

    def delete(self) -> None:
        self.kill_procs()
        run(["ip", "netns", "del", self.name], check=False)


class Sandbox:
    """All namespaces of one run under one unique prefix; cleanup removes them."""

    def __init__(self, prefix: Optional[str] = None, root_dir: Optional[Path] = None):
        self.prefix = prefix or f"vpt{secrets.token_hex(3)}"
        self.namespaces: dict[str, Netns] = {}
        self.root_dir = Path(root_dir or Path("/tmp") / self.prefix)
        self.root_dir.mkdir(parents=True, exist_ok=True)
        self._cleanups: list = []

    def netns(self, short: str) -> Netns:
        ns = Netns(f"{self.prefix}-{short}", self)
        self.namespaces[short] = ns
        return ns

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
        for ns in reversed(list(self.namespaces.values())):
            ns.delete()
        self.namespaces.clear()
        run(["rm", "-rf", str(self.root_dir)], check=False)
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

    def connect(self, node: Netns, address: str, ifname: str = "eth0", mtu: int = 1500) -> None:
        """Wire `node` to the fabric with `address` on its `ifname`."""
        self._ports += 1
        port = f"p{self._ports}"
        self.sandbox.veth(self.ns, port, node, ifname)
        self.ns.ip("link", "set", port, "mtu", str(mtu), "master", "br0", "up")
        node.ip("link", "set", ifname, "mtu", str(mtu), "up")
        node.ip("addr", "add", f"{address}/{self.prefixlen}", "dev", ifname)
