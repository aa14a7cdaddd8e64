"""vpcni-ipam served two ways: in-process for vpcni, and as a CNI IPAM plugin executable.

In-process (`"ipam": {"type": "vpcni-ipam"}` in vpcni's config) the handler
gets a `VpcIpam` in place of a delegated plugin: same verbs, no extra
process. The `vpcni-ipam` executable reuses vpcni's CNI layer (environment
checks, version rules, error JSON) with its own config model: any plugin's
network config that has an `ipam` section.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from vpcni.cni import versions
from vpcni.cni.plugin import MAX_STDIN, Dispatcher
from vpcni.core.config import ValidAttachment, raise_validation
from vpcni.core.ipam import Ipam
from vpcni.core.errors import (CheckFailed, InvalidConfig, NotAvailable, TryAgainLater,
                               UnknownContainer)
from vpcni.core.models import NAME_PATTERN, Result

from . import IPAM_TYPE
from .allocator import Allocator, node_name, owner_for
from .config import parse_settings
from .store import Store, open_store

LOG = logging.getLogger(__name__)
_stores: dict[str, Store] = {}
_stores_lock = threading.Lock()


def store_for(settings) -> Store:
    """One store object per store config in this process (the agent serves many calls)."""
    key = settings.store.model_dump_json()
    with _stores_lock:
        if key not in _stores:
            _stores[key] = open_store(settings.store)
        return _stores[key]


class VpcIpam(Ipam):
    """The IPAM verbs for one CNI request (vpcni's Request, or the plugin's own).
    Served in-process by vpcni through the `vpcni.ipam` entry point."""

    keyed_by_attachment = True

    @classmethod
    def check_config(cls, ipam: dict) -> None:
        parse_settings(ipam)

    def __init__(self, req):
        self.req = req
        raw = req.config.ipam
        raw = raw.model_dump() if isinstance(raw, BaseModel) else raw
        self.settings = parse_settings(raw)
        self.network = req.config.name
        self.node = node_name(self.settings, req.env)
        self.allocator = Allocator(self.settings, self.network, store_for(self.settings))

    def add(self) -> Result:
        owner = owner_for(self.network, self.req.container_id, self.req.ifname, self.req.args,
                          self.node)
        result = self.allocator.allocate(owner)
        LOG.info("ipam %s: %s/%s holds %s", self.network, owner.container_id, owner.ifname,
                 [str(ip.address) for ip in result.ips])
        return result

    def delete(self, container_id: Optional[str] = None, ifname: Optional[str] = None) -> None:
        freed = self.allocator.release(container_id or self.req.container_id,
                                       ifname or self.req.ifname)
        if freed:
            LOG.info("ipam %s: freed %s", self.network, [a.ip for a in freed])

    def check(self) -> None:
        held = self.allocator.held(self.req.container_id, self.req.ifname)
        if not held:
            raise UnknownContainer(f"ipam {IPAM_TYPE}: container {self.req.container_id!r} "
                                   f"interface {self.req.ifname!r} holds no address in "
                                   f"network {self.network!r}")
        if len(held) != len(self.allocator.range_sets):
            raise CheckFailed(f"ipam {IPAM_TYPE}: {self.req.container_id}/{self.req.ifname} "
                              f"holds {len(held)} address(es), the config has "
                              f"{len(self.allocator.range_sets)} range set(s)")
        prev = getattr(self.req.config, "prevResult", None)
        if prev is not None:
            # A chain's result may carry other plugins' addresses too: ours must be there.
            reported = {str(ip.address.ip) for ip in prev.ips}
            for a in held:
                if a.ip not in reported:
                    raise CheckFailed(f"ipam {IPAM_TYPE}: {a.ip}, held by "
                                      f"{self.req.container_id}/{self.req.ifname}, is not in "
                                      "prevResult")

    def status(self) -> None:
        try:
            self.allocator.store.ping()
        except TryAgainLater as exc:
            raise NotAvailable(exc.msg) from None

    def gc(self) -> None:
        valid = {(v.containerID, v.ifname) for v in self.req.config.gc_valid() or []}
        freed = self.allocator.gc(valid, self.node)
        if freed:
            LOG.info("ipam %s: GC freed %s", self.network,
                     [f"{a.ip} ({a.container_id}/{a.ifname})" for a in freed])


# ---------------------------------------------------------------- the executable


class IpamNetworkConfig(BaseModel):
    """The keys vpcni-ipam reads of the calling plugin's network config."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)
    cniVersion: str
    name: str = Field(pattern=NAME_PATTERN)
    ipam: dict[str, Any]
    prevResult: Optional[Result] = None
    valid_attachments: Optional[list[ValidAttachment]] = Field(
        default=None, alias="cni.dev/valid-attachments")

    def gc_valid(self) -> Optional[list[ValidAttachment]]:
        return self.valid_attachments


class IpamDispatcher(Dispatcher):
    """vpcni's CNI layer with vpcni-ipam's config and verbs."""

    def parse_config(self, raw: dict) -> IpamNetworkConfig:
        try:
            return IpamNetworkConfig.model_validate(raw)
        except ValidationError as exc:
            raise_validation(exc, "network config", unsupported=InvalidConfig)
            raise

    def _call(self, req, version: str) -> tuple[str, int]:
        ipam = VpcIpam(req)
        if req.command == "ADD":
            return json.dumps(versions.convert(ipam.add(), version)), 0
        {"DEL": ipam.delete, "CHECK": ipam.check, "STATUS": ipam.status,
         "GC": ipam.gc}[req.command]()
        return "", 0


def serve(stdin: bytes) -> int:
    """Serve one CNI invocation in this process: the `vpcni-ipam` console script, and
    the shim's standalone mode (`python -m vpcni.ipam.plugin`). In agent mode the shim
    installed as vpcni-ipam forwards the call, and the agent runs IpamDispatcher."""
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format=f"{IPAM_TYPE}: %(levelname)s %(message)s")
    out, rc = IpamDispatcher().run(os.environ, stdin)
    if out:
        sys.stdout.write(out + "\n")
    sys.stdout.flush()
    return rc


def main() -> int:
    # Never more than the largest config plus one byte (that one says "too large").
    return serve(sys.stdin.buffer.read(MAX_STDIN + 1))


if __name__ == "__main__":
    sys.exit(main())
