#!/bin/sh
# The agent container. Its pid is the host's (hostPID): recorded for the host's
# vpcni-ipam wrapper, which runs in this container's file system.
set -eu
echo $$ > /run/vpcni/agent.pid
exec /opt/vpcni/venv/bin/vpcnictl agent --node-config /etc/vpcni/node.json
