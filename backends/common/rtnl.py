"""A synchronous rtnetlink client: pyroute2's messages and request filters over a
plain netlink socket, without pyroute2's event loop.

pyroute2 0.9's `IPRoute` runs an asyncio event loop for every call: ~350-800 µs
per request here, against ~10 µs for the same request on a raw socket, and its
sockets join the rtnetlink multicast groups (every link, address and route
event of the namespace is queued to them). The backends make ~25 requests per
ADD, so that overhead was most of the agent's time per call.

`Rtnl` keeps the part of pyroute2 that is worth trusting: the keyword
arguments are turned into messages by pyroute2's own request filters
(`get_arguments_processor`, the same code `IPRoute.link(...)` runs), messages
are encoded and decoded by pyroute2's message classes, and errors are
pyroute2's `NetlinkError`. Only the transport is ours: one request at a time,
sent and read back synchronously on a socket that joins no group.

The calls the backends use are offered with IPRoute's names and arguments
(`link`, `addr`, `route`, `neigh`, `fdb`, `brport`), so the helpers work with
either. An `Rtnl` is not thread-safe; `ThreadRtnl` gives each thread its own.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import socket
import struct
import threading
import time
import weakref
from functools import partial
from typing import Callable, Optional

from pyroute2.iproute.linux import get_arguments_processor, get_dump_filter
from pyroute2.netlink import (NLM_F_ACK, NLM_F_APPEND, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL,
                              NLM_F_REPLACE, NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR,
                              NETLINK_ROUTE)
from pyroute2.netlink.exceptions import NetlinkDumpInterrupted, NetlinkError
from pyroute2.netlink.nlsocket import NetlinkRequest
from pyroute2.netlink.rtnl import (RTM_DELADDR, RTM_DELLINK, RTM_DELNEIGH, RTM_DELROUTE,
                                   RTM_GETADDR, RTM_GETLINK, RTM_GETNEIGH, RTM_GETROUTE,
                                   RTM_NEWADDR, RTM_NEWLINK, RTM_NEWNEIGH, RTM_NEWROUTE)
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
from pyroute2.netlink.rtnl.marshal import MarshalRtnl
from pyroute2.netlink.rtnl import ndmsg as nd
from pyroute2.netlink.rtnl.rtmsg import rtmsg
from pyroute2.netns import setns

LOG = logging.getLogger(__name__)

SOL_NETLINK = 270
NETLINK_EXT_ACK = 11
NETLINK_GET_STRICT_CHK = 12
NLM_F_DUMP_INTR = 0x10
AF_BRIDGE = 7
# Big enough for any answer of the kernel here (a dump part is at most 32 KiB; a
# PF's link message with 256 VFs ~80 KiB); larger ones fail loudly, never truncated.
RECV_SIZE = 256 * 1024
# The kernel answers EBUSY while another request holds what this one needs
# (pyroute2 retries the same way).
BUSY_RETRIES = 30
BUSY_WAIT = 0.05

_FLAGS = {
    "dump": NLM_F_REQUEST | NLM_F_DUMP,
    "get": NLM_F_REQUEST | NLM_F_ACK,
    "req": NLM_F_REQUEST | NLM_F_ACK,
}
_FLAGS["create"] = _FLAGS["req"] | NLM_F_CREATE | NLM_F_EXCL
_FLAGS["append"] = _FLAGS["req"] | NLM_F_CREATE | NLM_F_APPEND
_FLAGS["change"] = _FLAGS["req"] | NLM_F_REPLACE
_FLAGS["replace"] = _FLAGS["change"] | NLM_F_CREATE

# mode -> (message class, {command: (message type, flags)}), as IPRoute maps them.
_COMMANDS = {
    "link": (ifinfmsg, {"add": (RTM_NEWLINK, "create"), "set": (RTM_NEWLINK, "req"),
                        "del": (RTM_DELLINK, "req"), "get": (RTM_GETLINK, "get"),
                        "dump": (RTM_GETLINK, "dump")}),
    "addr": (ifaddrmsg, {"add": (RTM_NEWADDR, "create"), "replace": (RTM_NEWADDR, "replace"),
                         "del": (RTM_DELADDR, "req"), "dump": (RTM_GETADDR, "dump")}),
    "route": (rtmsg, {"add": (RTM_NEWROUTE, "create"), "replace": (RTM_NEWROUTE, "replace"),
                      "del": (RTM_DELROUTE, "req"), "get": (RTM_GETROUTE, "get"),
                      "dump": (RTM_GETROUTE, "dump")}),
    "neigh": (nd.ndmsg, {"add": (RTM_NEWNEIGH, "create"), "replace": (RTM_NEWNEIGH, "replace"),
                      "append": (RTM_NEWNEIGH, "append"), "del": (RTM_DELNEIGH, "req"),
                      "get": (RTM_GETNEIGH, "get"), "dump": (RTM_GETNEIGH, "dump")}),
}


def socket_in(fd: int, family: int, kind: int, proto: int) -> socket.socket:
    """A socket living in the namespace `fd` refers to.

    The calling thread enters the namespace (setns moves only the calling
    thread), creates the socket and goes back home at once; a socket keeps its
    namespace for life. Two setns calls cost ~20 µs here, a helper thread that
    enters instead ~180 µs, pyroute2's IPRoute(netns=...) (a forked helper
    process) 15-35 ms. A thread that cannot go home is not left serving
    requests in a pod's namespace: the process exits (its supervisor restarts it).
    """
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        setns(fd, flags=0)
        try:
            return socket.socket(family, kind, proto)
        finally:
            try:
                setns(home, flags=0)
            except OSError as exc:  # never seen; not survivable for this thread
                LOG.critical("cannot return thread %s to its network namespace: %s; exiting",
                             threading.current_thread().name, exc)
                os._exit(70)
    finally:
        os.close(home)


def netlink_socket(strict_check: bool = False) -> socket.socket:
    """A bound NETLINK_ROUTE socket of this thread's namespace that joins no group."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                         NETLINK_ROUTE)
    try:
        prepare(sock, strict_check)
    except OSError:
        sock.close()
        raise
    return sock


def prepare(sock: socket.socket, strict_check: bool = False) -> None:
    """Bind `sock` (groups 0) and ask for error texts (and strict dump filtering)."""
    sock.bind((0, 0))
    sock.setsockopt(SOL_NETLINK, NETLINK_EXT_ACK, 1)
    if strict_check:
        # The kernel then filters dumps by the header's fields (an FDB dump of one port).
        sock.setsockopt(SOL_NETLINK, NETLINK_GET_STRICT_CHK, 1)


def _nla_numbers(msg_class) -> dict[str, int]:
    """NLA name -> type number, from a pyroute2 message class's (public) nla_map."""
    out = {}
    for i, entry in enumerate(msg_class.nla_map):
        if len(entry) == 3:
            out[entry[1]] = entry[0]
        else:
            out[entry[0]] = i
    return out


_IFLA = _nla_numbers(ifinfmsg)
# What vpcni reads from link messages. A link message carries ~45 attributes
# (statistics, per-family configuration, XDP, ...) and pyroute2 decodes each
# in Python (~2.5 µs apiece): the others are dropped before decoding.
LINK_ATTRS = frozenset(_IFLA[name] for name in (
    "IFLA_ADDRESS", "IFLA_BROADCAST", "IFLA_IFNAME", "IFLA_MTU", "IFLA_LINK", "IFLA_MASTER",
    "IFLA_OPERSTATE", "IFLA_LINKINFO", "IFLA_IFALIAS", "IFLA_NUM_VF", "IFLA_VFINFO_LIST",
    "IFLA_PHYS_PORT_NAME", "IFLA_PHYS_SWITCH_ID", "IFLA_LINK_NETNSID", "IFLA_GROUP",
    "IFLA_PERM_ADDRESS", "IFLA_PARENT_DEV_NAME"))
# IFLA_EXT_MASK: the kernel leaves the statistics out (RTEXT_FILTER_SKIP_STATS),
# and the VF list in (RTEXT_FILTER_VF), as `ip link show` asks.
RTEXT_FILTER_VF = 1
RTEXT_FILTER_SKIP_STATS = 1 << 3
NLMSG_HDRLEN = 16
IFINFOMSG_LEN = 16


def keep_link_attrs(data: bytes, keep: frozenset) -> bytes:
    """`data` (netlink messages) with the link messages' attributes outside `keep`
    removed, lengths fixed; other messages unchanged."""
    out = []
    off = 0
    total = len(data)
    while off + NLMSG_HDRLEN <= total:
        length, kind = struct.unpack_from("=IH", data, off)
        if length < NLMSG_HDRLEN or off + length > total:
            out.append(data[off:])
            break
        if kind != RTM_NEWLINK or length < NLMSG_HDRLEN + IFINFOMSG_LEN:
            out.append(data[off:off + length])
        else:
            body = [data[off + NLMSG_HDRLEN:off + NLMSG_HDRLEN + IFINFOMSG_LEN]]
            p, end = off + NLMSG_HDRLEN + IFINFOMSG_LEN, off + length
            while p + 4 <= end:
                nla_len, nla_type = struct.unpack_from("=HH", data, p)
                if nla_len < 4:
                    break
                step = (nla_len + 3) & ~3
                if nla_type & 0x3FFF in keep:
                    body.append(data[p:p + step])
                p += step
            kept = b"".join(body)
            out.append(struct.pack("=I", NLMSG_HDRLEN + len(kept))
                       + data[off + 4:off + NLMSG_HDRLEN] + kept)
        off += (length + 3) & ~3
    return b"".join(out)


# Requests already encoded, by their arguments: the same request (a bridge's link
# looked up by name, an FDB dump of one port) is asked for on every ADD, and
# pyroute2's request filters and encoder cost ~50 µs a time. Only reads (get,
# dump) whose arguments are all plain values are kept; the sequence number is set
# per send. Changes are not kept: nearly all name an interface the ADD just made
# (its fresh ifindex: link set/del, addr add), are never sent again, and filled
# the cache with ~4 dead entries (~2 KB) per ADD/DEL cycle until it was cleared
# (soak benchmark: 3,331 of 3,388 entries after 800 cycles, 30 hits in all).
ENCODED_CACHE_SIZE = 4096
_ENCODED: dict[tuple, tuple[bytes, Optional[Callable]]] = {}
_PLAIN = (str, int, float, bool, type(None))
_CACHED_COMMANDS = frozenset({"get", "dump"})


def _cache_key(mode: str, command: str, kwarg: dict, parameters: Optional[dict]):
    if command not in _CACHED_COMMANDS:
        return None
    items = tuple(sorted(kwarg.items()))
    extra = tuple(sorted((parameters or {}).items()))
    if all(isinstance(v, _PLAIN) for _, v in items + extra):
        return (mode, command, items, extra)
    return None


def _encode(msg, msg_type: int, flags: int) -> bytes:
    msg["header"]["type"] = msg_type
    msg["header"]["flags"] = flags
    msg["header"]["sequence_number"] = 0
    msg["header"]["pid"] = 0
    msg.encode()
    return bytes(msg.data)


def _build(mode: str, command: str, kwarg: dict, parameters: Optional[dict]
           ) -> tuple[bytes, Optional[Callable]]:
    """The request IPRoute would send for `mode`/`command` with `kwarg` (its sequence
    number 0), and how to filter a dump's answer."""
    msg_class, commands = _COMMANDS[mode]
    try:
        msg_type, flags = commands[command]
    except KeyError:
        raise ValueError(f"{mode} command {command!r} is not supported here") from None
    kwarg = dict(kwarg)
    dump_filter, kwarg = get_dump_filter(mode, command, kwarg, parameters)
    arguments = get_arguments_processor(mode, command, kwarg, parameters)
    msg = msg_class()
    for field in msg.fields:
        msg[field[0]] = arguments.get_value(field[0], default=0, mode="field")
    for key, value in arguments.items():
        nla = msg_class.name2nla(key)
        if msg.valid_nla(nla) and value is not None:
            msg["attrs"].append([nla, value])
    if "attrs" in arguments:
        msg["attrs"].extend(arguments["attrs"])
    match = None
    if command == "dump" and dump_filter is not None:
        # pyroute2's own matching: a callable, or every key of the filter equal
        # (an empty filter matches everything: no need to call it).
        if callable(dump_filter) or any(isinstance(k, (str, tuple)) for k in dump_filter):
            match = partial(NetlinkRequest.match_one_message, dump_filter)
    return _encode(msg, msg_type, _FLAGS[flags]), match


_IFLA_PLAIN = {
    _IFLA["IFLA_IFNAME"]: "str", _IFLA["IFLA_IFALIAS"]: "str", _IFLA["IFLA_MTU"]: "u32",
    _IFLA["IFLA_MASTER"]: "u32", _IFLA["IFLA_LINK"]: "u32", _IFLA["IFLA_GROUP"]: "u32",
    _IFLA["IFLA_NUM_VF"]: "u32", _IFLA["IFLA_ADDRESS"]: "mac", _IFLA["IFLA_BROADCAST"]: "mac",
    _IFLA["IFLA_PERM_ADDRESS"]: "mac",
}
_IFLA_NAMES = {name: number for name, number in _IFLA.items() if number in _IFLA_PLAIN}
_IFINFOMSG = struct.Struct("=BxHiII")


class LinkMessage:
    """A link message (RTM_NEWLINK) read lazily.

    The header fields and the plain attributes read on every call (name, alias,
    MTU, master, MAC, ...) are unpacked with struct when asked for; anything else
    (nested link info, VF lists, the operational state) comes from pyroute2's
    ifinfmsg, decoded on first use from the attributes in `keep`. Offers what
    vpcni uses of a pyroute2 message: msg["index"], msg.get(name), get_nested.
    """

    __slots__ = ("_data", "_keep", "_fields", "_attrs", "_full")

    def __init__(self, data: bytes, keep: Optional[frozenset] = None):
        self._data = data
        self._keep = keep
        family, ifi_type, index, flags, change = _IFINFOMSG.unpack_from(data, NLMSG_HDRLEN)
        length, kind, hflags, seq, pid = struct.unpack_from("=IHHII", data, 0)
        self._fields = {"family": family, "ifi_type": ifi_type, "index": index,
                        "flags": flags, "change": change,
                        "header": {"length": length, "type": kind, "flags": hflags,
                                   "sequence_number": seq, "pid": pid}}
        attrs: dict[int, tuple[int, int]] = {}
        p, end = NLMSG_HDRLEN + IFINFOMSG_LEN, len(data)
        while p + 4 <= end:
            nla_len, nla_type = struct.unpack_from("=HH", data, p)
            if nla_len < 4:
                break
            attrs.setdefault(nla_type & 0x3FFF, (p + 4, nla_len - 4))
            p += (nla_len + 3) & ~3
        self._attrs = attrs
        self._full = None

    def __getitem__(self, key: str):
        if key in self._fields:
            return self._fields[key]
        return self._pyroute2()[key]

    def get(self, name: str, default=None):
        number = _IFLA_NAMES.get(name)
        if number is None:
            return self._pyroute2().get(name, default)
        where = self._attrs.get(number)
        if where is None:
            return default
        start, size = where
        kind = _IFLA_PLAIN[number]
        raw = self._data[start:start + size]
        if kind == "u32":
            return struct.unpack_from("=I", raw)[0]
        if kind == "str":
            return raw.split(b"\0", 1)[0].decode("utf-8", "replace")
        return ":".join(f"{b:02x}" for b in raw)

    def get_nested(self, *names):
        return self._pyroute2().get_nested(*names)

    def _pyroute2(self):
        if self._full is None:
            data = self._data if self._keep is None else keep_link_attrs(self._data, self._keep)
            msg = ifinfmsg(data)
            msg.decode()
            self._full = msg
        return self._full

    def __repr__(self) -> str:
        return f"LinkMessage(index={self['index']}, ifname={self.get('IFLA_IFNAME')!r})"


_RECV = threading.local()


def _recv_buffer() -> tuple[mmap.mmap, memoryview]:
    """The calling thread's receive buffer, shared by all its sockets: a socket's
    answer is copied out before the thread reads another one. One per socket cost a
    zeroed RECV_SIZE allocation for every pod namespace an ADD or DEL opened (glibc
    serves it from the thread's arena once a freed one raised its mmap threshold).
    An anonymous mapping, not a bytearray: only the pages answers were written to
    are resident (a bytearray is zeroed, all of it), and none is in malloc's arenas."""
    view = getattr(_RECV, "view", None)
    if view is None:
        view = _RECV.view = memoryview(mmap.mmap(-1, RECV_SIZE))
    return view.obj, view


class Rtnl:
    """One netlink socket and IPRoute's calls over it, synchronously (not thread-safe)."""

    def __init__(self, sock: Optional[socket.socket] = None, strict_check: bool = False,
                 link_attrs: Optional[frozenset] = LINK_ATTRS):
        """`sock`: a NETLINK_ROUTE socket made elsewhere (in another namespace); it
        is bound here and closed by close(). `link_attrs`: the attributes of link
        messages to decode (None: all of them)."""
        if sock is None:
            sock = netlink_socket(strict_check)
        else:
            prepare(sock, strict_check)
        self.sock = sock
        self.strict_check = strict_check
        self.link_attrs = link_attrs
        self.marshal = MarshalRtnl()
        self._seq = 0

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "Rtnl":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------ transport

    def _send(self, data: bytes, match: Optional[Callable]) -> list:
        """Send an encoded request (its sequence number set here) and read its answer."""
        self._seq = (self._seq % 0x7FFFFFFF) + 1
        seq = self._seq
        buf = bytearray(data)
        struct.pack_into("=I", buf, 8, seq)
        for attempt in range(BUSY_RETRIES):
            try:
                return self._exchange(bytes(buf), seq, match)
            except NetlinkError as exc:
                if exc.code != errno.EBUSY or attempt == BUSY_RETRIES - 1:
                    raise
                time.sleep(BUSY_WAIT)
        raise AssertionError("unreachable")

    def _exchange(self, data: bytes, seq: int, match: Optional[Callable]) -> list:
        self.sock.send(data)
        out: list = []
        interrupted = False
        buf, view = _recv_buffer()
        while True:
            # Into the calling thread's buffer: recv(RECV_SIZE) would allocate (and
            # fault in) the whole size on every read.
            n = self.sock.recv_into(buf, 0, socket.MSG_TRUNC)
            if n > len(buf):
                raise OSError(errno.EMSGSIZE, f"netlink answer of {n} bytes is larger than "
                              f"the {len(buf)}-byte buffer")
            chunk = bytes(view[:n])
            off = 0
            while off + NLMSG_HDRLEN <= n:
                length, kind, flags, msg_seq = struct.unpack_from("=IHHI", chunk, off)
                if length < NLMSG_HDRLEN or off + length > n:
                    break
                one = chunk[off:off + length]
                off += (length + 3) & ~3
                if msg_seq != seq:
                    continue  # a late answer to an earlier, abandoned request
                if flags & NLM_F_DUMP_INTR:
                    interrupted = True
                if kind in (NLMSG_ERROR, NLMSG_DONE):
                    reply = next(iter(self.marshal.parse(one)))
                    if reply["header"].get("error") is not None:
                        raise reply["header"]["error"]
                    if kind == NLMSG_DONE and interrupted:
                        raise NetlinkDumpInterrupted()
                    return out  # the acknowledgement, or the end of a dump
                # A get's answer is followed by its acknowledgement, a dump's
                # parts by NLMSG_DONE: read on until one of them.
                if kind == RTM_NEWLINK and self.link_attrs is not None:
                    reply = LinkMessage(one, self.link_attrs)
                else:
                    reply = next(iter(self.marshal.parse(one)), None)
                    if reply is None:
                        continue
                if match is None or match(reply):
                    out.append(reply)

    def _call(self, mode: str, command: str, kwarg: dict, parameters: Optional[dict] = None):
        key = _cache_key(mode, command, kwarg, parameters)
        hit = _ENCODED.get(key) if key is not None else None
        if hit is None:
            hit = _build(mode, command, kwarg, parameters)
            if key is not None:
                if len(_ENCODED) >= ENCODED_CACHE_SIZE:
                    _ENCODED.clear()
                _ENCODED[key] = hit
        data, match = hit
        return self._send(data, match)

    # ------------------------------------------------------------ IPRoute's calls

    def link(self, command: str, **kwarg) -> list:
        if command in ("get", "dump") and self.link_attrs is not None:
            kwarg.setdefault("ext_mask", RTEXT_FILTER_VF | RTEXT_FILTER_SKIP_STATS)
        return self._call("link", command, kwarg)

    def addr(self, command: str, **kwarg) -> list:
        return self._call("addr", command, kwarg)

    def route(self, command: str, **kwarg) -> list:
        if command in ("add", "replace"):
            # As IPRoute.route: a static unicast route unless said otherwise.
            kwarg["proto"] = kwarg.get("proto") or "static"
            kwarg["type"] = kwarg.get("type") or "unicast"
        return self._call("route", command, kwarg, {"strict_check": self.strict_check})

    def neigh(self, command: str, **kwarg) -> list:
        return self._call("neigh", command, kwarg)

    def fdb(self, command: str, **kwarg) -> list:
        """Bridge FDB entries: neighbour messages of family AF_BRIDGE (as IPRoute.fdb)."""
        kwarg["family"] = AF_BRIDGE
        if command in ("add", "del", "append") and not kwarg.get("state", 0) & nd.states["noarp"]:
            # As IPRoute.fdb: static (noarp) entries, permanent unless said
            # reachable, on the device itself unless said master.
            state = kwarg.get("state", 0) | nd.states["noarp"]
            if not state & (nd.states["permanent"] | nd.states["reachable"]):
                state |= nd.states["permanent"]
            kwarg["state"] = state
            if not kwarg.get("flags", 0) & (nd.flags["self"] | nd.flags["master"]):
                kwarg["flags"] = kwarg.get("flags", 0) | nd.flags["self"]
        return self.neigh(command, **kwarg)

    def brport(self, command: str, **kwarg) -> list:
        """Bridge-port settings (`set` only): a link message for a bridge_slave."""
        if command != "set":
            raise ValueError(f"brport command {command!r} is not supported here")
        return self.link("set", index=kwarg.pop("index", 0), kind="bridge_slave", **kwarg)


class ThreadRtnl:
    """IPRoute's calls on a socket of the calling thread's own (made on first use).

    The agent serves requests from a fixed pool of threads; each gets one socket
    for its lifetime (bounded by the pool), so no request waits for another's
    netlink round trip and none opens a socket of its own.
    """

    def __init__(self, strict_check: bool = False):
        self.strict_check = strict_check
        # Every thread's socket lives in the namespace this object was made in,
        # whichever namespace the thread is in when it first asks.
        self._netns = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        self._local = threading.local()
        self._all: "weakref.WeakSet[Rtnl]" = weakref.WeakSet()
        self._lock = threading.Lock()
        self._closed = False

    def _mine(self) -> Rtnl:
        rt = getattr(self._local, "rtnl", None)
        if rt is None:
            if self._closed:
                raise OSError(errno.EBADF, "netlink sockets closed")
            sock = socket_in(self._netns, socket.AF_NETLINK,
                             socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_ROUTE)
            rt = self._local.rtnl = Rtnl(sock=sock, strict_check=self.strict_check)
            with self._lock:
                self._all.add(rt)
        return rt

    def link(self, command: str, **kwarg) -> list:
        return self._mine().link(command, **kwarg)

    def addr(self, command: str, **kwarg) -> list:
        return self._mine().addr(command, **kwarg)

    def route(self, command: str, **kwarg) -> list:
        if command in ("add", "replace"):
            # As IPRoute.route: a static unicast route unless said otherwise.
            kwarg["proto"] = kwarg.get("proto") or "static"
            kwarg["type"] = kwarg.get("type") or "unicast"
        return self._mine().route(command, **kwarg)

    def neigh(self, command: str, **kwarg) -> list:
        return self._mine().neigh(command, **kwarg)

    def fdb(self, command: str, **kwarg) -> list:
        return self._mine().fdb(command, **kwarg)

    def brport(self, command: str, **kwarg) -> list:
        return self._mine().brport(command, **kwarg)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for rt in list(self._all):
                rt.close()
            self._all.clear()
            os.close(self._netns)

    def __enter__(self) -> "ThreadRtnl":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
