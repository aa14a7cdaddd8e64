"""vpcni driven by libcni, the library that containerd, CRI-O and podman use.

A small Go driver of ours (libcni/driver/main.go) is built once per session
against Debian's libcni 1.1.2 (CNI <= 1.0.0) and runs inside a node's
namespace, as a runtime there would: libcni execs vpcni (and tuning) from the
cluster's CNI bin dir with the environment the driver inherited, so
VPCNI_NODE_CONFIG reaches vpcni. Its cache goes to the sandbox, never to
/var/lib/cni.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import pytest

from tests.functional.leftovers import assert_no_leftovers, links, records
from tests.functional.netstate import assigned_addresses, pod_interface, sysctl
from tests.spec_shapes import check_result
from vpcni.lab.cluster import CniResult, Node, Pod
from vpcni.lab.netns import run
from vpcni.lab.traffic import wait_ping

pytestmark = pytest.mark.functional

DRIVER_SOURCE = Path(__file__).parent / "libcni" / "driver" / "main.go"
DEBIAN_GOPATH = Path("/usr/share/gocode")
LIBCNI_PACKAGE = DEBIAN_GOPATH / "src/github.com/containernetworking/cni/libcni"
VERSION = "1.0.0"  # the newest libcni 1.1.2 speaks
# tuning 1.1.1 substitutes IFNAME in sysctl keys on ADD but not on CHECK: spell it out.
SYSCTL = "net.ipv4.conf.eth1.arp_notify"


@pytest.fixture(scope="session")
def libcni_driver(tmp_path_factory) -> Path:
    """The driver binary, built offline once per session (a missing toolchain fails)."""
    go = shutil.which("go")
    if go is None:
        pytest.fail("go is not installed (scripts/setup.sh installs golang-go)")
    if not LIBCNI_PACKAGE.is_dir():
        pytest.fail(f"libcni is not at {LIBCNI_PACKAGE} "
                    "(scripts/setup.sh installs golang-github-appc-cni-dev)")
    tmp = tmp_path_factory.mktemp("libcni-driver")
    package = tmp / "gopath" / "src" / "vpcni-libcni-driver"
    package.mkdir(parents=True)
    shutil.copy(DRIVER_SOURCE, package / "main.go")
    binary = tmp / "driver"
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp),
           "GOPATH": f"{tmp / 'gopath'}:{DEBIAN_GOPATH}", "GO111MODULE": "off",
           "GOCACHE": str(tmp / "gocache"), "GOFLAGS": "", "GOPROXY": "off",
           "CGO_ENABLED": "0"}
    start = time.monotonic()
    proc = subprocess.run([go, "build", "-o", str(binary), "."], cwd=package, env=env,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        pytest.fail(f"building the libcni driver failed:\n{proc.stderr}")
    print(f"libcni driver built in {time.monotonic() - start:.1f}s")
    return binary


@dataclass
class Runtime:
    """A runtime on `node` with one network configuration list, as libcni sees it."""

    driver: Path
    node: Node
    conflist: Path
    cache_dir: Path

    def __call__(self, command: str, pod: Pod, ifname: str = "eth1",
                 capability_args: Optional[dict] = None, args: str = "") -> CniResult:
        cmd = ["ip", "netns", "exec", self.node.ns.name, str(self.driver),
               "-command", command, "-conflist", str(self.conflist),
               "-containerid", pod.container_id, "-netns", pod.netns, "-ifname", ifname,
               "-path", str(self.node.cni_bin), "-cachedir", str(self.cache_dir)]
        if capability_args is not None:
            cmd += ["-capability-args", json.dumps(capability_args)]
        if args:
            cmd += ["-args", args]
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
               "VPCNI_NODE_CONFIG": str(self.node.config_path)}
        proc = run(cmd, check=False, env=env)
        return CniResult(proc.returncode, proc.stdout, proc.stderr)

    def cached_result(self, pod: Pod, ifname: str = "eth1") -> Path:
        name = json.loads(self.conflist.read_text())["name"]
        return self.cache_dir / "results" / f"{name}-{pod.container_id}-{ifname}"


def ok(res: CniResult) -> CniResult:
    assert "Traceback" not in res.stderr, res.stderr
    assert res.rc == 0, f"rc {res.rc}: {res.stdout} {res.stderr}"
    return res


def driver_error(res: CniResult) -> dict[str, Any]:
    """The driver's error report: the last line of its stderr (plugins log above it)."""
    assert "Traceback" not in res.stderr, res.stderr
    assert res.rc == 1, f"expected a failure: {res}"
    return json.loads(res.stderr.strip().splitlines()[-1])


def runtime_for(driver: Path, node: Node, name: str, plugins: list[dict]) -> Runtime:
    conflist = node.dir / f"{name}.conflist"
    conflist.write_text(json.dumps({"cniVersion": VERSION, "name": name, "plugins": plugins}))
    return Runtime(driver, node, conflist, node.dir / "libcni-cache")


def vpcni_plugin(vni: int, addr: str, **extra) -> dict:
    return {"type": "vpcni", "vni": vni, "addr": addr, **extra}


def tuning_plugin(data_dir: Path) -> dict:
    return {"type": "tuning", "sysctl": {SYSCTL: "1"}, "dataDir": str(data_dir)}


@pytest.mark.parametrize("with_tuning", [False, True], ids=["vpcni", "vpcni+tuning"])
def test_add_check_del_through_libcni(cluster, node, backend, libcni_driver, with_tuning):
    pod = cluster.add_pod(node, "a")
    name = f"{cluster.sandbox.prefix}-lc"
    plugins = [vpcni_plugin(340, "172.16.40.1/24")]
    if with_tuning:
        plugins.append(tuning_plugin(cluster.sandbox.dir("tuning")))
    runtime = runtime_for(libcni_driver, node, name, plugins)

    result = json.loads(ok(runtime("ADD", pod)).stdout)
    check_result(result, VERSION)
    assert result["cniVersion"] == VERSION
    idx, itf = pod_interface(result, pod.netns)
    assert [(ip["address"], ip["interface"]) for ip in result["ips"]] == [
        ("172.16.40.1/24", idx)]
    eth1 = links(pod.ns.name)["eth1"]
    assert "UP" in eth1["flags"]
    assert eth1["address"] == itf["mac"].lower()
    assert assigned_addresses(pod.ns, "eth1") == {"172.16.40.1/24"}
    if with_tuning:
        assert sysctl(pod.ns, SYSCTL) == "1"
    assert [(r["network"], r["container_id"]) for r in records(node)] == [
        (name, pod.container_id)]
    assert runtime.cached_result(pod).exists()

    ok(runtime("CHECK", pod))
    pod.ns.ip("link", "del", "eth1")
    err = driver_error(runtime("CHECK", pod))
    assert "code" in err, f"CHECK failed outside the plugins: {err}"
    assert "eth1" in err["msg"], err

    ok(runtime("DEL", pod))
    assert_no_leftovers(node, backend, pods=[pod], macs=[itf["mac"]])
    assert not runtime.cached_result(pod).exists()


@pytest.mark.parametrize("declared", [True, False], ids=["declared", "undeclared"])
def test_capability_args_reach_vpcni_only_when_declared(cluster, node, backend, libcni_driver,
                                                        declared):
    """libcni passes `ips`/`mac` as runtimeConfig only to plugins that declare them."""
    pod = cluster.add_pod(node, "a")
    capabilities = {"capabilities": {"ips": True, "mac": True}} if declared else {}
    runtime = runtime_for(libcni_driver, node, f"{cluster.sandbox.prefix}-cap",
                          [vpcni_plugin(340, "172.16.40.1/24", **capabilities)])
    wanted = {"ips": ["172.16.40.77/24"], "mac": "02:00:ac:10:28:4d"}

    result = json.loads(ok(runtime("ADD", pod, capability_args=wanted)).stdout)
    _, itf = pod_interface(result, pod.netns)
    eth1 = links(pod.ns.name)["eth1"]
    if declared:
        assert assigned_addresses(pod.ns, "eth1") == {"172.16.40.77/24"}
        assert eth1["address"] == itf["mac"] == wanted["mac"]
        assert [ip["address"] for ip in result["ips"]] == ["172.16.40.77/24"]
    else:
        assert assigned_addresses(pod.ns, "eth1") == {"172.16.40.1/24"}
        assert eth1["address"] == itf["mac"] != wanted["mac"]
    ok(runtime("CHECK", pod, capability_args=wanted))

    ok(runtime("DEL", pod, capability_args=wanted))
    assert_no_leftovers(node, backend, pods=[pod], macs=[itf["mac"]])


def test_cni_args_through_libcni(cluster, node, backend, libcni_driver):
    """CNI_ARGS as Kubernetes runtimes send them; vpcni takes IP= and ignores the rest."""
    pod = cluster.add_pod(node, "a")
    runtime = runtime_for(libcni_driver, node, f"{cluster.sandbox.prefix}-args",
                          [vpcni_plugin(340, "172.16.40.1/24")])
    args = (f"IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=a;"
            f"K8S_POD_INFRA_CONTAINER_ID={pod.container_id};IP=172.16.40.78/24")

    result = json.loads(ok(runtime("ADD", pod, args=args)).stdout)
    assert [ip["address"] for ip in result["ips"]] == ["172.16.40.78/24"]
    assert assigned_addresses(pod.ns, "eth1") == {"172.16.40.78/24"}
    ok(runtime("CHECK", pod, args=args))

    ok(runtime("DEL", pod, args=args))
    assert_no_leftovers(node, backend, pods=[pod])


def test_two_nodes_ping_through_libcni(cluster, backend, libcni_driver):
    nodes = [cluster.add_node(f"n{i}", f"198.51.100.{i}", backend=backend) for i in (1, 2)]
    name = f"{cluster.sandbox.prefix}-vpc"
    pods = []
    for host, (node, peer) in enumerate(zip(nodes, reversed(nodes)), start=1):
        pod = cluster.add_pod(node, f"p{host}")
        runtime = runtime_for(libcni_driver, node, name,
                              [vpcni_plugin(341, f"172.16.41.{host}/24", vteps=[peer.address]),
                               tuning_plugin(cluster.sandbox.dir(f"tuning-{host}"))])
        ok(runtime("ADD", pod))
        pods.append((pod, runtime))

    wait_ping(pods[0][0].ns, "172.16.41.2")
    assert pods[1][0].ns.ping("172.16.41.1")

    for pod, runtime in pods:
        ok(runtime("CHECK", pod))
        ok(runtime("DEL", pod))
        assert_no_leftovers(pod.node, backend, pods=[pod])
