"""vpcni: VPCs for Kubernetes.

The import root. The packages live in the top-level folders core/, cni/,
backends/, ctl/ and lab/ and are installed as vpcni.core, vpcni.cni, ...
"""

__version__ = "0.1.0"
