"""The result-shape validators themselves: they must pass good output and catch bad output."""

from __future__ import annotations

import copy

import pytest

from tests.spec_shapes import VERSIONS, check_error, check_result, check_version_output

OLD = ("0.3.0", "0.3.1", "0.4.0")


def good(version: str) -> dict:
    """A well-formed result of `version`: a host veth, a container interface, one IPv4."""
    ctr = {"name": "eth1", "mac": "02:00:00:00:00:01", "sandbox": "/var/run/netns/p"}
    if version == "1.1.0":
        ctr["mtu"] = 1450
    ip = {"address": "10.0.0.2/24", "gateway": "10.0.0.1", "interface": 1}
    if version in OLD:
        ip["version"] = "4"
    route = {"dst": "0.0.0.0/0", "gw": "10.0.0.1"}
    if version == "1.1.0":
        route |= {"mtu": 1400, "advmss": 1360, "priority": 10, "table": 100, "scope": 0}
    return {"cniVersion": version,
            "interfaces": [{"name": "vp1234", "mac": "02:00:00:00:00:02"}, ctr],
            "ips": [ip], "routes": [route], "dns": {"nameservers": ["10.0.0.53"]}}


@pytest.mark.parametrize("version", VERSIONS)
def test_good_result_passes(version):
    check_result(good(version), version)


def test_minimal_result_passes():
    check_result({"cniVersion": "1.0.0", "ips": []}, "1.0.0")


def assert_fails(check, *args, words) -> None:
    """`check(*args)` raises AssertionError whose message contains every one of `words`."""
    with pytest.raises(AssertionError) as info:
        check(*args)
    for word in words:
        assert word in str(info.value)


def _broken(version, mutate):
    res = copy.deepcopy(good(version))
    mutate(res)
    return res


BAD = [
    # (id, version, mutation, words the message must contain)
    ("no-cniVersion", "1.0.0", lambda r: r.pop("cniVersion"), ["cniVersion", "missing"]),
    ("other-cniVersion", "1.0.0", lambda r: r.update(cniVersion="0.4.0"), ["result.cniVersion"]),
    ("unknown-top-key", "1.1.0", lambda r: r.update(extra=1), ["result.extra"]),
    ("version-missing-0.3.1", "0.3.1", lambda r: r["ips"][0].pop("version"),
     ["ips[0]", "'version'"]),
    ("version-in-1.0.0", "1.0.0", lambda r: r["ips"][0].update(version="4"),
     ["ips[0].version", "1.0.0"]),
    ("version-mismatch", "0.4.0", lambda r: r["ips"][0].update(version="6"),
     ["ips[0].version", "IPv4"]),
    ("iface-mtu-in-1.0.0", "1.0.0", lambda r: r["interfaces"][1].update(mtu=1500),
     ["interfaces[1].mtu"]),
    ("iface-socketPath-in-0.4.0", "0.4.0",
     lambda r: r["interfaces"][1].update(socketPath="/x"), ["interfaces[1].socketPath"]),
    ("iface-pciID-in-1.0.0", "1.0.0", lambda r: r["interfaces"][1].update(pciID="0000:00:01.0"),
     ["interfaces[1].pciID"]),
    ("route-table-in-1.0.0", "1.0.0", lambda r: r["routes"][0].update(table=5),
     ["routes[0].table"]),
    ("route-advmss-in-0.3.0", "0.3.0", lambda r: r["routes"][0].update(advmss=5),
     ["routes[0].advmss"]),
    ("route-scope-str", "1.1.0", lambda r: r["routes"][0].update(scope="link"),
     ["routes[0].scope", "int"]),
    ("interface-index-out-of-range", "1.1.0", lambda r: r["ips"][0].update(interface=2),
     ["ips[0].interface", "index"]),
    ("interface-index-negative", "1.0.0", lambda r: r["ips"][0].update(interface=-1),
     ["ips[0].interface"]),
    ("interface-index-bool", "1.0.0", lambda r: r["ips"][0].update(interface=True),
     ["ips[0].interface", "int"]),
    ("address-no-prefix", "1.1.0", lambda r: r["ips"][0].update(address="10.0.0.2"),
     ["ips[0].address", "CIDR"]),
    ("gateway-garbage", "1.1.0", lambda r: r["ips"][0].update(gateway="nope"),
     ["ips[0].gateway", "nope"]),
    ("bad-mac", "1.1.0", lambda r: r["interfaces"][1].update(mac="zz"), ["interfaces[1].mac"]),
    ("empty-sandbox", "1.1.0", lambda r: r["interfaces"][1].update(sandbox=""),
     ["interfaces[1].sandbox"]),
    ("iface-without-name", "1.1.0", lambda r: r["interfaces"][0].pop("name"),
     ["interfaces[0]", "'name'"]),
    ("route-dst-garbage", "1.1.0", lambda r: r["routes"][0].update(dst="default"),
     ["routes[0].dst"]),
    ("dns-unknown-key", "1.1.0", lambda r: r["dns"].update(servers=[]), ["dns.servers"]),
    ("ips-not-list", "1.1.0", lambda r: r.update(ips={}), ["result.ips", "list"]),
]


@pytest.mark.parametrize("version,mutate,words", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_result_fails_naming_the_key(version, mutate, words):
    assert_fails(check_result, _broken(version, mutate), version, words=words)


def test_unknown_version_is_refused():
    with pytest.raises(AssertionError, match="2.0.0"):
        check_result({"cniVersion": "2.0.0"}, "2.0.0")


def test_error_shape():
    check_error({"cniVersion": "1.1.0", "code": 7, "msg": "bad", "details": "more"})
    check_error({"cniVersion": "0.4.0", "code": 4, "msg": "bad"}, "0.4.0")


@pytest.mark.parametrize("body,words", [
    ({"code": 7, "msg": "x"}, ["cniVersion"]),
    ({"cniVersion": "1.1.0", "msg": "x"}, ["code"]),
    ({"cniVersion": "1.1.0", "code": "7", "msg": "x"}, ["error.code", "int"]),
    ({"cniVersion": "1.1.0", "code": 7, "msg": ""}, ["error.msg"]),
    ({"cniVersion": "1.1.0", "code": 7, "msg": "x", "details": 3}, ["error.details"]),
    ({"cniVersion": "1.1.0", "code": 7, "msg": "x", "error": "y"}, ["error.error"]),
    ({"cniVersion": "9.9.9", "code": 7, "msg": "x"}, ["9.9.9"]),
    ([], ["JSON object"]),
], ids=["no-version", "no-code", "code-str", "empty-msg", "details-int", "extra-key",
        "bad-version", "not-object"])
def test_bad_error_fails(body, words):
    assert_fails(check_error, body, words=words)


def test_error_version_pinned():
    with pytest.raises(AssertionError, match="expected '0.3.1'"):
        check_error({"cniVersion": "1.1.0", "code": 1, "msg": "x"}, "0.3.1")


def test_version_output():
    check_version_output({"cniVersion": "1.0.0", "supportedVersions": list(VERSIONS)},
                         VERSIONS)


@pytest.mark.parametrize("body,words", [
    ({"supportedVersions": ["1.0.0"]}, ["cniVersion"]),
    ({"cniVersion": "1.0.0"}, ["supportedVersions"]),
    ({"cniVersion": "1.0.0", "supportedVersions": []}, ["non-empty"]),
    ({"cniVersion": "1.1.0", "supportedVersions": ["1.0.0"]}, ["not among"]),
    ({"cniVersion": "1.0.0", "supportedVersions": ["1.0.0", "1.0.0"]}, ["duplicates"]),
    ({"cniVersion": "1.0.0", "supportedVersions": ["1.0.0"], "x": 1}, ["version output.x"]),
], ids=["no-version", "no-list", "empty-list", "version-not-listed", "duplicates", "extra"])
def test_bad_version_output_fails(body, words):
    assert_fails(check_version_output, body, words=words)


def test_version_output_expected_list():
    with pytest.raises(AssertionError, match="expected"):
        check_version_output({"cniVersion": "1.0.0", "supportedVersions": ["1.0.0"]}, VERSIONS)
