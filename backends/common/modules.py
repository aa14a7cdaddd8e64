"""What the running kernel can do, from /sys/module and the module lists."""

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
