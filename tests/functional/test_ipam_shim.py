"""vpcni-ipam as `vpcnictl install-cni` puts it into a host's CNI bin dir: the static Go
shim under a second name, which forwards each call to the node's agent (the host has
no Python with vpcni) or, in standalone mode, execs the standalone Python.

The bin dir here is a sandbox directory filled by `vpcnictl install-cni --dest`; the
calls run inside the node's namespace, directly (as a runtime or a delegating plugin
execs an IPAM plugin) and from the reference bridge plugin delegating to it.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
from pathlib import Path

import pytest

from tests.functional.netstate import assigned_addresses
from vpcni.ipam.config import SqliteStoreConfig
from vpcni.ipam.store import SqliteStore
from vpcni.lab.cluster import CniResult, Cluster, Node, installed_executable
from vpcni.lab.netns import run, wait_for

pytestmark = pytest.mark.functional

SUBNET = "172.16.46.0/24"


@pytest.fixture
def host_bin(cluster: Cluster) -> Path:
    """A CNI bin dir as install-cni leaves it on a host."""
    dest = cluster.sandbox.dir("host-cni-bin")
    out = subprocess.run([installed_executable("vpcnictl"), "install-cni", "--dest", str(dest)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert not (dest / "vpcni-ipam").read_bytes().startswith(b"#!")  # the static shim
    return dest


def ipam_conf(cluster: Cluster, **extra) -> dict:
    store = {"type": "sqlite", "path": str(cluster.sandbox.dir("ipam") / "ipam.sqlite")}
    return {"cniVersion": "1.0.0", "name": f"{cluster.sandbox.prefix}-sh", "type": "bridge",
            "ipam": {"type": "vpcni-ipam", "subnets": [SUBNET], "store": store}, **extra}


def held(conf: dict) -> dict[str, str]:
    """container ID -> address, as the store has them."""
    store = SqliteStore(SqliteStoreConfig(**conf["ipam"]["store"]))
    return {a.container_id: a.ip for a in store.list(conf["name"])}


def ipam_exec(node: Node, exe: Path, command: str, conf: dict, cid: str) -> CniResult:
    """`exe` executed in the node's namespace with the CNI environment of the call (the
    node's namespace as the container's: an IPAM plugin does not enter it)."""
    env = node.cni_env(command, cid, node.ns.path, "eth0")
    proc = run(["ip", "netns", "exec", node.ns.name, str(exe)], check=False,
               input=json.dumps(conf), env=env)
    return CniResult(proc.returncode, proc.stdout, proc.stderr)


def served_by_agent(node: Node, conf: dict, cid: str) -> bool:
    """The agent's log has the allocation (the standalone plugin logs to stderr only)."""
    log = node.dir / "vpcni.log"
    return log.exists() and f"ipam {conf['name']}: {cid}/eth0 holds" in log.read_text()


def test_agent_mode_add_check_del_through_the_installed_shim(cluster, host_bin):
    node = cluster.add_node("n1", "198.51.100.1", agent=True)
    exe = host_bin / "vpcni-ipam"
    conf = ipam_conf(cluster)

    add = ipam_exec(node, exe, "ADD", conf, "c1")
    assert add.ok, add.stdout or add.stderr
    [ip] = add.json["ips"]
    assert ip["address"] == "172.16.46.2/24" and ip["gateway"] == "172.16.46.1"
    assert served_by_agent(node, conf, "c1")
    assert held(conf) == {"c1": "172.16.46.2"}
    assert ipam_exec(node, exe, "ADD", conf, "c1").json == add.json  # repeated: same
    check = ipam_exec(node, exe, "CHECK", conf | {"prevResult": add.json}, "c1")
    assert check.ok, check.stdout
    other = ipam_exec(node, exe, "CHECK", conf | {"prevResult": add.json}, "c2")
    assert other.rc == 1 and other.json["code"] == 3, other.stdout
    assert ipam_exec(node, exe, "DEL", conf, "c1").ok
    assert ipam_exec(node, exe, "DEL", conf, "c1").ok  # DEL of nothing is fine
    assert held(conf) == {}

    # The agent away: ADD is code 11 naming its socket; DEL is spooled and done by the
    # agent when it starts (through vpcni-ipam, not vpcni).
    assert ipam_exec(node, exe, "ADD", conf, "c2").ok
    node.stop_agent()
    away = ipam_exec(node, exe, "ADD", conf, "c3")
    assert away.rc == 1 and away.json["code"] == 11 and node.agent_socket in away.json["msg"]
    gone = ipam_exec(node, exe, "DEL", conf, "c2")
    assert gone.ok and gone.stdout == "", gone
    assert "vpcni-ipam: agent unreachable" in gone.stderr
    assert held(conf) == {"c2": "172.16.46.2"}
    node.start_agent()
    node.wait_agent_ready()
    wait_for(lambda: held(conf) == {}, timeout=10, what="the spooled DEL replayed")
    assert list((node.state_dir / "pending-del").glob("*")) == []


@pytest.mark.parametrize("served", ["agent", "standalone"])
def test_reference_bridge_delegates_to_the_installed_shim(cluster, host_bin, served):
    """bridge finds vpcni-ipam in CNI_PATH (the host's bin dir first): two pods get
    addresses from the node's agent (or the standalone Python) and talk."""
    node = cluster.add_node("n1", "198.51.100.1", agent=(served == "agent"))
    conf = ipam_conf(cluster, bridge="vpbr1", isGateway=True)
    path = f"{host_bin}:{cluster.cni_bin}"
    pods = [cluster.add_pod(node, name) for name in ("a", "b")]
    ips = []
    for p in pods:
        res = node.cni("ADD", conf, p.container_id, p.netns, "eth0", plugin="bridge", path=path)
        assert res.ok, res.stdout or res.stderr
        [ip] = res.json["ips"]
        assert assigned_addresses(p.ns, "eth0") == {ip["address"]}
        ips.append(ip["address"].split("/")[0])
    assert len(set(ips)) == 2
    assert all(ipaddress.ip_address(ip) in ipaddress.ip_network(SUBNET) for ip in ips)
    assert served_by_agent(node, conf, pods[0].container_id) == (served == "agent")
    assert pods[0].ns.ping(ips[1], count=3)
    for p in pods:
        res = node.cni("DEL", conf, p.container_id, p.netns, "eth0", plugin="bridge", path=path)
        assert res.ok, res.stdout or res.stderr
    assert held(conf) == {}
