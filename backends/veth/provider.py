"""The veth interface provider (entry point `veth` in `vpcni.interfaces`).

    pod netns                        node netns
    <CNI_IFNAME> (addresses, routes) ── veth ── <port name from the switch> ── the switch

The pod end is born inside the pod's namespace (no moment in the node's) with
the network's MTU and the requested MAC; both ends carry the attachment's
alias, the mark that says whose they are. The node end is left down and
unenslaved: the switch backend puts it into its switch and brings it up.
"""

from __future__ import annotations

import errno
import logging
from contextlib import ExitStack

from pyroute2.netlink.exceptions import NetlinkError

from vpcni.backends.common import podif
from vpcni.backends.common.podif import delete_if_exists, describe, get_link
from vpcni.backends.common.rtnl import ThreadRtnl
from vpcni.backends.common.underlay import netlink_errors
from vpcni.backends.common.modules import kernel_support
from vpcni.core.backend import InterfaceProvider
from vpcni.core.faults import fault
from vpcni.core.config import NodeConfig
from vpcni.core.errors import BackendError
from vpcni.core.models import Attachment, Capabilities, Probe, VpcNetwork

LOG = logging.getLogger(__name__)


class VethProvider(InterfaceProvider):
    name = "veth"
    kinds = ("veth",)

    def __init__(self, node: NodeConfig):
        super().__init__(node)
        self.ipr = ThreadRtnl()

    def close(self) -> None:
        self.ipr.close()

    @classmethod
    def probe(cls, node: NodeConfig) -> Probe:
        # Built-in veth leaves no trace in /sys/module (and /lib/modules may be
        # absent in a container): unknown is not "missing"; creating the pair says.
        how = kernel_support("veth") or "built-in or unlisted"
        return Probe(name=cls.name, available=True, score=10, facts={"veth": how},
                     reason=f"veth pairs (kernel support: {how})")

    def _remove_leftovers(self, pod_ns: podif.PodNetns, att: Attachment, host: str,
                          alias: str) -> bool:
        """Undo what a crashed earlier plug of this attachment left; True when it did."""
        found = False
        link = get_link(self.ipr, host)
        if link is not None:
            # Ours: marked as this attachment's, or created by vpcni and never marked
            # (a crash between the two requests; the name is this attachment's).
            if link.get("IFLA_IFALIAS") != alias and not podif.unclaimed(link):
                raise BackendError(f"interface {host} exists in the node namespace and is not "
                                   f"vpcni's (alias {link.get('IFLA_IFALIAS')!r})")
            with netlink_errors(f"could not delete leftover {host}"):
                delete_if_exists(self.ipr, host)
            found = True
        pod = get_link(pod_ns.ipr, att.ifname)
        if pod is not None:
            if pod.get("IFLA_IFALIAS") != alias and not podif.unclaimed(pod):
                raise BackendError(f"interface {att.ifname} already exists in netns {att.netns}")
            with netlink_errors(f"could not delete leftover {att.ifname} in netns {att.netns}"):
                delete_if_exists(pod_ns.ipr, att.ifname)
            found = True
        return found

    def _undo(self, host: str) -> None:
        try:
            delete_if_exists(self.ipr, host)
        except NetlinkError as exc:
            LOG.error("rollback: could not delete %s: %s", host, describe(exc))

    def plug(self, net: VpcNetwork, att: Attachment, mtu: int,
             switch: Capabilities) -> tuple[Attachment, bool]:
        host = att.host_ifname
        alias = podif.attachment_alias(*att.key)
        with podif.open_netns(att.netns) as pod_ns, ExitStack() as undo:
            peer = {"ifname": att.ifname, "mtu": mtu, "group": podif.LINK_GROUP}
            if att.mac:
                peer["address"] = att.mac
            leftovers = False
            with podif.netns_fd(att.netns) as fd, netlink_errors(
                    f'could not create veth "{host}" with peer {att.ifname} in netns {att.netns}'):
                peer["net_ns_fd"] = fd
                try:
                    self.ipr.link("add", ifname=host, kind="veth", mtu=mtu, peer=peer,
                                      group=podif.LINK_GROUP)
                except NetlinkError as exc:
                    # One end exists: what a crashed earlier ADD of this attachment left
                    # (removed, then created again), or someone else's (an error).
                    if exc.code != errno.EEXIST:
                        raise
                    leftovers = self._remove_leftovers(pod_ns, att, host, alias)
                    self.ipr.link("add", ifname=host, kind="veth", mtu=mtu, peer=peer,
                                      group=podif.LINK_GROUP)
            undo.callback(self._undo, host)
            fault("veth.created")
            with netlink_errors(f'could not mark "{host}"'):
                podif.claim_port_named(self.ipr, host, alias)
            with netlink_errors(f"could not configure {att.ifname} in netns {att.netns}"):
                pod = podif.configure_interface(pod_ns, att.ifname, att.ips, att.routes,
                                                alias=alias)
            if switch.pod_tx_checksum_off:
                with netlink_errors(f"could not turn tx checksum offload off on {att.ifname} "
                                    f"in netns {att.netns}"):
                    podif.disable_tx_checksum(att.netns, att.ifname)
            undo.pop_all()
        return att.model_copy(update={"mac": pod.mac, "mtu": pod.mtu, "interface": "veth",
                                      "provider": self.name}), leftovers

    def unplug(self, att: Attachment) -> None:
        alias = podif.attachment_alias(*att.key)
        if att.host_ifname and podif.delete_host_link(self.ipr, att.host_ifname, att, alias):
            return  # a veth pair goes as a whole: the pod's end went with ours
        podif.delete_pod_interface(att, alias)

    def check(self, att: Attachment) -> list[str]:
        return podif.check_pod(att)

    def set_mtu(self, att: Attachment, mtu: int) -> bool:
        # Both ends of the pair: the pod's and the switch's port.
        podif.set_mtu(self.ipr, att, mtu)
        return True

    def reap_unclaimed(self, in_use) -> list[str]:
        candidates = [link.get("IFLA_IFNAME") for link in self.ipr.link("dump")
                      if podif.unclaimed(link)
                      and link.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND") == "veth"]
        if not candidates:
            return []
        names = in_use()  # after the listing: an ADD under way has its record by now
        reaped = []
        for name in candidates:
            if name in names:
                continue
            with netlink_errors(f"could not delete unclaimed {name}"):
                link = get_link(self.ipr, name)
                if link is not None and podif.unclaimed(link) and \
                        delete_if_exists(self.ipr, name):
                    reaped.append(name)
        return reaped

    def owned(self) -> dict[str, tuple[str, str, str]]:
        out = {}
        for link in self.ipr.link("dump"):
            key = podif.alias_attachment(link.get("IFLA_IFALIAS"))
            if key is not None and link.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND") == "veth":
                out[link.get("IFLA_IFNAME")] = key
        return out
