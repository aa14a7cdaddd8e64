"""The ovs backend: VPCs on Open vSwitch (OVSDB + an OpenFlow pipeline)."""
from .backend import OvsBackend, host_ifname

__all__ = ["OvsBackend", "host_ifname"]
