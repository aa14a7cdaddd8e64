#!/bin/sh
# The agent pod's init container: the CNI executables into the host's CNI bin dir
# (mounted at /host/opt/cni/bin), then the node config (/etc/vpcni, the host's).
set -eu
here=$(dirname "$0")
bin=/host/opt/cni/bin

# The shim, a static Go binary (the host needs nothing to run it; the image has it
# prebuilt where install-cni finds it: no Go toolchain), as `vpcni` and as `vpcni-ipam`
# (under that name it forwards IPAM calls to the agent, which serves vpcni-ipam).
/opt/vpcni/venv/bin/vpcnictl install-cni --dest "$bin"

/opt/vpcni/venv/bin/python "$here/write-node-config.py"

# The agent container mounts the tenancy bindings here, inside its read-only mount of
# /etc/vpcni: the mount point must exist beforehand.
mkdir -p /etc/vpcni/tenancy
