"""A simulated cluster: underlay fabric, nodes, pods, and CNI calls made as a runtime makes them.

One builder shared by the tests, the demo and the benchmarks. Every node is
a namespace on the fabric with its own node config, state dir and log; every
pod is a namespace; CNI calls execute the installed `vpcni` inside the node's
namespace with the CNI environment and the config on stdin.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from vpcni.cni.install import install_shim

from vpcni.cni.shim import agent_call

from .daemons import Ovs
from .simnic import SimNic
from .netns import Fabric, Netns, Sandbox, run, wait_for

REFERENCE_PLUGINS = Path("/usr/lib/cni")


def installed_executable(name: str) -> str:
    """An executable of this installation (the venv's bin dir first)."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} is not installed (run scripts/setup.sh)")
    return found


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@dataclass
class CniResult:
    rc: int
    stdout: str
    stderr: str

    @property
    def json(self) -> Any:
        return json.loads(self.stdout) if self.stdout.strip() else None

    @property
    def ok(self) -> bool:
        return self.rc == 0


@dataclass
class Pod:
    name: str
    node: "Node"
    ns: Netns
    container_id: str

    @property
    def netns(self) -> str:
        return self.ns.path


@dataclass
class Node:
    name: str
    ns: Netns
    address: str
    dir: Path
    cni_bin: Path
    node_config: dict = field(default_factory=dict)
    nic: Any = None  # a lab.simnic.SimNic when the node has a simulated SR-IOV NIC

    @property
    def config_path(self) -> Path:
        return self.dir / "node.json"

    @property
    def state_dir(self) -> Path:
        return self.dir / "state"

    def write_node_config(self, **overrides) -> None:
        cfg = {"vtepAddress": self.address, "stateDir": str(self.state_dir),
               "logFile": str(self.dir / "vpcni.log"), "logLevel": "DEBUG",
               "mode": "standalone",
               # Tests of other things attach without pod namespaces; the lab and the
               # tenancy tests turn it on with a bindings file.
               "tenancy": {"enforce": False},
               # Routed subnets' router namespaces carry the sandbox's prefix too.
               "routerNamespacePrefix": f"{self.ns.name}-r"}
        cfg.update(overrides)
        self.node_config = cfg
        self.config_path.write_text(json.dumps(cfg, indent=1))

    # ------------------------------------------------------------ agent

    @property
    def agent_socket(self) -> str:
        return str(self.node_config.get("agentSocket", self.dir / "agent.sock"))

    def start_agent(self, env: Optional[dict] = None) -> None:
        """Start `vpcnictl agent` in this node's namespace (killed by pid at cleanup);
        `env`: variables added to its environment (VPCNI_FAULT for crash tests)."""
        with open(self.dir / "agent.log", "ab") as log:
            # In the node's network namespace but the host's mount namespace (not `ip
            # netns exec`'s private one): VPC routers it names under /run/netns must
            # be the host's, as a DaemonSet's Bidirectional /run/netns makes them.
            self.ns.spawn(installed_executable("vpcnictl"), "agent", "--node-config",
                          str(self.config_path), stdout=log, stderr=log,
                          env=dict(os.environ, **env) if env else None, same_mounts=True)

    def http_get(self, path: str) -> tuple[int, str]:
        """GET `path` from the agent's health server, inside the node's namespace."""
        address = self.node_config.get("healthAddress", "127.0.0.1:9471")
        code = ("import sys, urllib.request, urllib.error\n"
                "try:\n"
                "    r = urllib.request.urlopen(sys.argv[1], timeout=5)\n"
                "    print(r.status); print(r.read().decode())\n"
                "except urllib.error.HTTPError as e:\n"
                "    print(e.code); print(e.read().decode())\n")
        out = self.ns.exec("/usr/bin/python3", "-S", "-c", code,
                           f"http://{address}{path}").stdout
        status, _, body = out.partition("\n")
        return int(status), body

    def metrics(self) -> str:
        return self.http_get("/metrics")[1]

    def agent_status(self) -> Optional[dict]:
        try:
            reply = agent_call(self.agent_socket, {"op": "status"}, timeout=2)
            return json.loads(reply["stdout"])
        except (OSError, ValueError, KeyError):
            return None

    def wait_agent_ready(self, timeout: float = 30.0) -> dict:
        def ready():
            status = self.agent_status()
            if status and not status["backend"].get("backend"):
                # No backend can serve this node: waiting will not change that.
                raise TimeoutError(f"agent on {self.name} cannot serve: "
                                   f"{status['backend'].get('why')}")
            return status if status and status.get("ready") else None
        try:
            return wait_for(ready, timeout=timeout, interval=0.05,
                            what=f"agent on {self.name} ready")
        except TimeoutError:
            raise TimeoutError(f"agent on {self.name} not ready after {timeout}s "
                               f"(status {self.agent_status()}); its log:\n"
                               f"{tail(self.dir / 'agent.log')}") from None

    def stop_agent(self) -> None:
        for pid in self.ns.sandbox.pids(self.ns.name, "vpcnictl"):
            self.ns.sandbox.kill_pid(pid)

    def restart_agent(self) -> dict:
        self.stop_agent()
        self.start_agent()
        return self.wait_agent_ready()

    # ------------------------------------------------------------ CNI

    def cni_env(self, command: str, container_id: str = "", netns: str = "",
                ifname: str = "", args: str = "", path: Optional[str] = None) -> dict:
        env = {
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": container_id,
            "CNI_NETNS": netns,
            "CNI_IFNAME": ifname,
            "CNI_PATH": str(self.cni_bin) if path is None else path,
            "VPCNI_NODE_CONFIG": str(self.config_path),
            # Who holds an address in vpcni-ipam (the nodes share one host name).
            "VPCNI_NODE_NAME": self.name,
        }
        if args:
            env["CNI_ARGS"] = args
        return {k: v for k, v in env.items() if v != "" or k == "CNI_COMMAND"}

    def cni(self, command: str, config: Any, container_id: str = "", netns: str = "",
            ifname: str = "eth1", args: str = "", plugin: str = "vpcni",
            env: Optional[dict] = None, path: Optional[str] = None) -> CniResult:
        """Execute a plugin in this node's namespace exactly as a runtime does."""
        stdin = config if isinstance(config, (str, bytes)) else json.dumps(config)
        if isinstance(stdin, bytes):
            stdin = stdin.decode()
        full_env = self.cni_env(command, container_id, netns, ifname, args, path)
        full_env.update(env or {})
        proc = run(["ip", "netns", "exec", self.ns.name, str(self.cni_bin / plugin)],
                   check=False, input=stdin, env=full_env)
        return CniResult(proc.returncode, proc.stdout, proc.stderr)


class Cluster:
    """Fabric + nodes + pods inside one Sandbox."""

    def __init__(self, sandbox: Sandbox, underlay: str = "198.51.100.0/24"):
        self.sandbox = sandbox
        self.fabric = Fabric(sandbox, underlay)
        self.nodes: dict[str, Node] = {}
        self.pods: dict[str, Pod] = {}
        self.cni_bin = sandbox.dir("cni-bin")
        self._link_plugins()

    def _link_plugins(self) -> None:
        """A CNI_PATH with the reference plugins and the vpcni shim, installed as in production."""
        if REFERENCE_PLUGINS.is_dir():
            for p in REFERENCE_PLUGINS.iterdir():
                (self.cni_bin / p.name).symlink_to(p)
        install_shim(self.cni_bin, standalone_python=installed_executable("python"))
        # vpcni-ipam, for plugins that delegate to it (vpcni serves it in-process).
        ipam = self.cni_bin / "vpcni-ipam"
        ipam.unlink(missing_ok=True)
        ipam.symlink_to(installed_executable("vpcni-ipam"))

    def add_node(self, name: str, address: str, agent: bool = False,
                 nic: Optional[dict] = None, **node_config) -> Node:
        """A node on the fabric; with `agent`, served by its own running `vpcnictl agent`;
        with `nic` (SimNic keywords: vfs, mode, vf_driver), a simulated SR-IOV NIC and the
        node config's `sriov` section pointing at it."""
        ns = self.sandbox.netns(name)
        port = self.fabric.connect(ns, address)
        node = Node(name=name, ns=ns, address=address, dir=self.sandbox.dir(name),
                    cni_bin=self.cni_bin)
        if node_config.get("backend") == "ovs":
            node_config = {"ovs": self.start_ovs(node, port)} | node_config
        if nic is not None:
            node.nic = SimNic(node.dir / "sysfs", ns, **nic).build()
            node_config = {"sriov": {"sysfsRoot": str(node.nic.sysfs_root),
                                     "pfDriver": "simulated",
                                     "simulatedStateFile": str(node.nic.state_file)}
                           } | node_config
            if "ovs" in node_config:
                node_config["ovs"] = node_config["ovs"] | {"sysfsRoot": str(node.nic.sysfs_root)}
        if agent:
            node_config = {"mode": "agent", "agentSocket": str(node.dir / "agent.sock"),
                           "healthAddress": "127.0.0.1:9471"} | node_config
        node.write_node_config(**node_config)
        self.nodes[name] = node
        if agent and node_config.get("evpn") is None:
            node.start_agent()
            node.wait_agent_ready()
        return node

    def add_dpu_host(self, name: str, dpu: Node, nic: Optional[dict] = None,
                     start: bool = True) -> Node:
        """The host of DPU node `dpu`: a namespace with no underlay of its own, whose
        simulated NIC's VF netdevs are here and whose representors are in the DPU's
        namespace; its node config pins the `dpu` switch (the DPU agent's socket) and
        its `sriov` section points at the host's sysfs view. The DPU's node config
        gets the DPU's sysfs view (its agent is restarted if it runs)."""
        ns = self.sandbox.netns(name)
        node = Node(name=name, ns=ns, address=dpu.address, dir=self.sandbox.dir(name),
                    cni_bin=self.cni_bin)
        node.nic = SimNic(node.dir / "sysfs", ns, dpu_netns=dpu.ns,
                          dpu_sysfs_root=dpu.dir / "sysfs", **(nic or {})).build()
        dpu.nic = node.nic
        dpu.write_node_config(**(dpu.node_config | {"sriov": {
            "sysfsRoot": str(node.nic.dpu_sysfs_root)}}))
        if self.sandbox.pids(dpu.ns.name, "vpcnictl"):
            dpu.restart_agent()
        node.write_node_config(
            backend="dpu", mode="agent", agentSocket=str(node.dir / "agent.sock"),
            healthAddress="127.0.0.1:9471", dpu={"agentSocket": dpu.agent_socket},
            tenancy=dpu.node_config.get("tenancy", {"enforce": False}),
            sriov={"sysfsRoot": str(node.nic.sysfs_root), "pfDriver": "simulated",
                   "simulatedStateFile": str(node.nic.state_file), "dpuHost": True})
        self.nodes[name] = node
        if start:
            node.start_agent()
            node.wait_agent_ready()
        return node

    def start_ovs(self, node: Node, fabric_port: str) -> dict:
        """Open vSwitch for `node` (userspace datapath, private dirs), the underlay address
        moved onto br-phy; the node config's `ovs` section that points at it."""
        ovs = Ovs(node.ns, self.sandbox.dir(f"{node.name}/ovs")).start()
        ovs.uplink(f"{node.address}/{self.fabric.prefixlen}")
        # Kernel VTEPs send VXLAN with a UDP checksum left to the "NIC" (CHECKSUM_PARTIAL
        # survives veth and bridge); the userspace datapath reads the frame raw from its
        # packet socket and drops it as corrupt. A real NIC fills the checksum in; here the
        # fabric port towards the OVS node does, with its tx offload off.
        self.fabric.ns.exec("ethtool", "-K", fabric_port, "tx", "off")
        return {"runDir": str(ovs.dir), "datapathType": "netdev"}

    def add_pod(self, node: Node, name: str) -> Pod:
        ns = self.sandbox.netns(f"pod-{name}")
        pod = Pod(name=name, node=node, ns=ns, container_id=f"{self.sandbox.prefix}-{name}")
        self.pods[name] = pod
        return pod

    def attach(self, pod: Pod, config: dict, ifname: str = "eth1", args: str = "") -> dict:
        """ADD `pod` to the network of `config`; raise with the CNI error if it fails."""
        res = pod.node.cni("ADD", config, pod.container_id, pod.netns, ifname, args)
        if not res.ok:
            raise RuntimeError(f"ADD {pod.name} failed: {res.stdout or res.stderr}")
        return res.json

    def detach(self, pod: Pod, config: dict, ifname: str = "eth1") -> None:
        res = pod.node.cni("DEL", config, pod.container_id, pod.netns, ifname)
        if not res.ok:
            raise RuntimeError(f"DEL {pod.name} failed: {res.stdout or res.stderr}")


def seed_network(name: str, vni: int, addr: Optional[str] = None, version: str = "1.1.0",
                 **extra) -> dict:
    """The seed's network config, with `type` vpcni."""
    cfg: dict[str, Any] = {"cniVersion": version, "name": name, "type": "vpcni", "vni": vni}
    if addr:
        cfg["addr"] = addr
    cfg.update(extra)
    return cfg


def environment_ok() -> Optional[str]:
    """Why the functional tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    if not shutil.which("ip"):
        return "needs iproute2"
    return None
