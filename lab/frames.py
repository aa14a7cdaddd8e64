"""Hand-built frames and captures for the lab's isolation tests: what a hostile pod
or a host on the underlay could send, and counting who receives it.

Builders are pure (bytes in, bytes out). `send_frames` writes raw frames from
inside a namespace through a packet socket; `Capture` counts the frames that
match a tcpdump filter on an interface, so a test proves what arrived instead
of inferring it from unanswered pings.
"""

from __future__ import annotations

import socket
import struct
import subprocess
import sys
from typing import Optional

from .netns import Netns, wait_for

BROADCAST = "ff:ff:ff:ff:ff:ff"
VXLAN_PORT = 4789
ETH_P_IP, ETH_P_ARP = 0x0800, 0x0806


def mac_bytes(mac: str) -> bytes:
    return bytes(int(x, 16) for x in mac.split(":"))


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ethernet(dst: str, src: str, ethertype: int, payload: bytes) -> bytes:
    return mac_bytes(dst) + mac_bytes(src) + struct.pack("!H", ethertype) + payload


def ipv4(src: str, dst: str, proto: int, payload: bytes, ttl: int = 64) -> bytes:
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 0x1234, 0, ttl, proto, 0,
                         socket.inet_aton(src), socket.inet_aton(dst))
    header = header[:10] + struct.pack("!H", checksum(header)) + header[12:]
    return header + payload


def udp(sport: int, dport: int, payload: bytes) -> bytes:
    """A UDP datagram with checksum 0 (allowed over IPv4: "not computed")."""
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def vxlan(vni: int, inner: bytes) -> bytes:
    return struct.pack("!II", 0x08000000, vni << 8) + inner


def udp_frame(dst_mac: str, src_mac: str, src_ip: str, dst_ip: str, dport: int,
              payload: bytes, sport: int = 40000) -> bytes:
    return ethernet(dst_mac, src_mac, ETH_P_IP,
                    ipv4(src_ip, dst_ip, socket.IPPROTO_UDP, udp(sport, dport, payload)))


def vxlan_frame(dst_mac: str, src_mac: str, src_ip: str, dst_ip: str, vni: int,
                inner: bytes, sport: int = 49152) -> bytes:
    """An Ethernet frame carrying a VXLAN packet for `vni` around `inner`."""
    return udp_frame(dst_mac, src_mac, src_ip, dst_ip, VXLAN_PORT, vxlan(vni, inner), sport)


def arp_frame(src_mac: str, sender_mac: str, sender_ip: str, target_ip: str, op: int = 1,
              dst_mac: str = BROADCAST, target_mac: str = "00:00:00:00:00:00") -> bytes:
    """ARP over Ethernet; a gratuitous ARP has sender_ip == target_ip."""
    body = struct.pack("!HHBBH6s4s6s4s", 1, ETH_P_IP, 6, 4, op, mac_bytes(sender_mac),
                       socket.inet_aton(sender_ip), mac_bytes(target_mac),
                       socket.inet_aton(target_ip))
    return ethernet(dst_mac, src_mac, ETH_P_ARP, body)


_SENDER = ("import socket,sys\n"
           "s=socket.socket(socket.AF_PACKET,socket.SOCK_RAW)\n"
           "s.bind((sys.argv[1],0))\n"
           "n=0\n"
           "for line in sys.stdin.read().split():\n"
           "    n+=s.send(bytes.fromhex(line)) > 0\n"
           "print(n)\n")


def send_frames(ns: Netns, ifname: str, frames: list[bytes]) -> int:
    """Write `frames` raw on `ifname` inside `ns`; how many the kernel took."""
    proc = ns.exec(sys.executable, "-c", _SENDER, ifname,
                   input="\n".join(f.hex() for f in frames))
    return int(proc.stdout.strip() or 0)


_PACED = ("import socket,sys,time\n"
          "s=socket.socket(socket.AF_PACKET,socket.SOCK_RAW)\n"
          "s.bind((sys.argv[1],0))\n"
          "frame=bytes.fromhex(sys.argv[2])\n"
          "for _ in range(int(sys.argv[3])):\n"
          "    s.send(frame); time.sleep(float(sys.argv[4]))\n")


def send_frames_paced(ns: Netns, ifname: str, frame: bytes, count: int,
                      interval: float) -> subprocess.Popen:
    """Send `frame` `count` times, `interval` seconds apart, in the background."""
    return ns.spawn(sys.executable, "-c", _PACED, ifname, frame.hex(), str(count), str(interval))


def send_udp(ns: Netns, src: Optional[str], dst: str, dport: int, payload: bytes,
             count: int = 1) -> None:
    """Plain UDP datagrams from `ns` (the node's own stack), source address `src`."""
    script = ("import socket,sys\n"
              "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
              "src=sys.argv[1]\n"
              "s.bind((src,0)) if src else None\n"
              "data=bytes.fromhex(sys.stdin.read().strip())\n"
              "for _ in range(int(sys.argv[4])): s.sendto(data,(sys.argv[2],int(sys.argv[3])))\n")
    ns.exec(sys.executable, "-c", script, src or "", dst, str(dport), str(count),
            input=payload.hex())


class Capture:
    """tcpdump on `ifname` in `ns` with a BPF `filter`; `stop()` returns the frames seen
    (one summary line each)."""

    def __init__(self, ns: Netns, filter: str, ifname: str = "eth1"):
        self.ns, self.filter, self.ifname = ns, filter, ifname
        self.proc: Optional[subprocess.Popen] = None

    def start(self) -> "Capture":
        self.proc = self.ns.spawn("tcpdump", "-n", "-l", "-e", "--immediate-mode", "-i",
                                  self.ifname, self.filter, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        wait_for(lambda: "listening" in self.proc.stderr.readline(), timeout=10,
                 what=f"tcpdump in {self.ns.name}")
        return self

    def stop(self) -> list[str]:
        if self.proc is None:
            return []
        self.proc.terminate()
        out, _ = self.proc.communicate(timeout=10)
        self.proc = None
        return [line for line in out.splitlines() if line and not line[0].isspace()]


class UdpListener:
    """A UDP socket on `port` in `ns` (all addresses) that counts datagrams for `seconds`."""

    _SCRIPT = ("import socket,sys,time\n"
               "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
               "s.setsockopt(socket.SOL_SOCKET,socket.SO_BROADCAST,1)\n"
               "s.bind(('0.0.0.0',int(sys.argv[1])))\n"
               "print('ready',flush=True)\n"
               "end=time.monotonic()+float(sys.argv[2]);n=0\n"
               "while True:\n"
               "    left=end-time.monotonic()\n"
               "    if left<=0: break\n"
               "    s.settimeout(left)\n"
               "    try: s.recv(4096); n+=1\n"
               "    except socket.timeout: break\n"
               "print(n,flush=True)\n")

    def __init__(self, ns: Netns, port: int, seconds: float = 2.0):
        self.proc = ns.spawn(sys.executable, "-c", self._SCRIPT, str(port), str(seconds),
                             stdout=subprocess.PIPE, text=True)
        wait_for(lambda: self.proc.stdout.readline().strip() == "ready", timeout=10,
                 what=f"UDP listener in {ns.name}")

    def count(self) -> int:
        out, _ = self.proc.communicate(timeout=30)
        return int(out.strip().splitlines()[-1])
