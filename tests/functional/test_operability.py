"""Operability on real nodes: `vpcnictl probe` without a node config, the human status,
the agent's metrics (errors by code, build info, no EVPN metrics without EVPN, vpcni-ipam
pool usage), JSON logs with timestamps that survive logrotate, `lab up`'s progress lines."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from vpcni.core.config import DEFAULT_NODE_CONFIG
from vpcni.lab.cluster import installed_executable, seed_network
from vpcni.lab.netns import wait_for

pytestmark = pytest.mark.functional

ISO = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d"


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """Prometheus text -> {(name, labels): value}."""
    out = {}
    for line in text.splitlines():
        m = re.fullmatch(r'([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)', line)
        if not m or line.startswith("#"):
            continue
        labels = frozenset(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        out[(m.group(1), labels)] = float(m.group(3))
    return out


def value(text: str, name: str, **labels) -> float | None:
    return samples(text).get((name, frozenset(labels.items())))


def vpcnictl(*args: str, ns=None, env=None) -> subprocess.CompletedProcess:
    cmd = [installed_executable("vpcnictl"), *args]
    if ns is not None:
        return ns.exec(*cmd, check=False, env=env, timeout=60)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


# ---------------------------------------------------------------- probe

@pytest.mark.skipif(os.path.lexists(DEFAULT_NODE_CONFIG),
                    reason=f"{DEFAULT_NODE_CONFIG} exists: probe reads it")
def test_probe_without_a_node_config_says_what_it_could_not_determine(sandbox):
    env = {k: v for k, v in os.environ.items() if k != "VPCNI_NODE_CONFIG"}
    bare = sandbox.netns("bare")  # loopback only: no default route, no underlay
    out = vpcnictl("probe", ns=bare, env=env)
    assert out.returncode == 1, out.stderr
    assert "no node config" in out.stdout and "Traceback" not in out.stderr
    assert "underlay (VTEP address): unknown: this network namespace has no default route" \
        in out.stdout
    kernel = next(l for l in out.stdout.splitlines() if l.startswith("kernel "))
    assert "cannot tell without an underlay" in kernel, kernel
    assert "this node cannot serve ADD" in out.stdout

    routed = sandbox.netns("routed")
    peer = sandbox.netns("peer")
    sandbox.veth(routed, "up0", peer, "up0")
    routed.ip("addr", "add", "192.0.2.1/24", "dev", "up0")
    routed.ip("link", "set", "up0", "up")
    peer.ip("link", "set", "up0", "up")
    routed.ip("route", "add", "default", "via", "192.0.2.2")
    out = vpcnictl("probe", "--json", ns=routed, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    probe = json.loads(out.stdout)
    assert probe["nodeConfig"] is None and probe["chosen"] == "kernel"
    assert any("guessed from the interface of the default route (up0)" in a
               for a in probe["assumed"]), probe["assumed"]
    kernel = next(p for p in probe["backends"] if p["name"] == "kernel")
    assert kernel["facts"]["vtep"] == "192.0.2.1" and kernel["facts"]["underlay"] == "up0"
    # A node config named but missing is still an error (exit 2), not the defaults.
    out = vpcnictl("probe", "--node-config", "/nonexistent/node.json", ns=routed, env=env)
    assert out.returncode == 2 and "file not found" in out.stderr


# ---------------------------------------------------------------- agent

def ipam_network(node, name: str, vni: int, subnet: str) -> dict:
    return seed_network(name, vni, ipam={"type": "vpcni-ipam", "subnets": [subnet],
                                         "store": {"type": "sqlite",
                                                   "path": str(node.dir / "ipam.sqlite")}})


def test_agent_metrics_status_and_json_logs(cluster):
    node = cluster.add_node("n1", "198.51.100.1", agent=True, reconcileInterval=1,
                            logFormat="json")
    pod = cluster.add_pod(node, "p1")
    cluster.attach(pod, ipam_network(node, "vpc-ops", 340, "172.16.40.0/24"))
    bad = node.cni("ADD", seed_network("vpc-bad", 341, "nope"), "c2", pod.netns, "eth2")
    assert json.loads(bad.stdout)["code"] == 7
    bad = node.cni("ADD", seed_network("vpc-bad", 341, "172.16.41.2/24"), "c3", "", "eth3")
    assert json.loads(bad.stdout)["code"] == 4

    metrics = node.metrics()
    assert value(metrics, "vpcni_cni_errors_total", command="ADD", code="7") == 1.0
    assert value(metrics, "vpcni_cni_errors_total", command="ADD", code="4") == 1.0
    assert value(metrics, "vpcni_cni_requests_total", command="ADD", result="error") == 2.0
    import importlib.metadata
    import platform
    assert value(metrics, "vpcni_build_info", version=importlib.metadata.version("vpcni"),
                 python=platform.python_version()) == 1.0
    assert value(metrics, "process_resident_memory_bytes") > 0
    assert value(metrics, "process_open_fds") > 0
    # No EVPN here: no speaker, session or route metrics, so no "disconnected" alarm.
    assert not re.search(r"^vpcni_(evpn|bgp)_", metrics, re.M), metrics
    # Pool usage from the reconcile loop (every reconcileInterval): a /24 has 254
    # hosts, the gateway .1 is never handed out, one is held.
    wait_for(lambda: value(node.metrics(), "vpcni_ipam_addresses", network="vpc-ops",
                           pool="172.16.40.0/24", state="used") == 1.0,
             timeout=15, what="vpcni_ipam_addresses")
    assert value(node.metrics(), "vpcni_ipam_addresses", network="vpc-ops",
                 pool="172.16.40.0/24", state="free") == 252.0
    assert json.loads((node.state_dir / "ipam-pools.json").read_text())["vpc-ops"]["subnets"] \
        == ["172.16.40.0/24"]

    human = vpcnictl("status", "--node-config", str(node.config_path))
    assert human.returncode == 0, human.stderr
    lines = human.stdout.splitlines()
    assert re.fullmatch(r"ready +yes \(up \d+\.\ds\)", lines[1]), lines
    assert "EVPN          not configured (static flood lists only)" in lines
    assert "attachments   1 in 1 VNI(s): VNI 340: 1" in lines
    assert any(l.startswith("backend       kernel, best available probe") for l in lines)
    assert "MTU           no drift (pod MTU VNI 340: 1450)" in lines
    as_json = json.loads(vpcnictl("status", "--json", "--node-config",
                                  str(node.config_path)).stdout)
    assert as_json["ready"] is True and as_json["version"] == importlib.metadata.version("vpcni")

    # Every line of the agent's log file and of its stderr is one JSON object with a time.
    log = node.dir / "vpcni.log"
    for path in (log, node.dir / "agent.log"):
        lines = [json.loads(l) for l in path.read_text().splitlines() if l.strip()]
        assert lines, path
        for line in lines:
            assert re.fullmatch(ISO, line["time"]) and line["level"] and line["logger"], line
    assert any("failed (code 7)" in l["message"]
               for l in map(json.loads, log.read_text().splitlines()))

    # logrotate renames the file: the agent's next line makes a new one.
    log.rename(log.with_name("vpcni.log.1"))
    node.cni("ADD", seed_network("vpc-bad", 341, "nope"), "c4", pod.netns, "eth4")
    wait_for(lambda: log.exists() and "failed (code 7)" in log.read_text(), timeout=10,
             what="a new log file after the rename")
    assert all(json.loads(l) for l in log.read_text().splitlines())


def test_plugin_log_lines_have_timestamps(cluster):
    """Standalone: the plugin process's stderr and log file lines carry the time."""
    node = cluster.add_node("n1", "198.51.100.1")
    pod = cluster.add_pod(node, "p1")
    res = node.cni("ADD", seed_network("vpc-bad", 342, "nope"), pod.container_id, pod.netns)
    assert json.loads(res.stdout)["code"] == 7
    err = [l for l in res.stderr.splitlines() if "failed (code 7)" in l]
    assert err and re.match(ISO + " vpcni: WARNING ", err[0]), res.stderr
    logged = [l for l in (node.dir / "vpcni.log").read_text().splitlines() if l.strip()]
    assert logged and all(re.match(ISO + r" \d+ [A-Z]+ ", l) for l in logged), logged


# ---------------------------------------------------------------- lab

TOPOLOGY = """
name = "{name}"
asn = 65000
underlay = "198.51.100.0/24"

[[reflectors]]
name = "rr1"
address = "198.51.100.201"
daemon = "gobgpd"

[[nodes]]
name = "node1"
address = "198.51.100.11"

[[vpcs]]
name = "blue"
vni = 300
cidr = "172.16.32.0/24"

[[pods]]
name = "blue-1"
node = "node1"
vpc = "blue"
"""


def test_lab_up_progress_and_the_status_of_an_evpn_node(tmp_path):
    from vpcni.lab.lab import Lab

    name = f"o{os.urandom(3).hex()}"
    topo = Path(tmp_path) / "topology.toml"
    topo.write_text(TOPOLOGY.format(name=name))
    try:
        up = vpcnictl("lab", "up", str(topo))
        assert up.returncode == 0, up.stdout + up.stderr
        # stdout as before; one progress line per step on stderr, with the time taken.
        assert up.stdout.startswith(f"lab {name} up in "), up.stdout
        steps = [re.fullmatch(rf"lab {name}: \[ *(\d+\.\d)s\] ([^:]+): .*", l)
                 for l in up.stderr.splitlines() if l.startswith(f"lab {name}: [")]
        assert all(steps), up.stderr
        assert [m.group(2) for m in steps] == ["reflectors started", "nodes started",
                                               "agents ready", "BGP sessions up",
                                               "pods attached", "EVPN converged"], up.stderr
        times = [float(m.group(1)) for m in steps]
        assert times == sorted(times)
        assert "pods attached: 1" in up.stderr and "reflectors started: 1 (rr1 gobgpd)" \
            in up.stderr

        lab = Lab.load(name)
        node = lab.node("node1")
        # Sessions just came up: the agent holds stale entries until its reconcile loop
        # has seen them up a few seconds (resynchronising), then follows gobgpd's table.
        def settled():
            out = vpcnictl("status", "--node-config", str(node.config_path))
            return out if "following gobgpd's table" in out.stdout else None
        human = wait_for(settled, timeout=20, interval=0.5, what="the agent to resynchronise")
        assert human.returncode == 0, human.stdout + human.stderr
        lines = human.stdout.splitlines()
        assert "  sessions    1 of 1 established: 198.51.100.201 established" in lines, lines
        assert "  remote      following gobgpd's table (not holding stale)" in lines
        assert any(re.fullmatch(r"  routes      announcing 2, received 0 \(type-2 0, "
                                r"type-3 0\)", l) for l in lines), lines
        assert any(l.startswith("EVPN          gobgpd unix://") and
                   l.endswith("connected, initial route dump received") for l in lines), lines
        assert "tenancy       enforced (bindings " + str(lab.bindings_file) + ")" in lines
        assert "  namespaces  lab: 1" in lines
        # The reconcile loop sets the EVPN gauges (every few seconds at most).
        metrics = wait_for(lambda: (lambda m: m if value(m, "vpcni_evpn_speaker_connected")
                                    == 1.0 else None)(node.metrics()),
                           timeout=15, what="vpcni_evpn_speaker_connected 1")
        assert value(metrics, "vpcni_bgp_sessions", state="established") == 1.0
        assert value(metrics, "vpcni_evpn_holding_stale") == 0.0
    finally:
        vpcnictl("lab", "down", name)
