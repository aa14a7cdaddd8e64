import json
import os

import pytest

from vpcni.core.config import NetworkConfig, NodeConfig
from vpcni.core.errors import InvalidConfig, UnsupportedField


def test_seed_config_parses_as_written():
    cfg = NetworkConfig.parse({"cniVersion": "1.1.0", "name": "pod-a", "type": "vpcni",
                               "vni": 300, "addr": "172.16.32.1/24"})
    net = cfg.network()
    assert (net.vni, net.port, net.mtu, net.vteps) == (300, 4789, None, [])
    assert str(cfg.addr) == "172.16.32.1/24"


def test_defaults_and_dedup_of_vteps():
    cfg = NetworkConfig.parse({"cniVersion": "1.0.0", "name": "n", "type": "vpcni", "vni": 7,
                               "vteps": ["198.51.100.2", "198.51.100.2", "198.51.100.3"]})
    assert [str(v) for v in cfg.network().vteps] == ["198.51.100.2", "198.51.100.3"]


@pytest.mark.parametrize("patch,exc,needle", [
    ({"vni": 16777216}, InvalidConfig, "'vni' = 16777216"),
    ({"port": 0}, InvalidConfig, "'port' = 0"),
    ({"vteps": ["x"]}, InvalidConfig, "'vteps[0]'"),
    ({"bogus": 1}, UnsupportedField, "'bogus' (value 1)"),
    ({"ipam": {"type": "host-local"}, "addr": "172.16.0.1/24"}, InvalidConfig, "exclude"),
    ({"runtimeConfig": {"mac": "zz"}}, InvalidConfig, "runtimeConfig.mac"),
])
def test_errors_name_field_and_value(patch, exc, needle):
    raw = {"cniVersion": "1.0.0", "name": "n", "type": "vpcni", "vni": 7} | patch
    with pytest.raises(exc) as info:
        NetworkConfig.parse(raw)
    assert needle in info.value.msg


def test_node_config_file(tmp_path, monkeypatch):
    path = tmp_path / "node.json"
    path.write_text(json.dumps({"vtepAddress": "198.51.100.1", "stateDir": str(tmp_path)}))
    monkeypatch.setenv("VPCNI_NODE_CONFIG", str(path))
    node = NodeConfig.load()
    assert str(node.vtepAddress) == "198.51.100.1" and node.source == str(path)


@pytest.mark.parametrize("content,needle", [
    ("{", "cannot read JSON"),
    ("[]", "must be a JSON object"),
    ('{"stateDir": "/x"}', "vtepAddress"),
    ('{"vtepAddress": "198.51.100.1", "colour": 1}', "'colour'"),
    ('{"vtepAddress": "300.1.1.1"}', "'vtepAddress'"),
])
def test_node_config_errors_name_file_and_field(tmp_path, content, needle):
    path = tmp_path / "node.json"
    path.write_text(content)
    with pytest.raises((InvalidConfig, UnsupportedField)) as info:
        NodeConfig.load(str(path))
    assert str(path) in info.value.msg and needle in info.value.msg


def test_missing_node_config_says_what_to_do(tmp_path):
    with pytest.raises(InvalidConfig, match="VPCNI_NODE_CONFIG"):
        NodeConfig.load(str(tmp_path / "nope.json"))


# ---------------------------------------------------------------- strict at the edge (issue 12)


@pytest.mark.parametrize("patch,needle", [
    ({"vteps": [3325256705]}, "'vteps[0]' = 3325256705: must be a string"),
    ({"vteps": [True]}, "'vteps[0]' = true: must be a string"),
    ({"prevResult": {"cniVersion": "1.1.0", "ips": [{"address": True}]}},
     "'prevResult.ips[0].address' = true: must be a string"),
    ({"prevResult": {"cniVersion": "1.1.0", "routes": [{"dst": ["10.0.0.0", 8]}]}},
     "'prevResult.routes[0].dst'"),
    ({"args": {"cni": True}}, "'args.cni' = true"),
    ({"args": {"cni": ["ips"]}}, "'args.cni'"),
    ({"args": {"cni": {"ips": "172.16.0.2/24"}}}, "'args.cni.ips'"),
    ({"args": {"cni": {"ips": ["172.16.0.2"]}}},
     "'args.cni.ips' = [\"172.16.0.2\"]: needs a prefix"),
    ({"args": {"cni": {"ips": ["224.0.0.1/24"]}}}, "cannot be a pod's address"),
    ({"args": {"cni": {"mac": 5}}}, "'args.cni.mac' = 5"),
    ({"args": 5}, "'args' = 5"),
], ids=["vtep-number", "vtep-bool", "prevResult-address-bool", "route-dst-list",
        "args.cni-bool", "args.cni-list", "args.cni.ips-string", "args.cni.ips-no-prefix",
        "args.cni.ips-multicast", "args.cni.mac-number", "args-number"])
def test_no_lax_types_where_addresses_and_args_go(patch, needle):
    """ipaddress would read 3325256705 or true as an address and [addr, prefix] as a
    network; args.cni of the wrong shape once reached ADD as an AttributeError."""
    raw = {"cniVersion": "1.0.0", "name": "n", "type": "vpcni", "vni": 7} | patch
    with pytest.raises(InvalidConfig) as info:
        NetworkConfig.parse(raw)
    assert needle in info.value.msg, info.value.msg


def test_args_cni_is_read_and_the_rest_of_args_kept():
    cfg = NetworkConfig.parse({"cniVersion": "1.0.0", "name": "n", "type": "vpcni", "vni": 7,
                               "args": {"cni": {"ips": ["172.16.0.2/24"],
                                                "mac": "02:00:00:00:00:01",
                                                "infinibandGUID": "x"},
                                        "k8s": {"a": 1}}})
    assert [str(i) for i in cfg.args.cni.ips] == ["172.16.0.2/24"]
    assert cfg.args.cni.mac == "02:00:00:00:00:01"
    assert cfg.args.model_extra == {"k8s": {"a": 1}}


def test_a_missing_field_is_named_without_quoting_the_whole_config():
    with pytest.raises(InvalidConfig) as info:
        NetworkConfig.parse({"cniVersion": "1.0.0", "type": "vpcni", "vni": 7})
    assert info.value.msg == "network config: 'name' is required"


@pytest.mark.parametrize("content,needle", [
    ('{"vtepAddress": "198.51.100.1", "lockTimeout": NaN}', "NaN is not a JSON value"),
    ('{"vtepAddress": "198.51.100.1", "lockTimeout": Infinity}', "Infinity is not a JSON value"),
    ('{"vtepAddress": "198.51.100.1", "lockTimeout": 1e400}', "'lockTimeout'"),
    ('{"vtepAddress": "198.51.100.1", "reconcileInterval": 1e400}', "'reconcileInterval'"),
    ('{"vtepAddress": 3325256705}', "'vtepAddress' = 3325256705: must be a string"),
], ids=["NaN", "Infinity", "lockTimeout-inf", "reconcileInterval-inf", "vtepAddress-number"])
def test_node_config_numbers_are_json_and_finite(tmp_path, content, needle):
    path = tmp_path / "node.json"
    path.write_text(content)
    with pytest.raises(InvalidConfig) as info:
        NodeConfig.load(str(path))
    assert str(path) in info.value.msg and needle in info.value.msg, info.value.msg


def test_node_config_differences_name_the_keys(tmp_path):
    a = NodeConfig.model_validate({"vtepAddress": "198.51.100.1"})
    b = NodeConfig.model_validate({"vtepAddress": "198.51.100.1", "backend": "kernel",
                                   "ovs": {"bridge": "br0"}})
    assert a.differences(a.model_copy(update={"source": "elsewhere"})) == []
    assert a.differences(b) == [("backend", "kernel", None), ("ovs", {"bridge": "br0"}, None)]


@pytest.mark.timeout(20)
def test_node_config_that_is_no_file_or_endless_is_code_7_at_once(tmp_path):
    """The agent reads the node config a request names: a FIFO must not block it, a
    device or a huge file not fill its memory, deep nesting not end in RecursionError."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    big = tmp_path / "big.json"
    big.write_text('{"vtepAddress": "198.51.100.1", "x": "' + "a" * (2 << 20) + '"}')
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    for path, needle in ((fifo, "not a regular file"), ("/dev/zero", "not a regular file"),
                         (tmp_path, "not a regular file"), (big, "larger than 1024 KiB"),
                         (deep, "nested too deeply")):
        with pytest.raises(InvalidConfig) as info:
            NodeConfig.load(str(path))
        assert str(path) in info.value.msg and needle in info.value.msg, info.value.msg


ROUTED = {"cniVersion": "1.1.0", "name": "green-a", "type": "vpcni", "vni": 400,
          "routing": {"vpc": "green", "l3vni": 4000, "subnet": "10.20.0.0/24"}}


def test_a_routed_subnet_gets_its_gateway_and_router():
    subnet = NetworkConfig.parse(ROUTED).network().subnet
    assert (str(subnet.prefix), str(subnet.gateway)) == ("10.20.0.0/24", "10.20.0.1")
    assert (subnet.router.vpc, subnet.router.l3vni, subnet.router.egress) == ("green", 4000, True)
    assert subnet.default_route and subnet.router.routes == ()
    raw = json.loads(json.dumps(ROUTED))
    raw["routing"] |= {"gateway": "10.20.0.254", "egress": False, "defaultRoute": False,
                       "routes": [{"dst": "192.0.2.0/24", "via": "10.20.0.9"}]}
    subnet = NetworkConfig.parse(raw).network().subnet
    assert str(subnet.gateway) == "10.20.0.254" and not subnet.router.egress
    assert not subnet.default_route
    assert [(str(r.dst), str(r.via)) for r in subnet.router.routes] == \
        [("192.0.2.0/24", "10.20.0.9")]
    assert NetworkConfig.parse({k: v for k, v in ROUTED.items() if k != "routing"}) \
        .network().subnet is None


@pytest.mark.parametrize("routing, needle", [
    ({"subnet": "10.20.0.1/24"}, "'routing.subnet' = \"10.20.0.1/24\": not a network"),
    ({"subnet": "fd00::/64"}, "IPv4 subnets only"),
    ({"subnet": "10.20.0.0/31"}, "prefix length must be 8 to 30"),
    ({"gateway": "10.21.0.1"}, "gateway 10.21.0.1 is not a host address of subnet"),
    ({"gateway": "10.20.0.0"}, "is not a host address"),
    ({"gateway": "10.20.0.255"}, "is not a host address"),
    ({"l3vni": 400}, "'routing.l3vni' = 400: it is the subnet's own 'vni'"),
    ({"l3vni": 0}, "'routing.l3vni' = 0"),
    ({"l3vni": "4000"}, "'routing.l3vni'"),
    ({"egress": "yes"}, "'routing.egress'"),
    ({"vpc": "no spaces"}, "'routing.vpc'"),
    ({"routes": [{"dst": "192.0.2.1/24", "via": "10.20.0.9"}]}, "'routing.routes[0].dst'"),
    ({"routes": [{"dst": "192.0.2.0/24", "via": "224.0.0.1"}]}, "not a unicast address"),
    ({"routes": [{"dst": "192.0.2.0/24"}]}, "'routing.routes[0].via' is required"),
    ({"bogus": 1}, "unsupported field 'routing.bogus'"),
    ({"subnet": "169.254.1.0/24"}, "overlaps 169.254.0.0/16, which no VPC subnet may use"),
    ({"subnet": "127.1.0.0/16"}, "overlaps 127.0.0.0/8"),
    ({"subnet": "224.0.0.0/24"}, "overlaps 224.0.0.0/4"),
    ({"routes": [{"dst": "0.0.0.0/0", "via": "10.20.0.9"}]}, "a default route is the VPC's egress"),
    ({"routes": [{"dst": "169.254.169.254/32", "via": "10.20.0.9"}]}, "overlaps 169.254.0.0/16"),
])
def test_routing_errors_name_the_field(routing, needle):
    raw = json.loads(json.dumps(ROUTED))
    raw["routing"] |= routing
    with pytest.raises((InvalidConfig, UnsupportedField)) as info:
        NetworkConfig.parse(raw)
    assert needle in info.value.msg, info.value.msg
