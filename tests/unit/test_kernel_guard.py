"""The kernel guard's pure parts: which set elements a port needs, and reading nft JSON back."""

import ipaddress

from vpcni.backends.kernel.guard import (ARP_RULES, BRIDGE_RULES, EXPECTED, INET_RULES, REPLACE,
                                         element_text, port_elements)


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
    assert element_text({"concat": ["vp0123456789a", "02:aa:00:00:00:01"]}) == \
        '"vp0123456789a" . 02:aa:00:00:00:01'
    assert element_text({"concat": ["vpa", "fd00::5"]}) == '"vpa" . fd00::5'
    assert element_text("vpb") == '"vpb"'
    assert element_text({"concat": ["198.51.100.2", 300]}) == "198.51.100.2 . 300"
    assert element_text({"elem": {"val": "vpc", "counter": {}}}) == '"vpc"'


def test_interface_names_cannot_break_out_of_the_quotes():
    assert port_elements('x"; flush ruleset', None, [])["port_l2"] == {'"x; flush ruleset"'}


def test_the_intact_check_counts_every_base_rule():
    assert EXPECTED[("bridge", "from_pod")] == 7
    assert EXPECTED[("inet", "vxlan_in")] == 4 and EXPECTED[("arp", "input")] == 1
    assert sum(EXPECTED.values()) == sum(line.startswith("add rule ") for line in
                                         (BRIDGE_RULES + INET_RULES + ARP_RULES).splitlines())


def test_a_table_of_another_layout_is_replaced_in_the_same_transaction():
    lines = REPLACE.splitlines()
    for family in ("bridge", "inet", "arp"):
        assert lines.index(f"delete table {family} vpcni") < lines.index(
            f"add chain {'bridge' if family == 'bridge' else family} vpcni "
            + {"bridge": "prerouting", "inet": "prerouting", "arp": "input"}[family]
            + " { type filter hook "
            + {"bridge": "prerouting priority filter", "inet": "prerouting priority raw - 1",
               "arp": "input priority filter"}[family] + "; policy accept; }")
