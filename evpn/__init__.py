"""BGP EVPN control plane: the node's gobgpd speaker, route codec, daemon configs."""
