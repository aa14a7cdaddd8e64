"""The image (issue 10): scripts/build-image.sh builds it, and the agent run from it with
podman, in a lab node's namespace, serves the seed's test.

Nothing here is skipped: when podman cannot run on this machine the build (or the
first `podman run`) fails, and so does the test, with podman's reason. Containers join
the lab's namespaces (`--network ns:...`) or none (`--network none`): podman makes no
network of its own, and nothing is added to the root namespace.
"""

from __future__ import annotations

import contextlib
import resource
import subprocess
import time
import tomllib
from pathlib import Path

import pytest

from vpcni.lab.cluster import REFERENCE_PLUGINS, Cluster, Node
from vpcni.lab.netns import NETNS_DIR

from tests.functional.test_seed import test_seed_two_nodes_ping_and_tcp_both_ways as seed_test

pytestmark = [pytest.mark.functional, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = ROOT / "scripts" / "build-image.sh"
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
IMAGE = f"localhost/vpcni:{VERSION}"
CONTROLLER_IMAGE = f"localhost/vpcni-controller:{VERSION}"
# A cold build (Debian base, wheels from PyPI) takes a minute or two here; the script
# reuses its caches and skips a build whose inputs are unchanged.
BUILD_TIMEOUT = 1200
# What the agent's container keeps of root's capabilities (docs/image.md).
AGENT_CAPS = ("NET_ADMIN", "SYS_ADMIN", "NET_RAW")
# The user gobgpd can run as (deploy/image/Containerfile).
NONROOT = "65532:65532"


def podman(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    """podman with the runtime and rlimits scripts/build-image.sh builds with: runc, and
    rlimits no higher than ours (podman's defaults need CAP_SYS_RESOURCE to raise a hard
    limit, which this project's VMs do not grant even to root)."""
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    nproc = resource.getrlimit(resource.RLIMIT_NPROC)[1]
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    nofile = 1048576 if nofile == resource.RLIM_INFINITY else nofile
    nproc = pid_max if nproc == resource.RLIM_INFINITY else min(nproc, pid_max)
    cmd = ["podman", "--runtime", "runc", *args]
    if args and args[0] == "run":
        cmd[3:4] = ["run", "--ulimit", f"nofile={nofile}:{nofile}",
                    "--ulimit", f"nproc={nproc}:{nproc}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} -> {proc.returncode}:\n{proc.stdout}{proc.stderr}")
    return proc


def in_image(*cmd: str, user: str = "0:0", timeout: float = 120) -> subprocess.CompletedProcess:
    """`cmd` in a throwaway container of the image: no network, no capability, read-only."""
    return podman("run", "--rm", "--network", "none", "--cap-drop", "all", "--read-only",
                  "--user", user, IMAGE, *cmd, timeout=timeout)


@pytest.fixture(scope="module")
def image() -> str:
    """The image, built (or found up to date) by scripts/build-image.sh."""
    started = time.monotonic()
    proc = subprocess.run([str(BUILD_SCRIPT)], capture_output=True, text=True,
                          timeout=BUILD_TIMEOUT)
    out = (proc.stdout + proc.stderr).strip().splitlines()
    if proc.returncode != 0:
        pytest.fail(f"{BUILD_SCRIPT} -> {proc.returncode} after "
                    f"{time.monotonic() - started:.0f}s:\n" + "\n".join(out[-60:]))
    return IMAGE


class AgentContainer:
    """`vpcnictl agent` of the image, in `node`'s network namespace: the node's directory
    (node config, state, socket, log) at the same path, /run/netns shared so that pod
    namespaces made later show up, root with AGENT_CAPS only, read-only root file system."""

    def __init__(self, node: Node, host_cni_state: bool = True):
        self.node = node
        self.cidfile = node.dir / "agent.cid"
        self.id: str | None = None
        # As the DaemonSet mounts the host's /var/lib/cni (delegated IPAM state) and
        # CNI bin dir: here the node's own "host" dir and the lab's bin dir.
        self.host_cni_state = host_cni_state
        self.var_lib_cni = node.dir / "host-var-lib-cni"

    def start(self) -> None:
        cni_bin = self.node.cni_bin
        mounts = ["-v", f"{self.node.dir}:{self.node.dir}",
                  "-v", f"{NETNS_DIR}:{NETNS_DIR}:rslave",
                  "-v", f"{cni_bin}:{cni_bin}:ro"]
        # The lab's bin dir links the reference plugins (static binaries) from here.
        if REFERENCE_PLUGINS.is_dir():
            mounts += ["-v", f"{REFERENCE_PLUGINS}:{REFERENCE_PLUGINS}:ro"]
        if self.host_cni_state:
            self.var_lib_cni.mkdir(exist_ok=True)
            mounts += ["-v", f"{self.var_lib_cni}:/var/lib/cni"]
        else:  # the old manifest's mistake: the container's own, lost with it
            mounts += ["--tmpfs", "/var/lib/cni"]
        if Path("/lib/modules").is_dir():  # the kernel backend's probe reads module lists
            mounts += ["-v", "/lib/modules:/lib/modules:ro"]
        caps = [a for cap in AGENT_CAPS for a in ("--cap-add", cap)]
        self.cidfile.unlink(missing_ok=True)  # a restart: podman refuses an existing one
        proc = podman("run", "-d", "--rm", "--cidfile", str(self.cidfile),
                      "--name", f"{self.node.ns.name}-agent",
                      "--network", f"ns:{self.node.ns.path}",
                      "--cap-drop", "all", *caps, "--read-only", *mounts,
                      # Its output where Node.wait_agent_ready() shows it on a timeout.
                      "--log-driver", "k8s-file",
                      "--log-opt", f"path={self.node.dir / 'agent.log'}",
                      IMAGE, "vpcnictl", "agent", "--node-config", str(self.node.config_path),
                      check=False)
        # The container may exist even when it did not start: its id is in the cidfile.
        with contextlib.suppress(OSError):
            self.id = self.cidfile.read_text().strip() or None
        if proc.returncode != 0:
            pytest.fail(f"podman run of the agent for {self.node.name} -> {proc.returncode}:\n"
                        f"{proc.stdout}{proc.stderr}")
        self.id = self.id or proc.stdout.strip()

    def capabilities(self) -> set[str]:
        proc = podman("container", "inspect", "--format", "{{.EffectiveCaps}}", self.id)
        return {cap.removeprefix("CAP_") for cap in proc.stdout.strip(" []\n").split()}

    def running(self) -> bool:
        proc = podman("container", "inspect", "--format", "{{.State.Running}}", self.id,
                      check=False)
        return proc.stdout.strip() == "true"

    def remove(self) -> None:
        """Stop and remove the container, by its id (nothing when it was never made)."""
        if self.id:
            podman("rm", "--force", "--time", "5", self.id, check=False, timeout=60)
            self.id = None


def agent_node(cluster: Cluster, name: str, address: str,
               host_cni_state: bool = True) -> tuple[Node, AgentContainer]:
    """A node whose agent runs from the image (`Cluster.add_node(agent=True)` would start
    the host's `vpcnictl agent`: the same node config, without starting one)."""
    node_dir = cluster.sandbox.root_dir / name  # what add_node gives the node
    node = cluster.add_node(name, address, mode="agent", agentSocket=str(node_dir / "agent.sock"),
                            healthAddress="127.0.0.1:9471")
    agent = AgentContainer(node, host_cni_state)
    # Removed before the sandbox deletes the namespaces, also when the test fails.
    cluster.sandbox.on_cleanup(agent.remove)
    agent.start()
    return node, agent


def install_shim_from_image(cluster: Cluster) -> bytes:
    """The install step as the DaemonSet runs it (`vpcnictl install-cni`, as root
    without any capability): the image's prebuilt shim, no Go toolchain in the image,
    replacing the one the lab built on the host."""
    podman("run", "--rm", "--network", "none", "--cap-drop", "all", "--read-only",
           "-v", f"{cluster.cni_bin}:/host/opt/cni/bin", IMAGE,
           "vpcnictl", "install-cni", "--dest", "/host/opt/cni/bin")
    return (cluster.cni_bin / "vpcni").read_bytes()


@pytest.mark.timeout(BUILD_TIMEOUT + 300)
def test_agent_from_the_image_serves_the_seed(image, cluster):
    shim = install_shim_from_image(cluster)
    assert b"/opt/vpcni/venv/bin/python" in shim  # the image's, for its own interpreter
    n1, agent1 = agent_node(cluster, "n1", "198.51.100.1")
    n2, agent2 = agent_node(cluster, "n2", "198.51.100.2")
    for node, agent in ((n1, agent1), (n2, agent2)):
        status = node.wait_agent_ready(timeout=60)
        assert status["backend"]["backend"] == "kernel", status
        assert agent.running()
        assert agent.capabilities() == set(AGENT_CAPS)
        # Its health server listens in the node's namespace, which the container joined.
        code, body = node.http_get("/readyz")
        assert code == 200, body
    # No agent of the host's: every CNI call goes to the containers.
    assert not cluster.sandbox.pids(n1.ns.name, "vpcnictl")
    assert not cluster.sandbox.pids(n2.ns.name, "vpcnictl")

    seed_test((cluster, n1, n2))

    # The agents did it: their attachment records are in the node dirs they were given.
    for node in (n1, n2):
        assert list((node.state_dir / "attachments").rglob("*.json")), node.name
    assert agent1.running() and agent2.running()


@pytest.mark.timeout(BUILD_TIMEOUT + 300)
def test_image_contents(image):
    # vpcni, its stubs, no grpcio-tools; the CLI entry points.
    in_image("python", "-c", "import importlib.util as u, sys\n"
             "import vpcni.evpn.gobgpapi.gobgp_pb2_grpc, vpcni.agent.server\n"
             # The ovs backend's client; the controller's 130 MB are its own image's.
             "import ovsdbapp\n"
             "sys.exit('kopf is in the node image' if u.find_spec('kopf') else 0)\n"
             "sys.exit('grpcio-tools is installed' if u.find_spec('grpc_tools') else 0)")
    assert "agent" in in_image("vpcnictl", "--help").stdout
    assert in_image("sh", "-c", "test -x /opt/vpcni/venv/bin/vpcni-ipam && echo ok").stdout == "ok\n"
    for tool in (["ovs-ofctl", "--version"], ["nft", "--version"], ["ip", "-V"]):
        in_image(*tool)
    # The shim is where build_go_shim() looks for it (VPCNI_BUILD_CACHE, keyed by the
    # image's interpreter): found there, no Go toolchain is asked for.
    out = in_image("sh", "-ec", "readlink -f /opt/vpcni/cni/vpcni\n"
                   "python -c 'import sys; from vpcni.cni import install\n"
                   "install.go_toolchain = lambda: \"/nonexistent/go\"\n"
                   "print(install.build_go_shim(sys.executable))'").stdout.split()
    assert out[0] == out[1] and out[0].startswith("/opt/vpcni/cache/shim/"), out
    # The default user is root (the agent and the install step need it).
    config = podman("image", "inspect", "--format", "{{.Config.User}}|{{.Size}}", IMAGE).stdout
    user, size = config.strip().split("|")
    assert user in ("", "root", "0")
    assert int(size) < 300_000_000, f"the image grew to {int(size) / 1e6:.0f} MB"


@pytest.mark.timeout(BUILD_TIMEOUT + 300)
def test_gobgpd_runs_without_root_and_without_capabilities(image):
    """gobgpd as the image's user 65532, no capability, its config rendered by vpcnictl
    (no listening port), its API on a unix socket that `gobgp` (the probes' client) asks."""
    script = (
        "id -u\n"
        "vpcnictl render gobgpd-node --router-id 198.51.100.11 --reflector 198.51.100.201 "
        "> /tmp/gobgpd.toml\n"
        "gobgpd -f /tmp/gobgpd.toml -p --pprof-disable --api-hosts unix:///tmp/gobgpd.sock "
        "> /tmp/gobgpd.log 2>&1 &\n"
        "for i in $(seq 100); do\n"
        "  if gobgp --target unix:///tmp/gobgpd.sock global 2>/dev/null; then exit 0; fi\n"
        "  sleep 0.1\n"
        "done\n"
        "cat /tmp/gobgpd.log; exit 1\n")
    out = in_image("sh", "-c", script, user=NONROOT, timeout=60).stdout
    assert out.splitlines()[0] == "65532"
    assert "198.51.100.11" in out  # gobgp global: the router id


@pytest.mark.timeout(BUILD_TIMEOUT + 300)
def test_delegated_host_local_keeps_its_allocations_across_an_agent_restart(image, cluster):
    """host-local, delegated by the agent in its container, keeps its state in the
    host's /var/lib/cni (mounted as the DaemonSet does): after the agent's container
    is replaced, the next pod gets another address. Without the mount (the old
    manifest) the same address is handed out twice: shown first."""
    install_shim_from_image(cluster)
    config = {"cniVersion": "1.0.0", "name": "hl", "type": "vpcni", "vni": 4600,
              "ipam": {"type": "host-local", "subnet": "172.16.46.0/24"}}

    def address(node, pod):
        res = node.cni("ADD", config, pod.container_id, pod.netns)
        assert res.ok, res.stdout + res.stderr
        return res.json["ips"][0]["address"]

    for host_cni_state, name, ip in ((False, "h0", "198.51.100.5"), (True, "h1", "198.51.100.6")):
        node, agent = agent_node(cluster, name, ip, host_cni_state=host_cni_state)
        node.wait_agent_ready(timeout=60)
        first = address(node, cluster.add_pod(node, f"{name}a"))
        agent.remove()
        agent.start()
        node.wait_agent_ready(timeout=60)
        second = address(node, cluster.add_pod(node, f"{name}b"))
        if host_cni_state:
            assert first != second, f"host-local handed out {first} twice"
            held = {p.name for p in (agent.var_lib_cni / "networks" / "hl").iterdir()}
            assert {first.split("/")[0], second.split("/")[0]} <= held
        else:
            assert first == second, "without the host's /var/lib/cni the state is lost"


@pytest.mark.timeout(BUILD_TIMEOUT + 300)
def test_controller_image(image):
    """The controller's image: kopf and the kubernetes client, `vpcnictl controller`,
    not root."""
    out = podman("run", "--rm", "--network", "none", "--cap-drop", "all", "--read-only",
                 CONTROLLER_IMAGE, "sh", "-ec",
                 "id -u; python -c 'import kopf, kubernetes, vpcni.controller.main'; "
                 "vpcnictl controller --help").stdout
    assert out.splitlines()[0] == "65532", out
    assert "--liveness" in out
