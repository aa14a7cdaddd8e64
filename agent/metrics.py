"""Prometheus metrics of one agent (its own registry, so several agents can share a process in tests)."""

from __future__ import annotations

import platform

from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector,
                               generate_latest)

LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
# The CNI error codes vpcni answers with (docs/configuration.md, "Error codes"): the
# `code` label of vpcni_cni_errors_total takes these, anything else (a delegated IPAM
# plugin's own code) is "other", so that callers cannot grow the series.
KNOWN_CODES = frozenset({1, 2, 3, 4, 5, 6, 7, 11, 50, 101, 999})


def package_version() -> str:
    """vpcni's version: the installed package's metadata (pyproject.toml's), the one
    source `vpcnictl --version`, the agent's status and vpcni_build_info read."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("vpcni")
    except PackageNotFoundError:
        return "unknown (not installed)"


def code_label(code) -> str:
    """The `code` label of a CNI error code: a known code, else "other"."""
    known = isinstance(code, int) and not isinstance(code, bool) and code in KNOWN_CODES
    return str(code) if known else "other"


class Metrics:
    """`evpn`: the node has an EVPN speaker; its metrics (speaker, routes, sessions,
    holding stale) exist only then: no "speaker disconnected" on a node without one."""

    def __init__(self, evpn: bool = True) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        # process_cpu_seconds_total, process_resident_memory_bytes, process_open_fds, ...
        ProcessCollector(registry=r)
        self.build_info = Gauge("vpcni_build_info", "vpcni's version and the Python it runs "
                                "on (always 1)", ["version", "python"], registry=r)
        self.build_info.labels(package_version(), platform.python_version()).set(1)
        self.requests = Counter("vpcni_cni_requests", "CNI requests served by the agent",
                                ["command", "result"], registry=r)
        self.errors = Counter("vpcni_cni_errors", "CNI requests the agent answered with an "
                              "error, by CNI error code (known codes, else other)",
                              ["command", "code"], registry=r)
        self.latency = Histogram("vpcni_cni_request_duration_seconds",
                                 "Time to serve a CNI request in the agent", ["command"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.attachments = Gauge("vpcni_attachments", "Attachments on this node per VNI",
                                 ["vni"], registry=r)
        self.ipam_addresses = Gauge(
            "vpcni_ipam_addresses",
            "vpcni-ipam pools of the networks this node's attachments use (cluster-wide): "
            "addresses held (used) and still to hand out (free) per range set",
            ["network", "pool", "state"], registry=r)
        self.evpn = evpn
        if evpn:
            self.routes_announced = Gauge("vpcni_evpn_routes_announced",
                                          "EVPN routes this node originates", ["type"],
                                          registry=r)
            self.routes_received = Gauge("vpcni_evpn_routes_received",
                                         "EVPN routes received for VNIs present on this node",
                                         ["type"], registry=r)
            self.speaker_up = Gauge("vpcni_evpn_speaker_connected",
                                    "1 when the agent is connected to its gobgpd", registry=r)
            self.holding_stale = Gauge(
                "vpcni_evpn_holding_stale",
                "1 while the node keeps remote entries learned before the control plane went "
                "away (no BGP session, gobgpd unreachable) or while it resynchronises",
                registry=r)
            self.bgp_sessions = Gauge("vpcni_bgp_sessions",
                                      "The node gobgpd's BGP sessions to route reflectors",
                                      ["state"], registry=r)
        self.reconciles = Counter("vpcni_reconcile_runs", "Reconcile loop runs", ["result"],
                                  registry=r)
        self.last_full_reconcile = Gauge(
            "vpcni_reconcile_full_seconds",
            "The last full reconcile pass: CPU time of the reconcile thread, and wall time",
            ["kind"], registry=r)
        self.pending_del = Gauge("vpcni_pending_del", "DELs spooled while the agent was away",
                                 registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _uncovered(first: int, last: int, spans: list[tuple[int, int]]) -> int:
    """How many of first..last no span (sorted by start) covers."""
    count, at = 0, first
    for a, b in spans:
        if b < at:
            continue
        if a > last:
            break
        if a > at:
            count += a - at
        at = max(at, b + 1)
        if at > last:
            return count
    return count + max(0, last - at + 1)


def ipam_pool_usage(settings, allocations) -> list[tuple[str, int, int]]:
    """(pool, used, free) per range set of a vpcni-ipam network's settings, given the
    network's allocations: `pool` names the range set's subnets; free counts the
    addresses the allocator may still hand out (gateways and exclusions never are;
    addresses reserved for a pod count as free until that pod holds them)."""
    range_sets = settings.range_sets()
    gateways = {(r.subnet.version, int(r.gateway_address())) for rs in range_sets for r in rs}
    excluded = list(settings.excluded())
    held: dict[int, int] = {}
    for a in allocations:
        held[a.rangeset] = held.get(a.rangeset, 0) + 1
    out = []
    for index, rs in enumerate(range_sets):
        version = rs[0].subnet.version
        spans = sorted([(g, g) for v, g in gateways if v == version]
                       + [(a, b) for v, a, b in excluded if v == version])
        size = sum(_uncovered(*r.bounds(), spans) for r in rs)
        used = held.get(index, 0)
        out.append((",".join(str(r.subnet) for r in rs), used, max(0, size - used)))
    return out
