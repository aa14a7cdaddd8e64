"""What the running kernel and its NICs can do, from sysfs and the module lists."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional

SYS_MODULE = Path("/sys/module")
LIB_MODULES = Path("/lib/modules")


def kernel_support(module: str) -> Optional[str]:
    """'loaded', 'built-in' or 'loadable' when the kernel can do `module`, else None."""
    if (SYS_MODULE / module).is_dir():
        return "loaded"
    pattern = re.compile(rf"(^|/){re.escape(module)}\.ko", re.MULTILINE)
    release = LIB_MODULES / os.uname().release
    for listing, how in (("modules.builtin", "built-in"), ("modules.dep", "loadable")):
        try:
            if pattern.search((release / listing).read_text()):
                return how
        except OSError:
            continue
    return None


def switchdev_ports(sysfs_root: Path = Path("/sys")) -> list[str]:
    """Netdevs of NICs whose embedded switch is in switchdev mode (mlx5's
    `compat/devlink/mode`), whose representors can carry offloaded flows."""
    found = []
    try:
        names = sorted(p.name for p in (Path(sysfs_root) / "class" / "net").iterdir())
    except OSError:
        return found
    for name in names:
        try:
            mode = (Path(sysfs_root) / "class" / "net" / name / "compat" / "devlink" /
                    "mode").read_text().strip()
        except OSError:
            continue
        if mode == "switchdev":
            found.append(name)
    return found
