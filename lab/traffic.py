"""Real traffic between simulated hosts: ICMP and a TCP identity service.

The TCP service answers every connection with its host's name, so a test
proves not only that a connection was made but whom it reached (two VPCs
may use the same addresses).
"""

from __future__ import annotations

import subprocess
import threading
import time

from .netns import Netns, wait_for

PYTHON = "/usr/bin/python3"
IDENT_PORT = 7777

_SERVER = r"""
import socket, sys
name, port = sys.argv[1].encode(), int(sys.argv[2])
s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("::", port)); s.listen(64)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    try:
        c.sendall(name + b"\n")
    finally:
        c.close()
"""

_CLIENT = r"""
import socket, sys
try:
    c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3]))
    print(c.recv(256).decode().strip())
except OSError as e:
    print("ERR", e); sys.exit(1)
"""


def start_ident_server(ns: Netns, name: str, port: int = IDENT_PORT) -> subprocess.Popen:
    """Start the identity service in `ns` (killed by the namespace's cleanup)."""
    proc = ns.spawn(PYTHON, "-S", "-c", _SERVER, name, str(port), stdout=subprocess.PIPE)
    line = proc.stdout.readline().decode().strip()
    if line != "ready":
        raise RuntimeError(f"identity server in {ns.name} did not start")
    return proc


def tcp_ident(ns: Netns, dst: str, port: int = IDENT_PORT, timeout: float = 2.0) -> str | None:
    """Who answers a TCP connection to dst:port from `ns`; None when nobody does."""
    proc = ns.exec(PYTHON, "-S", "-c", _CLIENT, dst, str(port), str(timeout), check=False,
                   timeout=timeout + 10)
    return proc.stdout.strip() if proc.returncode == 0 else None


def wait_ping(ns: Netns, dst: str, timeout: float = 10.0) -> float:
    """Ping until the first reply; the seconds it took."""
    start = time.monotonic()
    wait_for(lambda: ns.ping(dst, count=1, timeout=0.5), timeout=timeout, interval=0.0,
             what=f"ping {dst} from {ns.name}")
    return time.monotonic() - start


def continuous_ping(ns: Netns, dst: str, seconds: float, interval: float = 0.1):
    """Start `ping -i interval` for `seconds` from `ns`; returns the thread running it,
    whose `.result` is (sent, received) once joined."""
    count = int(seconds / interval)

    def go():
        proc = ns.exec("ping", "-n", "-q", "-i", str(interval), "-W", "1", "-c", str(count), dst,
                       check=False, timeout=seconds + 30)
        stats = [l for l in proc.stdout.splitlines() if "packets transmitted" in l][0].split()
        thread.result = (int(stats[0]), int(stats[3]))
    thread = threading.Thread(target=go)
    thread.result = None
    thread.start()
    return thread
