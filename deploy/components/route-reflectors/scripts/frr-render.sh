#!/bin/sh
# The FRR reflector pod's init container (vpcni image): bgpd's config from ConfigMap
# vpcni-fabric and this node's IP, into /etc/frr, which the frr container (FRR's image,
# without vpcnictl) shares.
set -eu
here=$(dirname "$0")
. "$here/require-listed.sh"
/opt/vpcni/venv/bin/vpcnictl render frr-rr --router-id "$ROUTER_ID" --asn "$ASN" \
  --vtep-prefix "$VTEP_PREFIX" > /etc/frr/bgpd.conf
: > /etc/frr/vtysh.conf
