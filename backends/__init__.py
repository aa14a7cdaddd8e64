"""vpcni backends."""
