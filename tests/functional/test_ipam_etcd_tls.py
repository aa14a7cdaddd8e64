"""vpcni-ipam's etcd store over TLS, against a real etcd that asks for client certificates.

A throwaway CA, etcd's server certificate and a client certificate are made with
`openssl` in the sandbox's directory for each test. etcd listens on 127.0.0.1 inside
a namespace of the sandbox (never the root namespace's loopback), and the clients
(`vpcni-ipam`, `vpcnictl ipam`, `etcdctl`) run in that namespace too.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from vpcni.lab.cluster import CniResult, installed_executable
from vpcni.lab.daemons import Etcd
from vpcni.lab.netns import Netns, Sandbox

pytestmark = pytest.mark.functional

SUBNET = "172.16.45.0/24"


def openssl(*args: str, cwd: Path) -> None:
    proc = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, f"openssl {' '.join(args)}: {proc.stderr}"


def make_ca(d: Path, name: str) -> tuple[Path, Path]:
    """A self-signed CA (EC P-256, valid one day): (certificate, key)."""
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "1",
            "-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)
    return d / f"{name}.pem", d / f"{name}.key"


def issue(d: Path, ca: tuple[Path, Path], name: str, extensions: str) -> tuple[Path, Path]:
    """A certificate for `name` signed by `ca`: (certificate, key)."""
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
    (d / f"{name}.ext").write_text(extensions)
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", str(ca[0]), "-CAkey", str(ca[1]),
            "-CAcreateserial", "-out", f"{name}.pem", "-days", "1",
            "-extfile", f"{name}.ext", cwd=d)
    return d / f"{name}.pem", d / f"{name}.key"


@dataclass
class Pki:
    ca: Path
    server: tuple[Path, Path]
    client: tuple[Path, Path]
    other_ca: Path  # trusted by nobody here


def make_pki(d: Path) -> Pki:
    ca = make_ca(d, "vpcni-test-ca")
    # etcd 3.4's JSON gateway dials etcd's own gRPC port with the server certificate as
    # its client certificate: it needs both uses.
    server = issue(d, ca, "etcd", "subjectAltName=IP:127.0.0.1\n"
                                  "extendedKeyUsage=serverAuth,clientAuth\n")
    client = issue(d, ca, "vpcni-ipam", "extendedKeyUsage=clientAuth\n")
    other = make_ca(d, "other-ca")
    return Pki(ca[0], server, client, other[0])


class TlsEtcd(Etcd):
    """etcd serving clients over TLS only, with client certificates required."""

    def __init__(self, ns: Netns, directory: Path, pki: Pki):
        super().__init__(ns, directory, "127.0.0.1")
        self.pki = pki

    scheme = "https"

    def server_args(self) -> list[str]:
        return ["--cert-file", str(self.pki.server[0]), "--key-file", str(self.pki.server[1]),
                "--trusted-ca-file", str(self.pki.ca), "--client-cert-auth"]

    def etcdctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.ns.exec("etcdctl", "--endpoints", self.endpoint, "--dial-timeout", "2s",
                            "--cacert", str(self.pki.ca), "--cert", str(self.pki.client[0]),
                            "--key", str(self.pki.client[1]), *args, check=check, timeout=20)

    def healthy(self) -> bool:
        return self.etcdctl("endpoint", "health", check=False).returncode == 0


@pytest.fixture
def tls_etcd(sandbox: Sandbox) -> TlsEtcd:
    pki = make_pki(sandbox.dir("pki"))
    return TlsEtcd(sandbox.netns("etcd"), sandbox.dir("etcd"), pki).start()


def tls_store(sandbox: Sandbox, etcd: TlsEtcd, **over) -> dict:
    store = {"type": "etcd", "endpoints": [etcd.endpoint], "prefix": f"/{sandbox.prefix}/ipam",
             "caFile": str(etcd.pki.ca), "certFile": str(etcd.pki.client[0]),
             "keyFile": str(etcd.pki.client[1])}
    return {k: v for k, v in (store | over).items() if v is not None}


def conf_with(sandbox: Sandbox, store: dict) -> dict:
    return {"cniVersion": "1.0.0", "name": f"{sandbox.prefix}-tls", "type": "bridge",
            "ipam": {"type": "vpcni-ipam", "subnets": [SUBNET], "store": store}}


def ipam(ns: Netns, command: str, conf: dict, cid: str) -> CniResult:
    """The vpcni-ipam executable, run in etcd's namespace as a delegating plugin runs it."""
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "CNI_COMMAND": command,
           "CNI_CONTAINERID": cid, "CNI_NETNS": ns.path, "CNI_IFNAME": "eth0",
           "CNI_PATH": "/nonexistent", "VPCNI_NODE_NAME": "n1"}
    proc = ns.exec(installed_executable("vpcni-ipam"), input=json.dumps(conf), env=env,
                   check=False)
    assert "Traceback" not in proc.stderr, proc.stderr
    return CniResult(proc.returncode, proc.stdout, proc.stderr)


def test_allocations_over_tls_with_a_client_certificate(sandbox, tls_etcd):
    conf = conf_with(sandbox, tls_store(sandbox, tls_etcd))
    got = []
    for cid in ("c0", "c1", "c2"):
        res = ipam(tls_etcd.ns, "ADD", conf, cid)
        assert res.ok, res.stdout or res.stderr
        got.append(res.json["ips"][0]["address"])
    # etcd is a shared store: addresses are chosen at random (docs/ipam.md).
    assert len(set(got)) == 3 and all(a.endswith("/24") and a.startswith("172.16.45.")
                                      for a in got)
    assert ipam(tls_etcd.ns, "CHECK", conf | {"prevResult": res.json}, "c2").ok
    assert ipam(tls_etcd.ns, "DEL", conf, "c1").ok
    # The keys are in that etcd (read with etcdctl over TLS) ...
    keys = tls_etcd.etcdctl("get", "--prefix", "--keys-only", f"/{sandbox.prefix}/ipam/"
                            ).stdout.split()
    assert sorted(k.rsplit("/", 1)[1] for k in keys if "/ips/" in k) == sorted(
        a.split("/")[0] for a in (got[0], got[2]))
    # ... and the operator's tool reaches them through the same config.
    path = sandbox.dir("conf") / "conf.json"
    path.write_text(json.dumps(conf))
    shown = json.loads(tls_etcd.ns.exec(installed_executable("vpcnictl"), "ipam", "show",
                                        "--conf", str(path), "--json").stdout)
    assert sorted(a["container_id"] for a in shown) == ["c0", "c2"]
    # STATUS asks the store too.
    status = ipam(tls_etcd.ns, "STATUS", conf | {"cniVersion": "1.1.0"}, "")
    assert status.ok, status.stdout


def test_tls_failures_are_errors_naming_what_to_fix(sandbox, tls_etcd):
    ns, pki = tls_etcd.ns, tls_etcd.pki

    def error(store: dict) -> dict:
        res = ipam(ns, "ADD", conf_with(sandbox, store), "c0")
        assert res.rc == 1, res
        return res.json

    # etcd's certificate is not signed by the CA we trust.
    err = error(tls_store(sandbox, tls_etcd, caFile=str(pki.other_ca)))
    assert err["code"] == 5 and "TLS handshake failed" in err["msg"], err
    assert "certificate verify failed" in err["msg"] and "'ipam.store.caFile'" in err["msg"]
    # No client certificate: etcd refuses the handshake.
    err = error(tls_store(sandbox, tls_etcd, certFile=None, keyFile=None))
    assert err["code"] == 5 and "TLS handshake failed" in err["msg"], err
    assert tls_etcd.endpoint in err["msg"] and "no client certificate" in err["msg"]
    # A file that is not there, or not PEM: code 5 naming the key, before any connection.
    err = error(tls_store(sandbox, tls_etcd, caFile=str(pki.ca) + ".missing"))
    assert err["code"] == 5 and "'ipam.store.caFile'" in err["msg"], err
    assert "No such file or directory" in err["msg"]
    not_pem = sandbox.dir("pki") / "not.pem"
    not_pem.write_text("not a certificate\n")
    err = error(tls_store(sandbox, tls_etcd, certFile=str(not_pem)))
    assert err["code"] == 5 and "'ipam.store.certFile'" in err["msg"] and "PEM" in err["msg"]
    # TLS files with a plain http:// endpoint: the config is wrong (code 7).
    err = error(tls_store(sandbox, tls_etcd, endpoints=["http://127.0.0.1:2379"]))
    assert err["code"] == 7 and "'ipam.store.caFile'" in err["msg"], err
    # etcd away: still "try again later", as without TLS.
    tls_etcd.stop()
    err = error(tls_store(sandbox, tls_etcd))
    assert err["code"] == 11 and "127.0.0.1:2379" in err["msg"], err
    # Nothing was allocated by any of these.
    tls_etcd.start()
    assert tls_etcd.etcdctl("get", "--prefix", "--keys-only", f"/{sandbox.prefix}/"
                            ).stdout.strip() == ""
