"""Names, aliases and kernel-support detection of the kernel backend (no root needed)."""

from __future__ import annotations

import os
import re

import pytest

from vpcni.backends.common import modules
from vpcni.backends.common.podif import alias_attachment, attachment_alias
from vpcni.backends.kernel import backend as kernel
from vpcni.backends.kernel.netlink import alias_vni, host_ifname, vni_alias
from vpcni.core.config import NodeConfig


def test_host_ifname_is_deterministic_and_fits_ifnamsiz():
    name = host_ifname("vpc-a", "0123456789abcdef", "eth1")
    assert name == host_ifname("vpc-a", "0123456789abcdef", "eth1")
    assert re.fullmatch(r"vp[0-9a-f]{11}", name)
    assert len(name) <= 15


@pytest.mark.parametrize("other", [("vpc-b", "c1", "eth1"), ("vpc-a", "c2", "eth1"),
                                   ("vpc-a", "c1", "eth2"), ("vpc-a/c", "1", "eth1")])
def test_host_ifname_differs_per_attachment(other):
    assert host_ifname("vpc-a", "c1", "eth1") != host_ifname(*other)


def test_aliases_round_trip():
    assert alias_vni(vni_alias(16777215)) == 16777215
    key = ("vpc-a", "c.1_x", "net1")
    assert alias_attachment(attachment_alias(*key)) == key


@pytest.mark.parametrize("alias", [None, "", "vpcni:vni=", "vpcni:vni=3x", "my bridge",
                                   "vpcni:att=a/b", "vpcni:att=a/b/c/d", "vpcni:att=a//c"])
def test_foreign_aliases_are_not_ours(alias):
    assert alias_vni(alias) is None and alias_attachment(alias) is None


@pytest.fixture
def fake_kernel(tmp_path, monkeypatch):
    """An empty /sys/module and /lib/modules to fill per test."""
    sys_module, lib_modules = tmp_path / "sys-module", tmp_path / "lib-modules"
    release = lib_modules / os.uname().release
    sys_module.mkdir()
    release.mkdir(parents=True)
    monkeypatch.setattr(modules, "SYS_MODULE", sys_module)
    monkeypatch.setattr(modules, "LIB_MODULES", lib_modules)
    return sys_module, release


def test_kernel_support_loaded_builtin_loadable(fake_kernel):
    sys_module, release = fake_kernel
    (sys_module / "bridge").mkdir()
    (release / "modules.builtin").write_text("kernel/net/bridge/br_netfilter.ko\n")
    (release / "modules.dep").write_text(
        "kernel/drivers/net/vxlan/vxlan.ko.xz: kernel/net/ipv4/udp_tunnel.ko.xz\n")
    assert modules.kernel_support("bridge") == "loaded"
    assert modules.kernel_support("vxlan") == "loadable"
    assert modules.kernel_support("br_netfilter") == "built-in"
    assert modules.kernel_support("netfilter") is None


def test_probe_names_missing_kernel_support(fake_kernel):
    sys_module, _ = fake_kernel
    (sys_module / "bridge").mkdir()
    probe = kernel.KernelBackend.probe(NodeConfig(vtepAddress="198.51.100.1"))
    assert not probe.available
    assert probe.reason.startswith("no vxlan support in kernel")
