"""core.tenancy: the bindings file, read again only when it changes; fail closed."""

from __future__ import annotations

import json
import os

import pytest

from vpcni.core.errors import InvalidConfig, TenancyRefused, TryAgainLater
from vpcni.core.tenancy import Tenancy, parse_bindings


def write(path, vnis, version=1):
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"version": version, "vnis": vnis}))
    os.replace(tmp, path)


def test_check_allows_bound_and_names_namespace_and_vpc_otherwise(tmp_path):
    path = tmp_path / "b.json"
    write(path, {"300": {"vpc": "blue", "namespaces": ["a", "b"]}})
    t = Tenancy(str(path))
    assert t.check(300, "a", "p") == "blue"
    with pytest.raises(TenancyRefused, match=r"pod c/p may not attach to VPC blue \(VNI 300\)"):
        t.check(300, "c", "p")
    with pytest.raises(TenancyRefused, match="no VPC has that VNI"):
        t.check(301, "a")
    with pytest.raises(TenancyRefused, match="K8S_POD_NAMESPACE"):
        t.check(300, None)
    assert TenancyRefused("x").code == 101


def test_off_allows_anything_without_reading(tmp_path):
    assert Tenancy(str(tmp_path / "absent.json"), enforce=False).check(7, None) == ""


def test_missing_is_try_again_and_malformed_is_invalid(tmp_path):
    path = tmp_path / "b.json"
    with pytest.raises(TryAgainLater, match="fails closed"):
        Tenancy(str(path)).check(300, "a")
    for text, where in (("{", "not JSON"), ('{"version": 2}', "version"),
                        ('{"version": 1, "vnis": {"300": {"vpc": "b", "x": 1}}}', "vnis.300.x"),
                        ('{"version": 1, "vnis": {"99999999": {"vpc": "b"}}}', "not a VNI"),
                        ('[' * 5000 + ']' * 5000, "not JSON")):
        with pytest.raises(InvalidConfig, match=where):
            parse_bindings(text, "f")


def test_a_changed_file_is_read_again_an_unchanged_one_is_not(tmp_path, monkeypatch):
    path = tmp_path / "b.json"
    write(path, {"300": {"vpc": "blue", "namespaces": ["a"]}})
    t = Tenancy(str(path))
    t.check(300, "a")
    reads = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda *a, **k: reads.append(a[0]) or real_open(*a, **k))
    t.check(300, "a")
    assert reads == []
    write(path, {"300": {"vpc": "blue", "namespaces": ["a", "z"]}})
    assert t.check(300, "z") == "blue"
    assert reads == [str(path)]


def test_a_bound_network_name_keeps_other_networks_off_the_vni(tmp_path):
    """A tenant's NAD may carry the VPC's VNI only under the VPC's network name
    (vpcni-ipam keys its pools by it)."""
    path = tmp_path / "b.json"
    write(path, {"300": {"vpc": "blue", "network": "vpc-blue", "namespaces": ["a"]}})
    t = Tenancy(str(path))
    assert t.check(300, "a", "p", "vpc-blue") == "blue"
    with pytest.raises(TenancyRefused, match="network 'vpc-red' may not use VNI 300"):
        t.check(300, "a", "p", "vpc-red")


def test_a_routed_subnet_routes_only_into_its_bound_vpc(tmp_path):
    """A routed network config names the VPC and L3VNI its pods are routed into: the
    binding must say the same, or a tenant's own NAD could route a bound VNI into
    another VPC's router."""
    path = tmp_path / "b.json"
    write(path, {"400": {"vpc": "green", "namespaces": ["a"], "l3vni": 4000},
                 "300": {"vpc": "blue", "namespaces": ["a"]}})
    t = Tenancy(str(path))
    assert t.check(400, "a", "p", routing=("green", 4000)) == "green"
    assert t.check(400, "a", "p") == "green"   # an L2-only member of the subnet
    with pytest.raises(TenancyRefused, match=r"routing.l3vni 4100 may not route VNI 400: it "
                                             r"is a routed subnet of VPC green with L3VNI 4000"):
        t.check(400, "a", "p", routing=("green", 4100))
    with pytest.raises(TenancyRefused, match="routing.vpc 'orange'"):
        t.check(400, "a", "p", routing=("orange", 4000))
    with pytest.raises(TenancyRefused, match="VPC blue's, not a routed subnet"):
        t.check(300, "a", "p", routing=("blue", 4000))
    with pytest.raises(InvalidConfig, match="l3vni"):
        parse_bindings(json.dumps({"version": 1, "vnis": {"400": {"vpc": "g", "l3vni": 0}}}),
                       "x")
