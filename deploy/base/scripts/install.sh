#!/bin/sh
# The agent pod's init container: the CNI executables into the host's CNI bin dir
# (mounted at /host/opt/cni/bin), then the node config (/etc/vpcni, the host's).
set -eu
here=$(dirname "$0")
bin=/host/opt/cni/bin

# The shim: a static Go binary, so the host needs nothing to run it (the image has it
# prebuilt where install-cni finds it: no Go toolchain).
/opt/vpcni/venv/bin/vpcnictl install-cni --dest "$bin"

# vpcni-ipam, for plugins that delegate to it (see the wrapper's comment).
cp "$here/vpcni-ipam" "$bin/.vpcni-ipam.tmp"
chmod 0755 "$bin/.vpcni-ipam.tmp"
mv -f "$bin/.vpcni-ipam.tmp" "$bin/vpcni-ipam"

/opt/vpcni/venv/bin/python "$here/write-node-config.py"

# The agent container mounts the tenancy bindings here, inside its read-only mount of
# /etc/vpcni: the mount point must exist beforehand.
mkdir -p /etc/vpcni/tenancy
