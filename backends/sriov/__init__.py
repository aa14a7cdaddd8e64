"""The sriov interface provider: SR-IOV VFs for pods (netdev) and KubeVirt VMs (vfio),
their representors in the node's (offloaded) VPC switch."""
from .provider import SriovProvider

__all__ = ["SriovProvider"]
