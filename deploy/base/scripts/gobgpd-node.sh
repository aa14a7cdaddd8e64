#!/bin/sh
# The node's gobgpd (sidecar of the agent): its config rendered at every start from the
# fabric ConfigMap (ASN, REFLECTORS) and the node's IP (router id = VTEP), then gobgpd as
# the container's process, its API on the unix socket the agent's node config names.
set -eu
set --
for rr in $REFLECTORS; do set -- "$@" --reflector "$rr"; done
/opt/vpcni/venv/bin/vpcnictl render gobgpd-node --router-id "$NODE_IP" --asn "$ASN" "$@" \
  > /run/gobgpd/gobgpd.toml
rm -f /run/vpcni/gobgpd/gobgpd.sock
# No -r on a restart: with it, gobgpd 3.10 holds its own routes back until every
# configured reflector has sent End-of-RIB, so one reflector down delays them. Without
# it the reflectors (graceful-restart helpers) keep this node's routes while it is
# away and replace them the moment the new session sends them (docs/control-plane.md).
exec gobgpd -f /run/gobgpd/gobgpd.toml -p --pprof-disable \
  --api-hosts unix:///run/vpcni/gobgpd/gobgpd.sock
