"""The dpu switch backend: the node's VPC switch runs on a DPU; this side forwards ports."""
from .backend import DpuBackend

__all__ = ["DpuBackend"]
