#!/usr/bin/env bash
# Sets up (Debian packages, venv) and runs the main job: the default lab
# (3 nodes, 2 route reflectors, 2 VPCs on one CIDR) in network namespaces,
# its connectivity matrix, then the routed lab (2 VPCs of 2 routed subnets
# each, on one pair of CIDRs, over kernel and OVS nodes) and its matrix, and
# their removal. KEEP=1 leaves the labs up.
# Progress lines go to stderr (setup's steps, then `lab up`'s); the lab's
# summary and its connectivity matrix to stdout.
set -euo pipefail
cd "$(dirname "$0")/.."

start=$SECONDS
step() { printf 'lab.sh: [%3ds] %s\n' "$((SECONDS - start))" "$*" >&2; }

./scripts/setup.sh
ctl=.venv/bin/vpcnictl
if [ "${KEEP:-0}" != 1 ]; then
  trap 'step "removing the labs"; $ctl lab down default; $ctl lab down routed' EXIT
fi
$ctl lab down default >/dev/null   # labs left from an interrupted run
$ctl lab down routed >/dev/null
step "bringing the default lab up"
$ctl lab up
step "measuring the connectivity matrix"
$ctl lab check default
# The routed lab: two VPCs with the same two subnets over kernel and OVS nodes,
# each subnet an anycast gateway, subnets routed over the VPC's L3VNI (docs/routing.md).
step "bringing the routed lab up"
$ctl lab up lab/topologies/routed.toml
step "measuring its connectivity matrix (subnets of a VPC reach each other)"
$ctl lab check routed
