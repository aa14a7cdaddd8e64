"""deploy/ agrees with the code: configs parse, paths and sockets line up, renders run."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from vpcni.core.config import NetworkConfig, NodeConfig
from vpcni.lab.cluster import installed_executable

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d]


def node_agent() -> tuple[dict, dict]:
    items = docs("node-agent.yaml")
    cm = next(d for d in items if d["kind"] == "ConfigMap")
    ds = next(d for d in items if d["kind"] == "DaemonSet")
    return cm, ds


def script(container: dict) -> str:
    return container["command"][-1]


def test_every_manifest_parses_and_has_a_kind():
    for path in DEPLOY.glob("*.yaml"):
        for d in docs(path.name):
            assert d.get("apiVersion") and d.get("kind"), path


def test_example_nads_are_valid_vpcni_configs():
    nads = [d for d in docs("vpcs-example.yaml") if d["kind"] == "NetworkAttachmentDefinition"]
    assert {n["metadata"]["name"] for n in nads} == {"pod-a", "pod-b"}
    for nad in nads:
        cfg = NetworkConfig.parse(json.loads(nad["spec"]["config"]))
        assert cfg.type == "vpcni" and cfg.vni == 300


def test_node_config_written_by_the_init_container_is_valid_and_matches_the_pod():
    cm, ds = node_agent()
    spec = ds["spec"]["template"]["spec"]
    init = script(spec["initContainers"][0])
    heredoc = re.search(r"<<JSON\n(.*?)\n\s*JSON", init, re.S).group(1)
    text = heredoc.replace("${NODE_IP}", "198.51.100.1").replace("${ASN}", cm["data"]["ASN"])
    node = NodeConfig.model_validate(json.loads(text))
    containers = {c["name"]: c for c in spec["containers"]}
    # gobgpd serves the socket the agent's node config names, on a shared volume.
    gobgpd_cmd = containers["gobgpd"]["command"]
    assert f"unix://{node.evpn.gobgpdSocket}" in gobgpd_cmd
    mounts = {m["mountPath"] for m in containers["agent"]["volumeMounts"]}
    for path in (node.agentSocket, node.evpn.gobgpdSocket, node.stateDir):
        assert any(str(path).startswith(m) for m in mounts), path
    port = int(node.healthAddress.rsplit(":", 1)[1])
    for probe in ("livenessProbe", "readinessProbe"):
        assert containers["agent"][probe]["httpGet"]["port"] == port
    assert containers["agent"]["readinessProbe"]["httpGet"]["path"] == "/readyz"


@pytest.mark.parametrize("manifest", ["node-agent.yaml", "route-reflectors.yaml"])
def test_render_commands_in_manifests_run(manifest):
    items = docs(manifest)
    workload = next(d for d in items if d["kind"] in ("DaemonSet", "StatefulSet"))
    text = script(workload["spec"]["template"]["spec"]["initContainers"][0])
    text = text.replace("\\\n", " ")
    line = next(l for l in text.splitlines() if "vpcnictl render" in l)
    line = line.split(">")[0].replace('"$@"', "--reflector 198.51.100.201")
    line = line.replace("${NODE_IP}", "198.51.100.1").replace("${ASN}", "65000")
    argv = shlex.split(line)
    argv[0] = installed_executable("vpcnictl")
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "198.51.100.1" in out.stdout
