"""The node agent: serves CNI requests, speaks EVPN, reconciles, reports health."""
