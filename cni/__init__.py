"""vpcni cni."""
