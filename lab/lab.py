"""`vpcnictl lab up|check|down`: a simulated cluster with the real control plane.

From a topology file: an underlay fabric, route reflectors (FRR bgpd or
gobgpd), nodes each running gobgpd and the vpcni agent (or a plain FRR VTEP
as the seed deploys it), VPCs and pods. Every pod is attached through the
installed `vpcni` shim exactly as a runtime calls it. `check` measures the
connectivity matrix with real traffic. Everything lives in namespaces and
under one directory; the sandbox state file lets `down` (another process)
remove it all, also after a failed `up`.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from vpcni.evpn import render

from .cluster import Cluster, Node
from .daemons import Frr, Gobgpd, Ovs
from .netns import Netns, Sandbox, add_world, wait_for, wire
from .topology import Topology
from .traffic import start_ident_server, tcp_ident

LAB_ROOT = Path("/run/vpcni-lab")


class LabError(RuntimeError):
    pass


@dataclass
class PodInfo:
    name: str
    node: str
    vpc: str
    vni: int
    address: str  # CIDR
    netns: str
    container_id: str
    mac: str = ""
    ipam: bool = False  # the address came from vpcni-ipam (the topology gave none)
    interface: str = "veth"  # or "vf": an SR-IOV VF of the node's simulated NIC
    origin: str = ""  # where the pod's interface came from, as `lab up` prints it

    @property
    def ip(self) -> str:
        return self.address.split("/")[0]


class Lab:
    """One lab instance, by name; its files live under /run/vpcni-lab/<name>."""

    def __init__(self, topo: Topology, root: Path = LAB_ROOT):
        self.topo = topo
        self.dir = Path(root) / topo.name
        self.box: Optional[Sandbox] = None
        self.prefix = ""
        self.stopped_reflectors: set[str] = set()
        self.cluster: Optional[Cluster] = None
        self.pods: dict[str, PodInfo] = {}
        self.sessions_after = 0.0
        self.converged_after = 0.0

    # ------------------------------------------------------------ paths

    @property
    def state_file(self) -> Path:
        return self.dir.parent / f"{self.topo.name}.sandbox.json"

    @property
    def lab_file(self) -> Path:
        return self.dir / "lab.json"

    @property
    def bindings_file(self) -> Path:
        """The tenancy bindings every node reads (what the VPC controller renders)."""
        return self.dir / "tenancy.json"

    def write_bindings(self, extra: Optional[dict[int, tuple]] = None) -> None:
        """The topology's VPCs, and `extra` VNIs (VNI -> (VPC, namespaces[, L3VNI of a
        routed subnet])) for tests that attach outside the topology."""
        doc = {"version": 1, "vnis": {str(v.vni): {"vpc": v.router or v.name,
                                                   "network": f"vpc-{v.name}",
                                                   "namespaces": v.namespaces}
                                      | ({"l3vni": v.l3vni} if v.router else {})
                                      for v in self.topo.vpcs}}
        for vni, (vpc, namespaces, *l3vni) in (extra or {}).items():
            doc["vnis"][str(vni)] = {"vpc": vpc, "namespaces": list(namespaces)} | (
                {"l3vni": l3vni[0]} if l3vni else {})
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.bindings_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=1))
        os.replace(tmp, self.bindings_file)

    def node_dir(self, name: str) -> Path:
        return self.box.dir(name)

    # ------------------------------------------------------------ up

    def up(self, progress: Optional[Callable[[float, str], None]] = None) -> None:
        """Bring the lab up; `progress(seconds since the start, what)` is called once
        each step is done (reflectors, nodes, agents, sessions, pods, convergence)."""
        t0 = time.monotonic()

        def step(what: str) -> None:
            if progress is not None:
                progress(time.monotonic() - t0, what)

        if self.state_file.exists():
            raise LabError(f"lab {self.topo.name!r} is already up (or was not taken down): "
                           f"run `vpcnictl lab down {self.topo.name}` first")
        self.dir.parent.mkdir(parents=True, exist_ok=True)
        self.prefix = f"vl{os.urandom(2).hex()}"
        self.box = Sandbox(prefix=self.prefix, root_dir=self.dir, state_file=self.state_file)
        try:
            self.cluster = Cluster(self.box, str(self.topo.underlay))
            self.write_bindings()
            for rr in self.topo.reflectors:
                self._start_reflector(rr)
            step(f"reflectors started: {len(self.topo.reflectors)} ("
                 + ", ".join(f"{rr.name} {rr.daemon}" for rr in self.topo.reflectors) + ")")
            for node in self.topo.nodes:
                self._start_node(node)
            step(f"nodes started: {len(self.topo.nodes)} ("
                 + ", ".join(f"{n.name} {n.kind}" for n in self.topo.nodes) + ")")
            agents = [n.name for n in self.topo.nodes if n.kind == "vpcni"]
            for name in agents:
                self.node(name).wait_agent_ready()
            step(f"agents ready: {len(agents)}")
            # As in a cluster, the nodes' BGP sessions are up before pods come: the
            # convergence measured below is the routes' trip, not session setup
            # (gobgpd dials its first connection 5-10 s after it starts).
            self.sessions_after = self.wait_sessions()
            running = len(self.topo.reflectors) - len(self.stopped_reflectors)
            step(f"BGP sessions up: {len(agents) * running} ({len(agents)} node(s) x "
                 f"{running} reflector(s))")
            for pod in self.topo.pods:
                self.add_pod(pod.name, pod.node, pod.vpc,
                             str(pod.address) if pod.address else None, pod.interface)
            self._save()
            step(f"pods attached: {len(self.pods)}")
            self.converged_after = self.wait_converged()
            step("EVPN converged: every node knows every remote pod of its VNIs")
        except BaseException:
            self.down()
            raise

    def _save(self) -> None:
        data = {"topology": self.topo.model_dump(mode="json"), "prefix": self.box.prefix,
                "pods": {n: vars(p) for n, p in self.pods.items()}}
        tmp = self.lab_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, self.lab_file)

    @classmethod
    def load(cls, name: str, root: Path = LAB_ROOT) -> "Lab":
        """The lab `name` as `up` left it (for check, down and tests in another process)."""
        path = Path(root) / name / "lab.json"
        try:
            data = json.loads(path.read_text())
        except OSError:
            raise LabError(f"lab {name!r} is not up (no {path})") from None
        lab = cls(Topology.model_validate(data["topology"]), root)
        lab.box = Sandbox.restore(lab.state_file)
        lab.prefix = lab.box.prefix
        lab.pods = {n: PodInfo(**p) for n, p in data["pods"].items()}
        return lab

    # ------------------------------------------------------------ reflectors

    def _start_reflector(self, rr) -> None:
        ns = self.box.netns(rr.name)
        self.cluster.fabric.connect(ns, str(rr.address))
        d = self.node_dir(rr.name)
        prefix = str(self.topo.underlay)
        if rr.daemon == "frr":
            Frr(ns, d, render.frr_reflector_bgpd(rr.address, self.topo.asn, prefix),
                render.frr_zebra(rr.name)).start()
        else:
            Gobgpd(ns, d, render.gobgpd_reflector_toml(rr.address, self.topo.asn,
                                                       prefix)).start()

    # ------------------------------------------------------------ nodes

    def _start_node(self, spec) -> None:
        reflectors = [str(rr.address) for rr in self.topo.reflectors]
        if spec.kind == "frr":
            ns = self.box.netns(spec.name)
            self.cluster.fabric.connect(ns, str(spec.address))
            d = self.node_dir(spec.name)
            Frr(ns, d, render.frr_vtep_bgpd(spec.address, self.topo.asn, reflectors),
                render.frr_zebra(spec.name)).start()
            return
        node_cfg = {"reconcileInterval": 10,
                    "evpn": {"gobgpdSocket": str(self.node_dir(spec.name) / "gobgpd.sock"),
                             "asn": self.topo.asn},
                    "tenancy": {"bindingsFile": str(self.bindings_file)}}
        if spec.backend:
            node_cfg["backend"] = spec.backend
        nic = spec.nic.model_dump() if spec.nic else None
        dpu = nic is not None and nic.pop("dpu")
        node = self.cluster.add_node(spec.name, str(spec.address), agent=True,
                                     nic=None if dpu else nic, **node_cfg)
        Gobgpd(node.ns, node.dir, render.gobgpd_node_toml(spec.address, self.topo.asn,
                                                          reflectors)).start()
        if dpu:
            self.cluster.add_dpu_host(self.host_of(spec.name), node, nic, start=False)
        node.start_agent()
        if dpu:
            node.wait_agent_ready()
            self.node(self.host_of(spec.name)).start_agent()

    @staticmethod
    def host_of(name: str) -> str:
        """The host namespace's node name of DPU node `name`."""
        return f"{name}-host"

    def cni_node(self, name: str) -> Node:
        """Where the CNI calls for the pods of node `name` go: the node, or its DPU's host."""
        spec = self.topo.node(name)
        if spec.nic is not None and spec.nic.dpu:
            return self.node(self.host_of(name))
        return self.node(name)

    def node(self, name: str) -> Node:
        """The vpcni node `name` (works after load() too)."""
        if self.cluster is not None and name in self.cluster.nodes:
            return self.cluster.nodes[name]
        spec = self.topo.node(name.removesuffix("-host"))
        d = self.box.root_dir / name
        return Node(name=name, ns=self.box.namespaces[name], address=str(spec.address), dir=d,
                    cni_bin=self.box.root_dir / "cni-bin",
                    node_config=json.loads((d / "node.json").read_text()))

    def gobgpd(self, name: str) -> Gobgpd:
        """The gobgpd of node or reflector `name`."""
        return Gobgpd(self.box.namespaces[name], self.box.root_dir / name)

    def restart_agent(self, name: str) -> dict:
        return self.node(self._vpcni_node(name)).restart_agent()

    def restart_gobgpd(self, name: str) -> None:
        if name not in {r.name for r in self.topo.reflectors}:
            self._vpcni_node(name)
        elif self._reflector(name).daemon != "gobgpd":
            raise LabError(f"reflector {name!r} runs FRR, not gobgpd")
        self.gobgpd(name).restart()

    def _reflector(self, name: str):
        for rr in self.topo.reflectors:
            if rr.name == name:
                return rr
        raise LabError(f"no route reflector {name!r} in lab {self.topo.name!r} (reflectors: "
                       f"{', '.join(r.name for r in self.topo.reflectors)})")

    def _vpcni_node(self, name: str) -> str:
        names = [n.name for n in self.topo.nodes]
        if name.removesuffix("-host") not in names:
            raise LabError(f"no node {name!r} in lab {self.topo.name!r} (nodes: "
                           f"{', '.join(names)})")
        return name

    def cut_underlay(self, name: str) -> None:
        """Take node `name`'s port on the fabric down: its underlay loses carrier."""
        self._underlay_port(name, "down")

    def restore_underlay(self, name: str) -> None:
        self._underlay_port(name, "up")

    def _underlay_port(self, name: str, state: str) -> None:
        if name not in {r.name for r in self.topo.reflectors}:
            self._vpcni_node(name)
        ns = self.box.namespaces[name]
        eth0 = json.loads(ns.ip("-j", "-d", "link", "show", "eth0").stdout)[0]
        peer = eth0.get("link_index")
        fabric = self.box.namespaces["fab"]
        ports = json.loads(fabric.ip("-j", "link", "show").stdout)
        port = next((p["ifname"] for p in ports if p["ifindex"] == peer), None)
        if port is None:
            raise LabError(f"{name}'s fabric port not found")
        fabric.ip("link", "set", port, state)

    def stop_reflector(self, name: str) -> None:
        ns, d = self.box.namespaces[name], self.box.root_dir / name
        rr = self._reflector(name)
        (Frr(ns, d) if rr.daemon == "frr" else Gobgpd(ns, d)).stop()
        self.stopped_reflectors.add(name)

    def start_reflector(self, name: str) -> None:
        ns, d = self.box.namespaces[name], self.box.root_dir / name
        rr = self._reflector(name)
        (Frr(ns, d) if rr.daemon == "frr" else Gobgpd(ns, d)).start()
        self.stopped_reflectors.discard(name)

    def add_underlay_host(self, short: str, address: str) -> Netns:
        """A host on the underlay that is neither node nor reflector (the world outside
        every VPC, an intruder): a namespace of the lab's, wired to the fabric."""
        ns = self.box.netns(short)
        wire(self.box, self.box.namespaces["fab"], f"p{short}"[:15], ns,
             f"{address}/{self.topo.underlay.prefixlen}")
        return ns

    def add_world(self) -> Netns:
        """The world outside every VPC (203.0.113.10), behind a router on the underlay
        through which every vpcni node reaches it (lab.netns.add_world)."""
        nodes = [self.box.namespaces[n.name] for n in self.topo.nodes if n.kind == "vpcni"]
        return add_world(self.box, self.box.namespaces["fab"], nodes,
                         self.topo.underlay.prefixlen)

    # ------------------------------------------------------------ pods

    def network_config(self, vpc: str, version: str = "1.1.0") -> dict:
        v = self.topo.vpc(vpc)
        conf = {"cniVersion": version, "name": f"vpc-{v.name}", "type": "vpcni", "vni": v.vni}
        if v.router is not None:
            conf["routing"] = {"vpc": v.router, "l3vni": v.l3vni, "subnet": str(v.cidr),
                               "egress": v.egress}
            if v.routes:
                conf["routing"]["routes"] = v.routes
        return conf

    def ipam_config(self, vpc: str) -> dict:
        """The VPC's vpcni-ipam section: its own keys over the lab's defaults."""
        v = self.topo.vpc(vpc)
        return {"type": "vpcni-ipam", "subnets": [str(v.cidr)],
                "store": {"type": "sqlite", "path": str(self.dir / "ipam.sqlite")}} | v.ipam

    def pod_config(self, info: PodInfo) -> dict:
        conf = self.network_config(info.vpc)
        if info.interface == "vf":
            conf["interface"] = "vf"
        return conf | ({"ipam": self.ipam_config(info.vpc)} if info.ipam
                       else {"addr": info.address})

    def add_pod(self, name: str, node: str, vpc: str, address: Optional[str] = None,
                interface: str = "veth", namespace: str = "lab") -> PodInfo:
        """Attach pod `name` (of Kubernetes namespace `namespace`: tenancy); without
        `address` the VPC's vpcni-ipam hands one out."""
        spec = self.topo.node(node)
        if address is None and spec.kind == "frr":
            raise LabError(f"pod {name}: an FRR node's pod needs an address")
        ns = self.box.netns(f"pod-{name}")
        info = PodInfo(name=name, node=node, vpc=vpc, vni=self.topo.vpc(vpc).vni,
                       address=address or "", netns=ns.name,
                       container_id=f"{self.box.prefix}-{name}", ipam=address is None,
                       interface=interface)
        if spec.kind == "frr":
            self._attach_frr_pod(ns, info)
            info.origin = "veth (plain FRR VTEP, built with ip)"
        else:
            res = self.cni_node(node).cni("ADD", self.pod_config(info), info.container_id,
                                          ns.path, "eth1",
                                          args=f"K8S_POD_NAMESPACE={namespace};"
                                               f"K8S_POD_NAME={name}")
            if not res.ok:
                ns.delete()
                raise LabError(f"ADD of pod {name} on {node} failed: {res.stdout or res.stderr}")
            result = res.json
            pod_if = result["interfaces"][result["ips"][0]["interface"]]
            info.mac = pod_if["mac"]
            port = next((i["name"] for i in result["interfaces"] if not i.get("sandbox")), "")
            info.origin = (f"VF {pod_if['pciID']} (representor as {port})"
                           if pod_if.get("pciID") else f"veth (node end {port})")
            info.address = result["ips"][0]["address"]
        start_ident_server(ns, name)
        self.pods[name] = info
        self._save()
        return info

    def remove_pod(self, name: str) -> None:
        info = self.pods.pop(name)
        if self.topo.node(info.node).kind == "vpcni":
            res = self.cni_node(info.node).cni("DEL", self.pod_config(info),
                                               info.container_id,
                                               str(Path("/var/run/netns") / info.netns), "eth1")
            if not res.ok:
                raise LabError(f"DEL of pod {name} failed: {res.stdout or res.stderr}")
        short = info.netns.removeprefix(self.box.prefix + "-")
        self.box.namespaces[short].delete()
        self._save()

    def _attach_frr_pod(self, ns: Netns, info: PodInfo) -> None:
        """The seed's plain-FRR VTEP: vxlan<VNI> + br<VNI> built with ip, a veth per pod."""
        host = self.box.namespaces[info.node]
        spec = self.topo.node(info.node)
        br, vx = f"br{info.vni}", f"vxlan{info.vni}"
        if host.ip("link", "show", br, check=False).returncode != 0:
            host.ip("link", "add", br, "type", "bridge")
            host.ip("link", "add", vx, "type", "vxlan", "id", str(info.vni), "dstport", "4789",
                    "local", str(spec.address), "nolearning")
            host.ip("link", "set", vx, "master", br, "addrgenmode", "none")
            host.ip("link", "set", vx, "type", "bridge_slave", "neigh_suppress", "off",
                    "learning", "off")
            host.ip("link", "set", vx, "up")
            host.ip("link", "set", br, "up")
        veth = f"h{len(self.pods)}{info.name}"[:15]
        self.box.veth(host, veth, ns, "eth1")
        host.ip("link", "set", veth, "master", br, "up")
        ns.ip("link", "set", "eth1", "mtu", "1450", "up")
        ns.ip("addr", "add", info.address, "dev", "eth1")
        info.mac = json.loads(ns.ip("-j", "link", "show", "eth1").stdout)[0]["address"]

    # ------------------------------------------------------------ convergence

    def sessions_down(self) -> list[str]:
        """BGP sessions between vpcni nodes and running reflectors that are not established."""
        down = []
        for node in self.topo.nodes:
            if node.kind != "vpcni":
                continue
            status = self.node(node.name).agent_status() or {}
            peers = status.get("evpn", {}).get("peers", {})
            for rr in self.topo.reflectors:
                if rr.name in self.stopped_reflectors:
                    continue
                state = peers.get(str(rr.address), "unknown")
                if state != "established":
                    down.append(f"{node.name} - {rr.name}: {state}")
        return down

    def missing_routes(self) -> list[str]:
        """Remote endpoints not yet in a vpcni node's FDB (what EVPN still has to deliver)."""
        missing = []
        for node in self.topo.nodes:
            if node.kind != "vpcni":
                continue
            local_vnis = {p.vni for p in self.pods.values() if p.node == node.name}
            for vni in sorted(local_vnis):
                known = self.remote_entries(node.name, vni)
                for pod in self.pods.values():
                    if pod.vni != vni or pod.node == node.name:
                        continue
                    vtep = str(self.topo.node(pod.node).address)
                    if (pod.mac, vtep) not in known:
                        missing.append(f"{node.name}: {pod.name} ({pod.mac} via {vtep})")
        return missing

    def ovs(self, name: str) -> Ovs:
        """The Open vSwitch of an ovs node."""
        return Ovs(self.box.namespaces[name], self.box.root_dir / name / "ovs")

    def remote_entries(self, node: str, vni: int) -> set[tuple[str, str]]:
        """(MAC, VTEP) pairs node `node` forwards to in `vni`: its FDB, or its OpenFlow L2 table."""
        ns = self.box.namespaces[node]
        if self.topo.node(node).backend == "ovs":
            out = self.ovs(node).ofctl("dump-flows", f"table=30,tun_id={vni}",
                                       options=("--no-stats",))
            found = re.findall(r"dl_dst=([0-9a-f:]{17}) actions=set_field:([0-9.a-f:]+)->tun_",
                               out)
            return set(found)
        fdb = ns.exec("bridge", "fdb", "show", "dev", f"vpvx{vni}", check=False).stdout
        return {(f[0], f[2]) for f in (line.split() for line in fdb.splitlines())
                if len(f) > 2 and f[1] == "dst"}

    def wait_sessions(self, timeout: float = 60.0) -> float:
        """Wait until every vpcni node's sessions to the running reflectors are
        established; seconds taken."""
        t0 = time.monotonic()
        try:
            wait_for(lambda: not self.sessions_down(), timeout=timeout, interval=0.05,
                     what="BGP sessions")
        except TimeoutError:
            raise LabError(f"BGP sessions not established after {timeout}s: "
                           f"{'; '.join(self.sessions_down())}") from None
        return time.monotonic() - t0

    def wait_converged(self, timeout: float = 30.0) -> float:
        """Wait until every vpcni node has its sessions to every running reflector up
        and knows every remote endpoint of its VNIs; seconds taken."""
        t0 = time.monotonic()
        try:
            wait_for(lambda: not self.missing_routes() and not self.sessions_down(),
                     timeout=timeout, interval=0.05, what="EVPN convergence")
        except TimeoutError:
            raise LabError(f"not converged after {timeout}s; missing: "
                           f"{'; '.join(self.missing_routes() + self.sessions_down())}") from None
        return time.monotonic() - t0

    # ------------------------------------------------------------ check

    def matrix(self, workers: int = 8) -> list[tuple[str, str, bool, bool, Optional[str]]]:
        """(src, dst, expected, reached, who answered) for every ordered pair of pods.

        Reached means a TCP connection from src to dst's address was answered
        by dst itself: with two VPCs on one CIDR, the same address may answer
        from the caller's own VPC, which is not dst.
        """
        pairs = [(a, b) for a in self.pods.values() for b in self.pods.values() if a is not b]
        routers = {v.vni: v.router for v in self.topo.vpcs}

        def probe(pair):
            src, dst = pair
            ns = Netns(src.netns, self.box, create=False)
            who = tcp_ident(ns, dst.ip, timeout=1.5)
            # One VNI, or two routed subnets of one VPC.
            expected = src.vni == dst.vni or (routers.get(src.vni) is not None
                                              and routers.get(src.vni) == routers.get(dst.vni))
            return (src.name, dst.name, expected, who == dst.name, who)
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            return list(pool.map(probe, pairs))

    def check(self, out=print) -> bool:
        rows = self.matrix()
        names = sorted(self.pods)
        cell = {(s, d): (e, r) for s, d, e, r, _ in rows}
        width = max(len(n) for n in names) + 1
        out("connectivity matrix (row reaches column): ok = reached as expected, "
            "-- = isolated as expected, MISSING / LEAK = differs")
        out(" " * width + " ".join(f"{n:>{width}}" for n in names))
        bad = 0
        for s in names:
            line = f"{s:<{width}}"
            for d in names:
                if s == d:
                    mark = "."
                else:
                    expected, reached = cell[(s, d)]
                    mark = {(True, True): "ok", (False, False): "--",
                            (True, False): "MISSING", (False, True): "LEAK"}[(expected, reached)]
                    bad += expected != reached
                line += f" {mark:>{width}}"
            out(line)
        same = sum(1 for _, _, e, _, _ in rows if e)
        out(f"{len(rows)} pairs: {same} inside a VPC, {len(rows) - same} across VPCs; "
            f"{bad} differ from expected")
        return bad == 0

    # ------------------------------------------------------------ down

    def down(self) -> None:
        if self.box is None:
            if not self.state_file.exists():
                return
            self.box = Sandbox.restore(self.state_file)
        self.box.cleanup()
        shutil.rmtree(self.dir, ignore_errors=True)
        _remove_root_if_empty(self.dir.parent)
        self.box = None


def _remove_root_if_empty(root: Path) -> None:
    with contextlib.suppress(OSError):
        Path(root).rmdir()


def down_by_name(name: str, root: Path = LAB_ROOT) -> bool:
    """Remove lab `name` whatever state it is in; False when there was nothing."""
    state = Path(root) / f"{name}.sandbox.json"
    found = state.exists()
    if found:
        Sandbox.restore(state).cleanup()
    shutil.rmtree(Path(root) / name, ignore_errors=True)
    _remove_root_if_empty(root)
    return found
