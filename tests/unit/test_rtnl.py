"""The synchronous rtnetlink client: the same requests as pyroute2's IPRoute, and
answers read back correctly (in a namespace of its own)."""

import os
import socket
import subprocess
import threading
import uuid

import pytest
from pyroute2 import IPBatch
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import ndmsg

from vpcni.backends.common import podif
from vpcni.backends.common.rtnl import LINK_ATTRS, Rtnl, ThreadRtnl, keep_link_attrs, socket_in

PERM_NOARP = ndmsg.states["permanent"] | ndmsg.states["noarp"]
# Every call form the backends make (kernel, veth, pod interface, OVS).
CALLS = [
    ("link", "add", dict(ifname="vpx", kind="veth", mtu=1450,
                         peer={"ifname": "eth1", "mtu": 1450, "address": "02:00:00:00:00:01",
                               "net_ns_fd": 5})),
    ("link", "set", dict(index=5, ifalias="vpcni:att=a/b/c", af_spec=podif.NO_IPV6_LINK_LOCAL)),
    ("link", "set", dict(ifname="vpx", ifalias="vpcni:att=a/b/c",
                         af_spec=podif.NO_IPV6_LINK_LOCAL)),
    ("link", "set", dict(index=5, state="up", mtu=1400, address="02:00:00:00:00:01",
                         ifalias="x")),
    ("link", "set", dict(index=5, master=7, state="up")),
    ("link", "set", dict(index=5, master=0, state="down")),
    ("link", "add", dict(ifname="vpbr1", kind="bridge", br_stp_state=0, br_mcast_snooping=0)),
    ("link", "add", dict(ifname="vpvx1", kind="vxlan", vxlan_id=1, vxlan_port=4789,
                         vxlan_learning=0, mtu=1450, master=3, vxlan_local="198.51.100.1")),
    ("link", "del", dict(index=5)),
    ("link", "get", dict(ifname="eth0", ext_mask=9)),
    ("addr", "add", dict(index=5, address="10.0.0.1", prefixlen=24, broadcast=True)),
    ("addr", "add", dict(index=5, address="fd00::1", prefixlen=64, flags=0x02)),
    ("route", "add", dict(dst="10.1.0.0/16", oif=5, family=socket.AF_INET, gateway="10.0.0.254",
                          priority=5, metrics={"mtu": 1400})),
    ("route", "add", dict(dst="0.0.0.0/0", oif=5, family=socket.AF_INET, gateway="10.0.0.254")),
    ("neigh", "replace", dict(ifindex=5, dst="10.0.0.9", lladdr="02:00:00:00:00:09",
                              state=ndmsg.states["permanent"])),
    ("neigh", "del", dict(ifindex=5, dst="10.0.0.9")),
    ("fdb", "replace", dict(ifindex=5, lladdr="02:00:00:00:00:09", dst="198.51.100.2",
                            state=PERM_NOARP, flags=ndmsg.flags["self"])),
    ("fdb", "append", dict(ifindex=5, lladdr="00:00:00:00:00:00", dst="198.51.100.2",
                           state=PERM_NOARP, flags=ndmsg.flags["self"])),
    ("fdb", "replace", dict(ifindex=5, lladdr="02:00:00:00:00:09",
                            state=ndmsg.states["reachable"],
                            flags=ndmsg.flags["master"] | ndmsg.flags["ext_learned"])),
    ("fdb", "del", dict(ifindex=5, lladdr="02:00:00:00:00:09", flags=ndmsg.flags["master"])),
    ("fdb", "add", dict(ifindex=5, lladdr="02:00:00:00:00:09", dst="198.51.100.2")),
    ("brport", "set", dict(index=5, learning=0, neigh_suppress=1)),
    ("fdb", "dump", dict(ifindex=5, dump_filter=None)),
    ("neigh", "dump", dict(NDA_IFINDEX=5, dump_filter=None)),
    ("addr", "dump", dict(family=2, index=5, dump_filter=None)),
    ("route", "dump", dict()),
]


def _without_seq_and_pid(data: bytes) -> bytes:
    return data[:8] + data[16:]


@pytest.mark.parametrize("mode,command,kwarg", CALLS,
                         ids=[f"{m}-{c}-{i}" for i, (m, c, _) in enumerate(CALLS)])
def test_requests_are_byte_for_byte_ipbatch(mode, command, kwarg):
    batch = IPBatch()
    try:
        getattr(batch, mode)(command, **dict(kwarg))
        want = bytes(batch.asyncore.batch)
    finally:
        batch.close()
    sent: list[bytes] = []
    rt = Rtnl(link_attrs=None)
    try:
        rt._exchange = lambda data, seq, match: sent.append(bytes(data)) or []
        getattr(rt, mode)(command, **dict(kwarg))
    finally:
        rt.close()
    assert _without_seq_and_pid(sent[0]) == _without_seq_and_pid(want)


@pytest.fixture
def netns():
    name = f"vpt{uuid.uuid4().hex[:8]}-rt"
    subprocess.run(["ip", "netns", "add", name], check=True)
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        yield name, fd
    finally:
        os.close(fd)
        subprocess.run(["ip", "netns", "del", name], check=False)


def _rtnl_in(fd: int, **kw) -> Rtnl:
    return Rtnl(sock=socket_in(fd, socket.AF_NETLINK, socket.SOCK_RAW, 0), **kw)


def test_answers_errors_and_dumps_in_a_namespace(netns):
    name, fd = netns
    with _rtnl_in(fd, strict_check=True) as rt:
        rt.link("add", ifname="vptbr", kind="bridge")
        link = rt.link("get", ifname="vptbr")[0]
        assert link.get("IFLA_IFNAME") == "vptbr"
        assert link.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND") == "bridge"
        rt.link("set", index=link["index"], ifalias="vpcni:x", state="up", mtu=1400)
        link = rt.link("get", index=link["index"])[0]
        assert (link.get("IFLA_IFALIAS"), link.get("IFLA_MTU"), link["flags"] & 1) == \
            ("vpcni:x", 1400, 1)
        # Dropped before decoding: attributes vpcni never reads.
        assert link.get("IFLA_STATS64") is None and link.get("IFLA_AF_SPEC") is None
        with pytest.raises(NetlinkError) as exc:
            rt.link("add", ifname="vptbr", kind="bridge")
        assert exc.value.code == 17  # EEXIST, with the kernel's text
        with pytest.raises(NetlinkError) as exc:
            rt.link("get", ifname="nosuchdev0")
        assert exc.value.code == 19
        rt.addr("add", index=link["index"], address="10.9.0.1", prefixlen=24)
        addrs = rt.addr("dump", family=socket.AF_INET, index=link["index"])
        assert [(a.get("IFA_ADDRESS"), a["prefixlen"]) for a in addrs] == [("10.9.0.1", 24)]
        assert {m.get("IFLA_IFNAME") for m in rt.link("dump")} == {"lo", "vptbr"}
        # The socket still works after errors (no answer is left behind).
        assert rt.link("get", index=1)[0].get("IFLA_IFNAME") == "lo"
    out = subprocess.run(["ip", "-n", name, "-o", "addr", "show", "vptbr"], check=True,
                         capture_output=True, text=True).stdout
    assert "10.9.0.1/24" in out


def test_keep_link_attrs_leaves_other_messages_alone():
    other = bytes.fromhex("24000000020000000100000000000000000000001000000000000000"
                          "0000000000000000")
    assert keep_link_attrs(other, LINK_ATTRS) == other


def test_thread_sockets_live_in_the_namespace_the_object_was_made_in(netns):
    name, fd = netns
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    from pyroute2.netns import setns
    setns(fd, flags=0)
    try:
        per_thread = ThreadRtnl()
    finally:
        setns(home, flags=0)
        os.close(home)
    names: dict[str, set] = {}

    def look(tag: str) -> None:
        names[tag] = {m.get("IFLA_IFNAME") for m in per_thread.link("dump")}

    try:
        per_thread.link("add", ifname="vptdummy", kind="bridge")
        threads = [threading.Thread(target=look, args=(str(i),)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        look("main")
    finally:
        per_thread.close()
    # Every thread saw the namespace's links, not the test's own namespace.
    assert all(seen == {"lo", "vptdummy"} for seen in names.values()), names
    with pytest.raises(OSError):
        per_thread.link("dump")


def test_link_messages_read_as_pyroute2_reads_them(netns):
    """The lazily read link message answers like pyroute2's own decoding, plain
    attributes and nested ones alike, for every kind of link the backends make."""
    from pyroute2 import IPRoute

    name, fd = netns
    with _rtnl_in(fd) as rt:
        rt.link("add", ifname="vptbr", kind="bridge")
        br = rt.link("get", ifname="vptbr")[0]["index"]
        rt.link("add", ifname="vptvx", kind="vxlan", vxlan_id=42, vxlan_port=4789,
                vxlan_learning=0, master=br, vxlan_local="198.51.100.9", mtu=1450)
        rt.link("add", ifname="vptv0", kind="veth", peer={"ifname": "vptv1"})
        v0 = rt.link("get", ifname="vptv0")[0]["index"]
        rt.link("set", index=v0, master=br, ifalias="vpcni:att=n/c/eth1")
        ours = {m.get("IFLA_IFNAME"): m for m in rt.link("dump")}
    from pyroute2.netns import setns
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    setns(fd, flags=0)
    try:
        with IPRoute() as ipr:
            theirs = {m.get("IFLA_IFNAME"): m for m in ipr.link("dump")}
    finally:
        setns(home, flags=0)
        os.close(home)
    assert set(ours) == set(theirs) == {"lo", "vptbr", "vptvx", "vptv0", "vptv1"}
    for ifname, mine in ours.items():
        ref = theirs[ifname]
        for field in ("index", "flags", "family"):
            assert mine[field] == ref[field], (ifname, field)
        for attr in ("IFLA_IFNAME", "IFLA_IFALIAS", "IFLA_MTU", "IFLA_MASTER", "IFLA_ADDRESS",
                     "IFLA_LINK", "IFLA_GROUP", "IFLA_OPERSTATE"):
            assert mine.get(attr) == ref.get(attr), (ifname, attr)
        for path in (("IFLA_LINKINFO", "IFLA_INFO_KIND"),
                     ("IFLA_LINKINFO", "IFLA_INFO_DATA", "IFLA_VXLAN_ID"),
                     ("IFLA_LINKINFO", "IFLA_INFO_DATA", "IFLA_VXLAN_LOCAL"),
                     ("IFLA_LINKINFO", "IFLA_INFO_SLAVE_DATA", "IFLA_BRPORT_LEARNING")):
            assert mine.get_nested(*path) == ref.get_nested(*path), (ifname, path)
