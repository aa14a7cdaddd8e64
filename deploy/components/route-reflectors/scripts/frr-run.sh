#!/bin/sh
# The FRR reflector container (FRR's image): bgpd on the config frr-render.sh wrote,
# restarted when it exits (after 1 s, doubling to 30 s while it keeps failing; reset
# after a minute up). A hung bgpd fails the liveness probe (its vty stops answering) and
# kubelet restarts the container.
#
# bgpd runs with -Z, without zebra: a reflector only passes routes on, so nothing of it
# touches the host's routing table, on whose network it runs. (FRR's watchfrr cannot
# supervise bgpd alone: it insists on zebra, and a zebra on the host network sweeps
# the kernel routes of other FRR instances, e.g. MetalLB's, when it starts.)
set -eu
pid=
# Stopped (kubelet's SIGTERM): bgpd goes first.
trap 'if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; wait "$pid" || true; fi; exit 0' TERM INT
delay=1
while :; do
  started=$(date +%s)
  /usr/lib/frr/bgpd -Z -A 127.0.0.1 -f /etc/frr/bgpd.conf --log stdout &
  pid=$!
  rc=0
  wait "$pid" || rc=$?
  pid=
  if [ $(($(date +%s) - started)) -ge 60 ]; then delay=1; fi
  echo "vpcni: bgpd exited with status $rc; starting it again in ${delay}s" >&2
  sleep "$delay"
  delay=$((delay * 2 > 30 ? 30 : delay * 2))
done
