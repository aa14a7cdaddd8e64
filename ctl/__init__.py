"""vpcni ctl."""
