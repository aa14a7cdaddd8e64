# Sourced by the reflectors' start scripts: this reflector must be one of the addresses
# the nodes peer with (REFLECTORS of ConfigMap vpcni-fabric), or no node would ever
# connect to it. Stop with the reason rather than run unused.
listed=
for rr in $REFLECTORS; do
  if [ "$rr" = "$NODE_IP" ]; then listed=yes; fi
done
if [ -z "$listed" ]; then
  echo "vpcni: route reflector $POD_NAME runs on node $NODE_NAME ($NODE_IP), which is not" \
    "in REFLECTORS of ConfigMap vpcni-fabric ($REFLECTORS): list it there, or label" \
    "only the listed nodes vpcni.io/route-reflector=true" >&2
  exit 1
fi
