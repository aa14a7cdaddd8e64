"""Install the shim into a CNI bin dir (what the CNI install DaemonSet does)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from . import shim


def install_shim(dest: Path, interpreter: str = "/usr/bin/python3",
                 standalone_python: str = sys.executable) -> Path:
    """Write the stdlib-only shim as `dest/vpcni`, run by `interpreter -S`.

    `-S` skips site-packages: the shim needs none, and it saves most of
    Python's start-up. Standalone mode re-executes with `standalone_python`,
    the interpreter that has vpcni installed.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    body = Path(shim.__file__).read_text()
    marker = "STANDALONE_PYTHON = None"
    if marker not in body:
        raise RuntimeError(f"{shim.__file__} lacks {marker!r}")
    body = body.replace(marker, f"STANDALONE_PYTHON = {standalone_python!r}", 1)
    target = dest / "vpcni"
    tmp = dest / ".vpcni.tmp"
    tmp.write_text(f"#!{interpreter} -S\n{body}")
    os.chmod(tmp, 0o755)
    os.replace(tmp, target)
    return target
