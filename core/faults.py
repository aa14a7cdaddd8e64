"""Fault injection for crash tests: the process kills itself (SIGKILL) at a named point.

`VPCNI_FAULT=<point>` in the agent's (or the standalone plugin's) environment
arms one point; `fault("<point>")` at that point in the ADD or DEL path then
ends the process as a crash, an OOM kill or a node reboot would: no cleanup,
no reply. Unset (production), `fault()` is a dictionary lookup and nothing
else. The points are listed in POINTS; tests/functional/test_crash.py kills
the agent at each and checks what the next ADD, DEL and GC make of it.
"""

from __future__ import annotations

import os
import signal

POINTS = (
    "add.recorded",        # the intent record written, nothing built
    "add.network",         # the VNI's bridge and VXLAN device in place
    "veth.created",        # the veth pair created, not yet marked (alias) as the attachment's
    "veth.plugged",        # the pod's interface configured
    "add.port",            # the port in the switch, filters set; the record still 'adding'
    "del.port",            # DEL: the port's filters removed
    "del.unplugged",       # DEL: the interface removed; the record still there
)

_ARMED = os.environ.get("VPCNI_FAULT")


def fault(point: str) -> None:
    """Die here when `point` is armed."""
    if _ARMED is not None and _ARMED == point:
        os.kill(os.getpid(), signal.SIGKILL)
