"""The controller as a kopf operator: handlers that call `vpcni.controller.api`.

Thin on purpose: every decision is in `logic`, every read and write in `api`.
Vpc create/update/resume reconcile the Vpc; a timer reconciles it again every
`statusInterval` seconds (status counts, namespaces that appeared, a
bindings document another writer changed); delete releases its NADs and VNI.
kopf runs these sync handlers in worker threads; the reconcile steps are safe
for that (optimistic concurrency on the API server, one bindings writer).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Optional

import kopf
from pydantic import ValidationError

from vpcni.core.config import first_error

from . import api as steps
from .logic import GROUP, VERSION, ControllerConfig

LOG = logging.getLogger(__name__)

DEFAULT_CONFIG = "/etc/vpcni/controller.json"
CONFIG_ENV = "VPCNI_CONTROLLER_CONFIG"
FINALIZER = "vpcni.io/controller"


def load_config(path: Optional[str] = None) -> ControllerConfig:
    path = path or os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG
    try:
        with open(path, "rb") as f:
            raw = json.load(f)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"controller config {path}: cannot read JSON: {exc}") from None
    try:
        return ControllerConfig.model_validate(raw)
    except ValidationError as exc:
        _, field, _, msg = first_error(exc)
        raise SystemExit(f"controller config {path}: {field or '(config)'}: {msg}") from None


def operator_settings() -> kopf.OperatorSettings:
    """kopf keeps its progress and last-handled spec in annotations (status is the
    controller's own), under vpcni.io; its finalizer is named for vpcni."""
    settings = kopf.OperatorSettings()
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=GROUP)
    settings.persistence.finalizer = FINALIZER
    settings.posting.level = logging.WARNING
    return settings


def _plain(body: Any) -> dict:
    """kopf's read-only Body as a plain dict (what the reconcile steps take)."""
    return json.loads(json.dumps(dict(body), default=dict))


def make_registry(cfg: ControllerConfig, api: steps.KubeApi, store: Any = None
                  ) -> kopf.OperatorRegistry:
    """The handlers, on a registry of their own (importing this module registers nothing)."""
    registry = kopf.OperatorRegistry()
    vpcs = dict(group=GROUP, version=VERSION, plural="vpcs", registry=registry)

    @kopf.on.login(registry=registry)
    def login(**kwargs):
        return kopf.login_via_client(**kwargs)

    @kopf.on.resume(**vpcs)
    @kopf.on.create(**vpcs)
    @kopf.on.update(**vpcs, field="spec")
    def reconcile(body, **_):
        status = steps.reconcile_vpc(api, _plain(body), cfg, store)
        if status and status.get("phase") == "Pending":
            # Pool exhausted, a namespace missing: not an error; the timer tries again.
            LOG.info("Vpc %s: %s", body["metadata"]["name"], status.get("message"))

    @kopf.timer(**vpcs, interval=cfg.statusInterval, initial_delay=cfg.statusInterval)
    def refresh(body, **_):
        steps.reconcile_vpc(api, _plain(body), cfg, store)

    @kopf.on.delete(**vpcs)
    def finalize(body, **_):
        steps.finalize_vpc(api, _plain(body), cfg)

    return registry


def run(cfg: ControllerConfig, standalone: bool = False, peering: Optional[str] = None,
        liveness: Optional[str] = None) -> None:
    """Run until interrupted: needs a reachable API server (in-cluster service account or
    kubeconfig) with the Vpc and VniClaim CRDs, and vpcni-ipam's etcd for status counts."""
    from vpcni.ipam.store import open_store

    api = steps.KubernetesApi.from_environment()
    store = open_store(cfg.ipamStore)
    registry = make_registry(cfg, api, store)
    kopf.run(registry=registry, settings=operator_settings(), clusterwide=True,
             standalone=standalone, peering_name=peering, liveness_endpoint=liveness)
