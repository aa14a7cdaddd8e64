"""The lab topology: pods without an address get one from vpcni-ipam."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from vpcni.lab.topology import Topology

BASE = {"reflectors": [{"name": "rr1", "address": "198.51.100.201"}],
        "nodes": [{"name": "node1", "address": "198.51.100.11"},
                  {"name": "vtep", "address": "198.51.100.12", "kind": "frr"}],
        "vpcs": [{"name": "blue", "vni": 300, "cidr": "172.16.32.0/24",
                  "ipam": {"exclude": ["172.16.32.0/28"]}}]}


def test_default_topology_leaves_addresses_to_ipam():
    topo = Topology.load()
    assert topo.pods and all(p.address is None for p in topo.pods)


def test_address_optional_on_vpcni_nodes_required_on_frr_nodes():
    ok = Topology.model_validate(BASE | {"pods": [{"name": "a", "node": "node1", "vpc": "blue"}]})
    assert ok.pods[0].address is None and ok.vpc("blue").ipam == {"exclude": ["172.16.32.0/28"]}
    with pytest.raises(ValidationError, match="FRR node vtep"):
        Topology.model_validate(BASE | {"pods": [{"name": "b", "node": "vtep", "vpc": "blue"}]})
    with pytest.raises(ValidationError, match="outside VPC blue"):
        Topology.model_validate(BASE | {"pods": [{"name": "c", "node": "node1", "vpc": "blue",
                                                  "address": "172.16.99.1/24"}]})
