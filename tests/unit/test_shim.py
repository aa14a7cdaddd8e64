"""The stdlib-only shim: what it may import, and its own copy of the version list."""

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from vpcni.cni import shim, versions
from vpcni.cni.install import GO_SOURCE, install_shim

STDLIB = set(sys.stdlib_module_names)


def test_shim_versions_match_the_spec_layer():
    assert shim.SUPPORTED_VERSIONS == versions.SUPPORTED


def test_shim_imports_only_the_standard_library_at_top_level():
    tree = ast.parse(Path(shim.__file__).read_text())
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = {a.name.split(".")[0] for n in top if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module.split(".")[0] for n in top if isinstance(n, ast.ImportFrom)}
    assert names and names <= STDLIB, names - STDLIB


def test_installed_python_shim_runs_without_site_packages(tmp_path):
    target = install_shim(tmp_path, "/usr/bin/python3", standalone_python="/nonexistent/python",
                          kind="python")
    assert target.read_text().startswith("#!/usr/bin/python3 -S\n")
    assert "STANDALONE_PYTHON = '/nonexistent/python'" in target.read_text()
    env = {"CNI_COMMAND": "VERSION", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([str(target)], input=b'{"cniVersion": "0.4.0"}', env=env,
                         capture_output=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"cniVersion": "0.4.0",
                                      "supportedVersions": list(versions.SUPPORTED)}


@pytest.mark.parametrize("kind", ["go", "python"])
def test_unreadable_node_config_and_no_agent_is_a_config_error(tmp_path, kind):
    target = install_shim(tmp_path, "/usr/bin/python3", standalone_python="/nonexistent/python",
                          kind=kind)
    env = {"CNI_COMMAND": "ADD", "PATH": "/usr/bin:/bin",
           "VPCNI_NODE_CONFIG": str(tmp_path / "missing.json")}
    out = subprocess.run([str(target)], input=b'{"cniVersion": "1.0.0"}', env=env,
                         capture_output=True, timeout=30)
    body = json.loads(out.stdout)
    assert out.returncode == 1 and body["code"] == 7
    assert str(tmp_path / "missing.json") in body["msg"]


def test_go_shim_versions_match_the_spec_layer():
    listed = re.search(r"supportedVersions = \[\]string\{([^}]*)\}", GO_SOURCE.read_text())
    assert tuple(v.strip().strip('"') for v in listed.group(1).split(",")) == versions.SUPPORTED


def test_go_shim_is_static_and_answers_version(tmp_path):
    target = install_shim(tmp_path, standalone_python="/nonexistent/python")
    assert not target.read_bytes().startswith(b"#!")
    assert b"/lib64/ld-linux" not in target.read_bytes()  # no dynamic loader: static
    out = subprocess.run([str(target)], input=b'{"cniVersion": "0.4.0"}',
                         env={"CNI_COMMAND": "VERSION"}, capture_output=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"cniVersion": "0.4.0",
                                      "supportedVersions": list(versions.SUPPORTED)}


def test_go_shim_spools_a_del_when_the_agent_is_away(tmp_path):
    target = install_shim(tmp_path / "bin", standalone_python="/nonexistent/python")
    node = tmp_path / "node.json"
    node.write_text(json.dumps({"agentSocket": str(tmp_path / "none.sock"),
                                "stateDir": str(tmp_path / "state")}))
    env = {"CNI_COMMAND": "DEL", "CNI_CONTAINERID": "c1", "CNI_IFNAME": "eth1",
           "VPCNI_NODE_CONFIG": str(node), "CNI_NETNS": "/x", "UNRELATED": "no"}
    out = subprocess.run([str(target)], input=b'{"cniVersion": "1.0.0", "name": "n"}', env=env,
                         capture_output=True, timeout=30)
    assert out.returncode == 0 and out.stdout == b"", out
    [spooled] = (tmp_path / "state" / "pending-del").iterdir()
    body = json.loads(spooled.read_text())
    assert body["stdin"] == '{"cniVersion": "1.0.0", "name": "n"}'
    assert body["env"]["CNI_CONTAINERID"] == "c1" and "UNRELATED" not in body["env"]
    env["CNI_COMMAND"] = "ADD"
    out = subprocess.run([str(target)], input=b'{"cniVersion": "1.0.0"}', env=env,
                         capture_output=True, timeout=30)
    body = json.loads(out.stdout)
    assert out.returncode == 1 and body["code"] == 11 and str(tmp_path / "none.sock") in body["msg"]
    assert body["cniVersion"] == "1.0.0"


def test_go_shim_refuses_a_malformed_agent_socket(tmp_path):
    target = install_shim(tmp_path / "bin", standalone_python="/nonexistent/python")
    node = tmp_path / "node.json"
    node.write_text(json.dumps({"agentSocket": 5}))
    out = subprocess.run([str(target)], input=b'{"cniVersion": "0.4.0"}',
                         env={"CNI_COMMAND": "ADD", "VPCNI_NODE_CONFIG": str(node)},
                         capture_output=True, timeout=30)
    body = json.loads(out.stdout)
    assert out.returncode == 1 and body["code"] == 7 and body["cniVersion"] == "0.4.0"
    assert "agentSocket" in body["msg"] and str(node) in body["msg"]


@pytest.mark.parametrize("kind", ["go", "python"])
def test_standalone_mode_takes_a_config_larger_than_a_pipe(tmp_path, kind):
    """Standalone mode hands the config on to the in-process plugin: the Python shim
    once wrote it into a pipe nobody read before its exec, and hung on more than
    64 KiB. Both shims must answer (here: code 2 for the padding, then code 7 over
    4 MiB)."""
    target = install_shim(tmp_path, "/usr/bin/python3", standalone_python=sys.executable,
                          kind=kind)
    node = tmp_path / "node.json"
    node.write_text(json.dumps({"vtepAddress": "198.51.100.1", "mode": "standalone",
                                "stateDir": str(tmp_path / "state"), "logFile": None}))
    env = {"CNI_COMMAND": "ADD", "PATH": "/usr/bin:/bin", "VPCNI_NODE_CONFIG": str(node),
           "CNI_CONTAINERID": "c1", "CNI_NETNS": "/proc/self/ns/net", "CNI_IFNAME": "eth1",
           "CNI_PATH": str(tmp_path)}
    for size, code in ((200_000, 2), (5 << 20, 7)):
        cfg = {"cniVersion": "1.1.0", "name": "n", "type": "vpcni", "vni": 5, "pad": "x" * size}
        out = subprocess.run([str(target)], input=json.dumps(cfg).encode(), env=env,
                             capture_output=True, timeout=60)
        body = json.loads(out.stdout)
        assert out.returncode == 1 and body["code"] == code, (body, out.stderr[-500:])
        assert b"Traceback" not in out.stderr


@pytest.mark.parametrize("kind", ["go", "python"])
@pytest.mark.parametrize("key", ["mode", "agentSocket", "stateDir"])
def test_a_shim_key_of_the_wrong_type_is_a_config_error(tmp_path, kind, key):
    """Both shims read mode, agentSocket and stateDir themselves: one that is not a
    string is code 7 naming it (the Python shim once died on it with a traceback)."""
    target = install_shim(tmp_path, "/usr/bin/python3", standalone_python="/nonexistent/python",
                          kind=kind)
    node = tmp_path / "node.json"
    node.write_text(json.dumps({"vtepAddress": "198.51.100.1", key: 5}))
    for command in ("ADD", "DEL"):
        out = subprocess.run([str(target)], input=b'{"cniVersion": "1.0.0"}', timeout=30,
                             env={"CNI_COMMAND": command, "PATH": "/usr/bin:/bin",
                                  "VPCNI_NODE_CONFIG": str(node)}, capture_output=True)
        body = json.loads(out.stdout)
        assert out.returncode == 1 and body["code"] == 7, (body, out.stderr)
        assert f"'{key}' = 5" in body["msg"] and str(node) in body["msg"]
        assert b"Traceback" not in out.stderr
