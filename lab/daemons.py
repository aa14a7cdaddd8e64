"""The BGP daemons of the control plane, run inside lab namespaces.

gobgpd is started through `Netns.spawn`; FRR's zebra and bgpd daemonize
(`-d`, as the seed runs them) and their pids, read from the pid files, are
handed to the sandbox. Either way the sandbox knows every pid with its start
time, so stop() here, and the sandbox's cleanup from any process, kill
exactly these processes. Every socket and file lives in the daemon's directory.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any, Optional

from .netns import Netns, run, wait_for

FRR_DIR = Path("/usr/lib/frr")
FRR_DAEMONS = ("zebra", "bgpd")


class Gobgpd:
    """One gobgpd in `ns`, its API on a unix socket in `directory`.

    Without `config` the one already in the directory is used (restarts)."""

    def __init__(self, ns: Netns, directory: Path, config: Optional[str] = None,
                 name: str = "gobgpd"):
        self.ns = ns
        self.dir = Path(directory)
        self.name = name
        self.config = self.dir / f"{name}.toml"
        if config is not None:
            self.config.write_text(config)
        self.socket = self.dir / f"{name}.sock"
        self.log = self.dir / f"{name}.log"

    @property
    def target(self) -> str:
        """The gRPC target of its API."""
        return f"unix://{self.socket}"

    def start(self) -> "Gobgpd":
        self.socket.unlink(missing_ok=True)
        with open(self.log, "ab") as log:
            proc = self.ns.spawn("gobgpd", "-f", str(self.config), "-p",
                                 "--api-hosts", self.target, "--pprof-disable",
                                 stdout=log, stderr=subprocess.STDOUT)
        wait_for(lambda: self.socket.exists() or proc.poll() is not None, timeout=10,
                 what=f"{self.name} API socket {self.socket}")
        if proc.poll() is not None:
            raise RuntimeError(f"{self.name} in {self.ns.name} exited with {proc.returncode}: "
                               f"{self.log.read_text()[-2000:]}")
        return self

    def stop(self) -> None:
        for pid in self.ns.sandbox.pids(self.ns.name, "gobgpd"):
            self.ns.sandbox.kill_pid(pid)

    def restart(self) -> "Gobgpd":
        self.stop()
        return self.start()

    def gobgp(self, *args: str) -> str:
        """The gobgp CLI against this daemon (for tests and debugging)."""
        return run(["gobgp", "--target", self.target, *args]).stdout


class Frr:
    """zebra + bgpd in `ns`; vty sockets, zserv socket and pid files in `directory`."""

    def __init__(self, ns: Netns, directory: Path, bgpd_conf: Optional[str] = None,
                 zebra_conf: Optional[str] = None):
        self.ns = ns
        self.dir = Path(directory)
        if bgpd_conf is not None:
            (self.dir / "bgpd.conf").write_text(bgpd_conf)
        if zebra_conf is not None:
            (self.dir / "zebra.conf").write_text(zebra_conf)

    def pid_file(self, daemon: str) -> Path:
        return self.dir / f"{daemon}.pid"

    def start(self) -> "Frr":
        # The daemons drop to user frr: the directory and its files must be theirs.
        run(["chown", "-R", "frr:frr", str(self.dir)])
        for daemon in FRR_DAEMONS:
            pid_file = self.pid_file(daemon)
            pid_file.unlink(missing_ok=True)
            self.ns.exec(str(FRR_DIR / daemon), "-d", "-P", "0",
                         "-f", str(self.dir / f"{daemon}.conf"), "-i", str(pid_file),
                         "--vty_socket", str(self.dir), "-z", str(self.dir / "zserv.api"),
                         "--log", f"file:{self.dir / f'{daemon}.log'}")
            pid = wait_for(lambda: pid_file.exists() and pid_file.read_text().strip(),
                           timeout=10, what=f"{daemon} pid file {pid_file}")
            self.ns.sandbox.adopt(int(pid), self.ns.name)
        wait_for(lambda: (self.dir / "bgpd.vty").exists(), timeout=10, what="bgpd vty socket")
        return self

    def stop(self) -> None:
        """Stop bgpd, then zebra (they take a second or two to exit), by their recorded pids."""
        for daemon in reversed(FRR_DAEMONS):
            for pid in self.ns.sandbox.pids(self.ns.name, daemon):
                self.ns.sandbox.kill_pid(pid)

    def vtysh(self, *commands: str) -> str:
        args = ["vtysh", "--vty_socket", str(self.dir)]
        for command in commands:
            args += ["-c", command]
        return self.ns.exec(*args).stdout

    def vtysh_json(self, command: str) -> Any:
        out = self.vtysh(command).strip()
        return json.loads(out) if out else {}
