#!/bin/sh
# A gobgpd route reflector container: its config rendered at every start from ConfigMap
# vpcni-fabric and this node's IP, then gobgpd itself as the container's process (kubelet
# restarts it). Its API is on a unix socket only (probes, `gobgp` for debugging).
set -eu
here=$(dirname "$0")
. "$here/require-listed.sh"
/opt/vpcni/venv/bin/vpcnictl render gobgpd-rr --router-id "$ROUTER_ID" --asn "$ASN" \
  --vtep-prefix "$VTEP_PREFIX" > /run/gobgpd/gobgpd.toml
rm -f /run/gobgpd/gobgpd.sock
exec gobgpd -f /run/gobgpd/gobgpd.toml -p --pprof-disable \
  --api-hosts unix:///run/gobgpd/gobgpd.sock
