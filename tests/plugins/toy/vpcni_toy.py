"""A third-party switch backend for vpcni's contract test: one Linux bridge per VNI on the
node, no overlay (pods of a VNI meet on one node only). It uses only vpcni's public
contract (vpcni.core.backend.Backend) and pyroute2; vpcni's core knows nothing of it."""

from __future__ import annotations

import errno
import hashlib

from pydantic import BaseModel, ConfigDict
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from vpcni.core.backend import Backend
from vpcni.core.errors import BackendError
from vpcni.core.models import Attachment, Capabilities, Owned, Probe, RemoteState, VpcNetwork


class ToyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    mtu: int = 1400


class ToyBackend(Backend):
    name = "toy"
    config_model = ToyConfig

    def __init__(self, node):
        super().__init__(node)
        self.ipr = IPRoute()

    def close(self) -> None:
        self.ipr.close()

    @classmethod
    def probe(cls, node) -> Probe:
        # Never the best choice: only a network or node that pins it gets it.
        return Probe(name=cls.name, available=True, score=0, reason="a Linux bridge per VNI")

    def describe(self) -> Capabilities:
        return Capabilities(ports=["veth"], port_prefix="ty")

    def port_name(self, att: Attachment) -> str:
        return "ty" + hashlib.sha256("/".join(att.key).encode()).hexdigest()[:11]

    def pod_mtu(self, net: VpcNetwork) -> int:
        return net.mtu or self.settings.mtu

    def _link(self, name: str):
        try:
            return self.ipr.link("get", ifname=name)[0]
        except NetlinkError as exc:
            if exc.code == errno.ENODEV:
                return None
            raise

    def ensure_network(self, net: VpcNetwork) -> None:
        name = f"toy{net.vni}"
        if self._link(name) is None:
            try:
                self.ipr.link("add", ifname=name, kind="bridge")
            except NetlinkError as exc:
                if exc.code != errno.EEXIST:
                    raise
        self.ipr.link("set", index=self._link(name)["index"], state="up")

    def release_network(self, vni: int) -> None:
        link = self._link(f"toy{vni}")
        if link is not None:
            self.ipr.link("del", index=link["index"])

    def add_port(self, net: VpcNetwork, att: Attachment) -> None:
        bridge, port = self._link(f"toy{net.vni}"), self._link(att.host_ifname)
        if bridge is None or port is None:
            raise BackendError(f"toy: bridge toy{net.vni} or port {att.host_ifname} missing")
        self.ipr.link("set", index=port["index"], master=bridge["index"], state="up")

    def remove_port(self, att: Attachment) -> None:
        port = self._link(att.host_ifname or self.port_name(att))
        if port is not None:
            self.ipr.link("set", index=port["index"], master=0)

    def check_port(self, net: VpcNetwork, att: Attachment) -> list[str]:
        bridge, port = self._link(f"toy{net.vni}"), self._link(att.host_ifname)
        if bridge is None or port is None or port.get("IFLA_MASTER") != bridge["index"]:
            return [f"toy: {att.host_ifname} is not in toy{net.vni}"]
        return []

    def apply_remote(self, vni: int, remote: RemoteState) -> None:
        return None  # no overlay: nothing remote to reach

    def owned(self) -> Owned:
        vnis = {int(l.get("IFLA_IFNAME")[3:]) for l in self.ipr.link("dump")
                if l.get("IFLA_IFNAME", "").startswith("toy")
                and l.get("IFLA_IFNAME")[3:].isdigit()}
        return Owned(vnis=vnis)
