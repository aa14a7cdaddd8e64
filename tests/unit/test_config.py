import json

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
