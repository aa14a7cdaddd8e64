# Sourced by the reflectors' start scripts: this reflector must be one of the addresses
# the nodes peer with (REFLECTORS of ConfigMap vpcni-fabric), or no node would ever
# connect to it. Stop with the reason rather than run unused. Sets ROUTER_ID: the entry of
# REFLECTOR_ROUTER_IDS at the same position. Not the node IP: the node's own gobgpd (the
# agent's sidecar runs on reflector nodes too) has that router id, and BGP refuses a peer
# with its own (the node would have no session to its own reflector).
listed=
i=0
for rr in $REFLECTORS; do
  i=$((i + 1))
  if [ "$rr" = "$NODE_IP" ]; then listed=$i; fi
done
if [ -z "$listed" ]; then
  echo "vpcni: route reflector $POD_NAME runs on node $NODE_NAME ($NODE_IP), which is not" \
    "in REFLECTORS of ConfigMap vpcni-fabric ($REFLECTORS): list it there, or label" \
    "only the listed nodes vpcni.io/route-reflector=true" >&2
  exit 1
fi
ROUTER_ID=
i=0
for id in $REFLECTOR_ROUTER_IDS; do
  i=$((i + 1))
  if [ "$i" = "$listed" ]; then ROUTER_ID=$id; fi
done
if [ -z "$ROUTER_ID" ]; then
  echo "vpcni: route reflector $POD_NAME ($NODE_IP) has no router id: REFLECTOR_ROUTER_IDS" \
    "of ConfigMap vpcni-fabric must name one per entry of REFLECTORS, in the same order" >&2
  exit 1
fi
