"""Prometheus metrics of one agent (its own registry, so several agents can share a process in tests)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("vpcni_cni_requests", "CNI requests served by the agent",
                                ["command", "result"], registry=r)
        self.latency = Histogram("vpcni_cni_request_duration_seconds",
                                 "Time to serve a CNI request in the agent", ["command"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.attachments = Gauge("vpcni_attachments", "Attachments on this node per VNI",
                                 ["vni"], registry=r)
        self.routes_announced = Gauge("vpcni_evpn_routes_announced",
                                      "EVPN routes this node originates", ["type"], registry=r)
        self.routes_received = Gauge("vpcni_evpn_routes_received",
                                     "EVPN routes received for VNIs present on this node",
                                     ["type"], registry=r)
        self.speaker_up = Gauge("vpcni_evpn_speaker_connected",
                                "1 when the agent is connected to its gobgpd", registry=r)
        self.holding_stale = Gauge(
            "vpcni_evpn_holding_stale",
            "1 while the node keeps remote entries learned before the control plane went "
            "away (no BGP session, gobgpd unreachable) or while it resynchronises", registry=r)
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
