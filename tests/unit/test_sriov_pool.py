"""VF claims: one holder per VF, found by key, damaged files skipped, released once."""

import threading

from vpcni.backends.sriov.pool import Claim, VfPool


def claim(pci: str, key=("net", "c1", "eth1")) -> Claim:
    return Claim(pci=pci, key=key, pf="enp1s0f0", index=0, mode="vf", saved={})


def test_a_vf_has_one_holder_and_is_found_by_key(tmp_path):
    pool = VfPool(tmp_path)
    assert pool.claim(claim("0000:01:01.0"))
    assert not pool.claim(claim("0000:01:01.0", key=("net", "c2", "eth1")))
    assert pool.get("0000:01:01.0").key == ("net", "c1", "eth1")
    assert pool.of(("net", "c1", "eth1")).pci == "0000:01:01.0"
    held = pool.get("0000:01:01.0")
    held.saved = {"mac": "00:00:00:00:00:00"}
    pool.update(held)
    assert pool.get("0000:01:01.0").saved == {"mac": "00:00:00:00:00:00"}
    pool.release("0000:01:01.0")
    assert pool.get("0000:01:01.0") is None and pool.claim(claim("0000:01:01.0"))


def test_racing_claims_give_the_vf_to_exactly_one(tmp_path):
    pool, winners = VfPool(tmp_path), []

    def take(i: int) -> None:
        if pool.claim(claim("0000:01:01.1", key=("net", f"c{i}", "eth1"))):
            winners.append(i)
    threads = [threading.Thread(target=take, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(winners) == 1
    assert not [p for p in (tmp_path / "sriov" / "claims").iterdir() if p.suffix == ".tmp"]


def test_a_damaged_claim_is_skipped_and_its_vf_stays_taken(tmp_path):
    pool = VfPool(tmp_path)
    pool.claim(claim("0000:01:01.0"))
    (tmp_path / "sriov" / "claims" / "0000:01:01.2.json").write_text("{not json")
    assert [c.pci for c in pool.all()] == ["0000:01:01.0"]
    assert not pool.claim(claim("0000:01:01.2", key=("net", "c9", "eth1")))
