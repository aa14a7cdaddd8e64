"""vpcni-ipam in the CNI bin dir: the shim installed under that name, without namespaces.

`install_shim` puts one program in the bin dir under two names. Run as vpcni-ipam it
serves the IPAM plugin: standalone mode execs `-m vpcni.ipam.plugin`, agent mode marks
the request {"plugin": "vpcni-ipam"} (in a spooled DEL too) and the agent serves it
in-process. A SQLite store in tmp_path keeps every case off the network.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vpcni.agent.server import Agent
from vpcni.cni import versions
from vpcni.cni.install import NAMES, install_shim
from vpcni.core.config import NodeConfig

KINDS = ["go", "python"]


def ipam_conf(tmp_path: Path, name: str = "blue") -> dict:
    """A config of some plugin that delegates to vpcni-ipam (as a runtime passes it on)."""
    return {"cniVersion": "1.0.0", "name": name, "type": "bridge",
            "ipam": {"type": "vpcni-ipam", "subnets": ["172.16.60.0/24"],
                     "store": {"type": "sqlite", "path": str(tmp_path / "ipam.sqlite")}}}


def env_for(command: str, node: Path, cid: str = "c1", **extra) -> dict:
    return {"CNI_COMMAND": command, "CNI_CONTAINERID": cid, "CNI_NETNS": "/proc/self/ns/net",
            "CNI_IFNAME": "eth0", "CNI_PATH": "/nonexistent", "PATH": "/usr/bin:/bin",
            "VPCNI_NODE_CONFIG": str(node), "VPCNI_NODE_NAME": "n1", **extra}


def call(exe: Path, command: str, conf: dict, node: Path, cid: str = "c1"):
    out = subprocess.run([str(exe)], input=json.dumps(conf).encode(),
                         env=env_for(command, node, cid), capture_output=True, timeout=60)
    assert b"Traceback" not in out.stderr, out.stderr.decode()
    return out.returncode, (json.loads(out.stdout) if out.stdout.strip() else None)


def node_config(tmp_path: Path, **keys) -> Path:
    path = tmp_path / "node.json"
    path.write_text(json.dumps({"vtepAddress": "198.51.100.1", "stateDir": str(tmp_path / "state"),
                                "logFile": None, **keys}))
    return path


@pytest.mark.parametrize("kind", KINDS)
def test_install_puts_vpcni_and_vpcni_ipam_into_the_bin_dir(tmp_path, kind):
    target = install_shim(tmp_path / "bin", "/usr/bin/python3",
                          standalone_python="/nonexistent/python", kind=kind)
    ipam = target.with_name("vpcni-ipam")
    assert NAMES == ("vpcni", "vpcni-ipam")
    assert sorted(p.name for p in target.parent.iterdir()) == ["vpcni", "vpcni-ipam"]  # no tmp
    assert ipam.read_bytes() == target.read_bytes() and os.access(ipam, os.X_OK)
    # Installed again over itself (an upgrade): both names replaced, nothing left over.
    install_shim(tmp_path / "bin", "/usr/bin/python3", standalone_python="/other/python",
                 kind=kind)
    assert sorted(p.name for p in target.parent.iterdir()) == ["vpcni", "vpcni-ipam"]
    assert ipam.read_bytes() == target.read_bytes()
    out = subprocess.run([str(ipam)], input=b'{"cniVersion": "0.4.0"}',
                         env={"CNI_COMMAND": "VERSION", "PATH": "/usr/bin:/bin"},
                         capture_output=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"cniVersion": "0.4.0",
                                      "supportedVersions": list(versions.SUPPORTED)}


def test_install_cni_command_installs_both(tmp_path):
    out = subprocess.run([str(Path(sys.executable).with_name("vpcnictl")), "install-cni",
                          "--dest", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert str(tmp_path / "vpcni-ipam") in out.stdout
    assert (tmp_path / "vpcni").samefile(tmp_path / "vpcni-ipam")  # a hard link


@pytest.mark.parametrize("kind", KINDS)
def test_standalone_mode_runs_the_ipam_plugin(tmp_path, kind):
    """The node config says standalone: the shim execs the standalone Python with
    -m vpcni.ipam.plugin, which answers ADD, CHECK and DEL from the store."""
    exe = install_shim(tmp_path / "bin", "/usr/bin/python3", standalone_python=sys.executable,
                       kind=kind).with_name("vpcni-ipam")
    node = node_config(tmp_path, mode="standalone")
    conf = ipam_conf(tmp_path)
    rc, res = call(exe, "ADD", conf, node)
    assert rc == 0, res
    assert res["cniVersion"] == "1.0.0"
    [ip] = res["ips"]
    assert ip["address"] == "172.16.60.2/24" and ip["gateway"] == "172.16.60.1"
    assert "interfaces" not in res  # an IPAM result
    assert call(exe, "ADD", conf, node) == (0, res)  # a repeated ADD: the same address
    assert call(exe, "CHECK", conf | {"prevResult": res}, node)[0] == 0
    assert call(exe, "DEL", conf, node) == (0, None)
    rc, err = call(exe, "CHECK", conf | {"prevResult": res}, node)
    assert rc == 1 and err["code"] == 3 and "holds no address" in err["msg"]
    # A bad ipam section is the plugin's own code 7 naming the field.
    rc, err = call(exe, "ADD", conf | {"ipam": {"type": "vpcni-ipam"}}, node)
    assert rc == 1 and err["code"] == 7 and "'ipam'" in err["msg"], err


@pytest.mark.parametrize("kind", KINDS)
def test_agent_away_del_is_spooled_marked_for_vpcni_ipam(tmp_path, kind):
    exe = install_shim(tmp_path / "bin", "/usr/bin/python3",
                       standalone_python="/nonexistent/python", kind=kind).with_name("vpcni-ipam")
    node = node_config(tmp_path, agentSocket=str(tmp_path / "none.sock"))
    conf = ipam_conf(tmp_path)
    rc, err = call(exe, "ADD", conf, node)
    assert rc == 1 and err["code"] == 11 and str(tmp_path / "none.sock") in err["msg"]
    out = subprocess.run([str(exe)], input=json.dumps(conf).encode(), env=env_for("DEL", node),
                         capture_output=True, timeout=30)
    assert out.returncode == 0 and out.stdout == b"", out
    assert out.stderr.startswith(b"vpcni-ipam: agent unreachable")
    [spooled] = (tmp_path / "state" / "pending-del").iterdir()
    body = json.loads(spooled.read_text())
    assert body["plugin"] == "vpcni-ipam" and json.loads(body["stdin"]) == conf
    # The same file as vpcni spools no mark (what agents before this understood).
    spooled.unlink()
    vpcni = exe.with_name("vpcni")
    subprocess.run([str(vpcni)], input=b'{"cniVersion": "1.0.0", "name": "n"}',
                   env=env_for("DEL", node), capture_output=True, timeout=30, check=True)
    [spooled] = (tmp_path / "state" / "pending-del").iterdir()
    assert "plugin" not in json.loads(spooled.read_text())


# ---------------------------------------------------------------- the agent's side


@pytest.fixture
def agent(tmp_path):
    """An agent object without its sockets: serve_request and the spool replay, as the
    shim reaches them (no backend is needed by vpcni-ipam)."""
    node = NodeConfig.load(node_config(tmp_path, mode="agent"))
    agent = Agent(node)
    yield agent
    agent.handler.close()


def request(tmp_path: Path, command: str, conf: dict, cid: str = "c1", **extra) -> bytes:
    env = env_for(command, tmp_path / "node.json", cid)
    return json.dumps({"env": env, "stdin": json.dumps(conf), **extra}).encode()


def test_agent_serves_a_request_marked_vpcni_ipam_in_process(tmp_path, agent):
    conf = ipam_conf(tmp_path)
    reply = agent.serve_request(request(tmp_path, "ADD", conf, plugin="vpcni-ipam"))
    assert reply["rc"] == 0, reply
    res = json.loads(reply["stdout"])
    assert [ip["address"] for ip in res["ips"]] == ["172.16.60.2/24"]
    reply = agent.serve_request(request(tmp_path, "CHECK", conf | {"prevResult": res},
                                        plugin="vpcni-ipam"))
    assert reply == {"stdout": "", "rc": 0}
    # Unmarked, the same config is vpcni's, which refuses another plugin's type.
    reply = agent.serve_request(request(tmp_path, "ADD", conf, "c2"))
    assert reply["rc"] == 1 and json.loads(reply["stdout"])["code"] == 7
    assert agent.serve_request(request(tmp_path, "DEL", conf, plugin="vpcni-ipam")) == \
        {"stdout": "", "rc": 0}
    reply = agent.serve_request(request(tmp_path, "ADD", conf, plugin="no-such-plugin"))
    err = json.loads(reply["stdout"])
    assert reply["rc"] == 1 and err["code"] == 6 and "no-such-plugin" in err["msg"]


def test_agent_replays_a_spooled_vpcni_ipam_del(tmp_path, agent):
    conf = ipam_conf(tmp_path)
    reply = agent.serve_request(request(tmp_path, "ADD", conf, plugin="vpcni-ipam"))
    assert reply["rc"] == 0, reply
    spool = tmp_path / "state" / "pending-del"
    spool.mkdir(mode=0o700, parents=True)
    (spool / "1-c1-eth0.json").write_text(request(tmp_path, "DEL", conf, plugin="vpcni-ipam")
                                          .decode())
    (spool / "1-c1-eth0.json").chmod(0o600)
    agent._replay_pending()
    assert list(spool.iterdir()) == []
    # Released: the next attachment gets the first address again.
    reply = agent.serve_request(request(tmp_path, "ADD", conf, "c2", plugin="vpcni-ipam"))
    assert [ip["address"] for ip in json.loads(reply["stdout"])["ips"]] == ["172.16.60.2/24"]
