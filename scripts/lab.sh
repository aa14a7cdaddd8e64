#!/usr/bin/env bash
# Sets up (Debian packages, venv) and runs the main job: the seed's two-node
# test in network namespaces, printed step by step, then removed.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/vpcnictl demo "$@"
