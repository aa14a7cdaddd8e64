#!/bin/sh
# The agent container.
set -eu
exec /opt/vpcni/venv/bin/vpcnictl agent --node-config /etc/vpcni/node.json
