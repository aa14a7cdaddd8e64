"""Property-based fuzzing of the edge: hostile environments and configs.

Whatever a runtime (or anyone who can reach the agent's socket) sends, the
validation that turns env + stdin into a Request (Dispatcher.parse, and the
per-request checks the handler makes before touching anything) either
accepts it or raises a VpcniError with a code of the CNI SPEC's well-known
set and a message; never another exception, which would reach the caller as
"internal error" (code 999). The same holds for the node config file and for
vpcni-ipam's settings. No namespaces, no I/O beyond temporary files: it runs
in CI in seconds, with a fixed seed (derandomize) so a failure is reproducible.
"""

from __future__ import annotations

import json
import math
import os
import random
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vpcni.cni.plugin import COMMANDS, Dispatcher
from vpcni.core.config import NodeConfig
from vpcni.core.errors import VpcniError
from vpcni.core.handler import Handler
from vpcni.core.ipam import static_ips

# CNI SPEC.md, "Error": the well-known codes (1-7 and 11; 8-10 are reserved).
SPEC_CODES = {1, 2, 3, 4, 5, 6, 7, 11}

# VPCNI_FUZZ_EXAMPLES=5000 looks further (minutes); CI runs the default.
FUZZ = settings(max_examples=int(os.environ.get("VPCNI_FUZZ_EXAMPLES", "200")),
                derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much])

# ---------------------------------------------------------------- strategies

# Text a hostile caller may send: any code point (control characters, non-ASCII,
# lone surrogates, as undecodable environment bytes arrive in Python), and the
# kind of near-miss values validation has to tell apart.
any_text = st.text(st.characters(codec=None), max_size=40)
near_misses = st.sampled_from([
    "", " ", ".", "..", "/", "a/b", "eth0:1", "eth 1", "-x", "x\n", "\x00", "\t", "é", "\u202e",
    "\udcff", "0", "-1", "1e400", "NaN", "300", "0x12c", "172.16.32.1", "172.16.32.1/24",
    "172.16.32.1/33", "fd00::1/64", "0.0.0.0/0", "224.0.0.1/24", "::/0", "garbage/24",
    "02:00:00:00:00:01", "01:00:00:00:00:01", "zz:zz:zz:zz:zz:zz", "0000:3b:00.2", "vpcni",
    "vpcni-ipam", "host-local", "veth", "vf", "host-vf", "pf0vf1", "kernel", "1.1.0", "0.3.1",
    "K=V", "IgnoreUnknown=1;IP=10.0.0.2/24", "IP=nope", "MAC=garbage", "=", ";", "a" * 300,
])
hostile_text = st.one_of(near_misses, any_text, st.text(max_size=2000).map(lambda s: s * 3))
numbers = st.one_of(st.integers(), st.integers(min_value=-2, max_value=70000),
                    st.just(2 ** 64), st.just(16777216),
                    st.floats(allow_nan=True, allow_infinity=True))
scalars = st.one_of(st.none(), st.booleans(), numbers, hostile_text)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(hostile_text, inner, max_size=4)),
    max_leaves=12)


def deep(n: int) -> object:
    value: object = "x"
    for i in range(n):
        value = [value] if i % 2 else {"k": value}
    return value


# Plausible shapes of the object-valued fields, with hostile leaves: validation
# has to look inside them, not only at their type.
def obj(**fields) -> st.SearchStrategy:
    return st.fixed_dictionaries({}, optional={k: st.one_of(v, json_values)
                                               for k, v in fields.items()})


ip_lists = st.lists(st.one_of(near_misses, json_values), max_size=3)
# vpcni-ipam's section, built rather than mutated (see also ipam_settings()).
ipam_shapes = obj(type=st.sampled_from(["vpcni-ipam", "host-local", "", "../x", "a b"]),
                  subnets=ip_lists, ranges=json_values, exclude=ip_lists, routes=json_values,
                  store=obj(type=st.sampled_from(["sqlite", "etcd"]), path=hostile_text,
                            endpoints=ip_lists, prefix=hostile_text, timeout=numbers),
                  reservations=json_values, node=hostile_text)
GOOD = {"cniVersion": "1.1.0", "name": "vpc1", "type": "vpcni", "vni": 300,
        "addr": "172.16.32.1/24"}


# Valid configs that set every field somewhere (addr and ipam exclude each other):
# mutating one spot of one of them keeps the rest valid, so validation is driven
# as deep as that spot.
RICH = [
    GOOD | {"mtu": 1400, "port": 4789, "backend": "kernel", "vteps": ["198.51.100.2"],
            "dns": {"nameservers": ["10.1.0.53"], "domain": "x", "search": ["x"],
                    "options": ["ndots:2"]},
            "runtimeConfig": {"ips": ["172.16.32.6/24"], "mac": "02:00:00:00:00:02",
                              "CNIDeviceInfoFile": "/run/cni/info.json"},
            "capabilities": {"ips": True, "mac": True},
            "prevResult": {"cniVersion": "1.1.0", "interfaces": [{"name": "eth0"}],
                           "ips": [{"address": "10.0.0.2/24", "gateway": "10.0.0.1",
                                    "interface": 0}],
                           "routes": [{"dst": "0.0.0.0/0", "gw": "10.0.0.1"}],
                           "dns": {"nameservers": ["10.0.0.53"]}},
            "cni.dev/valid-attachments": [{"containerID": "c1", "ifname": "eth1"}]},
    {k: v for k, v in GOOD.items() if k != "addr"} | {
        "ipam": {"type": "vpcni-ipam", "subnets": ["172.16.32.0/24", "fd00:32::/64"],
                 "exclude": ["172.16.32.0/28", "172.16.32.200-172.16.32.210"],
                 "routes": [{"dst": "0.0.0.0/0"}], "dns": {"nameservers": ["10.1.0.53"]},
                 "store": {"type": "sqlite", "path": "/var/lib/vpcni/ipam.sqlite",
                           "timeout": 5},
                 "reservations": [{"pod": "web-0", "namespace": "default",
                                   "ips": ["172.16.32.100"]}],
                 "node": "n1"},
        "cni.dev/attachments": [{"containerID": "c1", "ifname": "eth1"}]},
    # args.cni is read only when runtimeConfig does not give the same.
    GOOD | {"args": {"cni": {"ips": ["172.16.32.5/24"], "mac": "02:00:00:00:00:01"},
                     "K8S_POD_NAME": "web-0"}},
    GOOD | {"interface": "host-vf", "hostVF": "pf0vf1", "vf": {"vlan": 5, "spoofchk": "on"},
            "deviceID": "0000:3b:00.2", "pciBusID": "0000:3b:00.2"},
    {k: v for k, v in GOOD.items() if k != "addr"} | {
        "ipam": {"type": "host-local", "subnet": "172.16.32.0/24"}},
]
# Type confusion and edge values, besides random JSON.
odd_values = st.sampled_from([None, True, False, 0, -1, 1.5, 2 ** 64, float("inf"),
                              float("nan"), "", "x", "a" * 300, [], [1], ["x"], [None],
                              {}, {"a": 1}, {"": None}, [[[]]], deep(40)])
mutations = st.one_of(odd_values, near_misses, json_values)


def paths(value, here=()) -> list[tuple]:
    """Every spot in a JSON value: each key of each object, each item of each list."""
    out = [here]
    if isinstance(value, dict):
        for k, v in value.items():
            out += paths(v, here + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += paths(v, here + (i,))
    return out


def mutate(value, path: tuple, how: str, new, key: str):
    """`value` with the spot at `path` replaced, removed, or given an extra key."""
    if not path:
        if how == "extra" and isinstance(value, dict):
            return value | {key: new}
        return new
    head, rest = path[0], path[1:]
    if isinstance(value, dict):
        if not rest and how == "drop":
            return {k: v for k, v in value.items() if k != head}
        return value | {head: mutate(value[head], rest, how, new, key)}
    out = list(value)
    if not rest and how == "drop":
        del out[head]
        return out
    out[head] = mutate(out[head], rest, how, new, key)
    return out


@st.composite
def network_configs(draw, base: int | None = None) -> dict:
    """A rich valid config (RICH[base], or any) with one to three spots replaced,
    dropped or given extra keys."""
    cfg = RICH[base] if base is not None else draw(st.sampled_from(RICH))
    # Spots picked uniformly, from a drawn seed (Hypothesis' own choices favour the
    # first ones, and would leave the deeper spots alone).
    rnd = random.Random(draw(st.integers(0, 2 ** 32)))
    for _ in range(draw(st.integers(1, 3))):
        # Not the root: a config that is not an object is stdins()' business.
        path = rnd.choice(paths(cfg)[1:])
        how = rnd.choice(["replace", "replace", "replace", "drop", "extra"])
        cfg = mutate(cfg, path, how, draw(mutations), draw(hostile_text))
    return cfg


@st.composite
def stdins(draw) -> bytes:
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(st.binary(max_size=200))
    if kind == 1:
        return json.dumps(draw(json_values)).encode()
    if kind == 2:
        n = draw(st.sampled_from([50, 900, 1100, 5000]))
        return json.dumps(GOOD | {"dns": deep(n)}).encode() if n < 990 else \
            ("[" * n + "]" * n).encode()
    if kind == 3:
        big = draw(st.sampled_from(["name", "addr", "x", "backend"]))
        return json.dumps(GOOD | {big: "a" * 300_000}).encode()
    text = json.dumps(draw(network_configs()), ensure_ascii=draw(st.booleans()))
    # Python's JSON writer spells non-finite floats NaN and Infinity (not JSON), and
    # lone surrogates are not UTF-8: as bytes on stdin, both are what they are.
    return text.encode("utf-8", "surrogatepass")


env_values = st.one_of(hostile_text, st.sampled_from(["c1", "eth1", "/", "/proc/self/ns/net",
                                                       "/var/run/netns/nope", "/opt/cni/bin"]))


@st.composite
def environments(draw) -> dict:
    env = {"CNI_COMMAND": draw(st.one_of(st.sampled_from(COMMANDS), hostile_text)),
           "CNI_CONTAINERID": "c1", "CNI_NETNS": "/proc/self/ns/net", "CNI_IFNAME": "eth1",
           "CNI_PATH": "/opt/cni/bin"}
    for var in draw(st.lists(st.sampled_from(["CNI_CONTAINERID", "CNI_IFNAME", "CNI_ARGS",
                                              "CNI_NETNS", "CNI_PATH"]), max_size=3,
                             unique=True)):
        if draw(st.integers(0, 4)) == 0:
            env.pop(var, None)
        else:
            env[var] = draw(env_values)
    return env


# ---------------------------------------------------------------- properties


def assert_clean(err: VpcniError) -> None:
    assert err.code in SPEC_CODES, f"code {err.code}: {err.msg}"
    assert isinstance(err.msg, str) and err.msg.strip(), repr(err.msg)


def check_request(env: dict, stdin: bytes) -> None:
    """The property: the edge accepts, or refuses with a SPEC code and a message."""
    try:
        req = Dispatcher(node=None).parse(env, stdin)
        if req is not None and req.command == "ADD":
            # What ADD checks before it tears down or builds anything.
            Handler._requested_mac(req)
            if not req.config.ipam:
                static_ips(Handler._static_addresses(req))
    except VpcniError as err:
        assert_clean(err)


@FUZZ
@given(env=environments(), stdin=stdins())
def test_hostile_env_and_stdin_are_accepted_or_a_spec_error(env, stdin):
    check_request(env, stdin)


@pytest.mark.parametrize("base", range(len(RICH)))
@FUZZ
@given(data=st.data(),
       command=st.sampled_from(["ADD", "ADD", "ADD", "DEL", "CHECK", "GC", "STATUS"]))
def test_hostile_network_configs_are_accepted_or_a_spec_error(base, data, command):
    cfg = data.draw(network_configs(base), label="config")
    env = {"CNI_COMMAND": command, "CNI_CONTAINERID": "c1", "CNI_NETNS": "/proc/self/ns/net",
           "CNI_IFNAME": "eth1", "CNI_PATH": "/opt/cni/bin"}
    check_request(env, json.dumps(cfg).encode("utf-8", "surrogatepass"))


@FUZZ
@given(env=environments(), stdin=stdins())
def test_run_answers_with_one_error_object_never_an_internal_error(env, stdin):
    """Through run(), up to the handler: stdout is one JSON object (a result for
    VERSION, else an error here, as no handler is reached by an invalid request)."""

    class NoHandler(Dispatcher):
        def _call(self, req, version):
            return "", 0

    out, rc = NoHandler(node=None).run(env, stdin)
    if rc == 0:
        return
    body = json.loads(out)
    assert body["code"] in SPEC_CODES and not body["msg"].startswith("internal error"), body
    assert isinstance(body["msg"], str) and body["cniVersion"]


# A node config that sets every key (its sections are only checked for their owner
# and shape here; each backend validates its own when it loads).
RICH_NODE = {"vtepAddress": "198.51.100.1", "underlayInterface": "eth0",
             "stateDir": "/var/lib/vpcni", "backend": "kernel", "logFile": None,
             "logLevel": "INFO", "lockTimeout": 30, "mode": "agent",
             "agentSocket": "/run/vpcni/agent.sock", "standalonePython": "/usr/bin/python3",
             "evpn": {"gobgpdSocket": "/run/vpcni/gobgp.sock", "asn": 65000},
             "healthAddress": "127.0.0.1:9471", "reconcileInterval": 30,
             "ovs": {"bridge": "br-int"}}


@st.composite
def node_configs(draw) -> bytes:
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(st.binary(max_size=100))
    if kind == 1:
        return json.dumps(draw(json_values)).encode("utf-8", "surrogatepass")
    if kind == 2:
        n = draw(st.sampled_from([900, 5000]))
        return json.dumps(RICH_NODE | {"ovs": deep(n)}).encode() if n < 990 else \
            ("[" * n + "]" * n).encode()
    cfg = RICH_NODE
    rnd = random.Random(draw(st.integers(0, 2 ** 32)))
    for _ in range(draw(st.integers(1, 2))):
        cfg = mutate(cfg, rnd.choice(paths(cfg)[1:]),
                     rnd.choice(["replace", "replace", "drop", "extra"]),
                     draw(mutations), draw(hostile_text))
    text = json.dumps(cfg)
    if kind == 3:  # numbers Python reads as infinite, or not as JSON at all
        text = text.replace('"lockTimeout": 30', '"lockTimeout": ' + draw(
            st.sampled_from(["1e400", "-1e400", "NaN", "Infinity", "1e-400", "0"])))
    return text.encode("utf-8", "surrogatepass")


@pytest.fixture(scope="module")
def scratch():
    with tempfile.TemporaryDirectory(prefix="vpcni-fuzz-") as d:
        yield d


@FUZZ
@given(data=node_configs())
def test_hostile_node_configs_load_or_are_a_spec_error(scratch, data):
    path = os.path.join(scratch, "node.json")
    with open(path, "wb") as f:
        f.write(data)
    try:
        cfg = NodeConfig.load(path)
    except VpcniError as err:
        assert_clean(err)
        assert path in err.msg, err.msg
        return
    # What is accepted is usable as it is: finite timeouts and periods.
    assert math.isfinite(cfg.lockTimeout) and math.isfinite(cfg.reconcileInterval)


IPAM_ETCD = RICH[1]["ipam"] | {"store": {"type": "etcd", "endpoints": ["http://127.0.0.1:2379"],
                                         "prefix": "/vpcni/ipam", "timeout": 5}}
IPAM_RANGES = {"type": "vpcni-ipam", "ranges": [[{"subnet": "172.16.32.0/24",
                                                  "rangeStart": "172.16.32.10",
                                                  "rangeEnd": "172.16.32.20",
                                                  "gateway": "172.16.32.1"}]]}


@st.composite
def ipam_settings(draw):
    if draw(st.integers(0, 4)) == 0:
        return draw(ipam_shapes)
    raw = draw(st.sampled_from([RICH[1]["ipam"], IPAM_ETCD, IPAM_RANGES]))
    rnd = random.Random(draw(st.integers(0, 2 ** 32)))
    for _ in range(draw(st.integers(1, 2))):
        path = rnd.choice(paths(raw)[1:])
        raw = mutate(raw, path, rnd.choice(["replace", "replace", "drop", "extra"]),
                     draw(mutations), draw(hostile_text))
    return raw


@FUZZ
@given(raw=ipam_settings())
def test_hostile_vpcni_ipam_settings_parse_or_are_a_spec_error(raw):
    from vpcni.ipam.config import parse_settings

    try:
        settings_ = parse_settings(raw)
    except VpcniError as err:
        assert_clean(err)
        assert "ipam" in err.msg, err.msg
        return
    assert math.isfinite(settings_.store.timeout)
