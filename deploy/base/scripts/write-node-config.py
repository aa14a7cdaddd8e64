"""The node config, /etc/vpcni/node.json (or node.json in the directory given), from the
node's facts and the fabric ConfigMap.

Run by the agent pod's init container with the image's Python. NODE_IP (status.hostIP)
is the VTEP; ASN and VTEP_PREFIX come from ConfigMap vpcni-fabric. The file is checked
with the agent's own model before it replaces the old one: the host's shim reads it too
(it finds the agent's socket there).
"""

import ipaddress
import json
import os
import sys

from vpcni.core.config import NodeConfig

HEALTH_PORT = 9471


def main(etc: str = "/etc/vpcni") -> None:
    node, ip, prefix = os.environ["NODE_NAME"], os.environ["NODE_IP"], os.environ["VTEP_PREFIX"]
    if ipaddress.ip_address(ip).version != 4:
        sys.exit(f"vpcni: node {node}: its IP {ip} (status.hostIP) is not IPv4: a VTEP is "
                 "the node's BGP router id, an IPv4 address")
    if ipaddress.ip_address(ip) not in ipaddress.ip_network(prefix, strict=False):
        sys.exit(f"vpcni: node {node}: its IP {ip} (status.hostIP) is not in VTEP_PREFIX "
                 f"{prefix} of ConfigMap vpcni-fabric: fix one of them")
    config = {
        "vtepAddress": ip,
        "stateDir": "/var/lib/vpcni",
        "agentSocket": "/run/vpcni/agent.sock",
        "logFile": "/var/log/vpcni/vpcni.log",
        # In a directory of its own: the gobgpd container mounts only that.
        "evpn": {"gobgpdSocket": "/run/vpcni/gobgpd/gobgpd.sock", "asn": int(os.environ["ASN"])},
        # Written by the controller into ConfigMap vpcni-tenancy, mounted by the pod.
        "tenancy": {"enforce": True, "bindingsFile": "/etc/vpcni/tenancy/bindings.json"},
        # The node's IP (the pod's, with hostNetwork), not 127.0.0.1: kubelet's probes
        # and Prometheus connect from outside the pod.
        "healthAddress": f"{ip}:{HEALTH_PORT}",
    }
    NodeConfig.model_validate(config)
    tmp = os.path.join(etc, "node.json.tmp")
    with open(tmp, "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    os.replace(tmp, os.path.join(etc, "node.json"))
    print(f"vpcni: node {node}: {etc}/node.json written, VTEP {ip}")


if __name__ == "__main__":
    main(*sys.argv[1:])
