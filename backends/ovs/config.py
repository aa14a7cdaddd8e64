"""The ovs backend's node config section `ovs` (docs/configuration.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

from vpcni.core.models import NAME_PATTERN


class OvsConfig(BaseModel):
    """The node's Open vSwitch, as the ovs backend uses it (docs/backends/ovs.md)."""

    model_config = ConfigDict(extra="forbid")
    # OVS_RUNDIR: ovs-vswitchd's pid file and each bridge's OpenFlow socket
    # (<bridge>.mgmt) are here, and by default the OVSDB socket (db.sock).
    runDir: Path = Path("/run/openvswitch")
    ovsdbSocket: Optional[Path] = None
    # The integration bridge: created if missing, shared with others if it exists
    # (vpcni only touches its own ports and flows).
    bridge: str = Field(default="br-int", pattern=NAME_PATTERN, max_length=15)
    # system: the kernel datapath (production); netdev: the userspace datapath,
    # for nodes without the openvswitch kernel module.
    datapathType: Literal["system", "netdev"] = "system"
    # other_config:hw-offload: null follows the node (on when a NIC in switchdev mode
    # is found under sysfsRoot); true/false decide. ovs-vswitchd reads it at start.
    hwOffload: Optional[bool] = None
    sysfsRoot: Path = Path("/sys")

    @property
    def db_socket(self) -> Path:
        return self.ovsdbSocket or self.runDir / "db.sock"
