"""Operability without a node: `vpcnictl --version`, the human status, log lines (timestamps,
JSON, rotation), the agent's metrics (build info, errors by code, EVPN only with EVPN,
vpcni-ipam pool usage), the lab's progress lines."""

from __future__ import annotations

import importlib.metadata
import json
import logging
import platform
import re
import subprocess
import types

import pytest

from vpcni.agent.metrics import KNOWN_CODES, Metrics, code_label, ipam_pool_usage
from vpcni.ctl.main import format_status, main
from vpcni.lab.cluster import installed_executable

ISO = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d"


# ---------------------------------------------------------------- --version

def test_version_prints_the_package_version_python_and_gobgpd():
    out = subprocess.run([installed_executable("vpcnictl"), "--version"], capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == f"vpcni {importlib.metadata.version('vpcni')}"
    assert lines[1].startswith(f"Python {platform.python_version()} (")
    assert lines[2].startswith("gobgpd ")
    assert len(lines) == 3


def test_version_needs_no_subcommand(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith("vpcni ")


# ---------------------------------------------------------------- status

STATUS = {
    "version": "0.1.0", "node": "/etc/vpcni/node.json", "socket": "/run/vpcni/agent.sock",
    "uptime": 11520.4, "ready": False, "readyReason": "underlay interface eth0 is down",
    "backend": {"backend": "kernel", "why": "best available probe",
                "reason": "vxlan and bridge support present, VTEP 198.51.100.1 on eth0"},
    "attachmentsPerVni": {"300": 2, "301": 1},
    "tenancy": {"enforced": True, "bindingsFile": "/etc/vpcni/tenancy/bindings.json",
                "attachmentsPerNamespace": {"team-a": 2, "team-b": 1}},
    "mtu": {"podMtu": {"300": 1350, "301": 1350}, "differ": 7,
            "attachments": [{"attachment": f"vpc-a/c{i}/eth1", "vni": 300, "mtu": 1450,
                             "expected": 1350, "why": "pinned by the network config"}
                            for i in range(7)]},
    "evpn": {"connected": True, "synced": True, "gobgpd": "unix:///run/vpcni/gobgp.sock",
             "peers": {"198.51.100.201": "established", "198.51.100.202": "active"},
             "holdingStale": "no BGP session established (...)", "holdingFor": 12.5,
             "announcing": 5, "remote_type2": 8, "remote_type3": 4},
}


def rows(text: str) -> dict[str, str]:
    return {line[:13].strip(): line[14:] for line in text.splitlines() if line[:13].strip()}


def test_human_status_says_everything_an_operator_asks_first():
    text = format_status(STATUS)
    r = rows(text)
    assert r["agent"].startswith("vpcni 0.1.0, node config /etc/vpcni/node.json")
    assert r["ready"] == "NO: underlay interface eth0 is down (up 3h12m)"
    assert r["backend"] == ("kernel, best available probe: vxlan and bridge support present, "
                            "VTEP 198.51.100.1 on eth0")
    assert r["attachments"] == "3 in 2 VNI(s): VNI 300: 2, VNI 301: 1"
    assert r["EVPN"] == ("gobgpd unix:///run/vpcni/gobgp.sock: connected, initial route dump "
                         "received")
    assert r["sessions"] == ("1 of 2 established: 198.51.100.201 established, "
                             "198.51.100.202 active")
    assert r["remote"] == "HOLDING STALE entries for 12.5s: no BGP session established (...)"
    assert r["routes"] == "announcing 5, received 12 (type-2 8, type-3 4)"
    assert r["tenancy"] == "enforced (bindings /etc/vpcni/tenancy/bindings.json)"
    assert r["namespaces"] == "team-a: 2, team-b: 1"
    assert r["MTU"].startswith("7 attachment(s) not at the MTU they should have")
    listed = [line for line in text.splitlines() if "vpc-a/c" in line]
    assert len(listed) == 5 and "MTU 1450, expected 1350" in listed[0]
    assert "... 2 more (--json lists up to 100)" in text


def test_human_status_of_a_ready_node_without_evpn():
    st = dict(STATUS, ready=True, uptime=42.0, attachmentsPerVni={},
              mtu={"podMtu": {}, "differ": 0, "attachments": []},
              tenancy={"enforced": False, "bindingsFile": "/x", "attachmentsPerNamespace": {}})
    del st["evpn"]
    r = rows(format_status(st))
    assert r["ready"] == "yes (up 42.0s)"
    assert r["EVPN"] == "not configured (static flood lists only)"
    assert "sessions" not in r and "routes" not in r
    assert r["attachments"] == "0 in 0 VNI(s)"
    assert r["tenancy"].startswith("NOT ENFORCED")
    assert r["namespaces"] == "no attachments"
    assert r["MTU"] == "no drift"


def test_human_status_of_an_agent_with_fewer_keys_does_not_fail():
    """An older agent's status (no version, tenancy, mtu) still reads."""
    text = format_status({"ready": True, "uptime": 5000, "backend": {"backend": None,
                                                                     "why": "no usable"}})
    r = rows(text)
    assert r["agent"].startswith("vpcni ?") and r["ready"] == "yes (up 1h23m)"
    assert r["backend"] == "none usable: no usable"
    assert "tenancy" not in r and "MTU" not in r


# ---------------------------------------------------------------- logs

@pytest.fixture
def root_logger():
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    yield root
    for h in root.handlers[:]:
        if h not in saved[0]:
            root.removeHandler(h)
            h.close()
    root.setLevel(saved[1])


def node(tmp_path, fmt=None):
    ns = types.SimpleNamespace(logFile=tmp_path / "log" / "vpcni.log", logLevel="INFO")
    if fmt:
        ns.logFormat = fmt
    return ns


def test_text_log_lines_carry_a_timestamp(tmp_path, root_logger, capfd):
    from vpcni.cni.main import setup_logging

    setup_logging(node(tmp_path))
    log = logging.getLogger("vpcni.test")
    log.info("hello %s", "file")
    log.warning("hello stderr")
    lines = (tmp_path / "log" / "vpcni.log").read_text().splitlines()
    assert len(lines) == 2
    assert all(re.match(ISO + r" \d+ (INFO|WARNING) vpcni\.test: hello", l) for l in lines), lines
    err = capfd.readouterr().err.splitlines()
    assert re.fullmatch(ISO + " vpcni: WARNING hello stderr", err[-1]), err


def test_json_log_lines_parse(tmp_path, root_logger, capfd):
    from vpcni.cni.main import setup_logging

    setup_logging(node(tmp_path, "json"))
    log = logging.getLogger("vpcni.test")
    log.info("plain \"quoted\" and not UTF-8: \udcff")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("it failed")
    lines = [json.loads(l) for l in (tmp_path / "log" / "vpcni.log").read_text().splitlines()]
    assert [l["message"] for l in lines] == ["plain \"quoted\" and not UTF-8: \udcff",
                                             "it failed"]
    for line in lines:
        assert re.fullmatch(ISO, line["time"]) and line["logger"] == "vpcni.test"
        assert isinstance(line["pid"], int)
    assert [l["level"] for l in lines] == ["INFO", "ERROR"]
    assert "exception" not in lines[0]
    assert "Traceback" in lines[1]["exception"] and "ValueError: boom" in lines[1]["exception"]
    err = [json.loads(l) for l in capfd.readouterr().err.splitlines() if l.strip()]
    assert [e["message"] for e in err] == ["it failed"]  # stderr: warnings and up


def test_log_file_is_reopened_after_logrotate_renames_it(tmp_path, root_logger):
    """logrotate (without copytruncate) renames the file and expects the writer to
    make a new one: a WatchedFileHandler notices on the next line."""
    from vpcni.cni.main import setup_logging

    setup_logging(node(tmp_path))
    log = logging.getLogger("vpcni.test")
    path = tmp_path / "log" / "vpcni.log"
    log.info("before rotation")
    path.rename(path.with_name("vpcni.log.1"))
    log.info("after rotation")
    assert "before rotation" in path.with_name("vpcni.log.1").read_text()
    assert "after rotation" not in path.with_name("vpcni.log.1").read_text()
    assert "after rotation" in path.read_text() and "before" not in path.read_text()
    path.unlink()  # removed outright: made again too
    log.info("after removal")
    assert "after removal" in path.read_text()


def test_log_format_is_a_node_config_field(tmp_path):
    from vpcni.core.config import NodeConfig
    from vpcni.core.errors import InvalidConfig

    path = tmp_path / "node.json"
    path.write_text(json.dumps({"vtepAddress": "198.51.100.1", "logFormat": "json"}))
    assert NodeConfig.load(str(path)).logFormat == "json"
    path.write_text(json.dumps({"vtepAddress": "198.51.100.1"}))
    assert NodeConfig.load(str(path)).logFormat == "text"
    path.write_text(json.dumps({"vtepAddress": "198.51.100.1", "logFormat": "xml"}))
    with pytest.raises(InvalidConfig) as info:
        NodeConfig.load(str(path))
    assert "'logFormat'" in info.value.msg and info.value.code == 7


# ---------------------------------------------------------------- metrics

def series(metrics: Metrics) -> set[str]:
    return {line.split("{")[0].split(" ")[0] for line in metrics.render().decode().splitlines()
            if line and not line.startswith("#")}


def test_build_info_and_process_metrics():
    text = Metrics(evpn=False).render().decode()
    version = importlib.metadata.version("vpcni")
    assert (f'vpcni_build_info{{python="{platform.python_version()}",version="{version}"}} 1.0'
            in text or f'vpcni_build_info{{version="{version}",python="{platform.python_version()}"}} 1.0'
            in text), text
    for name in ("process_cpu_seconds_total", "process_resident_memory_bytes",
                 "process_open_fds", "process_start_time_seconds"):
        assert re.search(rf"^{name} \d", text, re.M), name


def test_evpn_metrics_only_where_evpn_is_configured():
    without, with_evpn = series(Metrics(evpn=False)), series(Metrics(evpn=True))
    assert not {s for s in without if s.startswith(("vpcni_evpn_", "vpcni_bgp_"))}, without
    assert "vpcni_evpn_speaker_connected" in with_evpn and "vpcni_evpn_holding_stale" in with_evpn
    m = Metrics(evpn=False)
    assert not hasattr(m, "speaker_up") and not hasattr(m, "bgp_sessions")


def test_error_code_label_is_bounded():
    assert {code_label(c) for c in KNOWN_CODES} == {str(c) for c in KNOWN_CODES}
    for odd in (0, 8, 100, 102, 1000, -1, None, "7", 7.0, True):
        assert code_label(odd) == "other", odd
    m = Metrics(evpn=False)
    for code in (7, 11, 4242, None):
        m.errors.labels("ADD", code_label(code)).inc()
    text = m.render().decode()
    assert 'vpcni_cni_errors_total{code="7",command="ADD"} 1.0' in text \
        or 'vpcni_cni_errors_total{command="ADD",code="7"} 1.0' in text
    totals = [l for l in text.splitlines() if l.startswith("vpcni_cni_errors_total{")]
    assert len(totals) == 3, totals  # 7, 11, other
    assert [l.rpartition(" ")[2] for l in totals if 'code="other"' in l] == ["2.0"], totals


def test_ipam_pool_usage_leaves_out_gateways_and_exclusions():
    from vpcni.ipam.config import parse_settings
    from vpcni.ipam.store import Allocation

    settings = parse_settings({"type": "vpcni-ipam", "ranges": [
        [{"subnet": "172.16.32.0/24"}, {"subnet": "172.16.33.0/28", "rangeStart": "172.16.33.4"}],
        [{"subnet": "fd00::/120"}]],
        "exclude": ["172.16.32.0/28", "172.16.32.10-172.16.32.20", "172.16.33.5"]})
    allocs = [Allocation("n", f"172.16.32.{i}", 0, f"c{i}", "eth1") for i in (30, 31)] + \
             [Allocation("n", "fd00::9", 1, "c9", "eth1")]
    usage = ipam_pool_usage(settings, allocs)
    # /24: 254 hosts; .1-.15 excluded (.1, the gateway, among them) and .16-.20 too.
    # /28 from .4: .4-.14 (11), less .5: 10. Its gateway .1 is below rangeStart.
    assert usage[0] == ("172.16.32.0/24,172.16.33.0/28", 2, 254 - 20 + 10 - 2)
    # /120 (IPv6: no broadcast): ::1-::ff (255), less the gateway ::1.
    assert usage[1] == ("fd00::/120", 1, 254 - 1)


def test_ipam_pool_usage_of_a_full_pool_is_zero_free():
    from vpcni.ipam.config import parse_settings
    from vpcni.ipam.store import Allocation

    settings = parse_settings({"type": "vpcni-ipam", "subnets": ["10.9.0.0/30"]})
    # a /30: .1 (gateway) and .2; two holders (one left from before an exclusion)
    allocs = [Allocation("n", "10.9.0.2", 0, "a", "eth1"), Allocation("n", "10.9.0.3", 0, "b", "e")]
    assert ipam_pool_usage(settings, allocs) == [("10.9.0.0/30", 2, 0)]


# ---------------------------------------------------------------- lab progress

def test_lab_up_reports_each_step(monkeypatch, tmp_path):
    """Lab.up calls progress(elapsed, what) once per step, in order (the steps stubbed)."""
    from vpcni.lab import lab as labmod
    from vpcni.lab.topology import Topology

    topo = Topology.load()
    lab = labmod.Lab(topo, root=tmp_path)
    monkeypatch.setattr(labmod, "Sandbox", lambda **kw: types.SimpleNamespace(prefix="vlx"))
    monkeypatch.setattr(labmod, "Cluster", lambda *a: None)
    for name in ("write_bindings", "_start_reflector", "_start_node", "_save", "down"):
        monkeypatch.setattr(lab, name, lambda *a, **kw: None)
    monkeypatch.setattr(lab, "node", lambda name: types.SimpleNamespace(
        wait_agent_ready=lambda: {"ready": True}))
    monkeypatch.setattr(lab, "wait_sessions", lambda: 1.5)
    monkeypatch.setattr(lab, "wait_converged", lambda: 0.2)

    def add_pod(name, *a):
        lab.pods[name] = name
    monkeypatch.setattr(lab, "add_pod", add_pod)
    seen: list[tuple[float, str]] = []
    lab.up(progress=lambda elapsed, what: seen.append((elapsed, what)))
    steps = [what.split(":")[0] for _, what in seen]
    assert steps == ["reflectors started", "nodes started", "agents ready", "BGP sessions up",
                     "pods attached", "EVPN converged"]
    assert seen[0][1] == "reflectors started: 2 (rr1 frr, rr2 gobgpd)"
    assert seen[2][1] == "agents ready: 3" and seen[4][1] == "pods attached: 6"
    assert seen[3][1] == "BGP sessions up: 6 (3 node(s) x 2 reflector(s))"
    assert [e for e, _ in seen] == sorted(e for e, _ in seen)
    lab2 = labmod.Lab(topo, root=tmp_path / "quiet")
    for name in ("write_bindings", "_start_reflector", "_start_node", "_save", "down",
                 "node", "wait_sessions", "wait_converged", "add_pod"):
        monkeypatch.setattr(lab2, name, getattr(lab, name))
    lab2.up()  # no progress callback: silent, as the tests and benchmarks use it
