"""vpcni-ipam's allocator over the SQLite store: config, choice, idempotency, GC, exhaustion."""

from __future__ import annotations

import concurrent.futures
import ipaddress
import json

import pytest

from vpcni.cni.plugin import parse_cni_args
from vpcni.core.errors import InvalidConfig, IpamError
from vpcni.ipam.allocator import Allocator, owner_for
from vpcni.ipam.config import parse_settings
from vpcni.ipam.plugin import IpamDispatcher
from vpcni.ipam.store import SqliteStore

NET = "vpc-blue"


def settings(tmp_path, **ipam):
    raw = {"type": "vpcni-ipam", "store": {"type": "sqlite", "path": str(tmp_path / "ipam.db")}}
    raw.update(ipam)
    return parse_settings(raw)


def allocator(tmp_path, **ipam) -> Allocator:
    s = settings(tmp_path, **ipam)
    return Allocator(s, NET, SqliteStore(s.store))


def owner(cid, ifname="eth0", node="n1", args=""):
    return owner_for(NET, cid, ifname, parse_cni_args(args), node)


def addresses(result) -> list[str]:
    return [str(ip.address) for ip in result.ips]


@pytest.mark.parametrize("ipam, field", [
    ({}, "ipam"),
    ({"subnets": ["172.16.32.0/33"]}, "ipam.subnets"),
    ({"subnets": ["172.16.32.0/24"], "store": {"type": "etcd", "endpoints": []}},
     "ipam.store.endpoints"),
    ({"subnets": ["172.16.32.0/24"], "store": {"type": "etcd", "endpoints": ["127.0.0.1"]}},
     "ipam.store.endpoints"),
    ({"subnets": ["172.16.32.0/24"], "exclude": ["nonsense"]}, "ipam.exclude"),
    ({"ranges": [[{"subnet": "172.16.32.0/24", "gateway": "172.16.33.1"}]]}, "ipam.ranges[0][0]"),
    ({"subnets": ["172.16.32.0/24", "172.16.32.128/25"]}, "ipam"),
    ({"subnets": ["172.16.32.0/24"], "reservations": [{"pod": "a", "ips": ["172.16.99.1"]}]},
     "ipam"),
    ({"subnets": ["172.16.32.0/24"], "colour": "blue"}, "ipam.colour"),
])
def test_bad_config_is_code_7_naming_the_field(tmp_path, ipam, field):
    with pytest.raises(InvalidConfig) as err:
        settings(tmp_path, **ipam)
    assert err.value.code == 7
    assert f"'{field}'" in err.value.msg


def test_gateway_network_broadcast_and_exclusions_are_never_handed_out(tmp_path):
    alloc = allocator(tmp_path, subnets=["172.16.32.0/28"],
                      exclude=["172.16.32.2-172.16.32.4", "172.16.32.8/30"])
    got = [addresses(alloc.allocate(owner(f"c{i}")))[0] for i in range(6)]
    assert got == [f"172.16.32.{i}/28" for i in (5, 6, 7, 12, 13, 14)]
    with pytest.raises(IpamError):
        alloc.allocate(owner("c6"))


def test_exhaustion_names_vpc_and_subnet_and_frees_nothing(tmp_path):
    alloc = allocator(tmp_path, subnets=["172.16.32.0/29"])  # .2-.6 (.1 gateway)
    held = {f"c{i}": addresses(alloc.allocate(owner(f"c{i}"))) for i in range(5)}
    with pytest.raises(IpamError) as err:
        alloc.allocate(owner("one-too-many"))
    assert "vpc-blue" in err.value.msg and "172.16.32.0/29" in err.value.msg
    assert sorted(a.ip for a in alloc.store.list(NET)) == \
        sorted(v[0].split("/")[0] for v in held.values())
    # Still each one's own, and a repeated ADD of a holder works while full.
    assert addresses(alloc.allocate(owner("c3"))) == held["c3"]


def test_repeat_add_same_address_del_frees_exactly_it_del_twice_ok(tmp_path):
    alloc = allocator(tmp_path, subnets=["172.16.32.0/24", "fd00:32::/64"],
                      routes=[{"dst": "0.0.0.0/0"}])
    first = alloc.allocate(owner("a"))
    other = alloc.allocate(owner("b"))
    assert [ip.address.version for ip in first.ips] == [4, 6]
    assert str(first.ips[0].gateway) == "172.16.32.1" and str(first.ips[1].gateway) == "fd00:32::1"
    assert str(first.routes[0].dst) == "0.0.0.0/0"
    assert addresses(alloc.allocate(owner("a"))) == addresses(first)
    assert {a.ip for a in alloc.release("a", "eth0")} == \
        {str(ip.address.ip) for ip in first.ips}
    assert alloc.release("a", "eth0") == []
    assert [a.container_id for a in alloc.store.list(NET)] == ["b", "b"]
    assert addresses(alloc.allocate(owner("b"))) == addresses(other)


def test_ifname_is_part_of_the_key(tmp_path):
    alloc = allocator(tmp_path, subnets=["172.16.32.0/24"])
    a = addresses(alloc.allocate(owner("a", "eth0")))
    b = addresses(alloc.allocate(owner("a", "eth1")))
    assert a != b
    alloc.release("a", "eth1")
    assert [x.ifname for x in alloc.store.list(NET)] == ["eth0"]


def test_several_subnets_fill_one_after_the_other(tmp_path):
    alloc = allocator(tmp_path, ranges=[[{"subnet": "172.16.32.0/30"},
                                         {"subnet": "172.16.33.0/30", "gateway": "172.16.33.2"}]])
    got = [addresses(alloc.allocate(owner(f"c{i}")))[0] for i in range(2)]
    assert got == ["172.16.32.2/30", "172.16.33.1/30"]
    with pytest.raises(IpamError, match="172.16.32.0/30, 172.16.33.0/30"):
        alloc.allocate(owner("c2"))


def test_reservations_by_pod_name(tmp_path):
    alloc = allocator(tmp_path, subnets=["172.16.32.0/29"],
                      reservations=[{"pod": "db-0", "namespace": "prod", "ips": ["172.16.32.2"]}])
    others = [addresses(alloc.allocate(owner(f"c{i}")))[0] for i in range(4)]
    assert "172.16.32.2/29" not in others
    with pytest.raises(IpamError):
        alloc.allocate(owner("c9"))  # the reserved one is the only one left
    wrong_ns = "K8S_POD_NAMESPACE=dev;K8S_POD_NAME=db-0"
    with pytest.raises(IpamError):
        alloc.allocate(owner("c10", args=wrong_ns))
    args = "IgnoreUnknown=1;K8S_POD_NAMESPACE=prod;K8S_POD_NAME=db-0"
    assert addresses(alloc.allocate(owner("db", args=args))) == ["172.16.32.2/29"]
    [rec] = alloc.held("db", "eth0")
    assert rec.pod == "prod/db-0" and rec.node == "n1"


def test_gc_frees_this_nodes_invalid_attachments_only(tmp_path):
    alloc = allocator(tmp_path, subnets=["172.16.32.0/24"])
    for cid, node in (("keep", "n1"), ("gone", "n1"), ("elsewhere", "n2")):
        alloc.allocate(owner(cid, node=node))
    freed = alloc.gc({("keep", "eth0")}, "n1")
    assert [a.container_id for a in freed] == ["gone"]
    assert sorted(a.container_id for a in alloc.store.list(NET)) == ["elsewhere", "keep"]


def test_parallel_callers_on_one_node_never_share_an_address(tmp_path):
    """200 threads, each with its own allocator and SQLite connection, on one file."""
    s = settings(tmp_path, subnets=["172.16.32.0/24"])

    def add(i):
        alloc = Allocator(s, NET, SqliteStore(s.store))
        return addresses(alloc.allocate(owner(f"c{i}")))[0]
    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        got = list(pool.map(add, range(200)))
    assert len(set(got)) == 200
    net = ipaddress.ip_network("172.16.32.0/24")
    assert all(ipaddress.ip_interface(a).ip in net for a in got)
    rows = SqliteStore(s.store).list(NET)
    assert len(rows) == 200 and len({r.ip for r in rows}) == 200
    assert "172.16.32.1" not in {r.ip for r in rows}


def test_standalone_dispatcher_add_check_del_gc(tmp_path, monkeypatch):
    conf = {"cniVersion": "1.1.0", "name": "br-net", "type": "bridge",
            "ipam": {"type": "vpcni-ipam", "subnets": ["172.16.40.0/24"],
                     "store": {"type": "sqlite", "path": str(tmp_path / "s.db")}}}
    env = {"CNI_CONTAINERID": "c1", "CNI_IFNAME": "eth0", "CNI_NETNS": "/proc/self/ns/net",
           "CNI_PATH": "/nonexistent", "VPCNI_NODE_NAME": "n1"}
    d = IpamDispatcher()

    def call(command, config=conf, **extra):
        return d.run(env | {"CNI_COMMAND": command} | extra, json.dumps(config).encode())
    out, rc = call("ADD")
    assert rc == 0, out
    result = json.loads(out)
    assert result["ips"] == [{"address": "172.16.40.2/24", "gateway": "172.16.40.1"}]
    assert call("CHECK", conf | {"prevResult": result}) == ("", 0)
    out, rc = call("CHECK", conf | {"prevResult": {"cniVersion": "1.1.0", "ips": [
        {"address": "172.16.40.99/24"}]}})
    assert rc == 1 and "172.16.40.2" in json.loads(out)["msg"]
    assert call("STATUS") == ("", 0)
    assert call("GC", conf | {"cni.dev/valid-attachments": [
        {"containerID": "c1", "ifname": "eth0"}]}) == ("", 0)
    assert json.loads(call("ADD")[0])["ips"] == result["ips"]
    assert call("GC", conf | {"cni.dev/valid-attachments": []}) == ("", 0)
    out, rc = call("CHECK")
    assert rc == 1 and json.loads(out)["code"] == 3
    assert call("DEL") == ("", 0)
    out, rc = call("ADD", {k: v for k, v in conf.items() if k != "ipam"})
    assert rc == 1 and json.loads(out)["code"] == 7 and "ipam" in json.loads(out)["msg"]


def test_ipv6_exclusions_apply_to_their_family_only(tmp_path):
    alloc = allocator(tmp_path, subnets=["172.16.32.0/29", "fd00:32::/125"],
                      exclude=["fd00:32::2-fd00:32::3"])
    assert addresses(alloc.allocate(owner("a"))) == ["172.16.32.2/29", "fd00:32::4/125"]
    assert addresses(alloc.allocate(owner("b"))) == ["172.16.32.3/29", "fd00:32::5/125"]


def test_sqlite_path_under_a_regular_file_is_code_5_naming_the_field(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    for path in (tmp_path / "file" / "ipam.db", tmp_path / "file" / "sub" / "ipam.db"):
        s = parse_settings({"type": "vpcni-ipam", "subnets": ["172.16.32.0/24"],
                            "store": {"type": "sqlite", "path": str(path)}})
        with pytest.raises(IpamError) as info:
            SqliteStore(s.store)
        assert info.value.code == 5, info.value.msg
        assert "'ipam.store.path'" in info.value.msg and "not a directory" in \
            info.value.msg.lower(), info.value.msg


@pytest.mark.parametrize("store,field", [
    ({"type": "sqlite", "path": ""}, "ipam.store.path"),
    ({"type": "sqlite", "path": "/x\u0000y"}, "ipam.store.path"),
    ({"type": "sqlite", "timeout": 1e300}, "ipam.store.timeout"),
    ({"type": "sqlite", "timeout": float("nan")}, "ipam.store.timeout"),
    ({"type": "etcd", "endpoints": ["http://127.0.0.1:2379"], "timeout": 7200},
     "ipam.store.timeout"),
    ({"type": "sqlite", "subnets": []}, "ipam.store.subnets"),
], ids=["path-empty", "path-nul", "timeout-huge", "timeout-nan", "etcd-timeout-2h", "extra"])
def test_store_settings_are_bounded(store, field):
    """A timeout beyond a lock's range (OverflowError) or a path SQLite reads as a
    private temporary database are refused with the config, naming the field."""
    with pytest.raises(InvalidConfig) as info:
        parse_settings({"type": "vpcni-ipam", "subnets": ["172.16.32.0/24"], "store": store})
    assert repr(field) in info.value.msg, info.value.msg


# ---------------------------------------------------------------- etcd over TLS

HTTPS = "https://127.0.0.1:9"  # never reached: these stores fail before connecting


def etcd_tls(**keys) -> dict:
    return {"type": "vpcni-ipam", "subnets": ["172.16.32.0/24"],
            "store": {"type": "etcd", "endpoints": [HTTPS], **keys}}


def pem(path, body="-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n"):
    path.write_text(body)
    return str(path)


@pytest.mark.parametrize("keys,field,says", [
    ({"caFile": "ca.pem"}, "caFile", "absolute path"),
    ({"caFile": "/"}, "caFile", "absolute path"),
    ({"caFile": 5}, "caFile", "string"),
    ({"certFile": "/c.pem"}, "keyFile", "keyFile is missing"),
    ({"keyFile": "/k.pem"}, "keyFile", "certFile is missing"),
    ({"caFile": "/ca.pem", "endpoints": [HTTPS, "http://127.0.0.1:2379"]}, "caFile",
     "https://"),
    ({"certFile": "/c.pem", "keyFile": "/k.pem", "endpoints": ["http://127.0.0.1:2379"]},
     "certFile", "https://"),
    ({"cafile": "/ca.pem"}, "cafile", "unsupported"),
])
def test_etcd_tls_config_is_code_7_naming_the_key(keys, field, says):
    with pytest.raises(InvalidConfig) as info:
        parse_settings(etcd_tls(**keys))
    assert info.value.code == 7
    assert f"'ipam.store.{field}'" in info.value.msg and says in info.value.msg, info.value.msg


def test_etcd_tls_keys_are_dumped_only_when_set(tmp_path):
    """Configs rendered from a store config (the controller's NADs) say only what is set."""
    plain = parse_settings(etcd_tls()).store
    assert set(plain.model_dump()) == {"type", "endpoints", "prefix", "timeout"}
    assert "caFile" not in plain.model_dump_json()
    tls = parse_settings(etcd_tls(caFile="/ca.pem", certFile="/c.pem", keyFile="/k.pem")).store
    assert {k: v for k, v in tls.model_dump().items() if k.endswith("File")} == {
        "caFile": "/ca.pem", "certFile": "/c.pem", "keyFile": "/k.pem"}
    assert type(tls).model_validate(tls.model_dump()) == tls


@pytest.mark.parametrize("key", ["caFile", "certFile", "keyFile"])
def test_etcd_tls_files_that_cannot_be_used_are_code_5_naming_the_key(tmp_path, key):
    from vpcni.ipam.store import EtcdStore

    files = {k: pem(tmp_path / f"{k}.pem") for k in ("caFile", "certFile", "keyFile")}
    (tmp_path / "dir").mkdir()
    (tmp_path / "text").write_text("not PEM at all\n")
    for path, says in ((tmp_path / "missing.pem", "No such file or directory"),
                       (tmp_path / "dir", "Is a directory"),
                       (tmp_path / "text", "not PEM")):
        s = parse_settings(etcd_tls(**(files | {key: str(path)})))
        with pytest.raises(IpamError) as info:
            EtcdStore(s.store)
        assert info.value.code == 5
        assert f"'ipam.store.{key}'" in info.value.msg and str(path) in info.value.msg
        assert says in info.value.msg, info.value.msg
    EtcdStore(parse_settings(etcd_tls(**files)).store)  # all three usable: opens


def test_etcd_tls_file_gone_after_open_is_code_5(tmp_path):
    """requests looks for the files on each request: one removed since the store opened
    is code 5 naming the TLS keys, not an internal error (nothing is connected)."""
    from vpcni.ipam.store import EtcdStore

    files = {k: pem(tmp_path / f"{k}.pem") for k in ("caFile", "certFile", "keyFile")}
    store = EtcdStore(parse_settings(etcd_tls(**files)).store)
    (tmp_path / "caFile.pem").unlink()
    with pytest.raises(IpamError) as info:
        store.ping()
    assert info.value.code == 5 and "'ipam.store.caFile'" in info.value.msg, info.value.msg
