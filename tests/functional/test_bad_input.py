"""Malformed environments and configs through the installed `vpcni`: a table.

Each row must fail with its exact CNI code, a message that names the culprit
(the variable or field, and the value where there is one), exactly one JSON
error object on stdout, no traceback on stderr, and nothing left behind.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Optional

import pytest

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
    # ---- node config ({node_config} is the file's path)
    Case("node-config-missing", 7, ("{node_config}", "not found"), node_config="MISSING"),
    Case("node-config-not-json", 7, ("{node_config}", "JSON"), node_config="vtepAddress: x"),
    Case("node-config-unknown-key", 7, ("{node_config}", "'colour'"), "ultraviolet",
         node_config_keys={"colour": "ultraviolet"}),
    Case("node-config-no-vtepAddress", 7, ("{node_config}", "vtepAddress"),
         node_config_keys={"vtepAddress": DROP}),
    Case("node-backend-nosuch", 50, ("backend", "not installed"), "nosuch",
         node_config_keys={"backend": "nosuch"}),
    Case("network-backend-nosuch", 50, ("backend", "not installed"), "nosuch",
         config={"backend": "nosuch"}),
]


@pytest.fixture(scope="module")
def world(backend):
    """One node (pinned to `backend`) and one pod, shared by the whole table."""
    box = Sandbox()
    try:
        cluster = Cluster(box)
        node = cluster.add_node("n1", "198.51.100.1", backend=backend)
        pod = cluster.add_pod(node, "p")
        yield box, node, pod
    finally:
        box.cleanup()


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
        text = json.dumps(_merge(node.node_config, case.node_config_keys))
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(world, backend, case):
    box, node, pod = world
    node_config = _node_config(node, case)
    stdin = case.stdin
    if stdin is None:
        stdin = json.dumps(_merge(seed_network("vpc-bad", 4300, "172.16.43.2/24"), case.config))
    netns = pod.netns if case.netns is None else case.netns.format(prefix=box.prefix)
    res = node.cni(case.command, stdin,
                   container_id=pod.container_id if case.container_id is None
                   else case.container_id,
                   netns=netns, ifname=case.ifname, args=case.args, path=case.path,
                   env={"VPCNI_NODE_CONFIG": node_config} if node_config else None)

    body = failed(res, code=case.code)
    for name in case.names:
        name = name.format(node_config=node_config)
        assert name in body["msg"], f"{name!r} not in {body['msg']!r}"
    if case.value is not None:
        value = case.value.format(prefix=box.prefix)
        assert re.search(rf"(?<![\w.]){re.escape(value)}(?![\w.])", body["msg"]), \
            f"value {value!r} not in {body['msg']!r}"

    assert_no_leftovers(node, backend, pods=[pod])
