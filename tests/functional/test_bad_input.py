"""Malformed environments and configs through the installed `vpcni`: a table.

Each row must fail with its exact CNI code, a message that names the culprit
(the variable or field, and the value where there is one), exactly one JSON
error object on stdout, no traceback on stderr, and nothing left behind; the
same on a node whose agent serves the call (behind the Go shim) as on one
that runs the plugin in-process (standalone).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Optional

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.functional.leftovers import assert_no_leftovers
from tests.functional.outcome import failed
from vpcni.lab.cluster import Cluster, seed_network
from vpcni.lab.netns import Sandbox

pytestmark = pytest.mark.functional

DROP = object()  # as a config value: remove the key


@dataclass
class Case:
    id: str
    code: int
    names: tuple[str, ...]              # words the message must contain
    value: Optional[str] = None         # the offending value, as a whole word in the message
    command: str = "ADD"
    container_id: Optional[str] = None  # None: the pod's
    args: str = ""                      # CNI_ARGS
    ifname: str = "eth1"
    netns: Optional[str] = None         # None: the pod's; "": unset; "{prefix}" is filled in
    path: Optional[str] = None          # CNI_PATH; None: the cluster's; "": unset
    stdin: Optional[str] = None         # replaces the JSON config
    config: dict[str, Any] = field(default_factory=dict)  # merged into the good config
    node_config: Optional[str] = None   # text of the node config file; "MISSING": no file
    node_config_keys: dict[str, Any] = field(default_factory=dict)  # merged into it
    # In agent mode, where it differs: (code, names). The agent serves the node config
    # it was started with; a request naming another one gets that file's errors, or
    # (valid but different) an error naming the difference.
    agent: Optional[tuple[int, tuple[str, ...]]] = None


# In config values and stdin, "{node_dir}" is the node's directory; "{node_dir}/a-file"
# is a regular file there (a path under it fails with ENOTDIR, for root too).
A_FILE = "{node_dir}/a-file"


CASES = [
    # ---- environment
    Case("CNI_COMMAND-missing", 4, ("CNI_COMMAND",), command=""),
    Case("CNI_COMMAND-bad", 4, ("CNI_COMMAND",), "BOGUS", command="BOGUS"),
    Case("CNI_CONTAINERID-slash", 4, ("CNI_CONTAINERID",), "abc/def", container_id="abc/def"),
    Case("CNI_CONTAINERID-dotdot", 4, ("CNI_CONTAINERID",), "..", container_id=".."),
    Case("CNI_CONTAINERID-leading-dash", 4, ("CNI_CONTAINERID",), "-abc", container_id="-abc"),
    Case("CNI_CONTAINERID-300-chars", 4, ("CNI_CONTAINERID", "300", "200"),
         container_id="c" * 300),
    Case("CNI_CONTAINERID-newline", 4, ("CNI_CONTAINERID",), container_id="abc\n"),
    Case("CNI_IFNAME-16-chars", 4, ("CNI_IFNAME", "15"), "eth0123456789abc",
         ifname="eth0123456789abc"),
    Case("CNI_IFNAME-non-ascii", 4, ("CNI_IFNAME", "ASCII"), ifname="eth\u00e9"),
    Case("CNI_IFNAME-control", 4, ("CNI_IFNAME", "printable"), ifname="eth\x07"),
    Case("CNI_IFNAME-slash", 4, ("CNI_IFNAME",), "a/b", ifname="a/b"),
    Case("CNI_IFNAME-colon", 4, ("CNI_IFNAME",), "eth1:0", ifname="eth1:0"),
    Case("CNI_IFNAME-space", 4, ("CNI_IFNAME", "'eth 1'"), ifname="eth 1"),
    Case("CNI_IFNAME-dotdot", 4, ("CNI_IFNAME",), "..", ifname=".."),
    Case("CNI_NETNS-missing", 4, ("CNI_NETNS", "ADD"), netns=""),
    Case("CNI_NETNS-relative", 4, ("CNI_NETNS", "absolute"), "var/run/netns/x",
         netns="var/run/netns/x"),
    Case("CNI_NETNS-nonexistent", 4, ("CNI_NETNS", "does not exist"),
         "/var/run/netns/{prefix}-nope", netns="/var/run/netns/{prefix}-nope"),
    Case("CNI_NETNS-not-a-netns", 4, ("CNI_NETNS", "not a network namespace"), "/proc/version",
         netns="/proc/version"),
    Case("CNI_PATH-missing", 4, ("CNI_PATH",), path=""),
    Case("CNI_ARGS-not-key-value", 4, ("CNI_ARGS",), "K8S_POD_NAME", args="K8S_POD_NAME"),
    Case("CNI_ARGS-MAC-garbage", 7, ("CNI_ARGS MAC",), "garbage", args="IgnoreUnknown=1;MAC=garbage"),
    Case("CNI_ARGS-IP-garbage", 7, ("ips",), "nope", args="IgnoreUnknown=1;IP=nope"),
    Case("CNI_ARGS-IP-without-prefix", 7, ("ips", "prefix"), args="IgnoreUnknown=1;IP=172.16.43.9"),
    # ---- stdin
    Case("stdin-not-json", 6, ("JSON",), stdin="{cniVersion: 1.1.0"),
    Case("stdin-empty", 6, ("JSON",), stdin=""),
    Case("stdin-not-object", 6, ("object",), stdin='["cniVersion", "1.1.0"]'),
    Case("stdin-nested-3000", 6, ("nested",), stdin="[" * 3000 + "]" * 3000),
    Case("stdin-over-4MiB", 7, ("MiB",),
         stdin=json.dumps(seed_network("vpc-bad", 4300, "172.16.43.2/24",
                                       padding="x" * (5 << 20)))),
    Case("stdin-NaN", 6, ("JSON", "NaN"),
         stdin='{"cniVersion": "1.1.0", "name": "vpc-bad", "type": "vpcni", "vni": NaN}'),
    Case("cniVersion-missing", 1, ("cniVersion", "0.3.0", "1.1.0"), config={"cniVersion": DROP}),
    Case("cniVersion-2.0.0", 1, ("cniVersion", "0.3.0", "1.1.0"), "2.0.0",
         config={"cniVersion": "2.0.0"}),
    # ---- network config fields
    Case("name-missing", 7, ("'name'",), config={"name": DROP}),
    Case("name-invalid", 7, ("'name'",), "bad/name", config={"name": "bad/name"}),
    Case("vni-0", 7, ("'vni'",), "0", config={"vni": 0}),
    Case("vni-2^24", 7, ("'vni'",), "16777216", config={"vni": 16777216}),
    Case("vni-abc", 7, ("'vni'",), "abc", config={"vni": "abc"}),
    Case("vni-missing", 7, ("'vni'",), config={"vni": DROP}),
    Case("vni-true", 7, ("'vni'",), "true", config={"vni": True}),
    Case("vni-string", 7, ("'vni'",), config={"vni": "300"}),
    Case("type-bridge", 7, ("'type'", "vpcni"), "bridge", config={"type": "bridge"}),
    Case("addr-number", 7, ("'addr'", "string"), "5", config={"addr": 5}),
    Case("addr-unspecified", 7, ("'addr'", "cannot be a pod's address"),
         config={"addr": "0.0.0.0/0"}),
    Case("addr-multicast", 7, ("'addr'", "multicast"), config={"addr": "224.0.0.5/24"}),
    Case("addr-without-prefix", 7, ("'addr'", "prefix"), "172.16.43.2",
         config={"addr": "172.16.43.2"}),
    Case("addr-garbage", 7, ("'addr'",), "garbage/24", config={"addr": "garbage/24"}),
    Case("mtu-10", 7, ("'mtu'",), "10", config={"mtu": 10}),
    Case("port-0", 7, ("'port'",), "0", config={"port": 0}),
    Case("port-70000", 7, ("'port'",), "70000", config={"port": 70000}),
    Case("vteps-nope", 7, ("vteps",), "nope", config={"vteps": ["nope"]}),
    Case("unknown-field", 2, ("'colour'",), "ultraviolet", config={"colour": "ultraviolet"}),
    Case("addr-and-ipam", 7, ("addr", "ipam"),
         config={"ipam": {"type": "host-local", "subnet": "172.16.43.0/24"}}),
    Case("ipam-without-type", 7, ("ipam.type",),
         config={"addr": DROP, "ipam": {"subnet": "172.16.43.0/24"}}),
    Case("ipam-type-not-in-CNI_PATH", 7, ("ipam.type", "CNI_PATH"), "nosuchipam",
         config={"addr": DROP, "ipam": {"type": "nosuchipam"}}),
    Case("runtimeConfig.mac-garbage", 7, ("runtimeConfig.mac",), "zz:zz:zz",
         config={"runtimeConfig": {"mac": "zz:zz:zz"}}),
    Case("args.cni.mac-garbage", 7, ("args.cni.mac",), "zz", config={"args": {"cni": {"mac": "zz"}}}),
    Case("dns-nameservers-not-list", 7, ("dns.nameservers",), "5", config={"dns": {"nameservers": 5}}),
    Case("prevResult-malformed", 7, ("prevResult.interfaces",), "5",
         config={"prevResult": {"cniVersion": "1.1.0", "interfaces": 5}}),
    Case("args.cni-not-an-object", 7, ("'args.cni'",), "true", config={"args": {"cni": True}}),
    Case("args.cni.ips-without-prefix", 7, ("'args.cni.ips'", "prefix"), "172.16.43.9",
         config={"args": {"cni": {"ips": ["172.16.43.9"]}}}),
    Case("vteps-number", 7, ("'vteps[0]'", "string"), config={"vteps": [3325256705]}),
    Case("ipam-store-path-under-a-file", 5, ("ipam.store.path", A_FILE + " is not a directory"),
         config={"addr": DROP, "ipam": {"type": "vpcni-ipam", "subnets": ["172.16.43.0/24"],
                                        "store": {"type": "sqlite",
                                                  "path": A_FILE + "/ipam.sqlite"}}}),
    Case("ipam-store-timeout-huge", 7, ("'ipam.store.timeout'",), "1e+300",
         config={"addr": DROP, "ipam": {"type": "vpcni-ipam", "subnets": ["172.16.43.0/24"],
                                        "store": {"type": "sqlite", "timeout": 1e300}}}),
    # ---- node config ({node_config} is the file's path)
    Case("node-config-missing", 7, ("{node_config}", "not found"), node_config="MISSING"),
    Case("node-config-not-json", 7, ("{node_config}", "JSON"), node_config="vtepAddress: x"),
    Case("node-config-unknown-key", 7, ("{node_config}", "'colour'"), "ultraviolet",
         node_config_keys={"colour": "ultraviolet"}),
    Case("node-config-no-vtepAddress", 7, ("{node_config}", "vtepAddress"),
         node_config_keys={"vtepAddress": DROP}),
    Case("node-backend-nosuch", 50, ("backend", "not installed"), "nosuch",
         node_config_keys={"backend": "nosuch"},
         agent=(7, ("{node_config}", "'backend'", "the vpcni agent serves"))),
    Case("node-stateDir-under-a-file", 5, ("stateDir", A_FILE + "/state", "Not a directory"),
         node_config_keys={"stateDir": A_FILE + "/state"},
         agent=(7, ("{node_config}", "'stateDir'", "the vpcni agent serves"))),
    Case("node-lockTimeout-1e400", 7, ("{node_config}", "'lockTimeout'", "finite"),
         node_config_keys={"lockTimeout": "{raw:1e400}"}),
    Case("network-backend-nosuch", 50, ("backend", "not installed"), "nosuch",
         config={"backend": "nosuch"}),
]


@pytest.fixture(scope="module")
def world(backend, mode):
    """One node (pinned to `backend`, served in `mode`: its agent started once) and one
    pod, shared by the whole table."""
    box = Sandbox()
    try:
        cluster = Cluster(box)
        node = cluster.add_node("n1", "198.51.100.1", agent=(mode == "agent"), backend=backend)
        pod = cluster.add_pod(node, "p")
        (node.dir / "a-file").write_text("a regular file where a directory would go\n")
        yield box, node, pod
    finally:
        box.cleanup()


def _fill(text: str, node) -> str:
    """`text` with {node_dir} filled in, and "{raw:X}" (a JSON string) replaced by X as
    it is (e.g. a number literal json.dumps would not write)."""
    text = re.sub(r'"\{raw:([^}"]*)\}"', r"\1", text)
    return text.replace("{node_dir}", str(node.dir))


def _merge(base: dict, changes: dict) -> dict:
    out = dict(base)
    for key, value in changes.items():
        if value is DROP:
            out.pop(key, None)
        else:
            out[key] = value
    return out


def _node_config(node, case: Case) -> Optional[str]:
    """The node config path this case runs with (None: the node's own)."""
    if case.node_config is None and not case.node_config_keys:
        return None
    path = node.dir / f"node-{case.id}.json"
    if case.node_config == "MISSING":
        return str(path)
    text = case.node_config
    if text is None:
        text = _fill(json.dumps(_merge(node.node_config, case.node_config_keys)), node)
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(world, backend, mode, case):
    box, node, pod = world
    node_config = _node_config(node, case)
    stdin = case.stdin
    if stdin is None:
        stdin = json.dumps(_merge(seed_network("vpc-bad", 4300, "172.16.43.2/24"), case.config))
    stdin = _fill(stdin, node)
    netns = pod.netns if case.netns is None else case.netns.format(prefix=box.prefix)
    call = dict(container_id=pod.container_id if case.container_id is None
                else case.container_id,
                netns=netns, ifname=case.ifname, args=case.args, path=case.path,
                env={"VPCNI_NODE_CONFIG": node_config} if node_config else None)
    res = node.cni(case.command, stdin, **call)
    if res.ok and case.command == "ADD":
        node.cni("DEL", stdin, **call)  # an unexpected success must not spoil later rows

    code, names = case.code, case.names
    if mode == "agent" and case.agent is not None:
        code, names = case.agent
    body = failed(res, code=code)
    for name in names:
        name = _fill(name, node).format(node_config=node_config)
        assert name in body["msg"], f"{name!r} not in {body['msg']!r}"
    if case.value is not None:
        value = case.value.format(prefix=box.prefix)
        assert re.search(rf"(?<![\w.]){re.escape(value)}(?![\w.])", body["msg"]), \
            f"value {value!r} not in {body['msg']!r}"

    assert_no_leftovers(node, backend, pods=[pod])


def test_state_dir_that_cannot_be_written_is_code_5_naming_it(world, backend, mode):
    """The node's own stateDir stops being a directory while the node serves (the agent
    has used it since its start): ADD is code 5 naming stateDir, and nothing is built.
    (A path under a regular file fails for root too, where a mode would not.)"""
    box, node, pod = world
    state = node.state_dir
    state.mkdir(exist_ok=True)
    aside = state.with_name("state.aside")
    state.rename(aside)
    try:
        state.write_text("a regular file where the state dir was\n")
        res = node.cni("ADD", seed_network("vpc-bad", 4300, "172.16.43.2/24"),
                       pod.container_id, pod.netns)
    finally:
        state.unlink()
        aside.rename(state)
    if res.ok:
        node.cni("DEL", seed_network("vpc-bad", 4300, "172.16.43.2/24"), pod.container_id,
                 pod.netns)
    body = failed(res, code=5)
    assert f"stateDir {state}" in body["msg"] and "Not a directory" in body["msg"], body
    assert_no_leftovers(node, backend, pods=[pod])


def test_bogus_commands_do_not_grow_the_agent_metrics(world, mode):
    """Metric labels take known values only: 200 requests with made-up CNI_COMMANDs
    are counted under command="invalid", and add no series to /metrics."""
    if mode != "agent":
        pytest.skip("standalone: no agent, no metrics")
    from vpcni.cni.shim import agent_call

    box, node, pod = world

    def bogus(i: int) -> None:
        command = [f"BOGUS-{i}", 'X"} 1\n# HELP', "add", "é" * 50, ""][i % 5] + str(i)
        reply = agent_call(node.agent_socket, {"env": {"CNI_COMMAND": command}, "stdin": ""})
        assert json.loads(reply["stdout"])["code"] == 4 and reply["rc"] == 1, reply

    def series(text: str) -> dict[str, float]:
        return {name: float(value) for name, _, value in
                (line.rpartition(" ") for line in text.splitlines())
                if name.startswith("vpcni_cni_")}

    bogus(0)
    before = series(node.http_get("/metrics")[1])
    for i in range(1, 201):
        bogus(i)
    after = series(node.http_get("/metrics")[1])
    assert after.keys() == before.keys(), sorted(after.keys() ^ before.keys())
    invalid = 'vpcni_cni_requests_total{command="invalid",result="error"}'
    assert after[invalid] == before[invalid] + 200


# Env values as a runtime could pass them: no NUL (execve), any other code point, and
# bytes that are not UTF-8 (here as the surrogates Python reads them as).
_env_text = st.text(st.one_of(st.characters(blacklist_categories=("Cs",),
                                            blacklist_characters="\x00"),
                              st.sampled_from(["\udcff", "\udc80"])), max_size=30)
_env_values = st.one_of(_env_text, st.sampled_from(
    ["", ".", "..", "-x", "a/b", "eth1:0", "x" * 300, "eth\t1", "IgnoreUnknown=1;IP=nope",
     "IgnoreUnknown=1;MAC=02:00:00:00:00:01", "IP=172.16.43.9/24,", "K8S_POD_NAME=é;=x"]))
_hostile_env = st.fixed_dictionaries({}, optional={
    "CNI_CONTAINERID": _env_values, "CNI_IFNAME": _env_values, "CNI_ARGS": _env_values,
    "CNI_NETNS": st.sampled_from(["", "relative/x", "/nonexistent/x", "/proc/version"])})


# VPCNI_FUZZ_EXAMPLES: the unit fuzz's examples per property; a tenth of them here.
@settings(max_examples=int(os.environ.get("VPCNI_FUZZ_EXAMPLES", "200")) // 10,
          derandomize=True, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(env=_hostile_env)
def test_hostile_environments_through_the_installed_plugin(world, backend, mode, env):
    """A small fuzz through the real `vpcni` (the Go shim, then the agent or the plugin
    in-process): whatever the CNI_* variables hold, the answer is one JSON object, an
    error has a SPEC code (or 50) and is no internal error, stderr has no traceback;
    what an ADD built, its DEL removes."""
    box, node, pod = world
    call = {"container_id": env.get("CNI_CONTAINERID", pod.container_id),
            "netns": env.get("CNI_NETNS", pod.netns), "ifname": env.get("CNI_IFNAME", "eth1"),
            "args": env.get("CNI_ARGS", "")}
    cfg = seed_network("vpc-bad", 4300, "172.16.43.2/24")
    res = node.cni("ADD", cfg, **call)
    assert "Traceback" not in res.stderr and "Logging error" not in res.stderr, res.stderr
    body = json.loads(res.stdout)
    if res.ok:
        assert node.cni("DEL", cfg, **call).ok
    else:
        assert body["code"] in {1, 2, 3, 4, 5, 6, 7, 11, 50}, body
        assert isinstance(body["msg"], str) and not body["msg"].startswith("internal error")
    assert_no_leftovers(node, backend, pods=[pod])
