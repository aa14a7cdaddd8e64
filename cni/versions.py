"""CNI spec versions and result conversion to the caller's version.

vpcni builds every result in the 1.1.0 shape (core.models.Result) and
converts it down here: 1.0.0 drops the 1.1 fields (interface mtu, socketPath,
pciID; route mtu/advmss/priority/table/scope), 0.4.0 and 0.3.x also add
`ips[].version`.
"""

from __future__ import annotations

from typing import Any

from vpcni.core.models import Result

SUPPORTED = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
CURRENT = "1.1.0"

_IFACE_11 = ("mtu", "socketPath", "pciID")
_ROUTE_11 = ("mtu", "advmss", "priority", "table", "scope")


def parse(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split("."))


def at_least(version: str, minimum: str) -> bool:
    return parse(version) >= parse(minimum)


def _clean(d: dict) -> dict:
    return {k: v for k, v in d.items() if v not in (None, "", [], {})}


def convert(result: Result, version: str) -> dict[str, Any]:
    """The result as JSON-ready dict in the shape of `version`."""
    modern = at_least(version, "1.1.0")
    interfaces = []
    for itf in result.interfaces:
        d = itf.model_dump(mode="json")
        if not modern:
            for k in _IFACE_11:
                d.pop(k, None)
        if d.get("sandbox") == "":
            d.pop("sandbox")
        interfaces.append(_clean(d) | {"name": itf.name})
    ips = []
    for ip in result.ips:
        d = _clean(ip.model_dump(mode="json"))
        if ip.interface is not None:
            d["interface"] = ip.interface
        if not at_least(version, "1.0.0"):
            d["version"] = str(ip.address.version)
        ips.append(d)
    routes = []
    for route in result.routes:
        d = _clean(route.model_dump(mode="json"))
        if not modern:
            for k in _ROUTE_11:
                d.pop(k, None)
        routes.append(d)
    out: dict[str, Any] = {"cniVersion": version}
    if interfaces:
        out["interfaces"] = interfaces
    out["ips"] = ips
    if routes:
        out["routes"] = routes
    out["dns"] = _clean(result.dns.model_dump(mode="json"))
    return out
