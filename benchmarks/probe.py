"""In-process probes inside lab namespaces, timed on this process's monotonic clock.

Both open their socket inside a namespace the way the product does (a
short-lived thread enters it; the socket keeps the namespace), so the
benchmark process itself sends, receives and takes every timestamp: no
second process, no clock to reconcile, no start-up in the measurement.

- `FirstReply`: from a pod, ARP for a target address every `interval` (5 ms)
  until someone answers, then ICMP echo to that MAC every `interval` until the
  target replies. The kernel's own resolver would retry ARP only every second.
- `NeighbourWatch`: in a node, the moment a permanent neighbour entry for an
  address appears (the kernel backend writes one per remote endpoint an EVPN
  type-2 route brings: the control plane has delivered).
"""

from __future__ import annotations

import ipaddress
import select
import socket
import struct
import threading
import time
from typing import Optional

from vpcni.backends.common.podif import netns_fd
from vpcni.backends.common.rtnl import socket_in

ETH_P_ALL = 0x0003
ETH_P_ARP = 0x0806
ETH_P_IP = 0x0800
PACKET_OUTGOING = 4
NETLINK_ROUTE = 0
RTMGRP_NEIGH = 0x4
RTM_NEWNEIGH = 28
NDA_DST = 1
NUD_PERMANENT = 0x80
BROADCAST = b"\xff" * 6


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


class FirstReply:
    """ARP, then ICMP echo, from `ifname` in the namespace at `netns` (address `src`)."""

    def __init__(self, netns: str, ifname: str, src: str, interval: float = 0.005):
        with netns_fd(netns) as fd:
            self.sock = socket_in(fd, socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        self.sock.bind((ifname, ETH_P_ALL))
        self.mac = self.sock.getsockname()[4]
        self.src = ipaddress.IPv4Address(src)
        self.interval = interval
        self.ident = 0x5650
        self._thread: Optional[threading.Thread] = None
        self.result: dict = {}

    def close(self) -> None:
        self.sock.close()

    def _arp_request(self, dst: ipaddress.IPv4Address) -> bytes:
        arp = struct.pack("!HHBBH6s4s6s4s", 1, ETH_P_IP, 6, 4, 1, self.mac, self.src.packed,
                          b"\0" * 6, dst.packed)
        return BROADCAST + self.mac + struct.pack("!H", ETH_P_ARP) + arp

    def _echo(self, dst: ipaddress.IPv4Address, dst_mac: bytes, seq: int) -> bytes:
        payload = b"vpcni-bench" + struct.pack("!d", time.monotonic())
        icmp = struct.pack("!BBHHH", 8, 0, 0, self.ident, seq) + payload
        icmp = icmp[:2] + struct.pack("!H", _checksum(icmp)) + icmp[4:]
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), seq, 0x4000, 64, 1, 0,
                         self.src.packed, dst.packed)
        ip = ip[:10] + struct.pack("!H", _checksum(ip)) + ip[12:]
        return dst_mac + self.mac + struct.pack("!H", ETH_P_IP) + ip + icmp

    def _drain(self) -> None:
        while select.select([self.sock], [], [], 0)[0]:
            self.sock.recv(65535)

    def start(self, dst: str, timeout: float = 10.0) -> None:
        """Begin probing `dst` in a thread; `wait()` returns the times."""
        self._drain()
        self.result = {}
        self._thread = threading.Thread(target=self._run, args=(ipaddress.IPv4Address(dst),
                                                                timeout), daemon=True)
        self._thread.start()

    def wait(self) -> dict:
        """{'start', 'arp', 'reply'}: monotonic seconds ('arp'/'reply' missing on timeout)."""
        self._thread.join()
        return self.result

    def _run(self, dst: ipaddress.IPv4Address, timeout: float) -> None:
        start = time.monotonic()
        self.result["start"] = start
        deadline = start + timeout
        dst_mac: Optional[bytes] = None
        seq = 0
        next_send = start
        while True:
            now = time.monotonic()
            if now > deadline:
                return
            if now >= next_send:
                seq = (seq + 1) & 0xFFFF
                frame = self._arp_request(dst) if dst_mac is None else self._echo(dst, dst_mac, seq)
                self.sock.send(frame)
                next_send = now + self.interval
            if not select.select([self.sock], [], [], max(0.0, next_send - time.monotonic()))[0]:
                continue
            frame, addr = self.sock.recvfrom(65535)
            at = time.monotonic()
            if addr[2] == PACKET_OUTGOING or len(frame) < 42:
                continue
            ethertype = struct.unpack("!H", frame[12:14])[0]
            if dst_mac is None and ethertype == ETH_P_ARP:
                op, sha, spa = struct.unpack("!H6s4s", frame[20:32])
                if op == 2 and spa == dst.packed:
                    dst_mac = sha
                    self.result["arp"] = at
                    next_send = at  # the first echo right away
            elif dst_mac is not None and ethertype == ETH_P_IP:
                ihl = (frame[14] & 0x0F) * 4
                proto, src = frame[23], frame[26:30]
                icmp = frame[14 + ihl:14 + ihl + 8]
                if proto == 1 and src == dst.packed and len(icmp) == 8:
                    kind, _, _, ident, _ = struct.unpack("!BBHHH", icmp)
                    if kind == 0 and ident == self.ident:
                        self.result["reply"] = at
                        return


class NeighbourWatch:
    """Times the first permanent neighbour entry for an address in a node's namespace."""

    def __init__(self, netns: str):
        with netns_fd(netns) as fd:
            self.sock = socket_in(fd, socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.sock.bind((0, RTMGRP_NEIGH))
        self._thread: Optional[threading.Thread] = None
        self.result: dict = {}

    def close(self) -> None:
        self.sock.close()

    def start(self, address: str, timeout: float = 10.0) -> None:
        while select.select([self.sock], [], [], 0)[0]:
            self.sock.recv(1 << 20)
        self.result = {}
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        args=(ipaddress.ip_address(address).packed, timeout))
        self._thread.start()

    def wait(self) -> dict:
        """{'seen': monotonic seconds} once the entry appeared (empty on timeout)."""
        self._thread.join()
        return self.result

    def _run(self, want: bytes, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.sock], [], [], left)[0]:
                return
            data = self.sock.recv(1 << 20)
            at = time.monotonic()
            if self._has(data, want):
                self.result["seen"] = at
                return

    @staticmethod
    def _has(data: bytes, want: bytes) -> bool:
        """Is there an RTM_NEWNEIGH, NUD_PERMANENT, NDA_DST == want in these messages?"""
        off = 0
        while off + 16 <= len(data):
            length, kind = struct.unpack_from("=IH", data, off)
            if length < 16:
                return False
            if kind == RTM_NEWNEIGH and length >= 28:
                state = struct.unpack_from("=H", data, off + 24)[0]
                attr = off + 28
                while state & NUD_PERMANENT and attr + 4 <= off + length:
                    alen, atype = struct.unpack_from("=HH", data, attr)
                    if alen < 4:
                        break
                    if atype == NDA_DST and data[attr + 4:attr + alen] == want:
                        return True
                    attr += (alen + 3) & ~3
            off += (length + 3) & ~3
        return False
