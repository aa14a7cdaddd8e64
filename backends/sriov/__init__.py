"""The sriov backend: SR-IOV VFs for pods (netdev) and KubeVirt VMs (vfio), representors in the offloaded switch."""
