"""vpcni backends."""
from .backend import KernelBackend
from .netlink import host_ifname

__all__ = ["KernelBackend", "host_ifname"]
