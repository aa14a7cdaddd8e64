"""A lab from a topology text, up under a unique name for one test module, always taken down."""

from __future__ import annotations

import os
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from vpcni.lab.cluster import installed_executable
from vpcni.lab.lab import Lab


@contextmanager
def lab_up(directory: Path, text: str, default_name: str) -> Iterator[tuple[Lab, str]]:
    """`vpcnictl lab up` of topology `text` (whose name is `default_name`) renamed to a
    unique name; (the lab, what `up` printed). `vpcnictl lab down` at the end."""
    name = f"{default_name[0]}{os.urandom(3).hex()}"
    topo = Path(directory) / "topology.toml"
    topo.write_text(text.replace(f'name = "{default_name}"', f'name = "{name}"', 1))
    try:
        proc = subprocess.run([installed_executable("vpcnictl"), "lab", "up", str(topo)],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        yield Lab.load(name), proc.stdout
    finally:
        subprocess.run([installed_executable("vpcnictl"), "lab", "down", name],
                       capture_output=True, timeout=300)
