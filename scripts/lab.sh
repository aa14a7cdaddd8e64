#!/usr/bin/env bash
# Sets up (Debian packages, venv) and runs the main job: the default lab
# (3 nodes, 2 route reflectors, 2 VPCs on one CIDR) in network namespaces,
# its connectivity matrix, and its removal. KEEP=1 leaves the lab up.
# Progress lines go to stderr (setup's steps, then `lab up`'s); the lab's
# summary and its connectivity matrix to stdout.
set -euo pipefail
cd "$(dirname "$0")/.."

start=$SECONDS
step() { printf 'lab.sh: [%3ds] %s\n' "$((SECONDS - start))" "$*" >&2; }

./scripts/setup.sh
ctl=.venv/bin/vpcnictl
if [ "${KEEP:-0}" != 1 ]; then
  trap 'step "removing the lab"; $ctl lab down default' EXIT
fi
$ctl lab down default >/dev/null   # a lab left from an interrupted run
step "bringing the default lab up"
$ctl lab up
step "measuring the connectivity matrix"
$ctl lab check default
