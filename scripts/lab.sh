#!/usr/bin/env bash
# Sets up (Debian packages, venv) and runs the main job: the default lab
# (3 nodes, 2 route reflectors, 2 VPCs on one CIDR) in network namespaces,
# its connectivity matrix, and its removal. KEEP=1 leaves the lab up.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
ctl=.venv/bin/vpcnictl
if [ "${KEEP:-0}" != 1 ]; then
  trap '$ctl lab down default' EXIT
fi
$ctl lab down default >/dev/null   # a lab left from an interrupted run
$ctl lab up
$ctl lab check default
