"""The VPC controller (vpcni.controller): its decisions and its reconcile steps.

No kube-apiserver runs on this machine. The reconcile steps are run against
`ApiServerStandIn`, an in-memory STAND-IN FOR THE KUBERNETES API SERVER that
enforces its semantics exactly where the controller's safety rests on them:

- create of a name that exists -> AlreadyExists (409);
- replace / replace_status / delete with a resourceVersion that is not the
  stored one -> Conflict (409); a replace without one is refused as well
  (custom resources require it);
- resourceVersion increments on every write (one counter, like etcd's revision);
- the status subresource: create and replace keep status out, replace_status
  changes nothing but status, generation moves with spec only;
- every call is atomic under one lock (thread-safe); `jitter` sleeps before
  each call, outside the lock, so that threads interleave between calls.

What it does not do (and a real API server would): garbage collection by owner
references, finalizers, watches, admission and schema validation.
"""

from __future__ import annotations

import concurrent.futures
import copy
import ipaddress
import json
import random
import threading
import time
import uuid
from collections import Counter

import pytest

from vpcni.controller import api as steps
from vpcni.controller import logic
from vpcni.controller.api import (CONFIGMAP, NAD, VNICLAIM, VPC, AlreadyExists, Conflict,
                                  NotFound)
from vpcni.controller.logic import ControllerConfig, SpecError
from vpcni.core.config import NetworkConfig
from vpcni.ipam.allocator import Allocator, owner_for
from vpcni.ipam.config import parse_settings
from vpcni.ipam.store import SqliteStore

ETCD = {"type": "etcd", "endpoints": ["http://198.51.100.250:2379"]}


class ApiServerStandIn:
    """A stand-in for the Kubernetes API server, in memory, for tests (see the module doc)."""

    STATUS_SUBRESOURCE = {VPC.plural}

    def __init__(self, namespaces=("vpcni-system",), jitter: float = 0.0):
        self._lock = threading.Lock()
        self._objects: dict[tuple[str, str, str], dict] = {}
        self._revision = 0
        self.namespaces = set(namespaces)
        self.jitter = jitter
        self.counts: Counter = Counter()

    # ------------------------------------------------------------ helpers

    def _pause(self) -> None:
        if self.jitter:
            time.sleep(random.uniform(0, self.jitter))

    def _key(self, res, name, namespace):
        return res.plural, (namespace or "") if res.namespaced else "", name

    def _next(self) -> str:
        self._revision += 1
        return str(self._revision)

    @staticmethod
    def _matches(obj, labels) -> bool:
        have = obj.get("metadata", {}).get("labels") or {}
        return all(have.get(k) == v for k, v in (labels or {}).items())

    def _stored(self, res, body):
        meta = body["metadata"]
        key = self._key(res, meta["name"], meta.get("namespace"))
        cur = self._objects.get(key)
        if cur is None:
            raise NotFound(f"404 {res.kind} {meta['name']}")
        rv = meta.get("resourceVersion")
        if rv != cur["metadata"]["resourceVersion"]:
            self.counts["conflict"] += 1
            raise Conflict(f"409 Conflict: {res.kind} {meta['name']}: resourceVersion {rv} is "
                           f"not {cur['metadata']['resourceVersion']}")
        return key, cur

    # ------------------------------------------------------------ KubeApi

    def get(self, res, name, namespace=None):
        self._pause()
        with self._lock:
            obj = self._objects.get(self._key(res, name, namespace))
            return copy.deepcopy(obj)

    def list(self, res, namespace=None, labels=None):
        self._pause()
        with self._lock:
            return [copy.deepcopy(o) for (plural, ns, _), o in sorted(self._objects.items())
                    if plural == res.plural and (namespace is None or ns == namespace)
                    and self._matches(o, labels)]

    def create(self, res, body):
        self._pause()
        with self._lock:
            meta = body["metadata"]
            ns = meta.get("namespace") if res.namespaced else None
            if res.namespaced and ns not in self.namespaces:
                raise NotFound(f"404 namespaces {ns!r} not found")
            key = self._key(res, meta["name"], ns)
            if key in self._objects:
                self.counts["already_exists"] += 1
                raise AlreadyExists(f"409 AlreadyExists: {res.kind} {meta['name']}")
            obj = copy.deepcopy(body)
            obj["metadata"].update(uid=str(uuid.uuid4()), resourceVersion=self._next(),
                                   generation=1, creationTimestamp="2026-01-01T00:00:00Z")
            if res.plural in self.STATUS_SUBRESOURCE:
                obj.pop("status", None)
            self._objects[key] = obj
            self.counts["writes"] += 1
            return copy.deepcopy(obj)

    def replace(self, res, body):
        self._pause()
        with self._lock:
            key, cur = self._stored(res, body)
            obj = copy.deepcopy(body)
            for kept in ("uid", "creationTimestamp", "generation"):
                obj["metadata"][kept] = cur["metadata"][kept]
            if res.plural in self.STATUS_SUBRESOURCE:
                obj["status"] = copy.deepcopy(cur.get("status"))
                if obj.get("spec") != cur.get("spec"):
                    obj["metadata"]["generation"] += 1
            obj["metadata"]["resourceVersion"] = self._next()
            self._objects[key] = obj
            self.counts["writes"] += 1
            return copy.deepcopy(obj)

    def replace_status(self, res, body):
        self._pause()
        with self._lock:
            key, cur = self._stored(res, body)
            obj = copy.deepcopy(cur)
            obj["status"] = copy.deepcopy(body.get("status"))
            obj["metadata"]["resourceVersion"] = self._next()
            self._objects[key] = obj
            self.counts["writes"] += 1
            return copy.deepcopy(obj)

    def delete(self, res, name, namespace=None, resource_version=None):
        self._pause()
        with self._lock:
            key = self._key(res, name, namespace)
            cur = self._objects.get(key)
            if cur is None:
                return False
            if resource_version is not None and \
                    resource_version != cur["metadata"]["resourceVersion"]:
                self.counts["conflict"] += 1
                raise Conflict(f"409 Conflict: precondition resourceVersion {resource_version}")
            del self._objects[key]
            self._revision += 1
            return True


# ---------------------------------------------------------------- helpers

def config(**kw) -> ControllerConfig:
    return ControllerConfig.model_validate({"ipamStore": ETCD, **kw})


def spec(**kw) -> dict:
    out = {"subnets": [{"name": "default", "cidr": "172.16.32.0/24",
                        "exclude": ["172.16.32.1-172.16.32.9"]}],
           "namespaces": ["team-a", "team-b"]}
    out.update(kw)
    return out


def make_vpc(server, name, **kw) -> dict:
    return server.create(VPC, {"apiVersion": logic.API_VERSION, "kind": "Vpc",
                               "metadata": {"name": name}, "spec": spec(**kw)})


def status(server, name) -> dict:
    return (server.get(VPC, name) or {}).get("status") or {}


def claims(server) -> dict[int, str]:
    return {logic.claim_vni(c): logic.claim_holder(c) for c in server.list(VNICLAIM)}


def delete_vpc(server, name, cfg):
    """What kopf's delete handler and then the API server do (finalizer, then removal)."""
    steps.finalize_vpc(server, server.get(VPC, name), cfg)
    server.delete(VPC, name)


# ---------------------------------------------------------------- the stand-in itself

def test_stand_in_enforces_the_api_servers_rules():
    server = ApiServerStandIn()
    vpc = make_vpc(server, "blue")
    with pytest.raises(AlreadyExists):
        make_vpc(server, "blue")
    assert "status" not in vpc and vpc["metadata"]["generation"] == 1
    stale = copy.deepcopy(vpc)
    fresh = server.replace_status(VPC, {**vpc, "status": {"phase": "Pending"}})
    assert int(fresh["metadata"]["resourceVersion"]) > int(vpc["metadata"]["resourceVersion"])
    with pytest.raises(Conflict):
        server.replace_status(VPC, {**stale, "status": {"phase": "Ready"}})
    with pytest.raises(Conflict):
        server.replace(VPC, {**stale, "spec": spec(mtu=1400)})
    with pytest.raises(Conflict):
        server.delete(VPC, "blue", resource_version=stale["metadata"]["resourceVersion"])
    # replace keeps status (subresource) and moves generation with spec.
    after = server.replace(VPC, {**fresh, "spec": spec(mtu=1400), "status": {"phase": "x"}})
    assert after["status"] == {"phase": "Pending"} and after["metadata"]["generation"] == 2
    with pytest.raises(NotFound):
        server.create(NAD, {"metadata": {"name": "x", "namespace": "nowhere"}})
    assert server.delete(VPC, "blue") and not server.delete(VPC, "blue")


# ---------------------------------------------------------------- the spec

def test_a_valid_spec_parses():
    s = logic.parse_spec(spec(vni=300, mtu=1450, backend="ovs", interfaceKind="sriov",
                              subnets=[{"name": "v4", "cidr": "172.16.32.0/24",
                                        "gateway": "172.16.32.254"},
                                       {"name": "v6", "cidr": "fd00:32::/64"}]))
    assert s.vni == 300 and [str(x.cidr) for x in s.subnets] == ["172.16.32.0/24",
                                                                 "fd00:32::/64"]


@pytest.mark.parametrize("change, field", [
    ({"subnets": [{"name": "a", "cidr": "172.16.32.1/24"}]}, "spec.subnets[0].cidr"),
    ({"subnets": [{"name": "a", "cidr": "172.16.32.0/24", "gateway": "10.0.0.1"}]},
     "spec.subnets[0].gateway"),
    ({"subnets": [{"name": "a", "cidr": "172.16.32.0/24", "exclude": ["10.0.0.0/8"]}]},
     "spec.subnets[0].exclude"),
    ({"subnets": [{"name": "a", "cidr": "172.16.32.0/24", "exclude": ["nope"]}]},
     "spec.subnets[0].exclude"),
    ({"subnets": [{"name": "A", "cidr": "172.16.32.0/24"}]}, "spec.subnets[0].name"),
    ({"subnets": [{"name": "a", "cidr": "172.16.32.0/24"},
                  {"name": "b", "cidr": "172.16.0.0/16"}]}, "spec.subnets"),
    ({"subnets": []}, "spec.subnets"),
    ({"mtu": 9001}, "spec.mtu"),
    ({"vni": 0}, "spec.vni"),
    ({"vni": "300"}, "spec.vni"),
    ({"backend": "dpdk"}, "spec.backend"),
    ({"namespaces": ["team-a", "team-a"]}, "spec.namespaces"),
    ({"namespaces": ["Team_A"]}, "spec.namespaces[0]"),
    ({"colour": "blue"}, "spec.colour"),
])
def test_spec_errors_name_the_field(change, field):
    with pytest.raises(SpecError) as err:
        logic.parse_spec(spec(**change))
    assert str(err.value).startswith(field), str(err.value)


def test_missing_subnets_and_bad_names_are_named():
    with pytest.raises(SpecError, match=r"^spec\.subnets is required"):
        logic.parse_spec({"namespaces": []})
    with pytest.raises(SpecError, match=r"^metadata\.name"):
        logic.validate_name("x" * 51)


def test_an_invalid_vpc_gets_phase_invalid_naming_the_field():
    server, cfg = ApiServerStandIn(), config()
    vpc = make_vpc(server, "blue", mtu=100)
    st = steps.reconcile_vpc(server, vpc, cfg)
    assert st["phase"] == "Invalid" and st["message"].startswith("spec.mtu")
    assert "vni" not in st and claims(server) == {}
    assert st["observedGeneration"] == 1
    assert st["conditions"][0]["status"] == "False"


def test_controller_config_checks_the_vni_range():
    assert config().pool() == (4096, 16777215)
    assert config(vniRange="10-20").pool() == (10, 20)
    for bad in ("20-10", "0-5", "5-16777216", "many"):
        with pytest.raises(ValueError, match="vniRange"):
            config(vniRange=bad)


# ---------------------------------------------------------------- VNIs

def test_vni_candidates_skip_what_is_claimed():
    assert list(logic.vni_candidates((10, 15), {11, 13})) == [10, 12, 14, 15]
    assert logic.keep_vni([5000, 4100], 5000) == 5000
    assert logic.keep_vni([5000, 4100], None) == 4100
    assert logic.keep_vni([], 7) is None


def test_fifty_vpcs_allocated_from_eight_threads_never_share_a_vni():
    server, cfg = ApiServerStandIn(jitter=0.0005), config()
    vpcs = [make_vpc(server, f"vpc{i}") for i in range(50)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(lambda v: steps.allocate_vni(server, v, cfg.pool()), vpcs))
    vnis = [o.vni for o in outcomes]
    assert all(o.phase == "Ready" for o in outcomes)
    assert len(set(vnis)) == 50 and set(vnis) == set(range(4096, 4146))
    # The claims back exactly those statuses, one per Vpc.
    assert claims(server) == {status(server, f"vpc{i}")["vni"]: f"vpc{i}" for i in range(50)}
    # The threads really raced for the same VNIs (and lost to the atomic create).
    assert server.counts["already_exists"] > 0


def test_two_controller_instances_sharing_the_api_server_never_share_a_vni():
    """Two controllers (no peering) reconcile every Vpc at once, each with 4 threads."""
    server = ApiServerStandIn(namespaces=("vpcni-system", "team-a", "team-b"), jitter=0.0005)
    cfg = config()
    vpcs = [make_vpc(server, f"vpc{i}") for i in range(50)]

    def instance(order):
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            return list(pool.map(lambda v: steps.reconcile_vpc(server, v, cfg), order))

    with concurrent.futures.ThreadPoolExecutor(2) as both:
        runs = [both.submit(instance, vpcs), both.submit(instance, list(reversed(vpcs)))]
        for run in runs:
            run.result()
    statuses = {v["metadata"]["name"]: status(server, v["metadata"]["name"]) for v in vpcs}
    vnis = [s["vni"] for s in statuses.values()]
    assert len(set(vnis)) == 50
    # Each Vpc holds exactly one claim, the one in its status; nothing leaked.
    assert claims(server) == {s["vni"]: name for name, s in statuses.items()}
    assert all(s["phase"] == "Ready" for s in statuses.values())
    # Each NAD carries its Vpc's VNI; the bindings agree.
    for name, s in statuses.items():
        nad = server.get(NAD, logic.nad_name(name), "team-a")
        assert json.loads(nad["spec"]["config"])["vni"] == s["vni"]
    doc = steps.reconcile_bindings(server, cfg)
    assert {int(k): v["vpc"] for k, v in doc["vnis"].items()} == claims(server)
    assert server.counts["already_exists"] > 0


def test_a_claim_is_taken_by_its_atomic_create_not_by_the_snapshot():
    """A VNI claimed after the allocator listed the claims is skipped on AlreadyExists."""
    server, cfg = ApiServerStandIn(), config(vniRange="100-102")
    blue, red = make_vpc(server, "blue"), make_vpc(server, "red")
    real_list = server.list

    def list_then_race(res, namespace=None, labels=None):
        out = real_list(res, namespace, labels)
        if res is VNICLAIM and not real_list(VNICLAIM):
            # red takes 100 between blue's snapshot and blue's create.
            server.create(VNICLAIM, logic.claim_object(100, red))
        return out

    server.list = list_then_race
    out = steps.allocate_vni(server, blue, cfg.pool())
    assert out.vni == 101 and claims(server) == {100: "red", 101: "blue"}
    assert server.counts["already_exists"] == 1


def test_a_stale_status_write_is_retried_and_keeps_the_other_writers_change():
    server, cfg = ApiServerStandIn(), config()
    vpc = make_vpc(server, "blue")
    server.replace_status(VPC, {**vpc, "status": {"endpoints": 3}})
    real = server.replace_status
    raced = []

    def other_writer_first(res, body):
        if not raced:
            raced.append(body["metadata"]["resourceVersion"])
            # Another writer (the status timer of another replica) writes in between.
            cur = server.get(VPC, "blue")
            real(VPC, {**cur, "status": {**cur["status"], "endpoints": 7}})
        return real(res, body)

    server.replace_status = other_writer_first
    out = steps.allocate_vni(server, vpc, cfg.pool())
    assert out.vni == 4096
    assert server.counts["conflict"] == 1  # the first write was refused...
    assert status(server, "blue") == {"vni": 4096, "endpoints": 7}  # ...and redone on top


def test_a_decision_made_on_a_stale_read_is_not_committed():
    """Two controllers gave one Vpc a claim each (4099, 4100). This one read the Vpc
    before the other committed 4100 and would keep the lowest, 4099: its write of
    status.vni carries the old resourceVersion, is refused, and it decides again on the
    fresh Vpc: 4100 stays, and only then is 4099 released."""
    server, cfg = ApiServerStandIn(), config()
    vpc = make_vpc(server, "blue", namespaces=[])
    for vni in (4099, 4100):
        server.create(VNICLAIM, logic.claim_object(vni, vpc))
    real = server.replace_status

    def other_commits_first(res, body):
        if body["status"].get("vni") == 4099:
            cur = server.get(VPC, "blue")
            real(VPC, {**cur, "status": {"vni": 4100}})  # the other controller's commit
        return real(res, body)

    server.replace_status = other_commits_first
    out = steps.allocate_vni(server, vpc, cfg.pool())
    assert out.vni == 4100 and status(server, "blue")["vni"] == 4100
    assert claims(server) == {4100: "blue"} and server.counts["conflict"] == 1


def test_reconcile_works_on_the_vpc_as_it_is_now():
    server = ApiServerStandIn(namespaces=("vpcni-system", "team-a", "team-b"))
    cfg = config()
    old = make_vpc(server, "blue")
    server.replace(VPC, {**old, "spec": spec(mtu=1400)})
    st = steps.reconcile_vpc(server, old, cfg)  # an older copy, as an event may carry
    assert st["observedGeneration"] == 2
    assert json.loads(server.get(NAD, "vpc-blue", "team-a")["spec"]["config"])["mtu"] == 1400
    # Being deleted: nothing is claimed or rendered any more.
    gone = make_vpc(server, "red")
    server.replace(VPC, {**gone, "metadata": {**gone["metadata"],
                                               "deletionTimestamp": "2026-01-01T00:00:00Z"}})
    assert steps.reconcile_vpc(server, gone, cfg) is None
    assert "red" not in claims(server).values()


def test_update_status_gives_up_after_repeated_conflicts():
    server = ApiServerStandIn()
    make_vpc(server, "blue")

    def always_stale(res, body):
        raise Conflict("409")

    server.replace_status = always_stale
    with pytest.raises(Conflict, match="still conflicting"):
        steps.update_status(server, "blue", lambda obj: {"phase": "Ready"})


def test_a_pinned_vni_held_by_another_vpc_is_a_conflict_naming_both():
    server, cfg = ApiServerStandIn(namespaces=("vpcni-system", "team-a", "team-b")), config()
    steps.reconcile_vpc(server, make_vpc(server, "blue", vni=300), cfg)
    st = steps.reconcile_vpc(server, make_vpc(server, "red", vni=300), cfg)
    assert st["phase"] == "Conflict"
    assert "'red'" in st["message"] and "'blue'" in st["message"] and "vni-300" in st["message"]
    assert claims(server) == {300: "blue"} and "vni" not in st
    assert status(server, "blue")["vni"] == 300
    # blue goes away: red gets its pinned VNI on the next reconcile.
    delete_vpc(server, "blue", cfg)
    st = steps.reconcile_vpc(server, server.get(VPC, "red"), cfg)
    assert st["phase"] == "Ready" and st["vni"] == 300 and claims(server) == {300: "red"}


def test_pool_exhaustion_is_pending_with_a_clear_message_until_a_vni_is_freed():
    server, cfg = ApiServerStandIn(), config(vniRange="4096-4098")
    for name in ("a", "b", "c", "d"):
        st = steps.reconcile_vpc(server, make_vpc(server, name, namespaces=[]), cfg)
    assert st["phase"] == "Pending" and "vni" not in st
    assert st["message"].startswith("no free VNI in vniRange 4096-4098 (3 of 3 claimed)")
    # A pinned VNI outside the pool does not use it up.
    st = steps.reconcile_vpc(server, make_vpc(server, "e", vni=77, namespaces=[]), cfg)
    assert st["phase"] == "Ready" and st["vni"] == 77
    freed = status(server, "b")["vni"]
    delete_vpc(server, "b", cfg)
    st = steps.reconcile_vpc(server, server.get(VPC, "d"), cfg)
    assert st["phase"] == "Ready" and st["vni"] == freed


def test_deleting_a_vpc_frees_its_vni_nads_and_binding():
    server = ApiServerStandIn(namespaces=("vpcni-system", "team-a", "team-b"))
    cfg = config()
    for name in ("blue", "red"):
        steps.reconcile_vpc(server, make_vpc(server, name), cfg)
    assert claims(server) == {4096: "blue", 4097: "red"}
    delete_vpc(server, "blue", cfg)
    assert claims(server) == {4097: "red"}
    assert [n["metadata"]["name"] for n in server.list(NAD)] == ["vpc-red", "vpc-red"]
    doc = json.loads(server.get(CONFIGMAP, "vpcni-tenancy", "vpcni-system")["data"]
                     ["bindings.json"])
    assert list(doc["vnis"]) == ["4097"]
    # The freed VNI is the next one handed out.
    st = steps.reconcile_vpc(server, make_vpc(server, "green"), cfg)
    assert st["vni"] == 4096


def test_a_claim_of_a_deleted_vpc_of_the_same_name_is_not_the_new_ones():
    server, cfg = ApiServerStandIn(), config()
    old = make_vpc(server, "blue", namespaces=[])
    steps.reconcile_vpc(server, old, cfg)
    server.delete(VPC, "blue")  # gone without its finalizer; the GC has not run yet
    new = make_vpc(server, "blue", namespaces=[])
    st = steps.reconcile_vpc(server, new, cfg)
    assert st["vni"] == 4097  # vni-4096 still names the old uid


def test_a_vpc_keeps_its_vni_across_reconciles_and_unpinning():
    server, cfg = ApiServerStandIn(), config()
    vpc = make_vpc(server, "blue", vni=300, namespaces=[])
    assert steps.reconcile_vpc(server, vpc, cfg)["vni"] == 300
    vpc = server.replace(VPC, {**server.get(VPC, "blue"), "spec": spec(namespaces=[])})
    assert steps.reconcile_vpc(server, vpc, cfg)["vni"] == 300  # unpinned: keeps what it holds
    vpc = server.replace(VPC, {**server.get(VPC, "blue"), "spec": spec(vni=301, namespaces=[])})
    st = steps.reconcile_vpc(server, vpc, cfg)
    assert st["vni"] == 301 and claims(server) == {301: "blue"}  # the old claim released
    assert st["observedGeneration"] == 3


def test_a_lost_claim_does_not_renumber_a_live_vpc():
    server, cfg = ApiServerStandIn(), config()
    for name in ("a", "b"):
        steps.reconcile_vpc(server, make_vpc(server, name, namespaces=[]), cfg)
    server.delete(VNICLAIM, "vni-4097")  # b's claim, deleted by hand
    st = steps.reconcile_vpc(server, server.get(VPC, "b"), cfg)
    assert st["vni"] == 4097 and claims(server) == {4096: "a", 4097: "b"}


def test_a_second_reconcile_writes_nothing():
    server = ApiServerStandIn(namespaces=("vpcni-system", "team-a", "team-b"))
    cfg = config()
    vpc = make_vpc(server, "blue")
    steps.reconcile_vpc(server, vpc, cfg, now="2026-01-01T00:00:00Z")
    writes = server.counts["writes"]
    steps.reconcile_vpc(server, server.get(VPC, "blue"), cfg, now="2026-01-02T00:00:00Z")
    assert server.counts["writes"] == writes
    cond = status(server, "blue")["conditions"]
    assert cond == [{"type": "Ready", "status": "True", "reason": "Ready", "message": "",
                     "lastTransitionTime": "2026-01-01T00:00:00Z", "observedGeneration": 1}]


# ---------------------------------------------------------------- NADs

def test_nads_per_bound_namespace_parse_with_vpcnis_own_models():
    server = ApiServerStandIn(namespaces=("vpcni-system", "team-a", "team-b", "team-c"))
    cfg = config()
    vpc = make_vpc(server, "blue", mtu=1450, backend="kernel",
                   subnets=[{"name": "v4", "cidr": "172.16.32.0/24",
                             "exclude": ["172.16.32.1-172.16.32.9"]},
                            {"name": "v6", "cidr": "fd00:32::/64"}])
    st = steps.reconcile_vpc(server, vpc, cfg)
    assert st["phase"] == "Ready" and st["message"] == ""
    nads = server.list(NAD)
    assert sorted(n["metadata"]["namespace"] for n in nads) == ["team-a", "team-b"]
    for nad in nads:
        assert nad["metadata"]["name"] == "vpc-blue"
        assert nad["metadata"]["ownerReferences"][0]["uid"] == vpc["metadata"]["uid"]
        raw = json.loads(nad["spec"]["config"])
        conf = NetworkConfig.parse(raw)
        assert (conf.name, conf.vni, conf.mtu, conf.backend) == ("vpc-blue", 4096, 1450,
                                                                 "kernel")
        assert conf.capabilities == {"ips": True, "mac": True}
        ipam = parse_settings(raw["ipam"])
        assert [str(s) for s in ipam.subnets] == ["172.16.32.0/24", "fd00:32::/64"]
        assert ipam.exclude == ["172.16.32.1-172.16.32.9"]
        assert ipam.store.type == "etcd" and ipam.store.endpoints == ETCD["endpoints"]
    # team-b unbound, team-c bound: team-b's NAD goes, team-c's comes.
    vpc = server.replace(VPC, {**server.get(VPC, "blue"),
                               "spec": {**vpc["spec"], "namespaces": ["team-a", "team-c"]}})
    steps.reconcile_vpc(server, vpc, cfg)
    assert sorted(n["metadata"]["namespace"] for n in server.list(NAD)) == ["team-a", "team-c"]


def test_a_spec_change_updates_the_nads_in_place():
    server = ApiServerStandIn(namespaces=("vpcni-system", "team-a", "team-b"))
    cfg = config()
    vpc = make_vpc(server, "blue")
    steps.reconcile_vpc(server, vpc, cfg)
    vpc = server.replace(VPC, {**server.get(VPC, "blue"), "spec": spec(mtu=1400)})
    steps.reconcile_vpc(server, vpc, cfg)
    for nad in server.list(NAD):
        assert json.loads(nad["spec"]["config"])["mtu"] == 1400


def test_ipam_gets_ranges_when_subnets_cannot_say_it():
    s = logic.parse_spec(spec(interfaceKind="sriov",
                              subnets=[{"name": "a", "cidr": "172.16.32.0/24",
                                        "gateway": "172.16.32.254"},
                                       {"name": "b", "cidr": "172.16.33.0/24"},
                                       {"name": "c", "cidr": "fd00:32::/64"}]))
    raw = logic.network_config("blue", s, 300, config())
    assert raw["interface"] == "vf"
    assert raw["ipam"]["ranges"] == [
        [{"subnet": "172.16.32.0/24", "gateway": "172.16.32.254"},
         {"subnet": "172.16.33.0/24"}],
        [{"subnet": "fd00:32::/64"}]]
    NetworkConfig.parse(raw)
    ipam = parse_settings(raw["ipam"])
    assert len(ipam.range_sets()) == 2  # one address of each family per attachment


def test_a_nad_not_made_by_the_controller_is_left_alone_and_a_missing_namespace_is_said():
    server = ApiServerStandIn(namespaces=("vpcni-system", "team-a"))
    cfg = config()
    server.create(NAD, {"apiVersion": logic.NAD_API_VERSION, "kind": logic.NAD_KIND,
                        "metadata": {"name": "vpc-blue", "namespace": "team-a",
                                     "labels": {"team": "a", logic.LABEL_VPC: "blue"}},
                        "spec": {"config": "{}"}})
    st = steps.reconcile_vpc(server, make_vpc(server, "blue"), cfg)
    assert st["phase"] == "Pending"
    assert "namespace team-a: NAD vpc-blue exists and is not the controller's" in st["message"]
    assert "namespace team-b does not exist" in st["message"]
    assert server.get(NAD, "vpc-blue", "team-a")["spec"]["config"] == "{}"
    # The namespace appears: the next reconcile (the timer's) makes its NAD.
    server.namespaces.add("team-b")
    steps.reconcile_vpc(server, server.get(VPC, "blue"), cfg)
    assert server.get(NAD, "vpc-blue", "team-b") is not None
    # Deleting the Vpc deletes its own NAD, never the hand-made one.
    delete_vpc(server, "blue", cfg)
    assert server.get(NAD, "vpc-blue", "team-b") is None
    assert server.get(NAD, "vpc-blue", "team-a")["spec"]["config"] == "{}"


# ---------------------------------------------------------------- bindings

def test_the_bindings_document():
    server = ApiServerStandIn(namespaces=("vpcni-system", "team-a", "team-b"))
    cfg = config()
    steps.reconcile_vpc(server, make_vpc(server, "blue", vni=300), cfg)
    steps.reconcile_vpc(server, make_vpc(server, "red", namespaces=["team-b"]), cfg)
    make_vpc(server, "green")  # not reconciled yet: no VNI in force, not bound
    expected = {"version": 1, "vnis": {
        "300": {"vpc": "blue", "network": "vpc-blue", "namespaces": ["team-a", "team-b"]},
        "4096": {"vpc": "red", "network": "vpc-red", "namespaces": ["team-b"]}}}
    assert steps.reconcile_bindings(server, cfg) == expected
    cm = server.get(CONFIGMAP, "vpcni-tenancy", "vpcni-system")
    assert json.loads(cm["data"]["bindings.json"]) == expected
    assert cm["metadata"]["labels"][logic.LABEL_MANAGED_BY] == logic.MANAGER


def test_bindings_bind_a_vni_only_to_the_vpc_whose_claim_backs_its_status():
    vpcs = [{"metadata": {"name": "blue", "uid": "u1"}, "spec": spec(), "status": {"vni": 300}},
            # red's status says 300 too (stale or forged): its claim does not back it.
            {"metadata": {"name": "red", "uid": "u2"}, "spec": spec(), "status": {"vni": 300}}]
    claim = logic.claim_object(300, vpcs[0])
    doc = logic.bindings_document(vpcs, [claim])
    assert doc == {"version": 1, "vnis": {"300": {"vpc": "blue", "network": "vpc-blue",
                                                  "namespaces": ["team-a", "team-b"]}}}


def test_a_hand_made_bindings_configmap_is_taken_over_keeping_its_other_keys():
    server, cfg = ApiServerStandIn(), config()
    server.create(CONFIGMAP, {"apiVersion": "v1", "kind": "ConfigMap",
                              "metadata": {"name": "vpcni-tenancy", "namespace": "vpcni-system"},
                              "data": {"bindings.json": "{}", "README": "hand made"}})
    steps.reconcile_vpc(server, make_vpc(server, "blue", namespaces=[]), cfg)
    cm = server.get(CONFIGMAP, "vpcni-tenancy", "vpcni-system")
    assert cm["data"]["README"] == "hand made"
    assert json.loads(cm["data"]["bindings.json"])["vnis"] == {
        "4096": {"vpc": "blue", "network": "vpc-blue", "namespaces": []}}


# ---------------------------------------------------------------- status from vpcni-ipam

def test_status_counts_come_from_vpcni_ipams_store(tmp_path):
    server = ApiServerStandIn(namespaces=("vpcni-system", "team-a", "team-b"))
    cfg = config()
    vpc = make_vpc(server, "blue")
    steps.reconcile_vpc(server, vpc, cfg)
    # Pods attach through the NAD as rendered; the store is SQLite here, etcd in a cluster.
    raw = json.loads(server.get(NAD, "vpc-blue", "team-a")["spec"]["config"])
    raw["ipam"]["store"] = {"type": "sqlite", "path": str(tmp_path / "ipam.db")}
    settings = parse_settings(raw["ipam"])
    store = SqliteStore(settings.store)
    alloc = Allocator(settings, raw["name"], store)
    for cid, node in (("c1", "n1"), ("c2", "n1"), ("c3", "n2")):
        alloc.allocate(owner_for(raw["name"], cid, "net1", {}, node))
    # Another VPC's allocations in the same store are not counted.
    Allocator(settings, "vpc-red", store).allocate(owner_for("vpc-red", "c9", "net1", {}, "n3"))
    st = steps.reconcile_vpc(server, server.get(VPC, "blue"), cfg, store=store)
    assert st["nodes"] == ["n1", "n2"] and st["endpoints"] == 3
    # 254 hosts, less .1-.9 excluded (the gateway .1 among them), less 3 used.
    assert st["addresses"] == {"used": 3, "free": 242, "subnets": [
        {"name": "default", "cidr": "172.16.32.0/24", "used": 3, "free": 242}]}
    assert st["phase"] == "Ready"


def test_capacity_counts_gateways_and_overlapping_exclusions_once():
    s = logic.parse_spec(spec(subnets=[
        {"name": "a", "cidr": "10.0.0.0/29", "gateway": "10.0.0.6",
         "exclude": ["10.0.0.1-10.0.0.2", "10.0.0.2/31", "10.0.0.6"]},
        {"name": "b", "cidr": "fd00::/64"}]))
    # /29: hosts .1-.6; .1, .2, .3 excluded, .6 gateway (and excluded): .4, .5 left.
    assert logic.capacity(s.subnets[0], s.subnets[0].exclude) == 2
    st = logic.usage_status("blue", s, [logic.Held("vpc-blue", "fd00::5", "c1", "eth1", "n1")])
    assert st["addresses"]["subnets"][1]["free"] == logic.FREE_CAP
    assert st["addresses"]["used"] == 1 and st["nodes"] == ["n1"]


def test_an_unreachable_store_leaves_the_counts_as_they_were():
    from vpcni.core.errors import TryAgainLater

    class Down:
        def list(self, network=None):
            raise TryAgainLater("ipam store etcd unreachable")

    server, cfg = ApiServerStandIn(), config()
    vpc = make_vpc(server, "blue", namespaces=[])
    server.replace_status(VPC, {**vpc, "status": {"endpoints": 5}})
    st = steps.reconcile_vpc(server, vpc, cfg, store=Down())
    assert st["phase"] == "Ready" and st["endpoints"] == 5


# ---------------------------------------------------------------- wiring (import only)

def test_the_kopf_wiring_imports_and_registers_its_handlers():
    """Import test only: running it needs an API server (docs/vpc-api.md)."""
    import kopf  # the `controller` extra, which the test setup installs
    from vpcni.controller import main

    registry = main.make_registry(config(), ApiServerStandIn())
    assert isinstance(registry, kopf.OperatorRegistry)
    # kopf has no public listing of a registry's handlers; its own containers are read here.
    def names(handlers):  # ids are the functions' qualified names (+ "/spec" for a field)
        return {h.id.split("/")[0].rsplit(".", 1)[-1] for h in handlers}

    assert names(registry._changing.get_all_handlers()) == {"reconcile", "finalize"}
    assert names(registry._spawning.get_all_handlers()) == {"refresh"}
    assert names(registry._activities.get_all_handlers()) == {"login"}
    settings = main.operator_settings()
    assert settings.persistence.finalizer == "vpcni.io/controller"
    assert isinstance(settings.persistence.progress_storage, kopf.AnnotationsProgressStorage)


def test_the_kubernetes_client_implementation_maps_the_api_servers_answers():
    """No call reaches an API server (there is none here): the client's methods are
    replaced by ones that raise what the API server answers, as the client would."""
    from kubernetes.client.exceptions import ApiException

    k = steps.KubernetesApi()
    assert k._selector({"b": "2", "a": "1"}) == "a=1,b=2"

    def answer(status, reason):
        def call(*args, **kwargs):
            raise ApiException(status=status, reason="x",
                               body=json.dumps({"kind": "Status", "reason": reason}))
        return call

    body = logic.claim_object(300, {"metadata": {"name": "blue", "uid": "u1"}})
    k.custom.create_cluster_custom_object = answer(409, "AlreadyExists")
    with pytest.raises(AlreadyExists):
        k.create(VNICLAIM, body)
    k.custom.replace_cluster_custom_object_status = answer(409, "Conflict")
    with pytest.raises(Conflict):
        k.replace_status(VPC, {"metadata": {"name": "blue", "resourceVersion": "1"}})
    k.custom.get_cluster_custom_object = answer(404, "NotFound")
    assert k.get(VPC, "blue") is None
    k.custom.delete_namespaced_custom_object = answer(404, "NotFound")
    assert k.delete(NAD, "vpc-blue", "team-a") is False
    k.custom.list_cluster_custom_object = answer(403, "Forbidden")
    with pytest.raises(steps.ApiError, match="403 Forbidden"):
        k.list(NAD)
    seen = {}

    def created(namespace, cm):
        seen["cm"] = cm
        return cm

    k.core.create_namespaced_config_map = created
    doc = logic.bindings_configmap({"version": 1, "vnis": {}}, config())
    assert k.create(CONFIGMAP, doc) == doc  # through the client's model and back
    assert seen["cm"].metadata.namespace == "vpcni-system"


# ---------------------------------------------------------------- routed Vpcs (spec.routing)

NAMESPACES = ("vpcni-system", "team-a", "team-b")


def routed(**kw) -> dict:
    """A routed spec: subnets web and db of one VPC, routed over its L3VNI."""
    out = spec(subnets=[{"name": "web", "cidr": "10.20.0.0/24"},
                        {"name": "db", "cidr": "10.20.1.0/24", "gateway": "10.20.1.254",
                         "exclude": ["10.20.1.1-10.20.1.9"]}],
               routing={"routes": [{"dst": "192.0.2.0/24", "via": "10.20.1.14"}]})
    out.update(kw)
    return out


def make_routed(server, name, **kw) -> dict:
    return server.create(VPC, {"apiVersion": logic.API_VERSION, "kind": "Vpc",
                               "metadata": {"name": name}, "spec": routed(**kw)})


def roles(server) -> dict[int, tuple[str, str]]:
    return {logic.claim_vni(c): (logic.claim_holder(c), c["spec"].get("role"))
            for c in server.list(VNICLAIM)}


def vnis_in_status(st: dict) -> list[int]:
    """Every VNI a status says the Vpc holds (vni, or l3vni and the subnets')."""
    return list(logic.status_vnis(st).values())


def test_a_routed_spec_parses_with_its_defaults():
    s = logic.parse_spec(routed())
    assert s.routing.l3vni is None and s.routing.egress is True
    assert s.routing.defaultRoute is True
    assert [str(r.via) for r in s.routing.routes] == ["10.20.1.14"]
    assert [n.role for n in logic.vni_needs(s)] == ["l3", "subnet/web", "subnet/db"]
    assert [n.field for n in logic.vni_needs(s)] == [
        "spec.routing.l3vni", "spec.subnets[0].vni", "spec.subnets[1].vni"]
    assert [n.role for n in logic.vni_needs(logic.parse_spec(spec()))] == ["vpc"]


@pytest.mark.parametrize("change, field", [
    ({"vni": 300}, "spec.vni"),
    ({"subnets": [{"name": "a", "cidr": "10.0.0.0/24"}, {"name": "b", "cidr": "fd00::/64"}]},
     "spec.subnets[1].cidr"),
    ({"subnets": [{"name": "a", "cidr": "10.0.0.0/7"}]}, "spec.subnets[0].cidr"),
    ({"subnets": [{"name": "a", "cidr": "10.0.0.0/24", "vni": 400},
                  {"name": "b", "cidr": "10.0.1.0/24", "vni": 400}]}, "spec.subnets[1].vni"),
    ({"routing": {"l3vni": 400}, "subnets": [{"name": "a", "cidr": "10.0.0.0/24", "vni": 400}]},
     "spec.subnets[0].vni"),
    ({"routing": {"l3vni": 0}}, "spec.routing.l3vni"),
    ({"routing": {"egress": "yes"}}, "spec.routing.egress"),
    ({"routing": {"nat": True}}, "spec.routing.nat"),
    ({"routing": {"routes": [{"dst": "192.0.2.1/24", "via": "10.20.1.14"}]}},
     "spec.routing.routes[0].dst"),
    ({"routing": {"routes": [{"dst": "192.0.2.0/24", "via": "10.99.0.1"}]}},
     "spec.routing.routes[0].via"),
    ({"routing": {"routes": [{"dst": "192.0.2.0/24", "via": "10.20.0.1"}]}},
     "spec.routing.routes[0].via"),  # web's gateway (its first host)
])
def test_routed_spec_errors_name_the_field(change, field):
    with pytest.raises(SpecError) as err:
        logic.parse_spec(routed(**change))
    assert str(err.value).startswith(field), str(err.value)


def test_routed_spec_errors_say_why():
    with pytest.raises(SpecError, match=r"^spec\.vni = 300: not with spec\.routing"):
        logic.parse_spec(routed(vni=300))
    with pytest.raises(SpecError, match=r"^spec\.subnets\[1\]\.cidr = fd00::/64: a routed Vpc "
                                        r"\(spec\.routing\) takes IPv4 subnets only"):
        logic.parse_spec(routed(subnets=[{"name": "a", "cidr": "10.0.0.0/24"},
                                         {"name": "b", "cidr": "fd00::/64"}]))
    with pytest.raises(SpecError, match=r"^spec\.subnets\[0\]\.vni = 400: a subnet's own VNI "
                                        r"needs spec\.routing"):
        logic.parse_spec(spec(subnets=[{"name": "a", "cidr": "10.0.0.0/24", "vni": 400}]))
    with pytest.raises(SpecError, match=r"^spec\.subnets\[0\]\.vni = 400: also "
                                        r"spec\.routing\.l3vni"):
        logic.parse_spec(routed(routing={"l3vni": 400},
                                subnets=[{"name": "a", "cidr": "10.0.0.0/24", "vni": 400}]))


def test_a_routed_vpc_gets_an_l3vni_and_a_vni_per_subnet_and_a_nad_per_subnet():
    server = ApiServerStandIn(namespaces=NAMESPACES + ("team-c",))
    cfg = config()
    vpc = make_routed(server, "green", mtu=1450, backend="kernel")
    st = steps.reconcile_vpc(server, vpc, cfg)
    assert st["phase"] == "Ready" and st["message"] == ""
    assert "vni" not in st and st["l3vni"] == 4096
    assert st["subnets"] == [{"name": "web", "vni": 4097}, {"name": "db", "vni": 4098}]
    assert roles(server) == {4096: ("green", "l3"), 4097: ("green", "subnet/web"),
                             4098: ("green", "subnet/db")}
    nads = server.list(NAD)
    assert sorted((n["metadata"]["namespace"], n["metadata"]["name"]) for n in nads) == [
        ("team-a", "vpc-green-db"), ("team-a", "vpc-green-web"),
        ("team-b", "vpc-green-db"), ("team-b", "vpc-green-web")]
    for nad in nads:
        raw = json.loads(nad["spec"]["config"])
        conf = NetworkConfig.parse(raw)
        subnet = raw["name"].rsplit("-", 1)[1]
        assert conf.name == nad["metadata"]["name"] == f"vpc-green-{subnet}"
        assert (conf.vni, conf.mtu, conf.backend) == (
            {"web": 4097, "db": 4098}[subnet], 1450, "kernel")
        assert nad["metadata"]["ownerReferences"][0]["uid"] == vpc["metadata"]["uid"]
        r = conf.routing
        assert (r.vpc, r.l3vni, r.egress, r.defaultRoute) == ("green", 4096, True, True)
        assert [(str(x.dst), str(x.via)) for x in r.routes] == [("192.0.2.0/24", "10.20.1.14")]
        ipam = parse_settings(raw["ipam"])
        (rs,) = ipam.range_sets()
        (rng,) = rs
        # One subnet per NAD; vpcni-ipam's gateway is the anycast gateway.
        assert rng.subnet == r.subnet and rng.gateway_address() == r.gateway
        assert ipam.store.type == "etcd"
    db = json.loads(server.get(NAD, "vpc-green-db", "team-a")["spec"]["config"])
    assert db["routing"]["gateway"] == "10.20.1.254"
    assert db["ipam"]["ranges"] == [[{"subnet": "10.20.1.0/24", "gateway": "10.20.1.254"}]]
    assert db["ipam"]["exclude"] == ["10.20.1.1-10.20.1.9"]
    web = json.loads(server.get(NAD, "vpc-green-web", "team-a")["spec"]["config"])
    assert "gateway" not in web["routing"] and web["ipam"]["subnets"] == ["10.20.0.0/24"]
    assert "exclude" not in web["ipam"]
    # The bindings: each subnet's VNI with its network; the L3VNI is never bound.
    doc = steps.reconcile_bindings(server, cfg)
    assert doc["vnis"] == {
        "4097": {"vpc": "green", "network": "vpc-green-web", "namespaces": ["team-a", "team-b"],
                 "l3vni": 4096},
        "4098": {"vpc": "green", "network": "vpc-green-db", "namespaces": ["team-a", "team-b"],
                 "l3vni": 4096}}
    # A second reconcile writes nothing.
    writes = server.counts["writes"]
    steps.reconcile_vpc(server, server.get(VPC, "green"), cfg)
    assert server.counts["writes"] == writes
    # Unbinding a namespace deletes both of its NADs; a new one gets both.
    vpc = server.replace(VPC, {**server.get(VPC, "green"),
                               "spec": routed(namespaces=["team-a", "team-c"])})
    steps.reconcile_vpc(server, vpc, cfg)
    assert sorted((n["metadata"]["namespace"], n["metadata"]["name"])
                  for n in server.list(NAD)) == [
        ("team-a", "vpc-green-db"), ("team-a", "vpc-green-web"),
        ("team-c", "vpc-green-db"), ("team-c", "vpc-green-web")]


@pytest.mark.parametrize("gateway", [None, "10.9.0.6"])
def test_vpcni_ipam_never_hands_out_the_anycast_gateway(tmp_path, gateway):
    """Every address of the rendered subnet's pool, taken by the real allocator: all
    inside routing.subnet, none the gateway RoutingConfig answers for."""
    subnet = {"name": "s", "cidr": "10.9.0.0/29", **({"gateway": gateway} if gateway else {})}
    s = logic.parse_spec(routed(subnets=[subnet], routing={}))
    raw = logic.network_configs("green", s, {"l3": 4000, "subnet/s": 400}, config())[
        "vpc-green-s"]
    conf = NetworkConfig.parse(raw)
    raw["ipam"]["store"] = {"type": "sqlite", "path": str(tmp_path / "ipam.db")}
    settings = parse_settings(raw["ipam"])
    alloc = Allocator(settings, raw["name"], SqliteStore(settings.store))
    got = []
    for i in range(6):
        try:
            res = alloc.allocate(owner_for(raw["name"], f"c{i}", "net1", {}, "n1"))
        except Exception:  # the pool is exhausted
            break
        got += [str(ip.address.ip) for ip in res.ips]
    expected_gw = gateway or "10.9.0.1"
    assert str(conf.routing.gateway) == expected_gw
    assert len(got) == 5 and expected_gw not in got  # 6 hosts of a /29, less the gateway
    assert all(ipaddress.ip_address(a) in conf.routing.subnet for a in got)
    assert logic.capacity(s.subnets[0], []) == 5


def test_pinned_routed_vnis_and_a_pinned_l3vni_held_by_another_vpc():
    server, cfg = ApiServerStandIn(namespaces=NAMESPACES), config()
    steps.reconcile_vpc(server, make_vpc(server, "blue", vni=4000), cfg)
    vpc = make_routed(server, "green", routing={"l3vni": 4000},
                      subnets=[{"name": "web", "cidr": "10.20.0.0/24", "vni": 400},
                               {"name": "db", "cidr": "10.20.1.0/24"}])
    st = steps.reconcile_vpc(server, vpc, cfg)
    assert st["phase"] == "Conflict"
    assert st["message"] == ("VNI 4000 pinned by Vpc 'green' (spec.routing.l3vni) is held by "
                             "Vpc 'blue' (VniClaim vni-4000); pin another VNI or remove "
                             "spec.routing.l3vni")
    # Pinned first: nothing was taken from the pool for db, no NAD rendered.
    assert 4096 not in claims(server) or claims(server)[4096] == "blue"
    assert [n["metadata"]["name"] for n in server.list(NAD)] == ["vpc-blue", "vpc-blue"]
    assert "l3vni" not in st and "subnets" not in st
    delete_vpc(server, "blue", cfg)
    st = steps.reconcile_vpc(server, server.get(VPC, "green"), cfg)
    assert st["phase"] == "Ready" and st["l3vni"] == 4000
    assert st["subnets"] == [{"name": "web", "vni": 400}, {"name": "db", "vni": 4096}]
    assert roles(server) == {400: ("green", "subnet/web"), 4000: ("green", "l3"),
                             4096: ("green", "subnet/db")}


def test_adding_and_removing_a_routed_subnet():
    server, cfg = ApiServerStandIn(namespaces=NAMESPACES), config()
    steps.reconcile_vpc(server, make_routed(server, "green"), cfg)
    three = routed(subnets=[*routed()["subnets"], {"name": "ops", "cidr": "10.20.2.0/24"}])
    vpc = server.replace(VPC, {**server.get(VPC, "green"), "spec": three})
    st = steps.reconcile_vpc(server, vpc, cfg)
    assert st["l3vni"] == 4096 and st["subnets"] == [
        {"name": "web", "vni": 4097}, {"name": "db", "vni": 4098}, {"name": "ops", "vni": 4099}]
    assert server.get(NAD, "vpc-green-ops", "team-b") is not None
    assert claims(server) == {4096: "green", 4097: "green", 4098: "green", 4099: "green"}
    # db removed: its claim released after the commit, its NADs deleted, its binding gone.
    # (its route's next hop is in db: the route goes too, else the spec is Invalid)
    two = routed(subnets=[three["subnets"][0], three["subnets"][2]], routing={})
    vpc = server.replace(VPC, {**server.get(VPC, "green"), "spec": two})
    st = steps.reconcile_vpc(server, vpc, cfg)
    assert st["subnets"] == [{"name": "web", "vni": 4097}, {"name": "ops", "vni": 4099}]
    assert sorted(claims(server)) == [4096, 4097, 4099]
    assert sorted({n["metadata"]["name"] for n in server.list(NAD)}) == [
        "vpc-green-ops", "vpc-green-web"]
    doc = json.loads(server.get(CONFIGMAP, "vpcni-tenancy", "vpcni-system")["data"]
                     ["bindings.json"])
    assert {k: v["network"] for k, v in doc["vnis"].items()} == {
        "4097": "vpc-green-web", "4099": "vpc-green-ops"}
    # The freed VNI is the next one handed out.
    assert steps.reconcile_vpc(server, make_vpc(server, "blue"), cfg)["vni"] == 4098


def test_turning_routing_on_and_off_gives_new_vnis_and_renames_the_nads():
    server, cfg = ApiServerStandIn(namespaces=NAMESPACES), config()
    plain = spec(subnets=[{"name": "web", "cidr": "10.20.0.0/24"}])
    steps.reconcile_vpc(server, make_vpc(server, "green", **plain), cfg)
    assert roles(server) == {4096: ("green", "vpc")}
    vpc = server.replace(VPC, {**server.get(VPC, "green"),
                               "spec": {**plain, "routing": {}}})
    st = steps.reconcile_vpc(server, vpc, cfg)
    assert "vni" not in st and st["l3vni"] == 4097 and st["subnets"] == [
        {"name": "web", "vni": 4098}]
    # The old VNI is released (after the commit), the old NADs are gone.
    assert roles(server) == {4097: ("green", "l3"), 4098: ("green", "subnet/web")}
    assert {n["metadata"]["name"] for n in server.list(NAD)} == {"vpc-green-web"}
    # And back: one VNI again (a new one), one NAD vpc-green.
    vpc = server.replace(VPC, {**server.get(VPC, "green"), "spec": plain})
    st = steps.reconcile_vpc(server, vpc, cfg)
    assert st["vni"] == 4096 and "l3vni" not in st and "subnets" not in st
    assert roles(server) == {4096: ("green", "vpc")}
    assert {n["metadata"]["name"] for n in server.list(NAD)} == {"vpc-green"}
    doc = steps.reconcile_bindings(server, cfg)
    assert doc["vnis"] == {"4096": {"vpc": "green", "network": "vpc-green",
                                    "namespaces": ["team-a", "team-b"]}}


def test_a_claim_left_for_a_role_is_reused_and_a_role_keeps_its_status_vni():
    """A controller that crashed after claiming VNIs for a routed Vpc, before its
    commit: its claims are taken again by role, not leaked, not doubled."""
    server, cfg = ApiServerStandIn(), config()
    vpc = make_routed(server, "green", namespaces=[])
    server.create(VNICLAIM, logic.claim_object(4200, vpc, "subnet/db"))
    server.create(VNICLAIM, logic.claim_object(4100, vpc, "l3"))
    st = steps.reconcile_vpc(server, vpc, cfg)
    assert st["l3vni"] == 4100 and st["subnets"] == [{"name": "web", "vni": 4096},
                                                     {"name": "db", "vni": 4200}]
    assert sorted(claims(server)) == [4096, 4100, 4200]
    # A claim lost by hand is re-claimed with the VNI status gives its role.
    server.delete(VNICLAIM, "vni-4200")
    st = steps.reconcile_vpc(server, server.get(VPC, "green"), cfg)
    assert st["subnets"][1] == {"name": "db", "vni": 4200}
    assert roles(server)[4200] == ("green", "subnet/db")


def test_a_routed_vpc_short_of_vnis_is_pending_and_frees_them_when_deleted():
    server, cfg = ApiServerStandIn(), config(vniRange="4096-4099")
    steps.reconcile_vpc(server, make_vpc(server, "blue", namespaces=[]), cfg)
    st = steps.reconcile_vpc(server, make_routed(
        server, "green", namespaces=[],
        subnets=[*routed()["subnets"], {"name": "ops", "cidr": "10.20.2.0/24"}]), cfg)
    assert st["phase"] == "Pending"
    assert st["message"].startswith("no free VNI in vniRange 4096-4099 (4 of 4 claimed)")
    assert "l3vni" not in st and "subnets" not in st
    assert sorted(claims(server).items()) == [(4096, "blue"), (4097, "green"),
                                              (4098, "green"), (4099, "green")]
    assert steps.reconcile_bindings(server, cfg)["vnis"].keys() == {"4096"}
    # Freed by blue: green completes with the claims it already had.
    delete_vpc(server, "blue", cfg)
    st = steps.reconcile_vpc(server, server.get(VPC, "green"), cfg)
    assert st["phase"] == "Ready" and sorted(vnis_in_status(st)) == [4096, 4097, 4098, 4099]
    delete_vpc(server, "green", cfg)
    assert claims(server) == {}


def test_routed_status_counts_each_subnet_in_its_own_pool(tmp_path):
    server, cfg = ApiServerStandIn(namespaces=NAMESPACES), config()
    steps.reconcile_vpc(server, make_routed(server, "green"), cfg)
    store = None
    for name, pods in (("vpc-green-web", (("c1", "n1"), ("c2", "n2"))),
                       ("vpc-green-db", (("c3", "n2"),))):
        raw = json.loads(server.get(NAD, name, "team-a")["spec"]["config"])
        raw["ipam"]["store"] = {"type": "sqlite", "path": str(tmp_path / "ipam.db")}
        settings = parse_settings(raw["ipam"])
        store = store or SqliteStore(settings.store)
        for cid, node in pods:
            Allocator(settings, name, store).allocate(owner_for(name, cid, "net1", {}, node))
    # A pool of another VPC (a plain one with the same first subnet) is not counted.
    other = parse_settings({"type": "vpcni-ipam", "subnets": ["10.20.0.0/24"],
                            "store": {"type": "sqlite", "path": str(tmp_path / "ipam.db")}})
    Allocator(other, "vpc-green-webx", store).allocate(
        owner_for("vpc-green-webx", "c9", "net1", {}, "n9"))
    st = steps.reconcile_vpc(server, server.get(VPC, "green"), cfg, store=store)
    assert st["nodes"] == ["n1", "n2"] and st["endpoints"] == 3
    # web: 254 hosts less the gateway .1, less 2 used; db: less .254 and .1-.9, less 1.
    assert st["addresses"] == {"used": 3, "free": 494, "subnets": [
        {"name": "web", "cidr": "10.20.0.0/24", "used": 2, "free": 251},
        {"name": "db", "cidr": "10.20.1.0/24", "used": 1, "free": 243}]}


def test_a_network_name_two_vpcs_would_share_goes_to_one_of_them():
    """Vpc green-web's network and Vpc green's routed subnet web are both vpc-green-web
    (a vpcni-ipam pool, cluster-wide): the Vpc serving it keeps it, else the older."""
    server, cfg = ApiServerStandIn(namespaces=NAMESPACES), config()
    steps.reconcile_vpc(server, make_vpc(server, "green-web"), cfg)  # serves it
    st = steps.reconcile_vpc(server, make_routed(server, "green"), cfg)  # "older" by name
    assert st["phase"] == "Conflict" and "vpc-green-web" in st["message"]
    assert "'green-web'" in st["message"] and "l3vni" not in st
    assert set(claims(server).values()) == {"green-web"}
    assert {n["metadata"]["name"] for n in server.list(NAD)} == {"vpc-green-web"}
    cm = json.loads(server.get(NAD, "vpc-green-web", "team-a")["spec"]["config"])
    assert "routing" not in cm
    # green-web goes: green gets it.
    delete_vpc(server, "green-web", cfg)
    st = steps.reconcile_vpc(server, server.get(VPC, "green"), cfg)
    assert st["phase"] == "Ready" and "vpc-green-web" in {
        n["metadata"]["name"] for n in server.list(NAD)}
    # Neither serving: the older (same creationTimestamp here: then the name) keeps it.
    server2 = ApiServerStandIn(namespaces=NAMESPACES)
    make_routed(server2, "green")
    st = steps.reconcile_vpc(server2, make_vpc(server2, "green-web"), cfg)
    assert st["phase"] == "Conflict" and "'green'" in st["message"]
    assert steps.reconcile_vpc(server2, server2.get(VPC, "green"), cfg)["phase"] == "Ready"


def test_a_managed_nad_of_another_vpc_is_left_alone():
    server, cfg = ApiServerStandIn(namespaces=NAMESPACES), config()
    server.create(NAD, {"apiVersion": logic.NAD_API_VERSION, "kind": logic.NAD_KIND,
                        "metadata": {"name": "vpc-blue", "namespace": "team-a",
                                     "labels": {logic.LABEL_MANAGED_BY: logic.MANAGER,
                                                logic.LABEL_VPC: "blue-old"}},
                        "spec": {"config": "{}"}})
    st = steps.reconcile_vpc(server, make_vpc(server, "blue"), cfg)
    assert st["phase"] == "Pending"
    assert "namespace team-a: NAD vpc-blue is Vpc 'blue-old''s (left alone)" in st["message"]
    assert server.get(NAD, "vpc-blue", "team-a")["spec"]["config"] == "{}"


def test_routed_and_plain_vpcs_allocated_from_threads_never_share_a_vni():
    """Twelve routed Vpcs (an L3VNI and three subnets each) and twelve plain ones,
    allocated from 8 threads: 60 VNIs, all distinct, one claim per VNI held."""
    server = ApiServerStandIn(jitter=0.0002)
    cfg = config()
    three = [*routed()["subnets"], {"name": "ops", "cidr": "10.20.2.0/24"}]
    vpcs = [make_routed(server, f"r{i}", namespaces=[], subnets=three) if i % 2 else
            make_vpc(server, f"p{i}", namespaces=[]) for i in range(24)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(lambda v: steps.allocate_vni(server, v, cfg.pool()), vpcs))
    assert all(o.phase == "Ready" for o in outcomes)
    held = [v for o in outcomes for v in o.vnis.values()]
    assert len(held) == 12 * 4 + 12 and len(set(held)) == len(held)
    assert set(held) == set(range(4096, 4096 + len(held)))  # lowest free, nothing leaked
    by_status = {v: logic.name_of(vpc) for vpc in vpcs
                 for v in vnis_in_status(status(server, logic.name_of(vpc)))}
    assert claims(server) == by_status
    for vni, (holder, role) in roles(server).items():
        st = status(server, holder)
        assert logic.status_vnis(st)[role] == vni
    assert server.counts["already_exists"] > 0


def test_two_controllers_on_routed_vpcs_converge_to_one_claim_per_vni():
    server = ApiServerStandIn(namespaces=NAMESPACES, jitter=0.0005)
    cfg = config()
    vpcs = [make_routed(server, f"r{i}") if i % 3 else make_vpc(server, f"p{i}")
            for i in range(15)]

    def instance(order):
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            return list(pool.map(lambda v: steps.reconcile_vpc(server, v, cfg), order))

    with concurrent.futures.ThreadPoolExecutor(2) as both:
        runs = [both.submit(instance, vpcs), both.submit(instance, list(reversed(vpcs)))]
        for run in runs:
            run.result()
    statuses = {logic.name_of(v): status(server, logic.name_of(v)) for v in vpcs}
    assert all(s["phase"] == "Ready" for s in statuses.values())
    held = [v for s in statuses.values() for v in vnis_in_status(s)]
    assert len(held) == 10 * 3 + 5 and len(set(held)) == len(held)
    assert claims(server) == {v: n for n, s in statuses.items() for v in vnis_in_status(s)}
    # Each subnet NAD carries its subnet's VNI and its Vpc's L3VNI; the bindings agree.
    for name, s in statuses.items():
        for sub in s.get("subnets", []):
            raw = json.loads(server.get(NAD, logic.nad_name(name, sub["name"]), "team-b")
                             ["spec"]["config"])
            assert (raw["vni"], raw["routing"]["l3vni"]) == (sub["vni"], s["l3vni"])
    doc = steps.reconcile_bindings(server, cfg)
    bound = {int(k) for k in doc["vnis"]}
    l3 = {s["l3vni"] for s in statuses.values() if "l3vni" in s}
    assert bound == set(held) - l3 and len(l3) == 10
