"""A switch backend and an interface provider composed the way core's handler does,
for tests that drive backends directly (without the store and IPAM around them)."""

from __future__ import annotations

from vpcni.core.errors import CheckFailed
from vpcni.core.models import Attachment, VpcNetwork


class Composed:
    def __init__(self, switch, provider):
        self.switch, self.provider = switch, provider

    def attach(self, net: VpcNetwork, att: Attachment) -> Attachment:
        att = att.model_copy(update={"host_ifname": self.switch.port_name(att)})
        att, leftovers = self.provider.plug(net, att, self.switch.pod_mtu(net),
                                            self.switch.describe())
        try:
            if leftovers:
                self.switch.remove_port(att.model_copy(update={"mac": None}))
            self.switch.add_port(net, att)
        except BaseException:
            self.provider.unplug(att)
            raise
        return att

    def detach(self, att: Attachment) -> None:
        if att.host_ifname is None:
            att = att.model_copy(update={"host_ifname": self.switch.port_name(att)})
        self.switch.remove_port(att)
        self.provider.unplug(att)

    def check(self, net: VpcNetwork, att: Attachment) -> None:
        problems = self.provider.check(att) + self.switch.check_port(net, att)
        if problems:
            raise CheckFailed(f"attachment {'/'.join(att.key)}: " + "; ".join(problems))
