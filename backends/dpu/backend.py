"""The dpu switch backend (entry point `dpu` in `vpcni.backends`), for a host whose NIC is
a DPU: the VPC switch, the VTEP, gobgpd and a vpcni agent run on the DPU; the host only
hands VFs to pods (provider `sriov`).

    host                                          DPU (its own agent, kernel or ovs switch)
    pod eth1 = VF ══ NIC ══ representor c1pf<N>vf<M> ── vpbr<VNI>/br-int ── VXLAN, EVPN
       │
    host agent: sriov moves the VF in, sets its MAC through the PF;
                dpu.add_port ──"ADD interface host-vf, hostVF pf<N>vf<M>, MAC, IPs"──▶ DPU agent

The channel is the DPU agent's own request socket and schema (what the `vpcni`
shim sends): an ADD, DEL or CHECK of the same attachment key, whose network
config says `"interface": "host-vf"` and names the VF, with the MAC and
addresses the host decided. The DPU records the attachment like any other, so
its EVPN routes, filters and reconcile follow from its records, and a restart
on either side converges from them. This is not OVN-Kubernetes' way (pod
annotations through the API server, watched by the DPU): a pod's ADD here
depends on the DPU agent only, not on the API server's latency or availability.

In the lab the socket is a unix socket path both namespaces see; a real DPU
needs the same requests over the host-DPU management network (TCP with mutual
TLS), which is not built yet. Per-VNI plumbing and remote state are the DPU's:
ensure_network, release_network and apply_remote do nothing on the host.
"""

from __future__ import annotations

import hashlib
import json
import socket
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from vpcni.cni.shim import agent_call
from vpcni.core.backend import Backend
from vpcni.core.config import NodeConfig
from vpcni.core.errors import BackendError, InvalidConfig, NotAvailable
from vpcni.core.models import Attachment, Capabilities, Owned, Probe, RemoteState, VpcNetwork

# What the DPU side's CNI layer needs but does not use for a host VF: there is no
# pod namespace on the DPU, and no plugin to find in a CNI_PATH.
DPU_NETNS = "/proc/self/ns/net"
DPU_CNI_PATH = "/opt/cni/bin"


class DpuConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # The DPU agent's request socket.
    agentSocket: Path
    # The pods' MTU (the DPU's underlay MTU minus VXLAN).
    podMtu: int = Field(default=1450, ge=576, le=65535)
    timeout: float = Field(default=30.0, gt=0)


class DpuBackend(Backend):
    name = "dpu"
    config_model = DpuConfig

    @classmethod
    def probe(cls, node: NodeConfig) -> Probe:
        if "dpu" not in node.sections():
            return Probe(name=cls.name, available=False,
                         reason="no `dpu` section in the node config (not a DPU host)")
        cfg = node.section(cls.name, DpuConfig)
        facts = {"agentSocket": str(cfg.agentSocket)}
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(2)
            sock.connect(str(cfg.agentSocket))
        except OSError as exc:
            return Probe(name=cls.name, available=False, facts=facts,
                         reason=f"the DPU agent does not answer at {cfg.agentSocket}: "
                                f"{exc.strerror or exc}")
        finally:
            sock.close()
        # Configured and answering: it is what this host's pods must use.
        return Probe(name=cls.name, available=True, score=100, facts=facts,
                     reason=f"the VPC switch runs on the DPU (agent at {cfg.agentSocket})")

    def describe(self) -> Capabilities:
        return Capabilities(ports=["remote-representor"], offload=True, port_prefix="vp")

    def port_name(self, att: Attachment) -> str:
        # The name the DPU's switch gives the representor (kernel switch naming):
        # informational on the host, where no such netdev exists.
        return "vp" + hashlib.sha256("/".join(att.key).encode()).hexdigest()[:11]

    def pod_mtu(self, net: VpcNetwork) -> int:
        return net.mtu or self.settings.podMtu

    def ensure_network(self, net: VpcNetwork) -> None:
        return None

    def release_network(self, vni: int) -> None:
        return None

    def apply_remote(self, vni: int, remote: RemoteState) -> None:
        return None

    def owned(self) -> Owned:
        return Owned()

    # ------------------------------------------------------------ the channel

    def _request(self, command: str, att: Attachment) -> dict:
        state = att.provider_state
        if command == "ADD" and ("pf_number" not in state or "vf" not in state):
            raise NotAvailable(f"attachment {'/'.join(att.key)} has no VF: on a DPU host "
                               "every network needs 'interface': 'vf' or a deviceID")
        config = {"cniVersion": "1.1.0", "name": att.network, "type": "vpcni", "vni": att.vni,
                  "port": att.port, "interface": "host-vf",
                  "hostVF": f"pf{state.get('pf_number', 0)}vf{state.get('vf', 0)}",
                  "runtimeConfig": {"ips": [str(ip.address) for ip in att.ips]}}
        if att.mac:
            config["runtimeConfig"]["mac"] = att.mac
        if att.vteps:
            config["vteps"] = [str(v) for v in att.vteps]
        env = {"CNI_COMMAND": command, "CNI_CONTAINERID": att.container_id,
               "CNI_IFNAME": att.ifname, "CNI_NETNS": DPU_NETNS, "CNI_PATH": DPU_CNI_PATH}
        if att.pod_namespace:
            # The DPU checks tenancy again with its own bindings (it trusts the host's
            # kubelet for the namespace, as the host's agent does).
            env["CNI_ARGS"] = (f"IgnoreUnknown=1;K8S_POD_NAMESPACE={att.pod_namespace}"
                               + (f";K8S_POD_NAME={att.pod_name}" if att.pod_name else ""))
        try:
            reply = agent_call(str(self.settings.agentSocket),
                               {"env": env, "stdin": json.dumps(config)}, self.settings.timeout)
        except (OSError, ValueError) as exc:
            raise BackendError(f"the DPU agent at {self.settings.agentSocket} did not answer "
                               f"{command} of {'/'.join(att.key)}: {exc}") from None
        if int(reply.get("rc", 1)) != 0:
            try:
                body = json.loads(reply.get("stdout") or "{}")
            except ValueError:
                body = {}
            msg = f"the DPU refused {command} of {'/'.join(att.key)}: {body.get('msg', reply)}"
            if body.get("code") == 7:
                raise InvalidConfig(msg)
            raise BackendError(msg)
        return reply

    def add_port(self, net: VpcNetwork, att: Attachment) -> None:
        self._request("ADD", att)

    def remove_port(self, att: Attachment) -> None:
        self._request("DEL", att)

    def check_port(self, net: VpcNetwork, att: Attachment) -> list[str]:
        try:
            self._request("CHECK", att)
        except (BackendError, InvalidConfig) as exc:
            return [str(exc)]
        return []
