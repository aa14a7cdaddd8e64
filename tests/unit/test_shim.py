"""The stdlib-only shim: what it may import, and its own copy of the version list."""

import ast
import json
import subprocess
import sys
from pathlib import Path

from vpcni.cni import shim, versions
from vpcni.cni.install import install_shim

STDLIB = set(sys.stdlib_module_names)


def test_shim_versions_match_the_spec_layer():
    assert shim.SUPPORTED_VERSIONS == versions.SUPPORTED


def test_shim_imports_only_the_standard_library_at_top_level():
    tree = ast.parse(Path(shim.__file__).read_text())
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = {a.name.split(".")[0] for n in top if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module.split(".")[0] for n in top if isinstance(n, ast.ImportFrom)}
    assert names and names <= STDLIB, names - STDLIB


def test_installed_shim_runs_without_site_packages(tmp_path):
    target = install_shim(tmp_path, "/usr/bin/python3", standalone_python="/nonexistent/python")
    assert target.read_text().startswith("#!/usr/bin/python3 -S\n")
    assert "STANDALONE_PYTHON = '/nonexistent/python'" in target.read_text()
    env = {"CNI_COMMAND": "VERSION", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([str(target)], input=b'{"cniVersion": "0.4.0"}', env=env,
                         capture_output=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"cniVersion": "0.4.0",
                                      "supportedVersions": list(versions.SUPPORTED)}


def test_unreadable_node_config_and_no_agent_is_a_config_error(tmp_path):
    target = install_shim(tmp_path, "/usr/bin/python3", standalone_python="/nonexistent/python")
    env = {"CNI_COMMAND": "ADD", "PATH": "/usr/bin:/bin",
           "VPCNI_NODE_CONFIG": str(tmp_path / "missing.json")}
    out = subprocess.run([str(target)], input=b'{"cniVersion": "1.0.0"}', env=env,
                         capture_output=True, timeout=30)
    body = json.loads(out.stdout)
    assert out.returncode == 1 and body["code"] == 7
    assert str(tmp_path / "missing.json") in body["msg"]
