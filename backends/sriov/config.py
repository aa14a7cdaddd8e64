"""The sriov provider's node config section `sriov` (docs/backends/sriov.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator


class SriovConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # Where PFs, VFs, drivers and representors are read (tests and the lab point
    # it at a simulated NIC's tree).
    sysfsRoot: Path = Path("/sys")
    # Who applies VF settings: the kernel's PF driver over netlink (real NICs), or
    # the lab's simulated NIC (SimulatedPfDriver, its state file below).
    pfDriver: Literal["netlink", "simulated"] = "netlink"
    simulatedStateFile: Optional[Path] = None
    # PFs whose VFs this node hands out when no deviceID names one (empty: all).
    pfs: list[str] = Field(default=[], max_length=64)
    # This node is a DPU's host: the eswitch and the representors are on the DPU
    # (switch backend `dpu`), so a PF with VFs serves VPCs whatever the host sees.
    dpuHost: bool = False

    @model_validator(mode="after")
    def _simulated_needs_state(self) -> "SriovConfig":
        if self.pfDriver == "simulated" and self.simulatedStateFile is None:
            raise ValueError("pfDriver 'simulated' needs simulatedStateFile (the simulated "
                             "NIC's state file)")
        return self
