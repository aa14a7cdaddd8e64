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


OVS_SCHEMA = Path("/usr/share/openvswitch/vswitch.ovsschema")
OVS_DAEMONS = ("ovsdb-server", "ovs-vswitchd")


class Ovs:
    """ovsdb-server + ovs-vswitchd of one simulated node, inside its namespace.

    Every file (database, sockets, pid files, logs, bridge mgmt sockets) lives
    in `directory` (OVS_RUNDIR/OVS_DBDIR/OVS_LOGDIR/OVS_SYSCONFDIR all point
    there), so many instances run side by side. Both daemons `--detach`; their
    pids, read from the pid files, are handed to the sandbox, which kills them
    by pid. No kernel module is needed with `datapath_type=netdev`.
    """

    def __init__(self, ns: Netns, directory: Path):
        self.ns = ns
        self.dir = Path(directory)

    @property
    def db_socket(self) -> Path:
        return self.dir / "db.sock"

    @property
    def env(self) -> dict:
        d = str(self.dir)
        return {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "OVS_RUNDIR": d, "OVS_DBDIR": d,
                "OVS_LOGDIR": d, "OVS_SYSCONFDIR": d}

    def _detached(self, daemon: str, *args: str) -> None:
        pid_file = self.dir / f"{daemon}.pid"
        pid_file.unlink(missing_ok=True)
        self.ns.exec(daemon, *args, f"--pidfile={pid_file}",
                     f"--unixctl={self.dir / f'{daemon}.ctl'}",
                     f"--log-file={self.dir / f'{daemon}.log'}", "--detach", env=self.env)
        pid = wait_for(lambda: pid_file.exists() and pid_file.read_text().strip(), timeout=10,
                       what=f"{daemon} pid file {pid_file}")
        self.ns.sandbox.adopt(int(pid), self.ns.name)

    def start(self) -> "Ovs":
        db = self.dir / "conf.db"
        if not db.exists():
            run(["ovsdb-tool", "create", str(db), str(OVS_SCHEMA)])
        self._detached("ovsdb-server", str(db), f"--remote=punix:{self.db_socket}")
        self.vsctl("--no-wait", "init")
        self._detached("ovs-vswitchd", f"unix:{self.db_socket}")
        return self

    def stop(self) -> None:
        for daemon in reversed(OVS_DAEMONS):
            for pid in self.ns.sandbox.pids(self.ns.name, daemon):
                self.ns.sandbox.kill_pid(pid)

    def vsctl(self, *args: str) -> str:
        return run(["ovs-vsctl", f"--db=unix:{self.db_socket}", "--timeout=10", *args],
                   env=self.env).stdout

    def ofctl(self, command: str, *args: str, bridge: str = "br-int",
              options: tuple[str, ...] = ()) -> str:
        """`ovs-ofctl -O OpenFlow13 OPTIONS COMMAND <bridge> ARGS...`."""
        return run(["ovs-ofctl", "-O", "OpenFlow13", *options, command,
                    f"unix:{self.dir / f'{bridge}.mgmt'}", *args], env=self.env).stdout

    def uplink(self, address: str, ifname: str = "eth0", bridge: str = "br-phy") -> None:
        """Move the underlay address from `ifname` onto bridge `bridge` with `ifname` as its port.

        The userspace datapath tunnels natively only out of an OVS bridge: the
        VTEP address must be on a bridge port for its route lookup to find it.
        """
        self.vsctl("--may-exist", "add-br", bridge, "--", "set", "bridge", bridge,
                   "datapath_type=netdev", "--", "--may-exist", "add-port", bridge, ifname)
        self.ns.ip("addr", "del", address, "dev", ifname)
        self.ns.ip("addr", "add", address, "dev", bridge)
        self.ns.ip("link", "set", bridge, "up")


class Etcd:
    """One etcd member (Debian etcd-server) in `ns`, listening on `address` only.

    `address` is the namespace's loopback, or its fabric address when nodes in
    other namespaces use it. Started through `Netns.spawn`, so stop() and the
    sandbox's cleanup kill it by pid; its data survive a stop (restarts).
    """

    def __init__(self, ns: Netns, directory: Path, address: str = "127.0.0.1"):
        self.ns = ns
        self.dir = Path(directory)
        self.address = address
        self.log = self.dir / "etcd.log"

    scheme = "http"

    @property
    def endpoint(self) -> str:
        return f"{self.scheme}://{self.address}:2379"

    def server_args(self) -> list[str]:
        """Extra etcd flags (a subclass's TLS)."""
        return []

    def start(self, timeout: float = 30.0) -> "Etcd":
        peer = f"http://{self.address}:2380"
        with open(self.log, "ab") as log:
            proc = self.ns.spawn("etcd", "--name", "vpcni", "--data-dir", str(self.dir / "data"),
                                 "--listen-client-urls", self.endpoint,
                                 "--advertise-client-urls", self.endpoint,
                                 "--listen-peer-urls", peer,
                                 "--initial-advertise-peer-urls", peer,
                                 "--initial-cluster", f"vpcni={peer}", *self.server_args(),
                                 stdout=log, stderr=subprocess.STDOUT)
        wait_for(lambda: proc.poll() is not None or self.healthy(), timeout=timeout,
                 interval=0.1, what=f"etcd at {self.endpoint} in {self.ns.name}")
        if proc.poll() is not None:
            raise RuntimeError(f"etcd in {self.ns.name} exited with {proc.returncode}: "
                               f"{self.log.read_text()[-2000:]}")
        return self

    def healthy(self) -> bool:
        return self.ns.exec("etcdctl", "--endpoints", self.endpoint, "--dial-timeout", "1s",
                            "endpoint", "health", check=False, timeout=10).returncode == 0

    def stop(self) -> None:
        for pid in self.ns.sandbox.pids(self.ns.name, "etcd"):
            self.ns.sandbox.kill_pid(pid)
