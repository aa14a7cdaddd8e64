"""The ovs backend's I/O: OVSDB through ovsdbapp, OpenFlow through `ovs-ofctl`.

One OVSDB connection per backend (the agent keeps it for its lifetime); every
change is one transaction with check_error=True, so the switch is never left
half-configured and a failure is an exception, not a log line. Flows are
changed with `ovs-ofctl --bundle add-flows`: one OpenFlow bundle per change,
applied atomically, so no packet ever sees half of a new flow set.
"""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path
from typing import Any, Optional

from .config import OvsConfig
from vpcni.core.errors import BackendError

from . import flows as fl

OFCTL = "ovs-ofctl"
OFCTL_TIMEOUT = 30
# external_ids keys: what marks a port as vpcni's and which attachment it serves.
EXT_NETWORK = "vpcni-network"
EXT_CONTAINER = "vpcni-container-id"
EXT_IFNAME = "vpcni-ifname"
EXT_VNI = "vpcni-vni"
EXT_UDP_PORT = "vpcni-udp-port"
EXT_IPS = "vpcni-ips"
EXT_MAC = "attached-mac"  # the OVS convention (ovn-controller, os-vif)
EXT_TUNNEL = "vpcni-tunnel"
EXT_VNI_PREFIX = "vpcni-vni-"  # on the bridge: vpcni-vni-<VNI>=<UDP port> while the VNI is here
# A VPC router's ports (routed subnets): the node ends of its veths, never an attachment's.
EXT_GATEWAY = "vpcni-gateway"  # =<VNI>: the subnet's gateway port vgw<VNI>
EXT_ROUTER = "vpcni-router"    # =<L3VNI>: the router's L3 port vl3<L3VNI>
EXT_IFINDEX = "vpcni-ifindex"  # the ifindex of the netdev the router port was added with
# On a gateway port, what the VPC's FIB needs of its subnet (updated in place):
EXT_GW_L3VNI = "vpcni-gateway-l3vni"      # =<L3VNI>: the subnet's VPC
EXT_GW_ADDRESS = "vpcni-gateway-address"  # =<gateway>/<prefix length>, e.g. 10.20.0.1/24
EXT_GW_STATICS = "vpcni-gateway-statics"  # =<dst>,...: static routes through the subnet
# Keys whose change means another netdev or another role: the port is added again.
ROUTER_PORT_IDENTITY = (EXT_GATEWAY, EXT_ROUTER, EXT_IFINDEX)
EXT_L3VNI_PREFIX = "vpcni-l3vni-"  # on the bridge: vpcni-l3vni-<L3VNI>=<UDP port> while its router is here


def tunnel_name(udp_port: int) -> str:
    return f"vpcni-vx{udp_port}"


def jsonrpc(path: Path, method: str, params: list, timeout: float = 2.0) -> Any:
    """One OVSDB JSON-RPC call over a unix socket (the probe's cheap look, no IDL)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        s.sendall(json.dumps({"method": method, "params": params, "id": 0}).encode())
        buf = b""
        decoder = json.JSONDecoder()
        while True:
            chunk = s.recv(65536)
            if not chunk:
                raise ConnectionError("connection closed before a reply")
            buf += chunk
            try:
                reply, _ = decoder.raw_decode(buf.decode())
            except ValueError:
                continue
            if reply.get("error"):
                raise ConnectionError(str(reply["error"]))
            return reply["result"]


def ovsdb_set(value: Any) -> list:
    """The elements of an OVSDB set/atom in JSON-RPC form."""
    if isinstance(value, list) and value and value[0] == "set":
        return list(value[1])
    return [value]


class Switch:
    def __init__(self, cfg: OvsConfig):
        from ovsdbapp.backend.ovs_idl import connection
        from ovsdbapp.schema.open_vswitch import impl_idl

        self.cfg = cfg
        self.bridge = cfg.bridge
        target = f"unix:{cfg.db_socket}"
        try:
            idl = connection.OvsdbIdl.from_server(target, "Open_vSwitch")
            self._conn = connection.Connection(idl=idl, timeout=10)
            self.api = impl_idl.OvsdbIdl(self._conn)
        except Exception as exc:
            raise BackendError(f"cannot connect to OVSDB at {cfg.db_socket}: {exc}") from exc

    def close(self) -> None:
        self._conn.stop()

    # ------------------------------------------------------------ OVSDB

    def transact(self, what: str, *commands) -> None:
        try:
            with self.api.transaction(check_error=True) as txn:
                for command in commands:
                    txn.add(command)
        except BackendError:
            raise
        except Exception as exc:
            raise BackendError(f"OVSDB transaction failed ({what}): {exc}") from exc

    def row(self, table: str, name: str) -> Optional[dict]:
        rows = self.api.db_list(table, [name], if_exists=True).execute(check_error=True)
        return rows[0] if rows else None

    def hw_offload(self) -> Optional[str]:
        """other_config:hw-offload of the Open_vSwitch record, if set."""
        rows = self.api.db_list("Open_vSwitch", columns=["other_config"]).execute(
            check_error=True)
        return rows[0]["other_config"].get("hw-offload") if rows else None

    def set_hw_offload(self, on: bool) -> None:
        self.transact("hw-offload", self.api.db_set(
            "Open_vSwitch", ".", ("other_config", {"hw-offload": "true" if on else "false"})))

    def bridge_exists(self) -> bool:
        return self.row("Bridge", self.bridge) is not None

    def ensure_network(self, vni: int, local_ip: str, udp_port: int) -> None:
        """The integration bridge (secure: no NORMAL fallback), the flow-based VXLAN
        port for `udp_port` and the VNI's mark on the bridge, in one transaction,
        only if something is missing."""
        name = tunnel_name(udp_port)
        options = {"remote_ip": "flow", "key": "flow", "local_ip": local_ip,
                   "dst_port": str(udp_port)}
        commands = []
        bridge = self.row("Bridge", self.bridge)
        if bridge is None:
            commands += [self.api.add_br(self.bridge, datapath_type=self.cfg.datapathType),
                         self.api.db_set("Bridge", self.bridge, ("fail_mode", "secure"),
                                         ("external_ids", {"vpcni": "integration"}))]
        vni_key = f"{EXT_VNI_PREFIX}{vni}"
        if bridge is not None and bridge["external_ids"].get(vni_key) not in (None, str(udp_port)):
            raise BackendError(f"VNI {vni} is on this node with UDP port "
                               f"{bridge['external_ids'][vni_key]}, not {udp_port}")
        if bridge is None or vni_key not in bridge["external_ids"]:
            commands.append(self.api.db_set("Bridge", self.bridge,
                                            ("external_ids", {vni_key: str(udp_port)})))
        iface = self.row("Interface", name)
        if iface is None:
            commands.append(self.api.add_port(self.bridge, name, type="vxlan", options=options,
                                              external_ids={EXT_TUNNEL: str(udp_port)}))
        elif iface["options"] != options:
            commands.append(self.api.db_set("Interface", name, ("options", options)))
        if commands:
            self.transact(f"bridge {self.bridge} and tunnel {name}", *commands)

    def vnis(self) -> dict[int, int]:
        """VNI -> UDP port of the VNIs marked on the bridge (ensure_network, until release)."""
        bridge = self.row("Bridge", self.bridge)
        if bridge is None:
            return {}
        out = {}
        for key, value in bridge["external_ids"].items():
            vni = key.removeprefix(EXT_VNI_PREFIX)
            if key.startswith(EXT_VNI_PREFIX) and vni.isdigit() and value.isdigit():
                out[int(vni)] = int(value)
        return out

    def l3vnis(self) -> dict[int, int]:
        """L3VNI -> UDP port of the VPC routers marked on the bridge."""
        bridge = self.row("Bridge", self.bridge)
        out = {}
        for key, value in (bridge["external_ids"] if bridge else {}).items():
            l3vni = key.removeprefix(EXT_L3VNI_PREFIX)
            if key.startswith(EXT_L3VNI_PREFIX) and l3vni.isdigit() and value.isdigit():
                out[int(l3vni)] = int(value)
        return out

    def mark_l3vni(self, l3vni: int, udp_port: int) -> None:
        bridge = self.row("Bridge", self.bridge)
        key = f"{EXT_L3VNI_PREFIX}{l3vni}"
        have = bridge["external_ids"].get(key) if bridge else None
        if have is not None and have != str(udp_port):
            raise BackendError(f"the router of L3VNI {l3vni} is on this node with UDP port "
                               f"{have}, not {udp_port}: a VPC's subnets share one UDP port")
        if have is None:
            self.transact(f"mark L3VNI {l3vni}", self.api.db_set(
                "Bridge", self.bridge, ("external_ids", {key: str(udp_port)})))

    def release_l3vni(self, l3vni: int) -> None:
        if self.bridge_exists():
            self.transact(f"release L3VNI {l3vni}",
                          self.api.db_remove("Bridge", self.bridge, "external_ids",
                                             f"{EXT_L3VNI_PREFIX}{l3vni}", if_exists=True))

    def release_vni(self, vni: int) -> None:
        if self.bridge_exists():
            self.transact(f"release VNI {vni}",
                          self.api.db_remove("Bridge", self.bridge, "external_ids",
                                             f"{EXT_VNI_PREFIX}{vni}", if_exists=True))

    def tunnels(self) -> dict[int, int]:
        """UDP port -> ofport of our tunnel ports on the bridge."""
        out = {}
        for row in self.api.db_list("Interface", columns=["name", "ofport", "external_ids"]
                                    ).execute(check_error=True):
            port = row["external_ids"].get(EXT_TUNNEL)
            ofport = ofport_of(row)
            if port and port.isdigit() and ofport:
                out[int(port)] = ofport
        return out

    def attachment_rows(self) -> list[dict]:
        """Every Interface row that names a vpcni attachment in its external_ids."""
        return [row for row in self.api.db_list(
                    "Interface", columns=["name", "ofport", "external_ids", "error"]
                ).execute(check_error=True) if EXT_VNI in row["external_ids"]]

    def router_rows(self) -> list[dict]:
        """Every Interface row of a VPC router's port (gateway or L3)."""
        return [row for row in self.api.db_list(
                    "Interface", columns=["name", "ofport", "external_ids", "error"]
                ).execute(check_error=True)
                if EXT_GATEWAY in row["external_ids"] or EXT_ROUTER in row["external_ids"]]

    def ensure_router_port(self, name: str, external_ids: dict[str, str]) -> tuple[int, bool]:
        """`name` (a router veth's node end) as a working port with `external_ids`: added
        when missing, re-added when it has no ofport or another identity (its netdev
        was re-created), its other external_ids updated in place; (its ofport, whether
        it changed anything). A port of that name that is not a router's is an error."""
        row = self.row("Interface", name)
        if row is not None:
            ext = row["external_ids"]
            if EXT_GATEWAY not in ext and EXT_ROUTER not in ext:
                raise BackendError(f"OVS port {name} exists and is not a vpcni router's "
                                   f"(external_ids {ext})")
            ofport = ofport_of(row)
            if ofport and all(ext.get(k) == external_ids.get(k) for k in ROUTER_PORT_IDENTITY
                              if k in external_ids):
                stale = {k: v for k, v in external_ids.items() if ext.get(k) != v}
                if not stale:
                    return ofport, False
                self.transact(f"update port {name}",
                              self.api.db_set("Interface", name, ("external_ids", stale)))
                return ofport, True
            self.del_port(name)
        return self.add_port(name, external_ids), True

    def add_port(self, name: str, external_ids: dict[str, str]) -> int:
        """Add `name` as a port with `external_ids` (one transaction); its ofport."""
        self.transact(f"add port {name}",
                      self.api.add_port(self.bridge, name, may_exist=False,
                                        external_ids=external_ids))
        row = self.row("Interface", name)
        ofport = ofport_of(row) if row else None
        if not ofport:
            error = (row or {}).get("error") or "no ofport assigned"
            raise BackendError(f"ovs-vswitchd could not add port {name} to {self.bridge}: "
                               f"{first_value(error)}")
        return ofport

    def del_port(self, name: str) -> None:
        self.transact(f"delete port {name}", self.api.del_port(name, if_exists=True))

    # ------------------------------------------------------------ OpenFlow

    def _ofctl(self, command: str, *args: str, options: tuple[str, ...] = (),
               stdin: Optional[str] = None) -> str:
        target = f"unix:{self.cfg.runDir / f'{self.bridge}.mgmt'}"
        cmd = [OFCTL, "-O", "OpenFlow13", *options, command, target, *args]
        try:
            proc = subprocess.run(cmd, input=stdin, capture_output=True, text=True,
                                  timeout=OFCTL_TIMEOUT)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise BackendError(f"{' '.join(cmd)}: {exc}") from exc
        if proc.returncode != 0:
            raise BackendError(f"{OFCTL} {command} on {self.bridge} failed: "
                               f"{proc.stderr.strip()}")
        return proc.stdout

    def dump(self, cookie: int, mask: int = -1) -> set[fl.Flow]:
        """The flows on the bridge whose cookie matches cookie/mask."""
        spec = f"cookie={cookie:#x}/{'-1' if mask == -1 else f'{mask:#x}'}"
        return fl.parse_dump(self._ofctl("dump-flows", spec, options=("--no-stats", "--no-names")))

    def converge(self, cookie: int, desired: set[fl.Flow], mask: int = -1) -> int:
        """Make the flows of cookie/mask exactly `desired`, in one bundle; the number of changes."""
        lines = fl.changes(self.dump(cookie, mask), desired)
        if lines:
            self._ofctl("add-flows", "-", options=("--bundle",), stdin="\n".join(lines) + "\n")
        return len(lines)

    def delete_scopes(self, cookies: list[int]) -> None:
        """Delete every flow of each of these exact cookies, in one bundle."""
        if cookies:
            lines = "".join(f"delete cookie={c:#x}/-1\n" for c in cookies)
            self._ofctl("add-flows", "-", options=("--bundle",), stdin=lines)

    def delete_flows(self, cookie: int, mask: int = -1) -> None:
        spec = f"cookie={cookie:#x}/{'-1' if mask == -1 else f'{mask:#x}'}"
        self._ofctl("del-flows", spec)


def ofport_of(row: dict) -> Optional[int]:
    value = row.get("ofport")
    if isinstance(value, list):
        value = value[0] if value else None
    return value if isinstance(value, int) and value > 0 else None


def first_value(value: Any) -> str:
    if isinstance(value, list):
        return str(value[0]) if value else ""
    return str(value)
