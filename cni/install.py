"""Install `vpcni` and `vpcni-ipam` into a CNI bin dir (what the CNI install DaemonSet does).

The executable runtimes exec is the static Go forwarder (cni/goshim/main.go),
built here with the Go toolchain (CGO_ENABLED=0: no libc, no Python needed on
the host) and cached per source and standalone interpreter. cni/shim.py is
the same forwarder in Python, run by `python3 -S`: `kind="python"` installs it
(hosts without a Go toolchain at install time).

`vpcni-ipam` is the same file under a second name (a hard link, else a copy):
run as vpcni-ipam the forwarder serves the CNI IPAM plugin, so that plugins
delegating to it (and chained configs) find it in the bin dir on a host that
has no Python with vpcni: in agent mode the agent runs it, in standalone mode
the standalone interpreter does (`-m vpcni.ipam.plugin`).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

from . import shim

GO_SOURCE = Path(__file__).with_name("goshim") / "main.go"
# What install_shim() puts into the bin dir: one program under both names.
NAMES = ("vpcni", "vpcni-ipam")
CACHE = Path(os.environ.get("VPCNI_BUILD_CACHE", "/var/cache/vpcni"))


class ShimBuildError(RuntimeError):
    pass


def go_toolchain() -> Optional[str]:
    return shutil.which("go")


def build_go_shim(standalone_python: str, cache: Path = CACHE) -> Path:
    """The Go shim for `standalone_python`, built once per source and interpreter
    (an image ships it prebuilt in the cache: no Go toolchain needed then)."""
    source = GO_SOURCE.read_bytes()
    key = hashlib.sha256(source + b"\0" + standalone_python.encode()).hexdigest()[:16]
    binary = cache / "shim" / key / "vpcni"
    if binary.exists():
        return binary
    go = go_toolchain()
    if go is None:
        raise ShimBuildError("no Go toolchain (`go`) in PATH to build the vpcni shim")
    binary.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, CGO_ENABLED="0", GO111MODULE="off",
               GOPATH=str(cache / "gopath"), GOCACHE=str(cache / "gocache"))
    with tempfile.TemporaryDirectory(dir=binary.parent) as tmp:
        out = Path(tmp) / "vpcni"
        proc = subprocess.run(
            [go, "build", "-trimpath",
             "-ldflags", f"-s -w -X main.standalonePython={standalone_python}",
             "-o", str(out), str(GO_SOURCE)],
            env=env, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise ShimBuildError(f"go build of {GO_SOURCE} failed: {proc.stderr.strip()}")
        os.replace(out, binary)
    return binary


def install_shim(dest: Path, interpreter: str = "/usr/bin/python3",
                 standalone_python: str = sys.executable, kind: str = "go") -> Path:
    """Install `dest/vpcni` and `dest/vpcni-ipam` (see NAMES): the Go shim (default),
    or the Python one run by `interpreter -S` (`kind="python"`). Standalone mode runs
    `standalone_python`, the interpreter that has vpcni installed. Each name is
    replaced atomically (a runtime exec'ing the old file meanwhile is unaffected).
    Returns the path of `vpcni`; `vpcni-ipam` is beside it."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / NAMES[0]
    tmp = dest / f".{NAMES[0]}.tmp"
    if kind == "go":
        shutil.copyfile(build_go_shim(standalone_python), tmp)
    else:
        body = Path(shim.__file__).read_text()
        marker = "STANDALONE_PYTHON = None"
        if marker not in body:
            raise RuntimeError(f"{shim.__file__} lacks {marker!r}")
        body = body.replace(marker, f"STANDALONE_PYTHON = {standalone_python!r}", 1)
        tmp.write_text(f"#!{interpreter} -S\n{body}")
    os.chmod(tmp, 0o755)
    for name in NAMES[1:]:
        other = dest / f".{name}.tmp"
        other.unlink(missing_ok=True)
        try:
            os.link(tmp, other)
        except OSError:  # a file system without hard links
            shutil.copy2(tmp, other)
        os.replace(other, dest / name)
    os.replace(tmp, target)
    return target
