"""The build hook of vpcni: gobgpd's gRPC stubs are generated when the package is built.

Everything else about the package is in pyproject.toml. Here build_py runs
evpn/genstubs.py (with grpcio-tools, a [build-system] requirement) after copying
the sources, so that:

- a wheel (`pip wheel .`, `pip install .`) carries vpcni/evpn/gobgpapi/*_pb2*.py,
  generated into the build directory from the installed gobgpd's .proto files
  (Debian's golang-github-osrg-gobgp-dev); nothing is written into site-packages
  at run time;
- an editable install (`pip install -e .`, the tests' venv) gets them in the
  source tree, evpn/gobgpapi/ (git-ignored), where the editable finder maps
  vpcni.evpn.

The stubs are pinned to the gobgpd that runs beside the agent: without gobgpd
3.10 and its .proto files the build fails with genstubs' message.
VPCNI_GENSTUBS=skip builds without them (vpcni.evpn then says they are missing).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.errors import SetupError

ROOT = Path(__file__).resolve().parent
STUBS_PACKAGE = "vpcni.evpn.gobgpapi"
SKIP_ENV = "VPCNI_GENSTUBS"


def _genstubs():
    """evpn/genstubs.py by path: the package being built is not importable yet."""
    spec = importlib.util.spec_from_file_location("_vpcni_genstubs", ROOT / "evpn" / "genstubs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class build_py_with_stubs(build_py):
    """build_py, then gobgpd's stubs into the package (build dir, or the source tree
    for an editable install)."""

    def run(self) -> None:
        super().run()
        if os.environ.get(SKIP_ENV) == "skip":
            self.announce(f"vpcni: {SKIP_ENV}=skip: building without gobgpd's gRPC stubs",
                          level=3)
            return
        if self.editable_mode:
            out = ROOT / self.get_package_dir(STUBS_PACKAGE)
        else:
            out = Path(self.build_lib, *STUBS_PACKAGE.split("."))
        genstubs = _genstubs()
        try:
            changed = genstubs.generate(out_dir=out)
        except genstubs.StubError as exc:
            msg = (f"vpcni: gobgpd's gRPC stubs: {exc} (or set {SKIP_ENV}=skip to build "
                   "without them)")
            if self.editable_mode:
                # setuptools turns an exception of a customised build_py into a warning
                # in editable mode and installs anyway: this must stop the install.
                raise SystemExit(msg) from None
            raise SetupError(msg) from None
        self.announce(f"vpcni: gobgpd stubs {'generated in' if changed else 'up to date in'} "
                      f"{out}", level=3)


setup(cmdclass={"build_py": build_py_with_stubs})
