"""vpcni-ipam: cluster-wide VPC IPAM (no per-node ranges).

One allocator per VPC subnet hands out addresses to any node; the
reservations live in a store shared by the nodes: a SQLite file (the
embedded default: one machine, the lab) or etcd (clusters). Served two ways
under one name, `vpcni-ipam`: in-process when vpcni's own config says
`"ipam": {"type": "vpcni-ipam"}`, and as a standalone CNI IPAM plugin that
any CNI plugin can delegate to. See docs/ipam.md.
"""

IPAM_TYPE = "vpcni-ipam"
