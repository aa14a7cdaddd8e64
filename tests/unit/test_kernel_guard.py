"""The kernel guard's pure parts: which set elements a port needs, and reading nft JSON back."""

import ipaddress

from vpcni.backends.kernel.guard import _BRIDGE, _INET, _element_text, port_elements


def ip(text):
    return ipaddress.ip_address(text)


def test_an_ipv4_port_gets_its_mac_and_addresses_only():
    elems = port_elements("vp0123456789a", "02:AA:00:00:00:01", [ip("172.16.32.1")])
    assert elems["port_mac"] == {'"vp0123456789a" . 02:aa:00:00:00:01'}
    assert elems["port_ip4"] == {'"vp0123456789a" . 172.16.32.1'}
    assert not elems["port_ip6"] and not elems["port_v6"] and not elems["port_l2"]


def test_an_ipv6_port_may_use_link_local_and_a_port_without_addresses_is_l2_only():
    v6 = port_elements("vpa", "02:00:00:00:00:02", [ip("fd00::5"), ip("10.0.0.5")])
    assert v6["port_ip6"] == {'"vpa" . fd00::5'} and v6["port_v6"] == {'"vpa"'}
    assert v6["port_ip4"] == {'"vpa" . 10.0.0.5'} and not v6["port_l2"]
    l2 = port_elements("vpb", "02:00:00:00:00:03", [])
    assert l2["port_l2"] == {'"vpb"'} and l2["port_mac"]


def test_listed_elements_read_back_as_the_text_they_were_added_with():
    assert _element_text({"concat": ["vp0123456789a", "02:aa:00:00:00:01"]}) == \
        '"vp0123456789a" . 02:aa:00:00:00:01'
    assert _element_text({"concat": ["vpa", "fd00::5"]}) == '"vpa" . fd00::5'
    assert _element_text("vpb") == '"vpb"'
    assert _element_text({"concat": ["198.51.100.2", 300]}) == "198.51.100.2 . 300"
    assert _element_text({"elem": {"val": "vpc", "counter": {}}}) == '"vpc"'


def test_interface_names_cannot_break_out_of_the_quotes():
    assert port_elements('x"; flush ruleset', None, [])["port_l2"] == {'"x; flush ruleset"'}


def test_the_base_rules_fail_closed_and_keep_pods_off_the_node():
    assert 'iifname . ether saddr != @port_mac counter drop' in _BRIDGE
    assert _BRIDGE.strip().splitlines()[-1].endswith('counter drop comment "spoofed-ip"')
    assert 'add rule bridge vpcni input iifname "vp*" counter drop' in _BRIDGE
    assert 'vxlan_in counter drop comment "vxlan-unknown-vtep"' in _INET
