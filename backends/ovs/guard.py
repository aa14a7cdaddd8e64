"""The ovs backend's host-port guard: nothing a pod sends reaches the node's IP stack.

Forwarding between pods and VTEPs is OpenFlow's (flows.py: anti-spoofing,
VTEPs accepted per VNI). But a pod's host veth is also a plain kernel
interface: with the userspace datapath OVS reads it through a packet socket
and the kernel goes on to process the same frame, so a pod could reach the
node's own addresses (and ARP for them) through it. Two rules close that:

    table inet vpcni_ovs   prerouting: drop IPv4/IPv6 that arrives on a pod port ("vo*")
    table arp vpcni_ovs    input:      drop ARP that arrives on a pod port

OVS's packet socket sees the frame before these hooks run, so the pipeline
is unaffected; with the kernel datapath OVS consumes the frame before the IP
stack and the rules are simply never hit.

The node ends of a VPC router's veths in br-int (vgw<VNI>: a routed subnet's
gateway, vl3<L3VNI>: its L3 port) are such kernel interfaces too: what the
router sends (its ARP requests for VPC addresses, which may be the node's own)
must not reach the node's stack either.
"""

from __future__ import annotations

from vpcni.backends.common.nft import Nft
from vpcni.core.errors import BackendError

TABLE = "vpcni_ovs"
POD_PORTS = "vo*"
ROUTER_PORTS = ("vgw*", "vl3*")

_RULES = f"""
add table inet {TABLE}
add chain inet {TABLE} prerouting {{ type filter hook prerouting priority raw - 1; policy accept; }}
flush chain inet {TABLE} prerouting
add table arp {TABLE}
add chain arp {TABLE} input {{ type filter hook input priority filter; policy accept; }}
flush chain arp {TABLE} input
""" + "".join(f'add rule inet {TABLE} prerouting iifname "{ports}" counter drop comment "vpc-to-node"\n'
              f'add rule arp {TABLE} input iifname "{ports}" counter drop comment "vpc-to-node"\n'
              for ports in (POD_PORTS, *ROUTER_PORTS))


class HostPortGuard:
    def __init__(self) -> None:
        self._nft = Nft()
        self._installed = False

    def intact(self) -> bool:
        for what in (f"chain inet {TABLE} prerouting", f"chain arp {TABLE} input"):
            try:
                if not any("rule" in item for item in self._nft.list_json(what)):
                    return False
            except BackendError:
                return False
        return True

    def ensure(self, check: bool = True) -> bool:
        """Install (atomically replace) the rules if this guard has not yet, or, with
        `check`, if they are not intact; True when it installed them."""
        if self._installed and (not check or self.intact()):
            return False
        self._nft.run(_RULES, "keep pods off the node's IP stack")
        self._installed = True
        return True
