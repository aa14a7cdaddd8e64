"""The veth interface provider: a veth pair per attachment, the pod's end in its namespace."""
from .provider import VethProvider

__all__ = ["VethProvider"]
