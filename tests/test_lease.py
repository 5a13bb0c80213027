"""The lease: exactly one holder under races, stale takeover by exactly one process, heartbeat, expiry, loss."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from annotator.lease import BOOT_ID, HOST, Holder, Lease, LeaseHeld, LeaseLost, lease_state

ROUNDS = 50


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def write_holder(path: Path, **fields) -> Holder:
    holder = Holder(
        **{
            "token": os.urandom(8).hex(),
            "host": HOST,
            "pid": os.getpid(),
            "since": time.time(),
            "expires": time.time() + 60,
            "boot_id": BOOT_ID,
            **fields,
        }
    )
    path.write_bytes(holder.encode())
    return holder


def _racer(path: str, seed: int, barrier, results) -> None:
    """One of two processes: each round, wait for the start, try to take the lease, report, let go."""
    rng = random.Random(seed)
    link = os.link

    def jittered_link(source, target):  # widen the windows between read, claim and check
        time.sleep(rng.uniform(0, 0.01))
        return link(source, target)

    os.link = jittered_link
    for _ in range(ROUNDS):
        try:
            barrier.wait()
        except threading.BrokenBarrierError:
            return
        lease = Lease(path)
        try:
            lease.acquire()
            won = True
        except LeaseHeld:
            won = False
        results.put((seed, won))
        try:
            barrier.wait()  # everyone has tried: only now may the winner let go
            if won:
                lease.release()
            barrier.wait()
        except threading.BrokenBarrierError:
            return


@pytest.mark.slow
def test_two_processes_racing_for_the_lease_exactly_one_wins_every_round(tmp_path):
    """Rounds alternate a free lease, a stale one from a dead process, and a dead claimer's stale chain."""
    path = tmp_path / "lock"
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(3), context.Queue()
    racers = [context.Process(target=_racer, args=(str(path), seed, barrier, results)) for seed in (1, 2)]
    for racer in racers:
        racer.start()
    gone = dead_pid()
    kinds = []
    try:
        for round_ in range(ROUNDS):
            kind = ("free", "dead holder", "dead claimer")[round_ % 3]
            if kind != "free":
                stale = write_holder(path, pid=gone)
                if kind == "dead claimer":  # it claimed the stale lease, then died before installing itself
                    write_holder(path.with_name(f"lock.{stale.token}.next"), pid=gone)
            kinds.append(kind)
            barrier.wait(timeout=60)
            outcome = [results.get(timeout=60) for _ in racers]
            assert sum(won for _, won in outcome) == 1, (round_, kind, outcome)
            barrier.wait(timeout=60)
            barrier.wait(timeout=60)
            assert not path.exists(), "the winner released the lease"
            assert not list(tmp_path.glob("lock.*.next")), "no claim is left behind"
    finally:
        barrier.abort()  # a failed round must not leave the racers waiting
        for racer in racers:
            racer.join(timeout=60)
            if racer.is_alive():
                racer.kill()
    assert [racer.exitcode for racer in racers] == [0, 0]


def test_a_live_lease_refuses_a_second_holder_and_says_who_holds_it(tmp_path):
    path = tmp_path / "lock"
    with Lease(path):
        with pytest.raises(LeaseHeld) as refused:
            Lease(path).acquire()
        assert f"held by pid {os.getpid()} on {HOST} until" in str(refused.value)
        state = lease_state(path)
        assert state["live"] and state["pid"] == os.getpid()
    assert not path.exists() and lease_state(path) is None


def test_the_file_is_whole_from_the_instant_it_exists(tmp_path):
    path = tmp_path / "lock"
    lease = Lease(path, purpose="coordinator").acquire()
    raw = json.loads(path.read_text())
    assert {"token", "host", "pid", "since", "expires", "boot_id", "pid_start", "purpose"} <= set(raw)
    assert raw["token"] == lease.holder.token and raw["purpose"] == "coordinator"
    lease.release()


def test_a_lease_on_another_host_is_taken_only_after_it_expires(tmp_path):
    path = tmp_path / "lock"
    write_holder(path, host="gone-host", pid=12345, expires=time.time() + 30)
    with pytest.raises(LeaseHeld) as refused:
        Lease(path).acquire()
    assert "pid 12345 on gone-host until" in str(refused.value) and "expires by itself" in str(refused.value)
    write_holder(path, host="gone-host", pid=12345, expires=time.time() - 1)
    assert "expired at" in lease_state(path)["describe"] and not lease_state(path)["live"]
    lease = Lease(path).acquire()
    assert json.loads(path.read_text())["pid"] == os.getpid()
    lease.release()


def test_on_this_host_a_dead_pid_frees_the_lease_at_once_even_before_expiry(tmp_path):
    path = tmp_path / "lock"
    write_holder(path, pid=dead_pid(), expires=time.time() + 3600)
    assert lease_state(path)["describe"].startswith("stale:")
    Lease(path).acquire().release()


def test_a_reused_pid_or_a_rebooted_host_does_not_keep_a_lease(tmp_path):
    path = tmp_path / "lock"
    write_holder(path, pid=os.getpid(), pid_start=1)  # our pid, but another process's start time
    Lease(path).acquire().release()
    write_holder(path, pid=os.getpid(), boot_id="another-boot")
    Lease(path).acquire().release()


def test_a_damaged_lease_file_is_taken_over_once_its_grace_is_over(tmp_path):
    path = tmp_path / "lock"
    path.write_text("")
    with pytest.raises(LeaseHeld):
        Lease(path).acquire()
    old = time.time() - 60
    os.utime(path, (old, old))
    Lease(path).acquire().release()


def test_the_heartbeat_renews_and_a_taken_lease_is_noticed(tmp_path):
    path = tmp_path / "lock"
    lease = Lease(path, ttl_s=0.4)
    lease.acquire()
    lease.start_heartbeat()
    first = json.loads(path.read_text())["expires"]
    deadline = time.monotonic() + 30  # a renewal every 0.1 s; a loaded machine may run the thread late
    while json.loads(path.read_text())["expires"] <= first:
        assert time.monotonic() < deadline, "the heartbeat never pushed the expiry forward"
        time.sleep(0.05)
    lease.check()
    with lease._lock:  # not in the middle of a renewal, which would write over it: a taker never writes so
        write_holder(path, host="other-host", pid=1)  # someone else's lease now stands there
    time.sleep(0.3)  # past half the ttl: the heartbeat has noticed, or `check` renews (and notices) itself
    with pytest.raises(LeaseLost, match="lost the lease"):
        lease.check()
    lease.release()
    assert json.loads(path.read_text())["host"] == "other-host", "release never removes someone else's lease"


def test_a_claim_on_our_lease_means_it_is_lost(tmp_path):
    path = tmp_path / "lock"
    lease = Lease(path).acquire()
    write_holder(path.with_name(f"lock.{lease.holder.token}.next"), host="other-host")
    with pytest.raises(LeaseLost):
        lease.renew()
    lease.release()
    assert path.exists(), "the successor installs itself; we leave the file alone"
