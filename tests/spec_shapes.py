"""Validators of what a CNI plugin prints, per spec version (CNI SPEC.md, "Result Types").

Plain functions that raise AssertionError with a message naming the path of
the offending key (`ips[0].version`), so a test shows at once what is wrong.
They check the shape a runtime parses, not vpcni's own choices: they can be
pointed at any plugin's output (the reference plugins' too).

Per version:
- every version: interfaces[] {name, mac?, sandbox?}, ips[] {address,
  gateway?, interface?}, routes[] {dst, gw?}, dns {nameservers?, domain?,
  search?, options?}; ips[].interface is an index into interfaces;
- 0.3.0, 0.3.1, 0.4.0: ips[].version ("4" or "6", matching the address) is
  required; from 1.0.0 on it is gone;
- 1.1.0 only: interface mtu/socketPath/pciID, route mtu/advmss/priority/
  table/scope.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any, Iterable, Optional

VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
MAC = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")

_IFACE_BASE = {"name": str, "mac": str, "sandbox": str}
_IFACE_11 = {"mtu": int, "socketPath": str, "pciID": str}
_ROUTE_BASE = {"dst": str, "gw": str}
_ROUTE_11 = {"mtu": int, "advmss": int, "priority": int, "table": int, "scope": int}
_IP_BASE = {"address": str, "gateway": str, "interface": int}
_DNS = {"nameservers": list, "domain": str, "search": list, "options": list}


def _vt(version: str) -> tuple[int, ...]:
    if version not in VERSIONS:
        raise AssertionError(f"cniVersion {version!r} is not a spec version this validator "
                             f"knows ({', '.join(VERSIONS)})")
    return tuple(int(p) for p in version.split("."))


def _fail(where: str, msg: str) -> None:
    raise AssertionError(f"{where}: {msg}")


def _object(value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        _fail(where, f"must be a JSON object, got {type(value).__name__} {value!r}")
    return value


def _keys(obj: dict, allowed: dict[str, type], where: str, version: str,
          required: Iterable[str] = ()) -> None:
    for key in required:
        if key not in obj:
            _fail(where, f"required key {key!r} is missing (cniVersion {version}): {obj}")
    for key, value in obj.items():
        if key not in allowed:
            _fail(f"{where}.{key}", f"key not allowed in cniVersion {version} "
                                    f"(allowed: {', '.join(sorted(allowed))})")
        want = allowed[key]
        # JSON has no int/bool distinction problem in Python except bool <: int.
        if not isinstance(value, want) or (want is int and isinstance(value, bool)):
            _fail(f"{where}.{key}", f"must be {want.__name__}, got {value!r}")


def _cidr(value: str, where: str):
    if "/" not in value:
        _fail(where, f"{value!r} is not in CIDR notation")
    try:
        return ipaddress.ip_interface(value)
    except ValueError:
        _fail(where, f"{value!r} is not an IP address with prefix length")


def _ip(value: str, where: str):
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        _fail(where, f"{value!r} is not an IP address")


def check_result(result: Any, version: str) -> None:
    """A success result of ADD (or a prevResult) in the shape of `version`."""
    vt = _vt(version)
    modern = vt >= (1, 1, 0)
    res = _object(result, "result")
    top = {"cniVersion": str, "interfaces": list, "ips": list, "routes": list, "dns": dict}
    _keys(res, top, "result", version, required=("cniVersion",))
    if res["cniVersion"] != version:
        _fail("result.cniVersion", f"is {res['cniVersion']!r}, the request asked for {version!r}")

    interfaces = res.get("interfaces", [])
    iface_keys = _IFACE_BASE | (_IFACE_11 if modern else {})
    for i, raw in enumerate(interfaces):
        where = f"interfaces[{i}]"
        itf = _object(raw, where)
        _keys(itf, iface_keys, where, version, required=("name",))
        if not itf["name"]:
            _fail(f"{where}.name", "is empty")
        if "mac" in itf and not MAC.match(itf["mac"]):
            _fail(f"{where}.mac", f"{itf['mac']!r} is not a MAC address")
        if "sandbox" in itf and not itf["sandbox"]:
            _fail(f"{where}.sandbox", "is present but empty (omit it for host interfaces)")
        if "mtu" in itf and itf["mtu"] <= 0:
            _fail(f"{where}.mtu", f"{itf['mtu']} is not a positive MTU")

    ip_keys = _IP_BASE | ({} if vt >= (1, 0, 0) else {"version": str})
    for i, raw in enumerate(res.get("ips", [])):
        where = f"ips[{i}]"
        ip = _object(raw, where)
        _keys(ip, ip_keys, where, version,
              required=("address",) if vt >= (1, 0, 0) else ("address", "version"))
        addr = _cidr(ip["address"], f"{where}.address")
        if "version" in ip and ip["version"] != str(addr.version):
            _fail(f"{where}.version", f"is {ip['version']!r} but address {ip['address']} "
                                      f"is IPv{addr.version}")
        if "gateway" in ip:
            gw = _ip(ip["gateway"], f"{where}.gateway")
            if gw.version != addr.version:
                _fail(f"{where}.gateway", f"{gw} is not of the address family of {addr}")
        if "interface" in ip and not 0 <= ip["interface"] < len(interfaces):
            _fail(f"{where}.interface", f"{ip['interface']} is not an index into interfaces "
                                        f"(it has {len(interfaces)})")

    route_keys = _ROUTE_BASE | (_ROUTE_11 if modern else {})
    for i, raw in enumerate(res.get("routes", [])):
        where = f"routes[{i}]"
        route = _object(raw, where)
        _keys(route, route_keys, where, version, required=("dst",))
        try:
            ipaddress.ip_network(route["dst"])
        except ValueError:
            _fail(f"{where}.dst", f"{route['dst']!r} is not a network in CIDR notation")
        if "gw" in route:
            _ip(route["gw"], f"{where}.gw")

    if "dns" in res:
        _keys(res["dns"], _DNS, "dns", version)
        for key in ("nameservers", "search", "options"):
            for j, item in enumerate(res["dns"].get(key, [])):
                if not isinstance(item, str):
                    _fail(f"dns.{key}[{j}]", f"must be a string, got {item!r}")


def check_error(body: Any, version: Optional[str] = None) -> None:
    """The error JSON {cniVersion, code, msg, details?}; `version` pins cniVersion."""
    err = _object(body, "error")
    _keys(err, {"cniVersion": str, "code": int, "msg": str, "details": str}, "error",
          version or "any", required=("cniVersion", "code", "msg"))
    if version is not None and err["cniVersion"] != version:
        _fail("error.cniVersion", f"is {err['cniVersion']!r}, expected {version!r}")
    elif err["cniVersion"] not in VERSIONS:
        _fail("error.cniVersion", f"{err['cniVersion']!r} is not a spec version")
    if err["code"] <= 0:
        _fail("error.code", f"{err['code']} is not a positive error code")
    if not err["msg"].strip():
        _fail("error.msg", "is empty")


def check_version_output(body: Any, supported: Optional[Iterable[str]] = None) -> None:
    """VERSION's output {cniVersion, supportedVersions}."""
    out = _object(body, "version output")
    _keys(out, {"cniVersion": str, "supportedVersions": list}, "version output", "any",
          required=("cniVersion", "supportedVersions"))
    listed = out["supportedVersions"]
    if not listed or not all(isinstance(v, str) for v in listed):
        _fail("supportedVersions", f"must be a non-empty list of strings, got {listed!r}")
    if len(set(listed)) != len(listed):
        _fail("supportedVersions", f"has duplicates: {listed}")
    if out["cniVersion"] not in listed:
        _fail("cniVersion", f"{out['cniVersion']!r} is not among supportedVersions {listed}")
    if supported is not None and list(supported) != listed:
        _fail("supportedVersions", f"is {listed}, expected {list(supported)}")
