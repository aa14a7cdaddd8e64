"""Run the BGP daemons of the EVPN control plane inside lab namespaces.

gobgpd is started through `Netns.spawn` (the sandbox kills it by pid). FRR's
zebra and bgpd daemonize (`-d`, as the seed runs them); their pid files are
read and the sandbox kills exactly those pids at cleanup. Nothing runs in
the root namespace; every socket and file lives in the daemon's directory.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Optional

from vpcni.lab.netns import Netns, Sandbox, run, wait_for

FRR_DIR = Path("/usr/lib/frr")
FRR_DAEMONS = ("zebra", "bgpd")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _kill_pid(pid: int, timeout: float = 10.0) -> None:
    """SIGTERM, wait for the pid to go (FRR takes 1-2 s), then SIGKILL."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while _pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if _pid_alive(pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        wait_for(lambda: not _pid_alive(pid), timeout=5, what=f"pid {pid} to exit")


class Gobgpd:
    """One gobgpd in `ns`, its API on a unix socket in `directory`."""

    def __init__(self, ns: Netns, directory: Path, config: str, name: str = "gobgpd"):
        self.ns = ns
        self.dir = Path(directory)
        self.name = name
        self.config = self.dir / f"{name}.toml"
        self.config.write_text(config)
        self.socket = self.dir / f"{name}.sock"
        self.log = self.dir / f"{name}.log"
        self.proc: Optional[subprocess.Popen] = None

    @property
    def target(self) -> str:
        """The gRPC target of its API."""
        return f"unix://{self.socket}"

    def start(self) -> "Gobgpd":
        self.socket.unlink(missing_ok=True)
        with open(self.log, "ab") as log:
            self.proc = self.ns.spawn("gobgpd", "-f", str(self.config), "-p",
                                      "--api-hosts", self.target, "--pprof-disable",
                                      stdout=log, stderr=subprocess.STDOUT)
        wait_for(lambda: self.socket.exists() or self.proc.poll() is not None, timeout=10,
                 what=f"{self.name} API socket {self.socket}")
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} in {self.ns.name} exited with {self.proc.returncode}"
                               f": {self.log.read_text()[-2000:]}")
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def gobgp(self, *args: str) -> str:
        """The gobgp CLI against this daemon (for tests and debugging)."""
        return run(["gobgp", "--target", self.target, *args]).stdout


class Frr:
    """zebra + bgpd in `ns`, vty sockets, zserv socket and pid files in `directory`."""

    def __init__(self, sandbox: Sandbox, ns: Netns, directory: Path, bgpd_conf: str,
                 zebra_conf: str):
        self.sandbox = sandbox
        self.ns = ns
        self.dir = Path(directory)
        (self.dir / "bgpd.conf").write_text(bgpd_conf)
        (self.dir / "zebra.conf").write_text(zebra_conf)
        self.pids: dict[str, int] = {}

    def pid_file(self, daemon: str) -> Path:
        return self.dir / f"{daemon}.pid"

    def start(self) -> "Frr":
        # The daemons drop to user frr: the directory and files must be theirs.
        run(["chown", "-R", "frr:frr", str(self.dir)])
        self.sandbox.on_cleanup(self.stop)
        for daemon in FRR_DAEMONS:
            self.ns.exec(str(FRR_DIR / daemon), "-d", "-P", "0",
                         "-f", str(self.dir / f"{daemon}.conf"),
                         "-i", str(self.pid_file(daemon)),
                         "--vty_socket", str(self.dir), "-z", str(self.dir / "zserv.api"))
            pid_file = self.pid_file(daemon)
            wait_for(lambda: pid_file.exists() and pid_file.read_text().strip(), timeout=10,
                     what=f"{daemon} pid file {pid_file}")
            self.pids[daemon] = int(pid_file.read_text().strip())
        wait_for(lambda: (self.dir / "bgpd.vty").exists(), timeout=10, what="bgpd vty socket")
        return self

    def stop(self) -> None:
        """Kill exactly the pids this instance started, bgpd first, and wait for them."""
        for daemon in reversed(FRR_DAEMONS):
            pid = self.pids.pop(daemon, None)
            if pid is None:  # started, but start() gave up before reading its pid file
                try:
                    pid = int(self.pid_file(daemon).read_text().strip())
                except (OSError, ValueError):
                    continue
            _kill_pid(pid)
            self.pid_file(daemon).unlink(missing_ok=True)  # never kill a reused pid later

    def vtysh(self, *commands: str) -> str:
        args = ["vtysh", "--vty_socket", str(self.dir)]
        for command in commands:
            args += ["-c", command]
        return self.ns.exec(*args).stdout

    def vtysh_json(self, command: str) -> Any:
        out = self.vtysh(command).strip()
        return json.loads(out) if out else {}
