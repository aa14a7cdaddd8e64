"""Generate the Python gRPC stubs of gobgpd's API into vpcni/evpn/gobgpapi/.

Run when the package is built, never committed: setup.py's build_py calls
generate() (grpcio-tools is a [build-system] requirement, not a runtime one),
into the wheel's build directory or, for an editable install, the source tree.
By hand: `python -m vpcni.evpn.genstubs [--out DIR]` (needs grpcio-tools).
Standard library only at import: setup.py loads this file by path.

The stubs must describe the daemon that runs beside the agent, so this
refuses unless `gobgpd --version` is 3.10.x and the .proto tree (Debian's
golang-github-osrg-gobgp-dev) is the same release. It is idempotent: each
generated file starts with a stamp of its inputs, and nothing is rewritten
while every stamp matches.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.resources
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

PROTO_DIR = Path("/usr/share/gocode/src/github.com/osrg/gobgp/api")
PROTOS = ("gobgp.proto", "attribute.proto", "capability.proto")
PINNED_SERIES = (3, 10)
OUT_DIR = Path(__file__).resolve().parent / "gobgpapi"
STAMP_PREFIX = "# vpcni-genstubs: "

# protoc emits `import gobgp_pb2 as gobgp__pb2` (top-level modules); inside our
# package these must be relative.
_ABSOLUTE_IMPORT = re.compile(r"^import (\w+_pb2) as (\w+)$", re.MULTILINE)


class StubError(Exception):
    """The stubs cannot be generated; the message says what to install or fix."""


def _series(text: str) -> Optional[tuple[int, int, int]]:
    m = re.search(r"\b(\d+)\.(\d+)\.(\d+)\b", text)
    return (int(m.group(1)), int(m.group(2)), int(m.group(3))) if m else None


def gobgpd_version(gobgpd: str = "gobgpd") -> tuple[int, int, int]:
    """The version the installed daemon reports, e.g. (3, 10, 0)."""
    exe = shutil.which(gobgpd)
    if exe is None:
        raise StubError(f"{gobgpd!r} not found in PATH: install Debian package gobgpd "
                        f"{PINNED_SERIES[0]}.{PINNED_SERIES[1]}")
    proc = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30)
    version = _series(proc.stdout + proc.stderr)
    if proc.returncode != 0 or version is None:
        raise StubError(f"cannot read the version of {exe}: `{exe} --version` -> "
                        f"{proc.returncode}: {(proc.stdout + proc.stderr).strip()!r}")
    return version


def proto_tree_version(proto_dir: Path) -> Optional[tuple[int, int, int]]:
    """The release of the source tree the .proto files ship in, when it says."""
    version_go = proto_dir.parent / "internal" / "pkg" / "version" / "version.go"
    try:
        text = version_go.read_text()
    except OSError:
        return None
    parts = [re.search(rf"const {k} uint = (\d+)", text) for k in ("MAJOR", "MINOR", "PATCH")]
    if not all(parts):
        return None
    return tuple(int(m.group(1)) for m in parts)  # type: ignore[union-attr,return-value]


def check_inputs(proto_dir: Path, gobgpd: str = "gobgpd") -> tuple[int, int, int]:
    """Refuse unless the protos exist and daemon and protos are the pinned series."""
    missing = [p for p in PROTOS if not (proto_dir / p).is_file()]
    if missing:
        raise StubError(f"{proto_dir}: missing {', '.join(missing)} (install Debian package "
                        "golang-github-osrg-gobgp-dev, or pass --proto-dir)")
    daemon = gobgpd_version(gobgpd)
    pin = f"{PINNED_SERIES[0]}.{PINNED_SERIES[1]}.x"
    if daemon[:2] != PINNED_SERIES:
        raise StubError(f"gobgpd is {'.'.join(map(str, daemon))}, vpcni is pinned to {pin}: "
                        "the stubs must match the daemon's API (install gobgpd "
                        f"{pin} or update the pin together with the tests)")
    tree = proto_tree_version(proto_dir)
    if tree is not None and tree[:2] != daemon[:2]:
        raise StubError(f"{proto_dir} is gobgp {'.'.join(map(str, tree))} but gobgpd is "
                        f"{'.'.join(map(str, daemon))}: install matching packages")
    return daemon


def _tool_versions() -> tuple[str, str]:
    """(grpcio-tools, protobuf) of this environment: the build's."""
    try:
        return (importlib.metadata.version("grpcio-tools"),
                importlib.metadata.version("protobuf"))
    except importlib.metadata.PackageNotFoundError as exc:
        raise StubError(f"{exc.name} is not installed where the stubs are generated: "
                        "grpcio-tools is a build requirement of vpcni ([build-system] in "
                        "pyproject.toml); with --no-build-isolation install it first") from None


def _stamp(proto_dir: Path, daemon: tuple[int, int, int]) -> str:
    digest = hashlib.sha256()
    for name in PROTOS:
        digest.update(name.encode() + b"\0" + (proto_dir / name).read_bytes())
    for version in _tool_versions():
        digest.update(version.encode())
    version = ".".join(map(str, daemon))
    return f"gobgpd {version} sha256 {digest.hexdigest()[:32]}"


def _outputs(out_dir: Path) -> list[Path]:
    names = [p.replace(".proto", "_pb2.py") for p in PROTOS] + ["gobgp_pb2_grpc.py"]
    return [out_dir / n for n in names]


def _up_to_date(out_dir: Path, stamp: str) -> bool:
    for path in _outputs(out_dir):
        try:
            with open(path) as f:
                if f.readline().rstrip("\n") != STAMP_PREFIX + stamp:
                    return False
        except OSError:
            return False
    return True


def _protoc(proto_dir: Path, out_dir: Path) -> None:
    from grpc_tools import protoc  # build-time only: the runtime needs grpcio and protobuf

    well_known = importlib.resources.files("grpc_tools") / "_proto"
    args = ["grpc_tools.protoc", f"-I{proto_dir}", f"-I{well_known}",
            f"--python_out={out_dir}", f"--grpc_python_out={out_dir}", *PROTOS]
    if protoc.main(args) != 0:
        raise StubError(f"grpc_tools.protoc failed on {', '.join(PROTOS)} in {proto_dir}")


def generate(proto_dir: Path = PROTO_DIR, out_dir: Path = OUT_DIR, force: bool = False,
             gobgpd: str = "gobgpd") -> bool:
    """Generate the stubs; False when they were already up to date."""
    daemon = check_inputs(proto_dir, gobgpd)
    stamp = _stamp(proto_dir, daemon)
    if not force and _up_to_date(out_dir, stamp):
        return False
    out_dir.mkdir(parents=True, exist_ok=True)
    _protoc(proto_dir, out_dir)
    # protoc also emits empty *_pb2_grpc.py for protos without services.
    for name in PROTOS:
        grpc_file = out_dir / name.replace(".proto", "_pb2_grpc.py")
        if name != "gobgp.proto" and grpc_file.exists():
            grpc_file.unlink()
    for path in _outputs(out_dir):
        body = _ABSOLUTE_IMPORT.sub(r"from . import \1 as \2", path.read_text())
        tmp = path.with_suffix(".tmp")
        tmp.write_text(f"{STAMP_PREFIX}{stamp}\n{body}")
        tmp.replace(path)
    return True


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vpcni.evpn.genstubs", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--proto-dir", type=Path, default=PROTO_DIR)
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    parser.add_argument("--gobgpd", default="gobgpd", help="the daemon whose version to pin to")
    parser.add_argument("--force", action="store_true", help="regenerate even when up to date")
    args = parser.parse_args(argv)
    try:
        changed = generate(args.proto_dir, args.out, args.force, args.gobgpd)
    except StubError as exc:
        print(f"genstubs: {exc}", file=sys.stderr)
        return 1
    print(f"genstubs: {'generated' if changed else 'up to date:'} {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
