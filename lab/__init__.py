"""vpcni lab."""
