"""One error hierarchy for vpcni.

Every error carries the CNI error code it maps to (CNI SPEC.md, "Error"),
a message that names the field or object at fault, and optional details.
Backends raise these (or subclasses); the CNI layer turns them into the
error JSON. Nothing else in the code decides CNI codes.
"""

from __future__ import annotations


class VpcniError(Exception):
    """Base of every error vpcni reports to a caller."""

    code = 999

    def __init__(self, msg: str, details: str = "", code: int | None = None):
        super().__init__(msg)
        self.msg = msg
        self.details = details
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return self.msg


class IncompatibleVersion(VpcniError):
    code = 1


class UnsupportedField(VpcniError):
    code = 2


class UnknownContainer(VpcniError):
    code = 3


class InvalidEnvironment(VpcniError):
    code = 4


class IOFailure(VpcniError):
    code = 5


class DecodeError(VpcniError):
    code = 6


class InvalidConfig(VpcniError):
    code = 7


class TryAgainLater(VpcniError):
    code = 11


class NotAvailable(VpcniError):
    """STATUS: the plugin cannot serve ADD on this node right now."""

    code = 50


class TenancyRefused(VpcniError):
    """ADD from a namespace not bound to the VNI's VPC (a plugin-specific code: the
    SPEC leaves 100 and up to plugins)."""

    code = 101


class BackendError(VpcniError):
    """A dataplane operation failed (netlink, OVSDB, sysfs, ...)."""

    code = 999


class CheckFailed(VpcniError):
    """CHECK found the dataplane different from what was recorded."""

    code = 999


class IpamError(VpcniError):
    """An IPAM plugin or the built-in IPAM failed; keeps the plugin's code."""


class LockTimeout(TryAgainLater):
    pass
