"""vpcni: VPCs for Kubernetes.

The import root. The packages live in the top-level folders core/, cni/,
backends/, ctl/ and lab/ and are installed as vpcni.core, vpcni.cni, ...
"""

from importlib.metadata import PackageNotFoundError, version as _version

try:
    # The one version source is pyproject.toml's; this is the installed package's.
    __version__ = _version("vpcni")
except PackageNotFoundError:  # a source tree on sys.path, not installed
    __version__ = "0+unknown"
