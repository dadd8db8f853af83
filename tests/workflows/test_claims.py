"""Claim files: one holder per item, heartbeats, expiry, takeover of stale claims (once, even when contended)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

from loupe.workflows.claims import Claims, Owner


def _plant(folder: Path, name: str, owner: Owner, age_s: float = 0.0) -> Path:
    """A claim file as another worker would leave it, its heartbeat ``age_s`` old."""
    path = Claims(folder).path(name)
    path.write_text(json.dumps(dataclasses.asdict(owner)))
    then = time.time() - age_s
    os.utime(path, (then, then))
    return path


def _elsewhere(pid: int = 1) -> Owner:
    return dataclasses.replace(Owner.current("other-node"), host="another-node.cluster", pid=pid)


def _dead_pid() -> int:
    done = subprocess.run(["true"], check=True)
    assert done.returncode == 0
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_a_claim_has_one_holder_until_released(tmp_path):
    a, b = Claims(tmp_path, owner=Owner.current("a")), Claims(tmp_path, owner=Owner.current("b"))
    assert a.acquire("slide 1/x") and a.holds("slide 1/x")
    assert not b.acquire("slide 1/x") and b.state("slide 1/x") == "live"
    holder = b.holder("slide 1/x")
    assert holder is not None and (holder.worker, holder.pid, holder.host) == ("a", os.getpid(), a.owner.host)
    assert a.acquire("slide 1/x")  # holding it already
    a.release("slide 1/x")
    assert b.state("slide 1/x") == "free" and b.acquire("slide 1/x")
    assert [p.name for p in tmp_path.iterdir()] == [b.path("slide 1/x").name]  # no temporary files left
    b.close()
    assert not list(tmp_path.iterdir())


def test_a_heartbeat_keeps_a_claim_alive_past_the_expiry(tmp_path):
    with Claims(tmp_path, expiry_s=0.5, heartbeat_s=0.05, owner=Owner.current("a")) as a:
        assert a.acquire("s")
        time.sleep(1.2)
        b = Claims(tmp_path, expiry_s=0.5, owner=Owner.current("b"))
        assert b.state("s") == "live" and not b.acquire("s")
        assert a.holds("s")
    assert not a.path("s").exists()  # closing released it
    assert b.acquire("s")


def test_an_expired_claim_is_taken_over_and_a_fresh_one_is_not(tmp_path):
    _plant(tmp_path, "fresh", _elsewhere(), age_s=5)
    _plant(tmp_path, "old", _elsewhere(), age_s=20)
    b = Claims(tmp_path, expiry_s=10, owner=Owner.current("b"))
    assert b.state("fresh") == "live" and not b.acquire("fresh")
    assert b.state("old") == "stale" and b.acquire("old")
    holder = b.holder("old")
    assert holder is not None and holder.worker == "b"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([b.path("fresh").name, b.path("old").name])


@pytest.mark.parametrize("contenders", [2, 8])
def test_an_expired_claim_is_taken_over_exactly_once_by_contenders(tmp_path, contenders):
    for attempt in range(25):
        name = f"slide-{attempt}"
        _plant(tmp_path, name, _elsewhere(), age_s=60)
        workers = [Claims(tmp_path, expiry_s=10, owner=Owner.current(f"w{i}")) for i in range(contenders)]
        start = threading.Barrier(contenders)
        won: list[str] = []

        def contend(claims: Claims, name: str = name, start: threading.Barrier = start, won: list = won) -> None:
            start.wait()
            if claims.acquire(name):
                won.append(claims.owner.worker)

        threads = [threading.Thread(target=contend, args=(w,)) for w in workers]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(won) == 1, (attempt, won)
        holder = workers[0].holder(name)
        assert holder is not None and holder.worker == won[0]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no renamed-away or temporary files


def test_a_claim_renewed_after_it_was_judged_stale_is_left_to_its_new_owner(tmp_path):
    path = _plant(tmp_path, "s", _elsewhere(), age_s=60)
    seen = os.stat(path)  # worker b judges the claim stale here, then is delayed...
    b = Claims(tmp_path, expiry_s=10, owner=Owner.current("b"))
    c = Claims(tmp_path, expiry_s=10, owner=Owner.current("c"))
    assert c.acquire("s")  # ...while c takes it over
    assert not b._break(path, seen)  # b then finds another incarnation there: it leaves it
    assert c.holds("s") and not b.acquire("s")
    holder = b.holder("s")
    assert holder is not None and holder.worker == "c"


def test_a_dead_owner_on_this_machine_is_taken_over_at_once(tmp_path):
    me = Owner.current("me")
    _plant(tmp_path, "dead", dataclasses.replace(me, worker="killed", pid=_dead_pid()))
    _plant(tmp_path, "reused", dataclasses.replace(me, worker="old", pid_start=(me.pid_start or 0) + 1))
    _plant(tmp_path, "alive", dataclasses.replace(me, worker="sibling"))  # this very process: alive
    _plant(tmp_path, "remote", dataclasses.replace(_elsewhere(pid=_dead_pid())))  # pid means nothing here
    b = Claims(tmp_path, expiry_s=600, owner=Owner.current("b"))
    assert b.acquire("dead")
    if me.pid_start is not None:  # where /proc tells a reused pid
        assert b.acquire("reused")
    assert not b.acquire("alive") and not b.acquire("remote")


def test_a_zombie_owner_is_dead(tmp_path):
    proc = subprocess.Popen(["true"])
    deadline = time.time() + 10
    while Path(f"/proc/{proc.pid}").exists() and time.time() < deadline:
        if Path(f"/proc/{proc.pid}/stat").read_text().split(")")[-1].split()[0] == "Z":
            break
        time.sleep(0.01)
    try:
        zombie = dataclasses.replace(Owner.current("z"), pid=proc.pid)
        if not Path("/proc/self/stat").exists():
            pytest.skip("no /proc here")
        stat = Path(f"/proc/{proc.pid}/stat").read_text()
        zombie = dataclasses.replace(zombie, pid_start=int(stat[stat.rindex(")") + 2 :].split()[19]))
        assert zombie.is_gone()  # not yet reaped: os.kill(pid, 0) still succeeds
    finally:
        proc.wait()


def test_release_leaves_a_claim_taken_over_by_another_worker(tmp_path, caplog):
    a = Claims(tmp_path, expiry_s=1, owner=dataclasses.replace(_elsewhere(), worker="a"))
    assert a.acquire("s")
    then = time.time() - 10
    os.utime(a.path("s"), (then, then))  # a fell silent
    b = Claims(tmp_path, expiry_s=1, owner=Owner.current("b"))
    assert b.acquire("s")
    assert not a.holds("s")
    with caplog.at_level("WARNING", logger="loupe"):
        a.touch()
    assert "taken over" in caplog.text
    a.release("s")
    assert b.holds("s") and b.path("s").exists()


def test_clear_stale_deletes_only_the_claims_of_dead_workers(tmp_path):
    me = Owner.current("me")
    _plant(tmp_path, "dead", dataclasses.replace(me, worker="killed", pid=_dead_pid()))  # killed before releasing
    _plant(tmp_path, "live", dataclasses.replace(me, worker="other"))  # this process: alive
    _plant(tmp_path, "remote", _elsewhere(), age_s=5.0)  # another machine, heartbeat fresh
    claims = Claims(tmp_path, expiry_s=60.0, owner=me)
    assert claims.clear_stale(["dead", "live", "remote", "never-claimed"]) == 1
    assert claims.state("dead") == "free"
    assert claims.state("live") == "live" and claims.state("remote") == "live"
