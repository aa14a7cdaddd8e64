#!/usr/bin/env bash
# Sets up (Debian packages, venv) and runs the whole test suite, slow tests included.
# Needs root: the functional tests build network namespaces and run real daemons.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/pytest -p no:cacheprovider --timeout=600 "$@"
