import multiprocessing
import os
import time

import pytest

from vpcni.core.errors import InvalidEnvironment, LockTimeout
from vpcni.core.models import Attachment
from vpcni.core.store import AttachmentStore


def _att(cid="c1", ifname="eth1", network="net", vni=300, **kw):
    return Attachment(network=network, vni=vni, container_id=cid, ifname=ifname,
                      backend="kernel", **kw)


def test_put_get_delete_roundtrip(tmp_path):
    store = AttachmentStore(tmp_path)
    att = _att(mac="aa:bb:cc:dd:ee:ff", state="ready")
    store.put(att)
    assert store.get("net", "c1", "eth1") == att
    assert [a.key for a in store.all()] == [att.key]
    assert store.for_vni(300) == [att] and store.for_vni(301) == []
    store.delete("net", "c1", "eth1")
    store.delete("net", "c1", "eth1")  # twice is fine
    assert store.get("net", "c1", "eth1") is None
    assert list((tmp_path / "attachments").iterdir()) == []  # empty dirs pruned


def test_no_tmp_file_left_and_file_is_json(tmp_path):
    store = AttachmentStore(tmp_path)
    store.put(_att())
    files = [p.name for p in (tmp_path / "attachments" / "net" / "c1").iterdir()]
    assert files == ["eth1.json"]


@pytest.mark.parametrize("cid", ["../x", "a/b", "-lead", "", ".", "a b"])
def test_container_ids_that_would_escape_are_refused(tmp_path, cid):
    store = AttachmentStore(tmp_path)
    with pytest.raises(InvalidEnvironment, match="CNI_CONTAINERID"):
        store.get("net", cid, "eth1")


@pytest.mark.parametrize("ifname", ["a" * 16, "a/b", "a:b", "..", "a b", ""])
def test_bad_ifnames_are_refused(tmp_path, ifname):
    with pytest.raises(InvalidEnvironment, match="CNI_IFNAME"):
        AttachmentStore(tmp_path).get("net", "c1", ifname)


def _hold(state_dir, ready, release):
    store = AttachmentStore(state_dir)
    with store.attachment_lock("net", "c1", "eth1"):
        ready.set()
        release.wait(10)


def test_attachment_lock_excludes_other_processes(tmp_path):
    ready, release = multiprocessing.Event(), multiprocessing.Event()
    p = multiprocessing.Process(target=_hold, args=(tmp_path, ready, release))
    p.start()
    try:
        assert ready.wait(10)
        store = AttachmentStore(tmp_path, lock_timeout=0.3)
        t0 = time.monotonic()
        with pytest.raises(LockTimeout, match="still held"):
            with store.attachment_lock("net", "c1", "eth1"):
                pass
        assert time.monotonic() - t0 >= 0.3
        # A different attachment in another bucket is not blocked.
        other = next(f"c{i}" for i in range(2, 500)
                     if store.attachment_lock("net", f"c{i}", "eth1") is not None
                     and _bucket("net", f"c{i}") != _bucket("net", "c1"))
        with store.attachment_lock("net", other, "eth1"):
            pass
    finally:
        release.set()
        p.join(10)


def _bucket(network, cid):
    import hashlib
    return hashlib.sha1(f"{network}/{cid}/eth1".encode()).hexdigest()[:2]


def test_vni_lock_shared_allows_many_readers(tmp_path):
    store = AttachmentStore(tmp_path, lock_timeout=0.2)
    with store.vni_lock(300, exclusive=False):
        with AttachmentStore(tmp_path, lock_timeout=0.2).vni_lock(300, exclusive=False):
            pass
        with pytest.raises(LockTimeout):
            with AttachmentStore(tmp_path, lock_timeout=0.2).vni_lock(300, exclusive=True):
                pass


def test_lock_files_are_bounded(tmp_path):
    store = AttachmentStore(tmp_path)
    for i in range(600):
        with store.attachment_lock("net", f"c{i}", "eth1"):
            pass
    assert len(os.listdir(tmp_path / "locks")) <= 256


def test_listing_survives_concurrent_deletes(tmp_path):
    """all() while other callers add and delete records (and their directories)."""
    import threading

    store = AttachmentStore(tmp_path)
    stop = threading.Event()
    errors = []

    def churn(n):
        while not stop.is_set():
            for i in range(20):
                store.put(_att(cid=f"c{n}-{i}"))
            for i in range(20):
                store.delete("net", f"c{n}-{i}", "eth1")

    workers = [threading.Thread(target=churn, args=(n,)) for n in range(3)]
    for w in workers:
        w.start()
    try:
        for _ in range(200):
            try:
                list(store.all())
                list(store.all("net"))
            except OSError as exc:
                errors.append(exc)
    finally:
        stop.set()
        for w in workers:
            w.join()
    assert errors == []


def test_cached_store_answers_from_memory_and_refreshes_from_disk(tmp_path):
    store = AttachmentStore(tmp_path, cached=True)
    a, b = _att("c1", vni=300), _att("c2", vni=301)
    store.put(a)
    store.put(b)
    assert [x.key for x in store.for_vni(300)] == [a.key]
    assert store.vni_counts() == {300: 1, 301: 1}
    got = store.get(*a.key)
    got.mac = "aa:aa:aa:aa:aa:aa"  # a copy: the store's record is unchanged
    assert store.get(*a.key).mac is None
    # A record moved to another VNI leaves its old VNI's index.
    store.put(a.model_copy(update={"vni": 301}))
    assert store.vni_counts() == {301: 2}
    store.delete(*b.key)
    assert store.vni_counts() == {301: 1} and store.for_vni(300) == []
    # What another writer did on disk shows after refresh(), not before.
    other = AttachmentStore(tmp_path)
    other.put(_att("c3", vni=302))
    assert store.for_vni(302) == []
    store.refresh()
    assert [x.container_id for x in store.for_vni(302)] == ["c3"]
    assert [x.container_id for x in store.all()] == ["c1", "c3"]
    # The plain store sees the same records on disk.
    assert [x.container_id for x in other.all()] == ["c1", "c3"]


def test_a_torn_record_is_skipped_when_listing_and_named_when_read(tmp_path):
    store = AttachmentStore(tmp_path)
    store.put(_att("c1"))
    store.put(_att("c2"))
    (tmp_path / "attachments" / "net" / "c2" / "eth1.json").write_text('{"network": "ne')
    assert [x.container_id for x in store.all()] == ["c1"]
    assert [x.container_id for x in AttachmentStore(tmp_path, cached=True).all()] == ["c1"]
    from vpcni.core.errors import IOFailure
    with pytest.raises(IOFailure, match="c2/eth1.json is unreadable"):
        store.get("net", "c2", "eth1")


def test_unwritable_state_dir_is_an_io_failure(tmp_path):
    from vpcni.core.errors import IOFailure
    store = AttachmentStore(tmp_path)
    (tmp_path / "attachments" / "net").write_text("a file where a directory goes")
    with pytest.raises(IOFailure, match="cannot write"):
        store.put(_att())


def test_put_survives_concurrent_deletes_pruning_the_directories(tmp_path):
    """delete() prunes empty directories; a put() of another attachment of the same
    network (or container) racing it must still land (it once failed with ENOENT)."""
    import threading

    store = AttachmentStore(tmp_path)
    errors: list = []
    stop = threading.Event()

    def churn(cid: str) -> None:
        while not stop.is_set():
            store.put(_att(cid))
            store.delete("net", cid, "eth1")

    def writer() -> None:
        try:
            for i in range(300):
                store.put(_att("w", ifname=f"e{i % 3}"))
                store.delete("net", "w", f"e{i % 3}")
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=churn, args=(f"c{i}",)) for i in range(3)]
    for t in threads:
        t.start()
    try:
        writer()
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert errors == []


def test_state_dir_under_a_regular_file_is_code_5_naming_state_dir(tmp_path):
    """A path under a regular file fails for root too (ENOTDIR), where a mode would not."""
    from vpcni.core.errors import IOFailure
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(IOFailure) as info:
        AttachmentStore(tmp_path / "file" / "state")
    assert info.value.code == 5
    assert info.value.msg.startswith(f"stateDir {tmp_path / 'file' / 'state'}: ")
    assert "Not a directory" in info.value.msg


def test_state_dir_gone_unwritable_after_the_start_is_code_5_naming_state_dir(tmp_path):
    """The agent's store outlives its state dir: the lock files and records it cannot
    write are code 5 naming stateDir, not an internal error."""
    from vpcni.core.errors import IOFailure
    store = AttachmentStore(tmp_path / "state", cached=True)
    (tmp_path / "state").rename(tmp_path / "aside")
    (tmp_path / "state").write_text("not a directory")
    with pytest.raises(IOFailure) as info:
        with store.attachment_lock("net", "c1", "eth1"):
            pass
    assert info.value.msg.startswith(f"stateDir {tmp_path / 'state'}: cannot open a lock file")
    with pytest.raises(IOFailure, match=r"^stateDir .*: cannot write .*Not a directory"):
        store.put(_att())
