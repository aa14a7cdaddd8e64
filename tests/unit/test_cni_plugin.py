"""The CNI spec layer (cni/plugin.py, cni/versions.py) without namespaces.

Dispatcher.run is a pure function of env and stdin up to the handler call;
here the handler is a recording stand-in, so these tests reach no backend.
"""

from __future__ import annotations

import ipaddress
import json

import pytest

from tests.spec_shapes import check_error, check_result, check_version_output
from vpcni.cni import versions
from vpcni.cni.plugin import Dispatcher, parse_cni_args
from vpcni.core.errors import CheckFailed, InvalidEnvironment
from vpcni.core.models import DNS, Interface, IPConfig, Result, Route

SUPPORTED = versions.SUPPORTED
OLD = [v for v in SUPPORTED if not versions.at_least(v, "1.0.0")]


class RecordingHandler:
    """Stands in for core.handler.Handler: records requests, returns a fixed result."""

    def __init__(self, result: Result | None = None, raises: Exception | None = None):
        self.requests = []
        self.result = result or Result()
        self.raises = raises

    def _record(self, req):
        self.requests.append(req)
        if self.raises is not None:
            raise self.raises

    def add(self, req):
        self._record(req)
        return self.result

    def delete(self, req):
        self._record(req)

    def check(self, req):
        self._record(req)

    def status(self, req):
        self._record(req)

    def gc(self, req):
        self._record(req)
        return []

    def close(self):
        pass


class FakeDispatcher(Dispatcher):
    def __init__(self, handler: RecordingHandler):
        super().__init__(node=None)
        self.fake = handler

    def handler(self):
        return self.fake


def full_result() -> Result:
    """A result with every 1.1.0 field set: the converter must drop what older versions lack."""
    return Result(
        interfaces=[Interface(name="vp0a1b2c3d", mac="02:00:00:00:00:02", mtu=1450,
                              socketPath="/run/vhost.sock", pciID="0000:3b:00.2"),
                    Interface(name="eth1", mac="02:00:00:00:00:01", mtu=1450,
                              sandbox="/var/run/netns/pod", socketPath="/run/vhost2.sock",
                              pciID="0000:3b:00.3")],
        ips=[IPConfig(address=ipaddress.ip_interface("10.1.0.2/24"),
                      gateway=ipaddress.ip_address("10.1.0.1"), interface=1),
             IPConfig(address=ipaddress.ip_interface("fd00::2/64"), interface=1)],
        routes=[Route(dst="0.0.0.0/0", gw=ipaddress.ip_address("10.1.0.1"), mtu=1400,
                      advmss=1360, priority=5, table=100, scope=0)],
        dns=DNS(nameservers=["10.1.0.53"], domain="example", search=["example"],
                options=["ndots:2"]),
    )


def env(command: str, netns: str = "/", **extra) -> dict:
    out = {"CNI_COMMAND": command, "CNI_CONTAINERID": "c1", "CNI_NETNS": netns,
           "CNI_IFNAME": "eth1", "CNI_PATH": "/opt/cni/bin"}
    out.update(extra)
    return {k: v for k, v in out.items() if v is not None}


def config(version: str = "1.1.0", **extra) -> bytes:
    cfg = {"cniVersion": version, "name": "vpc1", "type": "vpcni", "vni": 100,
           "addr": "10.1.0.2/24"}
    cfg.update(extra)
    return json.dumps(cfg).encode()


def run(env_, stdin, handler=None):
    handler = handler or RecordingHandler()
    out, rc = FakeDispatcher(handler).run(env_, stdin)
    return out, rc, handler


def failed(out: str, rc: int, code: int, version: str = versions.CURRENT) -> dict:
    assert rc != 0, f"expected failure, got rc 0 and {out!r}"
    body = json.loads(out)
    check_error(body, version)
    assert body["code"] == code, body
    return body


# ---------------------------------------------------------------- VERSION


@pytest.mark.parametrize("stdin", [b"", b"garbage", b"[1, 2]", b"null", b"\xff\xfe",
                                   b'{"cniVersion": "9.9.9"}', b'{"cniVersion": ["1.0.0"]}',
                                   b'{"cniVersion": {}}'],
                         ids=["empty", "garbage", "list", "null", "not-utf8", "unknown-version",
                              "version-list", "version-object"])
def test_version_any_stdin(stdin):
    out, rc, handler = run({"CNI_COMMAND": "VERSION"}, stdin)
    assert rc == 0
    body = json.loads(out)
    check_version_output(body, SUPPORTED)
    assert body["cniVersion"] == versions.CURRENT
    assert not handler.requests


@pytest.mark.parametrize("version", SUPPORTED)
def test_version_echoes_a_supported_version(version):
    out, rc, _ = run({"CNI_COMMAND": "VERSION"}, json.dumps({"cniVersion": version}).encode())
    assert rc == 0
    body = json.loads(out)
    check_version_output(body, SUPPORTED)
    assert body["cniVersion"] == version


def test_version_needs_no_other_variable():
    out, rc, _ = run({"CNI_COMMAND": "VERSION", "CNI_CONTAINERID": "../../x"}, b"")
    assert rc == 0 and json.loads(out)["supportedVersions"] == list(SUPPORTED)


# ---------------------------------------------------------------- command, JSON, version


@pytest.mark.parametrize("command", [None, "", "add", "FOO", "VERSION "],
                         ids=["unset", "empty", "lowercase", "unknown", "trailing-space"])
def test_bad_command_is_code_4(command):
    e = env("ADD", CNI_COMMAND=command)
    out, rc, handler = run(e, config())
    body = failed(out, rc, 4)
    assert "CNI_COMMAND" in body["msg"] and repr(command or "") in body["msg"]
    assert "ADD" in body["msg"] and "GC" in body["msg"]  # lists the valid commands
    assert not handler.requests


@pytest.mark.parametrize("command", ["ADD", "DEL", "CHECK", "STATUS", "GC"])
@pytest.mark.parametrize("stdin", [b"", b"{", b"nope", b"\xff"], ids=["empty", "truncated",
                                                                       "word", "not-utf8"])
def test_stdin_not_json_is_code_6(command, stdin):
    body = failed(*run(env(command), stdin)[:2], 6)
    assert "JSON" in body["msg"]


@pytest.mark.parametrize("stdin", [b"[]", b"42", b'"s"', b"null"])
def test_stdin_not_an_object_is_code_6(stdin):
    body = failed(*run(env("ADD"), stdin)[:2], 6)
    assert "object" in body["msg"]


@pytest.mark.parametrize("raw", [
    {"name": "vpc1", "type": "vpcni", "vni": 1},
    {"cniVersion": "", "name": "vpc1", "type": "vpcni", "vni": 1},
    {"cniVersion": None, "name": "vpc1", "type": "vpcni", "vni": 1},
    {"cniVersion": 1.0, "name": "vpc1", "type": "vpcni", "vni": 1},
    {"cniVersion": "0.2.0", "name": "vpc1", "type": "vpcni", "vni": 1},
    {"cniVersion": "2.0.0", "name": "vpc1", "type": "vpcni", "vni": 1},
    {"cniVersion": "1.1", "name": "vpc1", "type": "vpcni", "vni": 1},
], ids=["missing", "empty", "null", "number", "0.2.0", "2.0.0", "1.1"])
@pytest.mark.parametrize("command", ["ADD", "DEL"])
def test_missing_or_unsupported_version_is_code_1(raw, command):
    body = failed(*run(env(command), json.dumps(raw).encode())[:2], 1)
    assert "cniVersion" in body["msg"]
    for v in SUPPORTED:
        assert v in body["msg"], f"{v} not listed in {body['msg']!r}"
    if isinstance(raw.get("cniVersion"), str) and raw["cniVersion"]:
        assert raw["cniVersion"] in body["msg"]


@pytest.mark.parametrize("version", ["0.3.0", "0.3.1"])
def test_check_before_0_4_0_is_code_1(version):
    out, rc, handler = run(env("CHECK"), config(version))
    body = failed(out, rc, 1, version)
    assert "CHECK" in body["msg"] and "0.4.0" in body["msg"] and version in body["msg"]
    assert not handler.requests


@pytest.mark.parametrize("version", ["0.3.1", "0.4.0", "1.0.0"])
@pytest.mark.parametrize("command", ["GC", "STATUS"])
def test_gc_status_before_1_1_0_are_code_1(command, version):
    extra = {"cni.dev/valid-attachments": []} if command == "GC" else {}
    out, rc, handler = run(env(command), config(version, **extra))
    body = failed(out, rc, 1, version)
    assert command in body["msg"] and "1.1.0" in body["msg"]
    assert not handler.requests


@pytest.mark.parametrize("command", ["CHECK", "STATUS", "GC", "DEL", "ADD"])
def test_each_command_reaches_the_handler_at_1_1_0(command):
    extra = {"cni.dev/valid-attachments": []} if command == "GC" else {}
    out, rc, handler = run(env(command), config("1.1.0", **extra))
    assert rc == 0, out
    assert [r.command for r in handler.requests] == [command]
    if command != "ADD":
        assert out == ""


def test_gc_without_valid_attachments_is_code_7():
    body = failed(*run(env("GC"), config())[:2], 7, "1.1.0")
    assert "cni.dev/valid-attachments" in body["msg"]


@pytest.mark.parametrize("key", ["cni.dev/valid-attachments", "cni.dev/attachments"])
def test_gc_valid_list_under_either_key(key):
    valid = [{"containerID": "c1", "ifname": "eth1"}]
    out, rc, handler = run(env("GC"), config(**{key: valid}))
    assert rc == 0, out
    [req] = handler.requests
    assert [(v.containerID, v.ifname) for v in req.config.gc_valid()] == [("c1", "eth1")]


@pytest.mark.parametrize("extra,field", [
    ({"prevResult": {"cniVersion": "1.1.0", "interfaces": 5}}, "'prevResult.interfaces'"),
    ({"prevResult": {"cniVersion": "1.1.0", "ips": [{"address": "nope"}]}},
     "'prevResult.ips[0].address'"),
    ({"dns": {"nameservers": 5}}, "'dns.nameservers'"),
], ids=["prevResult-interfaces", "prevResult-address", "dns-nameservers"])
def test_nested_config_parsed_before_the_handler(extra, field):
    """A malformed prevResult or dns fails as code 7 before ADD builds anything."""
    out, rc, handler = run(env("ADD"), config(**extra))
    body = failed(out, rc, 7)
    assert field in body["msg"]
    assert not handler.requests


# ---------------------------------------------------------------- environment


def test_add_needs_netns_del_does_not():
    body = failed(*run(env("ADD", netns=None), config())[:2], 4, "1.1.0")
    assert "CNI_NETNS" in body["msg"]
    out, rc, handler = run(env("DEL", netns=None), config())
    assert rc == 0 and handler.requests[0].netns is None


def test_del_tolerates_a_netns_that_is_gone():
    out, rc, handler = run(env("DEL", netns="/var/run/netns/gone-long-ago"), config())
    assert rc == 0, out


@pytest.mark.parametrize("raw,expected", [
    ("", {}),
    ("IgnoreUnknown=true;K8S_POD_NAME=x", {"IgnoreUnknown": "true", "K8S_POD_NAME": "x"}),
    ("IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;"
     "K8S_POD_INFRA_CONTAINER_ID=abc;K8S_POD_UID=u-1",
     {"IgnoreUnknown": "1", "K8S_POD_NAMESPACE": "default", "K8S_POD_NAME": "web-0",
      "K8S_POD_INFRA_CONTAINER_ID": "abc", "K8S_POD_UID": "u-1"}),
    ("A=1;;B=2;", {"A": "1", "B": "2"}),
    ("IP=10.0.0.2/24,fd00::2/64", {"IP": "10.0.0.2/24,fd00::2/64"}),
    ("K=a=b", {"K": "a=b"}),
    ("K=", {"K": ""}),
], ids=["empty", "multus", "kubelet", "empty-parts", "ip-list", "equals-in-value", "empty-value"])
def test_cni_args_lenient(raw, expected):
    assert parse_cni_args(raw) == expected


@pytest.mark.parametrize("raw", ["novalue", "A=1;junk", "=x"])
def test_cni_args_malformed_pair(raw):
    with pytest.raises(InvalidEnvironment) as info:
        parse_cni_args(raw)
    assert "CNI_ARGS" in info.value.msg


def test_cni_args_reach_the_handler():
    out, rc, handler = run(env("ADD", CNI_ARGS="IgnoreUnknown=true;K8S_POD_NAME=x"), config())
    assert rc == 0, out
    assert handler.requests[0].args == {"IgnoreUnknown": "true", "K8S_POD_NAME": "x"}


def test_cni_args_malformed_is_code_4():
    body = failed(*run(env("ADD", CNI_ARGS="K8S_POD_NAME"), config())[:2], 4, "1.1.0")
    assert "CNI_ARGS" in body["msg"] and "K8S_POD_NAME" in body["msg"]


# ---------------------------------------------------------------- results and errors


@pytest.mark.parametrize("version", SUPPORTED)
def test_convert_full_result(version):
    out = versions.convert(full_result(), version)
    check_result(out, version)
    json.dumps(out)
    host, ctr = out["interfaces"]
    assert ctr["sandbox"] == "/var/run/netns/pod" and "sandbox" not in host
    assert [ip["interface"] for ip in out["ips"]] == [1, 1]
    assert out["ips"][0]["gateway"] == "10.1.0.1"
    assert out["routes"][0]["gw"] == "10.1.0.1"
    assert out["dns"] == {"nameservers": ["10.1.0.53"], "domain": "example",
                          "search": ["example"], "options": ["ndots:2"]}
    if version == "1.1.0":
        assert ctr["mtu"] == 1450 and ctr["socketPath"] == "/run/vhost2.sock"
        assert ctr["pciID"] == "0000:3b:00.3"
        assert out["routes"][0] == {"dst": "0.0.0.0/0", "gw": "10.1.0.1", "mtu": 1400,
                                    "advmss": 1360, "priority": 5, "table": 100, "scope": 0}
    else:
        assert out["routes"][0] == {"dst": "0.0.0.0/0", "gw": "10.1.0.1"}
    if version in OLD:
        assert [ip["version"] for ip in out["ips"]] == ["4", "6"]
    else:
        assert all("version" not in ip for ip in out["ips"])


@pytest.mark.parametrize("version", SUPPORTED)
def test_convert_minimal_result(version):
    out = versions.convert(Result(), version)
    check_result(out, version)


@pytest.mark.parametrize("version", SUPPORTED)
def test_add_prints_the_result_in_the_asked_version(version):
    out, rc, _ = run(env("ADD"), config(version), RecordingHandler(result=full_result()))
    assert rc == 0, out
    check_result(json.loads(out), version)


def test_handler_error_keeps_code_and_details():
    err = CheckFailed("eth1: MTU 1400, recorded 1450", details="more")
    out, rc, _ = run(env("CHECK"), config("1.0.0"), RecordingHandler(raises=err))
    body = failed(out, rc, 999, "1.0.0")
    assert body["msg"] == "eth1: MTU 1400, recorded 1450" and body["details"] == "more"


def test_unexpected_exception_becomes_error_json():
    out, rc, _ = run(env("DEL"), config("0.4.0"), RecordingHandler(raises=KeyError("boom")))
    body = failed(out, rc, 999, "0.4.0")
    assert "KeyError" in body["msg"] and "boom" in body["msg"]


# ---------------------------------------------------------------- hostile input (issue 12)


@pytest.mark.parametrize("command", ["VERSION", "ADD"])
def test_deeply_nested_stdin(command):
    """VERSION answers whatever stdin holds (it once raised RecursionError: code 999);
    the other commands say code 6."""
    stdin = b"[" * 100_000 + b"]" * 100_000
    out, rc, handler = run({"CNI_COMMAND": command} if command == "VERSION" else env(command),
                           stdin)
    if command == "VERSION":
        assert rc == 0 and json.loads(out)["supportedVersions"] == list(SUPPORTED)
    else:
        assert "nested" in failed(out, rc, 6)["msg"]
    assert not handler.requests


def test_config_over_4_mib_is_code_7_before_it_is_parsed():
    """The standalone plugin's limit is the agent's (a request over 4 MiB: code 7)."""
    from vpcni.cni.plugin import MAX_STDIN

    stdin = config(padding="x" * MAX_STDIN)
    body = failed(*run(env("ADD"), stdin)[:2], 7)
    assert "4 MiB" in body["msg"]
    assert failed(*run(env("ADD"), config(padding="x" * 1000))[:2], 2)  # below: read


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_json_numbers_are_code_6(literal):
    stdin = config().replace(b'"vni": 100', f'"vni": {literal}'.encode())
    body = failed(*run(env("ADD"), stdin)[:2], 6)
    assert f"{literal} is not a JSON value" in body["msg"]


@pytest.mark.parametrize("args", [{"cni": True}, {"cni": ["x"]}, {"cni": {"mac": 5}},
                                  {"cni": {"ips": "10.1.0.9/24"}}])
def test_args_of_the_wrong_shape_stop_at_the_edge(args):
    """args.cni once reached ADD unchecked, where a non-object was an AttributeError."""
    out, rc, handler = run(env("ADD"), config(args=args))
    assert "'args" in failed(out, rc, 7)["msg"]
    assert not handler.requests


def test_parse_is_the_edge_without_the_handler():
    d = Dispatcher(node=None)
    req = d.parse(env("ADD"), config())
    assert req.command == "ADD" and req.container_id == "c1" and str(req.config.addr)
    assert d.parse({"CNI_COMMAND": "VERSION"}, b"") is None
    with pytest.raises(InvalidEnvironment):
        d.parse(env("ADD", CNI_IFNAME="a/b"), config())


class TestNamedNodeConfig:
    """The agent serves with its own node config; a request that names another file
    (VPCNI_NODE_CONFIG, which the shim read to find the agent) is checked."""

    @pytest.fixture
    def agent_config(self, tmp_path):
        from vpcni.core.config import NodeConfig

        path = tmp_path / "node.json"
        path.write_text(json.dumps({"vtepAddress": "198.51.100.1", "logFile": None,
                                    "stateDir": str(tmp_path / "state")}))
        return NodeConfig.load(str(path))

    def run_named(self, node, named):
        handler = RecordingHandler()
        extra = {} if named is None else {"VPCNI_NODE_CONFIG": str(named)}
        out, rc = Dispatcher(node, handler=handler).run(env("ADD", **extra), config())
        return out, rc, handler

    def test_its_own_file_by_any_name_is_served(self, agent_config, tmp_path):
        (tmp_path / "link.json").symlink_to(tmp_path / "node.json")
        for named in (None, tmp_path / "node.json", tmp_path / "link.json"):
            out, rc, handler = self.run_named(agent_config, named)
            assert rc == 0 and len(handler.requests) == 1, out

    def test_an_equal_copy_is_served(self, agent_config, tmp_path):
        (tmp_path / "copy.json").write_text((tmp_path / "node.json").read_text())
        assert self.run_named(agent_config, tmp_path / "copy.json")[1] == 0

    def test_an_invalid_one_gets_its_errors(self, agent_config, tmp_path):
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps({"vtepAddress": "198.51.100.1", "colour": "ultraviolet"}))
        out, rc, handler = self.run_named(agent_config, bad)
        msg = failed(out, rc, 7)["msg"]
        assert str(bad) in msg and "'colour'" in msg and not handler.requests
        out, rc, _ = self.run_named(agent_config, tmp_path / "missing.json")
        assert "file not found" in failed(out, rc, 7)["msg"]

    def test_a_valid_one_that_says_something_else_is_refused_naming_it(self, agent_config,
                                                                      tmp_path):
        other = tmp_path / "other.json"
        other.write_text(json.dumps({"vtepAddress": "198.51.100.1", "logFile": None,
                                     "stateDir": str(tmp_path / "state"),
                                     "backend": "nosuch"}))
        out, rc, handler = self.run_named(agent_config, other)
        msg = failed(out, rc, 7)["msg"]
        assert str(other) in msg and str(tmp_path / "node.json") in msg
        assert "'backend' = \"nosuch\" there, null in the agent's" in msg
        assert not handler.requests

    def test_standalone_does_not_look(self, tmp_path):
        """Standalone loaded the node config from the same variable: nothing to compare."""
        out, rc, handler = self.run_named(None, tmp_path / "whatever.json")
        assert rc == 0, out


def test_log_file_takes_what_is_not_utf8(tmp_path, capfd):
    """An environment's non-UTF-8 bytes arrive as surrogates and are quoted in
    messages: the log file escapes them instead of printing a logging error
    (a traceback) on stderr."""
    import logging
    import types

    from vpcni.cni.main import setup_logging

    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    try:
        setup_logging(types.SimpleNamespace(logFile=tmp_path / "vpcni.log", logLevel="INFO"))
        out, rc, _ = run(env("ADD\udcff"), config())  # logged as it came
        assert failed(out, rc, 4)
        for h in root.handlers:
            h.flush()
    finally:
        for h in root.handlers[:]:
            if h not in saved[0]:
                root.removeHandler(h)
                h.close()
        root.setLevel(saved[1])
    err = capfd.readouterr().err
    assert "Logging error" not in err and "Traceback" not in err, err
    assert "ADD\\udcff failed (code 4)" in (tmp_path / "vpcni.log").read_text()


def test_vpcni_ipam_settings_are_checked_at_the_edge():
    """In-process IPAM keys are checked with the config, before the handler; a delegated
    plugin's keys are the plugin's."""
    ipam = {"type": "vpcni-ipam", "subnets": ["10.1.0.0/24"], "exclude": ["nonsense"]}
    out, rc, handler = run(env("ADD"), config(addr=None, ipam=ipam))
    assert "'ipam.exclude'" in failed(out, rc, 7)["msg"] and not handler.requests
    out, rc, handler = run(env("ADD"), config(addr=None, ipam={"type": "host-local",
                                                               "exclude": ["nonsense"]}))
    assert rc == 0 and len(handler.requests) == 1, out
